//! The `Store` API on a real sled database in a temp dir.

use std::path::Path;
use std::sync::Arc;

use perch_core::Digest;
use perch_store::{
    DEFAULT_CACHE_CAPACITY, DEFAULT_FLUSH_EVERY_MS, SledOptions, SledStore, Store, StoreError,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn open(dir: &Path) -> Result<SledStore, StoreError> {
    SledStore::open(dir, &SledOptions::default())
}

/// One side of the journal as (generation, document).
type Side = Option<(u64, Vec<u8>)>;

fn current_and_previous(store: &dyn Store) -> Result<(Side, Side), String> {
    let journal = store.journal().map_err(|e| e.to_string())?;
    let side = |r: Result<Option<perch_store::JournalEntry>, StoreError>| {
        r.map(|e| e.map(|e| (e.generation, e.doc)))
            .map_err(|e| e.to_string())
    };
    Ok((side(journal.current)?, side(journal.previous)?))
}

#[test]
fn default_options_use_a_small_cache() {
    let options = SledOptions::default();
    assert_eq!(options.cache_capacity, DEFAULT_CACHE_CAPACITY);
    assert_eq!(DEFAULT_CACHE_CAPACITY, 4 * 1024 * 1024);
    assert_eq!(options.flush_every_ms, Some(DEFAULT_FLUSH_EVERY_MS));
}

#[test]
fn blobs_round_trip_and_are_verified() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path())?;
    let a = b"component a".to_vec();
    let b = vec![7u8; 300 * 1024];

    let da = store.put_blob(&a, None)?;
    assert_eq!(da, Digest::of(&a));
    let db = store.put_blob(&b, Some(&Digest::of(&b)))?;
    assert!(store.has_blob(&da)? && store.has_blob(&db)?);
    assert_eq!(store.get_blob(&da)?, Some(a.clone()));
    assert_eq!(store.get_blob(&db)?, Some(b.clone()));

    // Idempotent: a second put changes nothing.
    assert_eq!(store.put_blob(&a, Some(&da))?, da);
    let mut expected = vec![(da, a.len() as u64), (db, b.len() as u64)];
    expected.sort();
    assert_eq!(store.blobs()?, expected);

    let missing = Digest::of(b"never stored");
    assert!(!store.has_blob(&missing)?);
    assert_eq!(store.get_blob(&missing)?, None);

    store.remove_blob(&da)?;
    store.remove_blob(&missing)?;
    assert_eq!(store.get_blob(&da)?, None);
    assert_eq!(store.blobs()?, vec![(db, b.len() as u64)]);
    Ok(())
}

#[test]
fn a_blob_with_the_wrong_expected_digest_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path())?;
    let expected = Digest::of(b"what the manifest promised");
    let err = store
        .put_blob(b"what the network delivered", Some(&expected))
        .expect_err("mismatch must be refused");
    let actual = Digest::of(b"what the network delivered");
    assert!(
        matches!(err, StoreError::DigestMismatch { expected: e, actual: a } if e == expected && a == actual)
    );
    let message = err.to_string();
    assert!(
        message.contains(&expected.to_string()) && message.contains(&actual.to_string()),
        "{message}"
    );
    assert!(!store.has_blob(&actual)? && !store.has_blob(&expected)?);
    assert!(store.blobs()?.is_empty());
    Ok(())
}

#[test]
fn artifacts_are_per_engine_and_go_with_their_blob() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path())?;
    let blob = store.put_blob(b"component", None)?;
    let other = store.put_blob(b"other component", None)?;

    store.put_artifact(&blob, "wasmtime-48/x86_64/abc", b"native code v1")?;
    store.put_artifact(&blob, "wasmtime-48/x86_64/def", b"native code v2")?;
    store.put_artifact(&other, "wasmtime-48/x86_64/abc", b"other native code")?;
    assert_eq!(
        store.get_artifact(&blob, "wasmtime-48/x86_64/abc")?,
        Some(b"native code v1".to_vec())
    );
    assert_eq!(
        store.get_artifact(&blob, "wasmtime-48/x86_64/def")?,
        Some(b"native code v2".to_vec())
    );
    assert_eq!(store.get_artifact(&blob, "wasmtime-49/x86_64/abc")?, None);

    // Replacing keeps one artifact per key.
    store.put_artifact(&blob, "wasmtime-48/x86_64/abc", b"native code v1b")?;
    assert_eq!(
        store.get_artifact(&blob, "wasmtime-48/x86_64/abc")?,
        Some(b"native code v1b".to_vec())
    );

    // After an engine change only the current fingerprint's artifacts are worth keeping.
    assert_eq!(store.prune_artifacts("wasmtime-48/x86_64/abc")?, 1);
    assert_eq!(store.get_artifact(&blob, "wasmtime-48/x86_64/def")?, None);
    assert!(
        store
            .get_artifact(&blob, "wasmtime-48/x86_64/abc")?
            .is_some()
    );

    // Removing a blob removes its artifacts, and only its own.
    store.remove_blob(&blob)?;
    assert_eq!(store.get_artifact(&blob, "wasmtime-48/x86_64/abc")?, None);
    assert_eq!(
        store.get_artifact(&other, "wasmtime-48/x86_64/abc")?,
        Some(b"other native code".to_vec())
    );

    let err = store
        .put_artifact(&other, "", b"x")
        .expect_err("empty fingerprint");
    assert!(err.to_string().contains("engine fingerprint"), "{err}");
    Ok(())
}

#[test]
fn journal_keeps_current_and_previous_across_reopen() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let store = open(dir.path())?;
        assert_eq!(current_and_previous(&store)?, (None, None));
        assert_eq!(store.commit_desired(br#"{"revision":1}"#)?, 1);
        assert_eq!(
            current_and_previous(&store)?,
            (Some((1, br#"{"revision":1}"#.to_vec())), None)
        );
        assert_eq!(store.commit_desired(br#"{"revision":2}"#)?, 2);
        assert_eq!(
            current_and_previous(&store)?,
            (
                Some((2, br#"{"revision":2}"#.to_vec())),
                Some((1, br#"{"revision":1}"#.to_vec()))
            )
        );
    }
    let store = open(dir.path())?;
    assert_eq!(
        current_and_previous(&store)?,
        (
            Some((2, br#"{"revision":2}"#.to_vec())),
            Some((1, br#"{"revision":1}"#.to_vec()))
        )
    );
    assert_eq!(
        store.commit_desired(b"")?,
        3,
        "generations continue after reopen"
    );
    assert_eq!(
        current_and_previous(&store)?,
        (
            Some((3, Vec::new())),
            Some((2, br#"{"revision":2}"#.to_vec()))
        )
    );
    Ok(())
}

#[test]
fn large_journal_documents_round_trip() -> TestResult {
    let dir = tempfile::tempdir()?;
    let big = vec![b'x'; 700 * 1024];
    {
        let store = open(dir.path())?;
        store.commit_desired(&big)?;
        store.commit_desired(b"small")?;
    }
    let store = open(dir.path())?;
    assert_eq!(
        current_and_previous(&store)?,
        (Some((2, b"small".to_vec())), Some((1, big)))
    );
    Ok(())
}

#[test]
fn kv_namespaces_are_isolated_and_survive_reopen() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let store = open(dir.path())?;
        store.kv_set("thermostat", "threshold", b"28.5")?;
        store.kv_set("thermostat", "mode", b"auto")?;
        store.kv_set("logger", "threshold", b"debug")?;
        assert_eq!(
            store.kv_get("thermostat", "threshold")?,
            Some(b"28.5".to_vec())
        );
        assert_eq!(
            store.kv_get("logger", "threshold")?,
            Some(b"debug".to_vec())
        );
        assert_eq!(store.kv_get("logger", "mode")?, None);
        assert_eq!(store.kv_get("nobody", "threshold")?, None);
        store.sync()?;
    }
    let store = open(dir.path())?;
    assert_eq!(
        store.kv_keys("thermostat")?,
        vec!["mode".to_string(), "threshold".to_string()]
    );
    assert_eq!(store.kv_keys("logger")?, vec!["threshold".to_string()]);
    assert_eq!(
        store.kv_get("thermostat", "threshold")?,
        Some(b"28.5".to_vec())
    );

    assert!(store.kv_delete("thermostat", "mode")?);
    assert!(!store.kv_delete("thermostat", "mode")?);
    assert!(!store.kv_delete("nobody", "mode")?);
    assert_eq!(store.kv_keys("thermostat")?, vec!["threshold".to_string()]);
    assert_eq!(
        store.kv_get("logger", "threshold")?,
        Some(b"debug".to_vec())
    );

    // Namespaces are not prefixes of each other.
    store.kv_set("a", "b/c", b"1")?;
    assert_eq!(store.kv_keys("a/b")?, Vec::<String>::new());
    assert_eq!(store.kv_get("a/b", "c")?, None);
    Ok(())
}

#[test]
fn kv_drop_removes_one_namespace() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let store = open(dir.path())?;
        store.kv_set("gone", "k1", b"v1")?;
        store.kv_set("gone", "k2", b"v2")?;
        store.kv_set("kept", "k1", b"v1")?;
        store.kv_drop("gone")?;
        store.kv_drop("never-existed")?;
        assert_eq!(store.kv_keys("gone")?, Vec::<String>::new());
        assert_eq!(store.kv_get("gone", "k1")?, None);
        store.sync()?;
    }
    let store = open(dir.path())?;
    assert_eq!(store.kv_get("gone", "k1")?, None);
    assert_eq!(store.kv_get("kept", "k1")?, Some(b"v1".to_vec()));
    // A dropped namespace can be used again from scratch.
    store.kv_set("gone", "k3", b"v3")?;
    assert_eq!(store.kv_keys("gone")?, vec!["k3".to_string()]);
    Ok(())
}

#[test]
fn kv_refuses_an_empty_namespace() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path())?;
    let err = store.kv_set("", "k", b"v").expect_err("empty namespace");
    assert!(
        matches!(
            err,
            StoreError::Invalid {
                what: "kv namespace",
                ..
            }
        ),
        "{err}"
    );
    assert!(store.kv_get("", "k").is_err());
    assert!(store.kv_drop("").is_err());
    Ok(())
}

#[test]
fn opening_something_that_is_not_a_store_names_the_path() -> TestResult {
    let dir = tempfile::tempdir()?;

    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"hello")?;
    let err = open(&file).expect_err("a file is not a store");
    assert!(matches!(err, StoreError::NotAStore { .. }), "{err}");
    assert!(
        err.to_string().contains(&file.display().to_string()),
        "{err}"
    );

    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign)?;
    std::fs::write(foreign.join("notes.txt"), b"not sled")?;
    let err = open(&foreign).expect_err("a directory of other files is not a store");
    assert!(matches!(err, StoreError::NotAStore { .. }), "{err}");
    assert!(
        err.to_string().contains(&foreign.display().to_string()),
        "{err}"
    );
    assert!(
        !foreign.join("db").exists(),
        "nothing was created in a foreign directory"
    );

    let garbled = dir.path().join("garbled");
    std::fs::create_dir(&garbled)?;
    std::fs::write(garbled.join("conf"), b"this is not sled's config")?;
    std::fs::write(garbled.join("db"), vec![0xEE; 4096])?;
    let err = open(&garbled).expect_err("garbage is not a store");
    assert!(
        err.to_string().contains(&garbled.display().to_string()),
        "{err}"
    );

    let below_file = file.join("store");
    let err = open(&below_file).expect_err("cannot create a store below a file");
    assert!(
        err.to_string().contains(&below_file.display().to_string()),
        "{err}"
    );
    Ok(())
}

#[test]
fn a_store_open_elsewhere_is_refused_with_its_path() -> TestResult {
    let dir = tempfile::tempdir()?;
    let _first = open(dir.path())?;
    let err = open(dir.path()).expect_err("sled locks its database");
    assert!(matches!(err, StoreError::Open { .. }), "{err}");
    assert!(
        err.to_string().contains(&dir.path().display().to_string()),
        "{err}"
    );
    Ok(())
}

#[test]
fn new_store_directories_are_created_and_empty_ones_accepted() -> TestResult {
    let dir = tempfile::tempdir()?;
    let nested = dir.path().join("var/lib/perch/store");
    {
        let store = open(&nested)?;
        store.commit_desired(b"doc")?;
        assert_eq!(store.path(), nested.as_path());
    }
    assert!(nested.join("db").is_file() && nested.join("conf").is_file());
    let empty = tempfile::tempdir()?;
    let store = open(empty.path())?;
    assert!(store.blobs()?.is_empty());
    Ok(())
}

#[test]
fn shared_as_arc_dyn_store_across_threads() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn Store> = Arc::new(open(dir.path())?);
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || -> Result<(), StoreError> {
                for i in 0..25u8 {
                    store.put_blob(&[t, i], None)?;
                    store.kv_set(&format!("component-{t}"), &format!("key-{i:02}"), &[i])?;
                    if i % 5 == 0 {
                        store.commit_desired(&[t, i])?;
                    }
                }
                Ok(())
            })
        })
        .collect();
    for thread in threads {
        thread.join().map_err(|_| "thread panicked")??;
    }
    assert_eq!(store.blobs()?.len(), 100);
    for t in 0..4 {
        assert_eq!(store.kv_keys(&format!("component-{t}"))?.len(), 25);
    }
    let journal = store.journal()?;
    let current = journal.current?.ok_or("no current")?;
    let previous = journal.previous?.ok_or("no previous")?;
    assert_eq!((current.generation, previous.generation), (20, 19));
    Ok(())
}

#[test]
fn size_on_disk_counts_what_is_stored() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path())?;
    let before = store.size_on_disk()?;
    let blob: Vec<u8> = (0..2 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    store.put_blob(&blob, None)?;
    store.sync()?;
    let after = store.size_on_disk()?;
    assert!(
        after >= before + blob.len() as u64,
        "before {before}, after {after}"
    );
    Ok(())
}

#[test]
fn debug_output_never_shows_contents() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path())?;
    store.kv_set("secrets", "token", b"hunter2")?;
    store.commit_desired(b"{\"password\":\"hunter2\"}")?;
    let shown = format!("{store:?} {:?}", store.journal()?);
    assert!(shown.contains("SledStore"), "{shown}");
    assert!(!shown.contains("hunter2"), "{shown}");
    Ok(())
}

#[test]
fn a_db_file_of_garbage_is_refused_not_silently_emptied() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let store = open(dir.path())?;
        store.commit_desired(b"important")?;
    }
    let len = std::fs::metadata(dir.path().join("db"))?.len();
    std::fs::write(dir.path().join("db"), vec![0x11; len as usize])?;
    // sled 0.34 opens such a file as an empty database; the store must not.
    let err = open(dir.path()).expect_err("a garbage log must be refused");
    assert!(matches!(err, StoreError::Unrecoverable { .. }), "{err}");
    assert!(
        err.to_string().contains(&dir.path().display().to_string()),
        "{err}"
    );
    Ok(())
}

#[test]
fn a_damaged_sled_log_is_an_error_or_an_older_whole_journal_never_a_panic() -> TestResult {
    let template = tempfile::tempdir()?;
    let last = 200u64;
    let doc =
        |seq: u64| format!("{{\"seq\":{seq},\"pad\":\"{}\"}}", "p".repeat(20_000)).into_bytes();
    {
        let store = open(template.path())?;
        for seq in 1..=last {
            store.commit_desired(&doc(seq))?;
        }
    }
    let log = std::fs::read(template.path().join("db"))?;
    let conf = std::fs::read(template.path().join("conf"))?;
    let segment = 512 * 1024;
    let mut outcomes = Vec::new();
    for offset in (1000..log.len()).step_by(segment) {
        let dir = tempfile::tempdir()?;
        let mut damaged = log.clone();
        for byte in &mut damaged[offset..(offset + 64).min(log.len())] {
            *byte ^= 0x5A;
        }
        std::fs::write(dir.path().join("db"), damaged)?;
        std::fs::write(dir.path().join("conf"), &conf)?;
        std::fs::create_dir(dir.path().join("blobs"))?;
        let opened = std::panic::catch_unwind(|| open(dir.path()))
            .map_err(|_| format!("a panic escaped SledStore::open (damage at {offset})"))?;
        let store = match opened {
            Err(err) => {
                assert!(
                    err.to_string().contains(&dir.path().display().to_string()),
                    "{err}"
                );
                outcomes.push(format!("{offset}: {err}"));
                continue;
            }
            Ok(store) => store,
        };
        let journal = store.journal()?;
        let current = journal.current?.ok_or("no current")?;
        let previous = journal.previous?.ok_or("no previous")?;
        assert!(current.generation <= last && current.generation > 1);
        assert_eq!(current.doc, doc(current.generation), "damage at {offset}");
        assert_eq!(
            previous.generation,
            current.generation - 1,
            "damage at {offset}"
        );
        assert_eq!(previous.doc, doc(previous.generation), "damage at {offset}");
        outcomes.push(format!(
            "{offset}: opened at generation {}",
            current.generation
        ));
    }
    assert!(!outcomes.is_empty());
    println!("{}", outcomes.join("\n"));
    Ok(())
}

#[test]
fn outbox_sequences_continue_across_reopen() -> TestResult {
    let dir = tempfile::tempdir()?;
    // Recent timestamps: the default age bound drops records older than a week.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let record = |n: u8| perch_store::OutboxRecord {
        component: "thermostat".into(),
        stream: "climate".into(),
        timestamp_ms: now_ms + u64::from(n),
        payload: vec![n; usize::from(n)],
    };
    {
        let store = open(dir.path())?;
        assert_eq!(store.outbox_append(&record(1))?, 1);
        assert_eq!(store.outbox_append(&record(2))?, 2);
        // No explicit sync: an append is durable on its own.
    }
    let store = open(dir.path())?;
    assert_eq!(store.outbox_len()?, 2);
    assert_eq!(store.outbox_append(&record(3))?, 3);
    let recent = store.outbox_recent(2)?;
    assert_eq!(recent, vec![(2, record(2)), (3, record(3))]);
    Ok(())
}

#[test]
fn kv_increment_is_atomic_across_threads_and_refuses_non_numbers() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = std::sync::Arc::new(open(dir.path())?);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            std::thread::spawn(move || -> Result<(), perch_store::StoreError> {
                for _ in 0..250 {
                    store.kv_increment("counter", "hits", 2)?;
                }
                Ok(())
            })
        })
        .collect();
    for t in threads {
        t.join().map_err(|_| "increment thread panicked")??;
    }
    // Stored as decimal text, so a plain get reads it.
    assert_eq!(store.kv_get("counter", "hits")?, Some(b"2000".to_vec()));
    assert_eq!(store.kv_increment("counter", "hits", 0)?, 2000);

    store.kv_set("counter", "name", b"porch")?;
    let err = store
        .kv_increment("counter", "name", 1)
        .expect_err("text is not a counter");
    assert!(
        err.to_string().contains("counter/name") && err.to_string().contains("not a decimal"),
        "{err}"
    );
    store.kv_set("counter", "max", u64::MAX.to_string().as_bytes())?;
    let err = store
        .kv_increment("counter", "max", 1)
        .expect_err("overflow");
    assert!(err.to_string().contains("overflows"), "{err}");
    assert_eq!(
        store.kv_get("counter", "max")?,
        Some(u64::MAX.to_string().into_bytes()),
        "a refused increment changes nothing"
    );
    Ok(())
}
