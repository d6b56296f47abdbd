//! Crash consistency: a child process writes in a loop and is SIGKILLed at a random moment;
//! the parent reopens the store and checks that nothing the child acknowledged was lost.
//! For the desired-state journal, `current` must be one whole document and `previous` the
//! one before it; for the telemetry outbox, every record the child's appenders were given a
//! sequence number for must be there, intact, and sequence numbers never repeat.
//!
//! The child is this test binary again, running only an ignored helper (`crash_child`,
//! `outbox_child`).

use std::collections::BTreeMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Mutex, PoisonError, mpsc};
use std::time::Duration;

use perch_store::{OutboxRecord, SledOptions, SledStore, Store};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const CHILD_DIR_ENV: &str = "PERCH_STORE_CRASH_CHILD_DIR";
const OUTBOX_CHILD_DIR_ENV: &str = "PERCH_STORE_OUTBOX_CHILD_DIR";
const OUTBOX_CHILD_ROUND_ENV: &str = "PERCH_STORE_OUTBOX_CHILD_ROUND";
/// Appender threads in the outbox child, so kills land in shared commits.
const OUTBOX_APPENDERS: u64 = 4;

/// Held by each test that spawns children. Between fork and exec a child holds copies of
/// all the parent's descriptors, among them the one carrying another test's store lock
/// (sled `flock`s `db`), so that test's next child could find its store still locked.
static SPAWNING: Mutex<()> = Mutex::new(());
const ROUNDS: u64 = 10;

/// Document `seq`: JSON with its sequence number and padding derived from it, so a torn or
/// mixed-up document cannot pass [`parse_doc`]. Every 7th is 200 KiB, which sled writes to a
/// file under `blobs/` instead of its log.
fn doc(seq: u64) -> Vec<u8> {
    let pad_len = if seq % 7 == 3 {
        200 * 1024
    } else {
        (seq % 13) as usize * 97
    };
    let pad: String = (0..pad_len)
        .map(|i| char::from(b'a' + ((seq as usize).wrapping_mul(31).wrapping_add(i) % 26) as u8))
        .collect();
    format!("{{\"seq\":{seq},\"pad\":\"{pad}\"}}").into_bytes()
}

/// The sequence number of a document made by [`doc`], if it is exactly such a document.
fn parse_doc(bytes: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(bytes).ok()?;
    let seq = text
        .strip_prefix("{\"seq\":")?
        .split(',')
        .next()?
        .parse()
        .ok()?;
    (doc(seq) == bytes).then_some(seq)
}

fn open(dir: &Path) -> Result<SledStore, perch_store::StoreError> {
    SledStore::open(dir, &SledOptions::default())
}

/// The outbox rounds' records carry made-up timestamps: no age bound.
fn open_outbox(dir: &Path) -> Result<SledStore, perch_store::StoreError> {
    SledStore::open(
        dir,
        &SledOptions {
            outbox_max_age: None,
            ..SledOptions::default()
        },
    )
}

#[test]
#[ignore = "helper process for `killed_mid_commit_leaves_a_whole_journal`"]
fn crash_child() -> TestResult {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        return Ok(());
    };
    let store = open(Path::new(&dir))?;
    let current = store.journal()?.current?;
    let mut seq = match current {
        Some(entry) => parse_doc(&entry.doc).ok_or("current document is not one of ours")?,
        None => 0,
    };
    let mut out = std::io::stdout().lock();
    loop {
        seq += 1;
        store.commit_desired(&doc(seq))?;
        writeln!(out, "acked {seq}")?;
        out.flush()?;
    }
}

/// A small xorshift generator seeded from the OS, for kill delays.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        Self(RandomState::new().build_hasher().finish() | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn killed_mid_commit_leaves_a_whole_journal() -> TestResult {
    let _alone = SPAWNING.lock().unwrap_or_else(PoisonError::into_inner);
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe()?;
    let mut rng = Rng::new();
    let mut seen = 0u64; // the current sequence number after the last round
    let mut waited = 0u64; // rounds that waited for at least one acknowledged commit

    for round in 0..ROUNDS {
        let mut child = Command::new(&exe)
            .args([
                "crash_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR_ENV, dir.path())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("child has no stdout")?;
        let (acks, acked) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // The first one shares its line with the harness's `test crash_child ... `.
                if let Some(seq) = line
                    .find("acked ")
                    .and_then(|at| line[at + "acked ".len()..].parse::<u64>().ok())
                {
                    let _ = acks.send(seq);
                }
            }
        });

        // Most rounds kill mid-commit; every third one may also hit open and recovery.
        let mut first_ack = 0;
        if round % 3 != 2 {
            first_ack = acked.recv_timeout(Duration::from_secs(60))?;
            waited += 1;
        }
        std::thread::sleep(Duration::from_millis(rng.below(120)));
        if let Some(status) = child.try_wait()? {
            return Err(format!("round {round}: the child exited by itself: {status}").into());
        }
        child.kill()?; // SIGKILL
        child.wait()?;
        reader.join().map_err(|_| "reader thread panicked")?;
        let max_acked = acked.try_iter().fold(first_ack.max(seen), u64::max);

        let store = open(dir.path())?;
        let journal = store.journal()?;
        let current = journal
            .current
            .map_err(|e| format!("round {round}: {e}"))?
            .ok_or_else(|| format!("round {round}: no current document"))?;
        let seq = parse_doc(&current.doc)
            .ok_or_else(|| format!("round {round}: current is not a whole document"))?;
        assert!(
            (max_acked..=max_acked + 1).contains(&seq),
            "round {round}: current is {seq}, acknowledged up to {max_acked}"
        );
        assert_eq!(
            current.generation, seq,
            "round {round}: one commit per document"
        );
        let previous = journal
            .previous
            .map_err(|e| format!("round {round}: {e}"))?;
        if seq > 1 {
            let previous =
                previous.ok_or_else(|| format!("round {round}: no previous document"))?;
            assert_eq!(
                parse_doc(&previous.doc),
                Some(seq - 1),
                "round {round}: previous document"
            );
            assert_eq!(
                previous.generation,
                seq - 1,
                "round {round}: previous generation"
            );
        } else {
            assert!(
                previous.is_none(),
                "round {round}: a previous document before the second commit"
            );
        }
        println!("round {round}: acknowledged {max_acked}, current {seq}");
        seen = seq;
    }
    assert!(
        seen >= waited,
        "the child committed {seen} documents in {waited} rounds that saw a commit"
    );
    Ok(())
}

#[test]
fn documents_are_self_checking() {
    for seq in [1, 3, 10, 12] {
        assert_eq!(parse_doc(&doc(seq)), Some(seq));
    }
    assert!(doc(3).len() > 200 * 1024);
    let mut torn = doc(10);
    torn.truncate(torn.len() - 1);
    assert_eq!(parse_doc(&torn), None);
    let mut mixed = doc(12);
    let at = mixed.len() - 5;
    mixed[at] = b'!';
    assert_eq!(parse_doc(&mixed), None);
}

/// Record `n` of appender `thread` in `round`: everything about it derives from those three,
/// so a torn, mixed-up or misplaced record cannot pass for the acknowledged one. Every 97th
/// payload is 8 KiB (a sled leaf of such records is over sled's blob threshold).
fn outbox_record(round: u64, thread: u64, n: u64) -> OutboxRecord {
    let len = if n % 97 == 5 {
        8 * 1024
    } else {
        40 + (n % 17) as usize * 13
    };
    let seed = round.wrapping_mul(1_000_003) ^ thread.wrapping_mul(7919) ^ n;
    OutboxRecord {
        component: format!("appender-{thread}"),
        stream: format!("round-{round}"),
        timestamp_ms: 1_700_000_000_000 + round * 1_000_000 + n,
        payload: (0..len)
            .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64) % 251) as u8)
            .collect(),
    }
}

#[test]
#[ignore = "helper process for `killed_mid_append_keeps_every_acknowledged_outbox_record`"]
fn outbox_child() -> TestResult {
    let Some(dir) = std::env::var_os(OUTBOX_CHILD_DIR_ENV) else {
        return Ok(());
    };
    let round: u64 = std::env::var(OUTBOX_CHILD_ROUND_ENV)?.parse()?;
    let store = std::sync::Arc::new(open_outbox(Path::new(&dir))?);
    let appenders: Vec<_> = (0..OUTBOX_APPENDERS)
        .map(|thread| {
            let store = std::sync::Arc::clone(&store);
            std::thread::spawn(move || -> Result<(), String> {
                for n in 0.. {
                    let seq = store
                        .outbox_append(&outbox_record(round, thread, n))
                        .map_err(|e| e.to_string())?;
                    // One write per line: lines from different threads never interleave.
                    let line = format!("acked {seq} {thread} {n} ok\n");
                    std::io::stdout()
                        .lock()
                        .write_all(line.as_bytes())
                        .map_err(|e| e.to_string())?;
                }
                Ok(())
            })
        })
        .collect();
    for appender in appenders {
        appender.join().map_err(|_| "appender panicked")??;
    }
    Ok(())
}

/// Parses `acked <seq> <thread> <n> ok`; the first one shares its line with the test
/// harness's `test outbox_child ... `.
fn parse_ack(line: &str) -> Option<(u64, (u64, u64))> {
    let at = line.find("acked ")?;
    let mut words = line[at + "acked ".len()..].strip_suffix(" ok")?.split(' ');
    let mut next = || words.next()?.parse::<u64>().ok();
    Some((next()?, (next()?, next()?)))
}

#[test]
fn killed_mid_append_keeps_every_acknowledged_outbox_record() -> TestResult {
    let _alone = SPAWNING.lock().unwrap_or_else(PoisonError::into_inner);
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe()?;
    let mut rng = Rng::new();
    // Every sequence number a child was given, over all rounds: (round, thread, n).
    let mut acked: BTreeMap<u64, (u64, u64, u64)> = BTreeMap::new();
    let mut drained = 0; // what the parent acknowledged (removed) itself

    for round in 0..ROUNDS {
        let mut child = Command::new(&exe)
            .args([
                "outbox_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(OUTBOX_CHILD_DIR_ENV, dir.path())
            .env(OUTBOX_CHILD_ROUND_ENV, round.to_string())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("child has no stdout")?;
        let (acks, received) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(ack) = parse_ack(&line) {
                    let _ = acks.send(ack);
                }
            }
        });

        // Most rounds kill mid-append; every third one may also hit open and recovery.
        let mut first = Vec::new();
        if round % 3 != 2 {
            first.push(received.recv_timeout(Duration::from_secs(60))?);
        }
        std::thread::sleep(Duration::from_millis(rng.below(150)));
        if let Some(status) = child.try_wait()? {
            return Err(format!("round {round}: the child exited by itself: {status}").into());
        }
        child.kill()?; // SIGKILL
        child.wait()?;
        reader.join().map_err(|_| "reader thread panicked")?;
        let this_round: Vec<_> = first.into_iter().chain(received.try_iter()).collect();
        for &(seq, (thread, n)) in &this_round {
            if let Some(earlier) = acked.insert(seq, (round, thread, n)) {
                return Err(format!(
                    "round {round}: sequence number {seq} handed out again (first to {earlier:?})"
                )
                .into());
            }
        }

        let store = open_outbox(dir.path())?;
        let stored: BTreeMap<u64, OutboxRecord> = store
            .outbox_read(drained, usize::MAX)?
            .into_iter()
            .collect();
        for (&seq, &(r, thread, n)) in acked.range(drained + 1..) {
            let record = stored.get(&seq).ok_or_else(|| {
                format!("round {round}: acknowledged record {seq} ({r}, {thread}, {n}) is missing")
            })?;
            assert!(
                *record == outbox_record(r, thread, n),
                "round {round}: record {seq} is not the one acknowledged ({r}, {thread}, {n})"
            );
        }
        let stats = store.outbox_stats()?;
        assert!(
            stats.last_seq >= acked.keys().next_back().copied().unwrap_or(0),
            "round {round}: {stats:?}"
        );
        println!(
            "round {round}: {} acknowledged, {} stored, last seq {}",
            this_round.len(),
            stored.len(),
            stats.last_seq
        );
        // Drain now and then, as the broker would: sequence numbers must go on regardless.
        if round % 2 == 1 {
            drained = stats.last_seq;
            store.outbox_ack(drained)?;
        }
    }
    let stats = open_outbox(dir.path())?.outbox_stats()?;
    assert_eq!(stats.dropped, 0);
    assert!(
        acked.len() as u64 >= ROUNDS - ROUNDS / 3,
        "only {} acknowledged records in {ROUNDS} rounds",
        acked.len()
    );
    Ok(())
}

#[test]
fn outbox_acks_parse_only_whole_lines() {
    assert_eq!(parse_ack("acked 12 3 45 ok"), Some((12, (3, 45))));
    assert_eq!(
        parse_ack("test outbox_child ... acked 1 0 0 ok"),
        Some((1, (0, 0)))
    );
    assert_eq!(parse_ack("acked 12 3 4"), None);
    assert_eq!(parse_ack("running 1 test"), None);
}
