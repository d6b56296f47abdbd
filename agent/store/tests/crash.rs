//! Crash consistency of the desired-state journal: a child process commits numbered documents
//! in a loop and is SIGKILLed at a random moment; the parent reopens the store and checks
//! that `current` is one whole document, `previous` the one before it, and nothing the child
//! acknowledged was lost.
//!
//! The child is this test binary again, running only the ignored `crash_child` helper.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use perch_store::{SledOptions, SledStore, Store};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const CHILD_DIR_ENV: &str = "PERCH_STORE_CRASH_CHILD_DIR";
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
                if let Some(seq) = line
                    .strip_prefix("acked ")
                    .and_then(|s| s.parse::<u64>().ok())
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
