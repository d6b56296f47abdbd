//! The telemetry outbox as a durable queue: group commit, sequence numbers, draining and
//! bounds, on real sled databases in temp dirs. Power cuts are in `crash.rs`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Barrier, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use perch_store::{
    OutboxReceipt, OutboxRecord, OutboxStats, SledOptions, SledStore, Store, StoreError,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn open(dir: &Path) -> Result<SledStore, StoreError> {
    SledStore::open(dir, &SledOptions::default())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// When this test process started: recent enough for the default age bound, and the same
/// every time a record is made again for comparison.
static START_MS: LazyLock<u64> = LazyLock::new(now_ms);

/// Record `n` of `component`: a 100-byte payload derived from `n`, so a record read back
/// under the wrong sequence number or torn cannot pass for the right one.
fn record(component: &str, n: u64) -> OutboxRecord {
    OutboxRecord {
        component: component.into(),
        stream: "climate".into(),
        timestamp_ms: *START_MS + n,
        payload: (0..100u64)
            .map(|i| (n.wrapping_mul(131).wrapping_add(i) % 251) as u8)
            .collect(),
    }
}

/// A record of exactly `len` encoded bytes (12 bytes of framing plus names plus payload).
fn sized(n: u64, len: usize, timestamp_ms: u64) -> OutboxRecord {
    OutboxRecord {
        component: "c".into(),
        stream: "s".into(),
        timestamp_ms,
        payload: vec![n as u8; len - 14],
    }
}

/// `threads` threads append `per_thread` records each, all starting together. Returns
/// every acknowledged sequence number with its record.
fn append_concurrently(
    store: &Arc<SledStore>,
    threads: u64,
    per_thread: u64,
) -> Result<BTreeMap<u64, OutboxRecord>, Box<dyn std::error::Error>> {
    let start = Arc::new(Barrier::new(threads as usize));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let store = Arc::clone(store);
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                start.wait();
                (0..per_thread)
                    .map(|n| {
                        let r = record(&format!("component-{t}"), n);
                        store.outbox_append(&r).map(|seq| (seq, r))
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
        })
        .collect();
    let mut acked = BTreeMap::new();
    for handle in handles {
        for (seq, r) in handle.join().map_err(|_| "appender panicked")?? {
            if let Some(other) = acked.insert(seq, r) {
                return Err(format!("sequence number {seq} handed out twice ({other:?})").into());
            }
        }
    }
    Ok(acked)
}

#[test]
fn concurrent_appends_get_unique_gap_free_seqs_that_survive_reopen() -> TestResult {
    let dir = tempfile::tempdir()?;
    let acked = {
        let store = Arc::new(open(dir.path())?);
        append_concurrently(&store, 8, 250)?
    };
    assert_eq!(
        acked.keys().copied().collect::<Vec<_>>(),
        (1..=2000).collect::<Vec<_>>(),
        "unique and gap-free"
    );
    // Each appender's records got increasing sequence numbers, in the order it appended.
    for t in 0..8 {
        let name = format!("component-{t}");
        let payloads: Vec<_> = acked
            .values()
            .filter(|r| r.component == name)
            .map(|r| r.payload.clone())
            .collect();
        let expected: Vec<_> = (0..250).map(|n| record(&name, n).payload).collect();
        assert_eq!(payloads, expected, "{name}");
    }

    let store = open(dir.path())?;
    let read = store.outbox_read(0, usize::MAX)?;
    assert_eq!(read, acked.into_iter().collect::<Vec<_>>());
    assert_eq!(store.outbox_len()?, 2000);
    Ok(())
}

#[test]
fn concurrent_appenders_share_commits() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Arc::new(open(dir.path())?);
    let before = store.outbox_stats()?.commits;
    let acked = append_concurrently(&store, 8, 500)?;
    assert_eq!(acked.len(), 4000);
    let commits = store.outbox_stats()?.commits - before;
    println!("8 x 500 appends: {commits} commits");
    assert!(
        commits <= 4000 / 2,
        "{commits} commits (one fdatasync each) for 4000 records from 8 threads"
    );

    // One appender alone commits once per record.
    let before = store.outbox_stats()?.commits;
    for n in 0..10 {
        store.outbox_append(&record("alone", n))?;
    }
    assert_eq!(store.outbox_stats()?.commits - before, 10);
    Ok(())
}

#[test]
fn read_returns_durable_records_after_a_seq_and_ack_removes_through() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path())?;
    assert_eq!(store.outbox_read(0, 10)?, vec![]);
    assert_eq!(store.outbox_ack(5)?, 0, "nothing to acknowledge");
    for n in 1..=10 {
        assert_eq!(store.outbox_append(&record("c", n))?, n);
    }
    let seqs = |v: Vec<(u64, OutboxRecord)>| v.into_iter().map(|(s, _)| s).collect::<Vec<_>>();

    assert_eq!(seqs(store.outbox_read(0, 3)?), vec![1, 2, 3]);
    assert_eq!(seqs(store.outbox_read(3, 3)?), vec![4, 5, 6]);
    assert_eq!(seqs(store.outbox_read(8, 100)?), vec![9, 10]);
    assert_eq!(store.outbox_read(10, 100)?, vec![]);
    assert_eq!(store.outbox_read(u64::MAX, 100)?, vec![]);
    assert_eq!(store.outbox_read(0, 0)?, vec![]);
    let read = store.outbox_read(4, 1)?;
    assert_eq!(read, vec![(5, record("c", 5))]);

    assert_eq!(store.outbox_ack(4)?, 4);
    assert_eq!(
        store.outbox_ack(4)?,
        0,
        "acknowledging again removes nothing"
    );
    assert_eq!(store.outbox_ack(2)?, 0);
    assert_eq!(seqs(store.outbox_read(0, 3)?), vec![5, 6, 7]);
    assert_eq!(store.outbox_len()?, 6);
    assert_eq!(
        seqs(store.outbox_recent(2)?),
        vec![9, 10],
        "recent still works"
    );

    // Acknowledging past the end removes what is there and nothing appended later.
    assert_eq!(store.outbox_ack(1_000)?, 6);
    assert_eq!(store.outbox_len()?, 0);
    assert_eq!(store.outbox_append(&record("c", 11))?, 11);
    assert_eq!(seqs(store.outbox_read(0, 10)?), vec![11]);

    // A large acknowledgement goes in chunks.
    for n in 12..=10_011 {
        store.outbox_append(&record("c", n))?;
    }
    assert_eq!(store.outbox_ack(10_000)?, 9_990);
    assert_eq!(
        seqs(store.outbox_read(0, 100)?),
        (10_001..=10_011).collect::<Vec<_>>()
    );
    assert_eq!(store.outbox_stats()?.len, 11);
    Ok(())
}

#[test]
fn sequence_numbers_never_repeat_after_the_outbox_was_emptied_and_reopened() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let store = open(dir.path())?;
        for n in 1..=5 {
            assert_eq!(store.outbox_append(&record("c", n))?, n);
        }
        assert_eq!(store.outbox_ack(5)?, 5);
        assert_eq!(store.outbox_len()?, 0);
        assert_eq!(
            store.outbox_append(&record("c", 6))?,
            6,
            "after an empty outbox"
        );
        assert_eq!(store.outbox_ack(6)?, 1);
    }
    let store = open(dir.path())?;
    let stats = store.outbox_stats()?;
    assert_eq!((stats.len, stats.first_seq, stats.last_seq), (0, None, 6));
    assert_eq!(store.outbox_append(&record("c", 7))?, 7, "after reopen");
    assert_eq!(*store.outbox_watch().borrow(), 7);
    Ok(())
}

#[test]
fn the_byte_bound_drops_the_oldest_records_and_counts_them() -> TestResult {
    let dir = tempfile::tempdir()?;
    let options = SledOptions {
        outbox_max_bytes: 10 * 200,
        ..SledOptions::default()
    };
    let now = now_ms();
    {
        let store = SledStore::open(dir.path(), &options)?;
        for n in 1..=10 {
            store.outbox_append(&sized(n, 200, now))?;
        }
        let stats = store.outbox_stats()?;
        assert_eq!((stats.len, stats.bytes, stats.dropped), (10, 2000, 0));

        assert_eq!(store.outbox_append(&sized(11, 200, now))?, 11);
        assert_eq!(store.outbox_append(&sized(12, 200, now))?, 12);
        // A bigger record makes room for itself: two more of the oldest go.
        assert_eq!(store.outbox_append(&sized(13, 350, now))?, 13);
        let stats = store.outbox_stats()?;
        assert_eq!(
            (stats.len, stats.bytes, stats.first_seq, stats.dropped),
            (9, 8 * 200 + 350, Some(5), 4)
        );

        let err = store
            .outbox_append(&sized(14, 2001, now))
            .expect_err("a record larger than the whole outbox");
        assert!(matches!(err, StoreError::Invalid { .. }), "{err}");
        assert!(err.to_string().contains("outbox_max_bytes"), "{err}");
    }

    // The counter, the sizes and the sequence numbers survive a reopen.
    let store = SledStore::open(dir.path(), &options)?;
    let stats = store.outbox_stats()?;
    assert_eq!(
        (
            stats.len,
            stats.bytes,
            stats.first_seq,
            stats.last_seq,
            stats.dropped
        ),
        (9, 1950, Some(5), 13, 4),
        "the refused record got no sequence number: {stats:?}"
    );
    assert_eq!(store.outbox_append(&sized(15, 200, now))?, 14);
    let read = store.outbox_read(0, 100)?;
    assert_eq!(read.first().map(|(s, _)| *s), Some(6));
    assert_eq!(read.last(), Some(&(14, sized(15, 200, now))));
    assert_eq!(store.outbox_stats()?.dropped, 5);
    Ok(())
}

#[test]
fn the_byte_bound_holds_under_concurrent_appends_and_keeps_the_newest() -> TestResult {
    let dir = tempfile::tempdir()?;
    let options = SledOptions {
        outbox_max_bytes: 10_000,
        ..SledOptions::default()
    };
    let store = Arc::new(SledStore::open(dir.path(), &options)?);
    let acked = append_concurrently(&store, 8, 100)?;
    assert_eq!(acked.len(), 800);
    // Records still being synced are never dropped, so a commit may leave the outbox over
    // its bound by what was in flight; the next one brings it back.
    store.outbox_append(&record("last", 0))?;
    let stats = store.outbox_stats()?;
    assert!(stats.bytes <= 10_000, "{stats:?}");
    assert_eq!(stats.len + stats.dropped, 801, "{stats:?}");
    let kept: Vec<u64> = store
        .outbox_read(0, usize::MAX)?
        .into_iter()
        .map(|(seq, _)| seq)
        .collect();
    assert_eq!(
        kept,
        (802 - stats.len..=801).collect::<Vec<_>>(),
        "the newest records are kept"
    );
    Ok(())
}

#[test]
fn records_past_the_age_bound_are_dropped_at_the_next_commit() -> TestResult {
    let dir = tempfile::tempdir()?;
    let day = 24 * 60 * 60 * 1000;
    let now = now_ms();
    let store = SledStore::open(
        dir.path(),
        &SledOptions {
            outbox_max_age: Some(Duration::from_secs(2 * 24 * 60 * 60)),
            ..SledOptions::default()
        },
    )?;
    store.outbox_append(&sized(1, 100, now - 5 * day))?;
    store.outbox_append(&sized(2, 100, now - 3 * day))?;
    store.outbox_append(&sized(3, 100, now - day))?;
    // Each commit dropped what was already stored and too old when it ran.
    let stats = store.outbox_stats()?;
    assert_eq!(
        (stats.len, stats.first_seq, stats.oldest_ms, stats.dropped),
        (1, Some(3), Some(now - day), 2)
    );
    store.outbox_append(&sized(4, 100, now))?;
    let stats = store.outbox_stats()?;
    assert_eq!((stats.len, stats.first_seq, stats.dropped), (2, Some(3), 2));

    // Without an age bound nothing expires.
    let dir = tempfile::tempdir()?;
    let store = SledStore::open(
        dir.path(),
        &SledOptions {
            outbox_max_age: None,
            ..SledOptions::default()
        },
    )?;
    store.outbox_append(&sized(1, 100, 0))?;
    store.outbox_append(&sized(2, 100, now))?;
    assert_eq!(store.outbox_stats()?.dropped, 0);
    assert_eq!(store.outbox_len()?, 2);
    Ok(())
}

#[test]
fn a_clock_jump_expires_the_backlog_a_batch_per_commit() -> TestResult {
    let dir = tempfile::tempdir()?;
    let no_age = SledOptions {
        outbox_max_age: None,
        ..SledOptions::default()
    };
    let old = now_ms() - 30 * 24 * 60 * 60 * 1000;
    {
        let store = Arc::new(SledStore::open(dir.path(), &no_age)?);
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let store = Arc::clone(&store);
                std::thread::spawn(move || {
                    (0..625).try_for_each(|n| {
                        store.outbox_append(&sized(t * 1000 + n, 50, old)).map(drop)
                    })
                })
            })
            .collect();
        for thread in threads {
            thread.join().map_err(|_| "appender panicked")??;
        }
        assert_eq!(store.outbox_len()?, 5000);
    }
    // Reopened with the default week: everything stored is a month old.
    let store = open(dir.path())?;
    store.outbox_append(&record("c", 1))?;
    assert_eq!(
        store.outbox_stats()?.dropped,
        4096,
        "one batch of expired records"
    );
    store.outbox_append(&record("c", 2))?;
    let stats = store.outbox_stats()?;
    assert_eq!((stats.dropped, stats.len), (5000, 2));
    Ok(())
}

#[test]
fn stats_describe_the_outbox() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path())?;
    let empty = store.outbox_stats()?;
    assert_eq!(
        OutboxStats {
            commits: 0,
            ..empty.clone()
        },
        OutboxStats::default()
    );
    let now = now_ms();
    store.outbox_append(&sized(1, 150, now - 3000))?;
    store.outbox_append(&sized(2, 250, now - 2000))?;
    store.outbox_append(&sized(3, 300, now - 1000))?;
    store.outbox_ack(1)?;
    let stats = store.outbox_stats()?;
    assert_eq!(
        stats,
        OutboxStats {
            len: 2,
            bytes: 550,
            first_seq: Some(2),
            last_seq: 3,
            oldest_ms: Some(now - 2000),
            dropped: 0,
            commits: empty.commits + 3,
        }
    );
    Ok(())
}

#[test]
fn the_watch_follows_the_last_durable_seq() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Arc::new(open(dir.path())?);
    let mut watch = store.outbox_watch();
    assert_eq!(*watch.borrow_and_update(), 0);
    assert!(!watch.has_changed()?);
    store.outbox_append(&record("c", 1))?;
    assert!(watch.has_changed()?);
    assert_eq!(*watch.borrow_and_update(), 1);

    // Another thread sees every commit.
    let waiter = std::thread::spawn(move || {
        while *watch.borrow_and_update() < 3 {
            std::thread::sleep(Duration::from_millis(1));
        }
        *watch.borrow()
    });
    store.outbox_append(&record("c", 2))?;
    store.outbox_append(&record("c", 3))?;
    assert_eq!(waiter.join().map_err(|_| "waiter panicked")?, 3);
    // Acknowledging does not move it.
    store.outbox_ack(3)?;
    assert_eq!(*store.outbox_watch().borrow(), 3);
    Ok(())
}

#[test]
fn a_failed_sync_fails_every_appender_of_the_batch_and_keeps_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Arc::new(open(dir.path())?);
    assert_eq!(store.outbox_append(&record("c", 1))?, 1);

    // The commit syncs `db` by path: with the file moved away the fdatasync fails (sled
    // keeps writing through its open descriptor).
    let db = dir.path().join("db");
    let moved = dir.path().join("db.moved");
    std::fs::rename(&db, &moved)?;
    let start = Arc::new(Barrier::new(8));
    let results: Vec<_> = (0..8)
        .map(|t| {
            let store = Arc::clone(&store);
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                start.wait();
                store.outbox_append(&record("c", 100 + t))
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().map_err(|_| "appender panicked"))
        .collect::<Result<_, _>>()?;
    std::fs::rename(&moved, &db)?;

    for result in results {
        let err = result.expect_err("no record of a failed commit is acknowledged");
        let message = err.to_string();
        assert!(message.contains("fdatasync"), "{message}");
        assert!(message.contains(&db.display().to_string()), "{message}");
    }
    let stats = store.outbox_stats()?;
    assert_eq!((stats.len, stats.bytes), (1, 120));
    assert_eq!(*store.outbox_watch().borrow(), 1);
    assert_eq!(store.outbox_read(0, 100)?, vec![(1, record("c", 1))]);

    // The store goes on; the failed records' sequence numbers are not reused.
    let seq = store.outbox_append(&record("c", 2))?;
    assert_eq!(seq, 10);
    drop(store);
    let store = open(dir.path())?;
    let seqs: Vec<_> = store
        .outbox_read(0, 100)?
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(seqs, vec![1, seq]);
    Ok(())
}

#[test]
fn submitted_records_commit_in_order_and_resolve_without_a_thread_each() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path())?;
    // One thread with 2,000 records in flight: what async tasks awaiting their publishes
    // look like to the outbox.
    let receipts: Vec<_> = (0..2000)
        .map(|n| store.outbox_submit(&record("submitted", n)))
        .collect();
    let seqs = receipts
        .into_iter()
        .map(OutboxReceipt::wait)
        .collect::<Result<Vec<_>, _>>()?;
    assert_eq!(seqs, (1..=2000).collect::<Vec<_>>(), "in submission order");
    let read = store.outbox_read(0, usize::MAX)?;
    let expected: Vec<_> = (0..2000).map(|n| (n + 1, record("submitted", n))).collect();
    assert_eq!(read, expected);

    // A record refused outright resolves to its error at once and takes no sequence number.
    let too_large = sized(0, 64 * 1024 * 1024 + 1, now_ms());
    let err = store
        .outbox_submit(&too_large)
        .wait()
        .expect_err("a record larger than the outbox is refused");
    assert!(err.to_string().contains("outbox_max_bytes"), "{err}");
    assert_eq!(store.outbox_append(&record("submitted", 2000))?, 2001);
    Ok(())
}

#[test]
fn closing_the_store_commits_every_record_already_submitted() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path())?;
    let receipts: Vec<_> = (0..500)
        .map(|n| store.outbox_submit(&record("closing", n)))
        .collect();
    drop(store);
    for (n, receipt) in (1..).zip(receipts) {
        assert_eq!(
            receipt.wait()?,
            n,
            "record {n} acknowledged after the close"
        );
    }
    let store = open(dir.path())?;
    assert_eq!(store.outbox_len()?, 500);
    assert_eq!(
        store.outbox_read(0, usize::MAX)?,
        (0..500)
            .map(|n| (n + 1, record("closing", n)))
            .collect::<Vec<_>>()
    );
    Ok(())
}

#[test]
fn async_tasks_awaiting_their_records_share_commits() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Arc::new(open(dir.path())?);
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    let before = store.outbox_stats()?.commits;
    // 256 tasks on ONE thread, 8 records each: they can only share commits if awaiting a
    // receipt lets the other tasks run.
    let mut acked = runtime.block_on(async {
        let tasks: Vec<_> = (0..256)
            .map(|t| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let mut seqs = Vec::new();
                    for n in 0..8 {
                        seqs.push(
                            store
                                .outbox_submit(&record(&format!("task-{t}"), n))
                                .await?,
                        );
                    }
                    Ok::<_, StoreError>(seqs)
                })
            })
            .collect();
        let mut acked = Vec::new();
        for task in tasks {
            let seqs = task.await??;
            assert!(
                seqs.is_sorted(),
                "one task's records in its order: {seqs:?}"
            );
            acked.extend(seqs);
        }
        Ok::<_, Box<dyn std::error::Error>>(acked)
    })?;
    acked.sort_unstable();
    assert_eq!(acked, (1..=2048).collect::<Vec<_>>());
    let commits = store.outbox_stats()?.commits - before;
    println!("256 tasks x 8 records on one thread: {commits} commits");
    assert!(
        commits <= 2048 / 8,
        "{commits} commits for 2048 records from 256 tasks"
    );
    Ok(())
}
