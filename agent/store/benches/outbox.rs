//! Outbox append throughput and acknowledgement latency: one record per `fdatasync` (the
//! baseline: sled insert, flush, `fdatasync` of the log, one thread) against the
//! group-committed `Store::outbox_append` with 1, 8 and 64 concurrent appenders.
//!
//! `cargo bench -p perch-store --bench outbox` prints a table. Every configuration runs for
//! `PERCH_BENCH_SECS` seconds (default 3) after a short warm-up, on a fresh store under
//! `PERCH_BENCH_DIR` (default: the system temp dir; put it on the disk you care about,
//! a tmpfs makes `fdatasync` free). `PERCH_BENCH_APPENDERS` lists the concurrency levels
//! (default `1,8,64`) for threads calling `outbox_append`, `PERCH_BENCH_TASKS` (default
//! `64,1024`) for tokio tasks awaiting `outbox_submit` on two worker threads. Records carry a 100-byte payload (130 bytes encoded).
//!
//! Appenders are closed loops: each appends its next record as soon as the previous one is
//! acknowledged, so a commit can carry at most as many records as there are appenders.

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use perch_store::{OutboxRecord, SledOptions, SledStore, Store};

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

const PAYLOAD_LEN: usize = 100;
const WARM_UP: Duration = Duration::from_millis(300);

fn record(thread: usize, n: u64) -> OutboxRecord {
    OutboxRecord {
        component: format!("component-{thread}"),
        stream: "climate".into(),
        timestamp_ms: 1_700_000_000_000 + n,
        payload: (0..PAYLOAD_LEN).map(|i| (n as usize + i) as u8).collect(),
    }
}

struct Run {
    name: String,
    records: u64,
    elapsed: Duration,
    /// Acknowledgement latency of every append, sorted.
    latencies: Vec<Duration>,
    commits: Option<u64>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.records as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> Duration {
        let at = ((self.latencies.len() as f64 * p).ceil() as usize).saturating_sub(1);
        self.latencies.get(at).copied().unwrap_or_default()
    }
}

/// sled insert + flush + `fdatasync` of `db` per record, one thread: what `outbox_append`
/// cost before group commit.
fn baseline(dir: &Path, secs: Duration) -> BenchResult<Run> {
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(perch_store::DEFAULT_CACHE_CAPACITY)
        .mode(sled::Mode::LowSpace)
        .flush_every_ms(Some(perch_store::DEFAULT_FLUSH_EVERY_MS))
        .open()?;
    let tree = db.open_tree("perch/outbox")?;
    let log = File::open(dir.join("db"))?;
    let mut seq = 0u64;
    let append = |seq: u64| -> BenchResult<Duration> {
        let r = record(0, seq);
        let mut value = Vec::with_capacity(12 + PAYLOAD_LEN + 20);
        for s in [&r.component, &r.stream] {
            value.extend_from_slice(&(s.len() as u16).to_be_bytes());
            value.extend_from_slice(s.as_bytes());
        }
        value.extend_from_slice(&r.timestamp_ms.to_be_bytes());
        value.extend_from_slice(&r.payload);
        let start = Instant::now();
        tree.insert(seq.to_be_bytes(), value)?;
        db.flush()?;
        log.sync_data()?;
        Ok(start.elapsed())
    };
    let warm = Instant::now();
    while warm.elapsed() < WARM_UP {
        seq += 1;
        append(seq)?;
    }
    let mut latencies = Vec::new();
    let start = Instant::now();
    while start.elapsed() < secs {
        seq += 1;
        latencies.push(append(seq)?);
    }
    let elapsed = start.elapsed();
    latencies.sort_unstable();
    Ok(Run {
        name: "baseline: insert + flush + fdatasync per record".into(),
        records: latencies.len() as u64,
        elapsed,
        commits: Some(latencies.len() as u64),
        latencies,
    })
}

/// `appenders` threads calling `outbox_append` in a loop for `secs`.
fn grouped(dir: &Path, appenders: usize, secs: Duration) -> BenchResult<Run> {
    let store = Arc::new(SledStore::open(dir, &SledOptions::default())?);
    let start_line = Arc::new(Barrier::new(appenders + 1));
    let threads: Vec<_> = (0..appenders)
        .map(|thread| {
            let store = Arc::clone(&store);
            let start_line = Arc::clone(&start_line);
            std::thread::spawn(move || -> Result<Vec<Duration>, String> {
                let mut n = 0;
                let mut append = || -> Result<Duration, String> {
                    n += 1;
                    let r = record(thread, n);
                    let start = Instant::now();
                    store.outbox_append(&r).map_err(|e| e.to_string())?;
                    Ok(start.elapsed())
                };
                let warm = Instant::now();
                while warm.elapsed() < WARM_UP {
                    append()?;
                }
                start_line.wait();
                let start = Instant::now();
                let mut latencies = Vec::new();
                while start.elapsed() < secs {
                    latencies.push(append()?);
                }
                Ok(latencies)
            })
        })
        .collect();
    start_line.wait();
    let before = store.outbox_stats()?.commits;
    let start = Instant::now();
    let mut latencies = Vec::new();
    for thread in threads {
        latencies.extend(thread.join().map_err(|_| "appender panicked")??);
    }
    let elapsed = start.elapsed();
    let commits = store.outbox_stats()?.commits - before;
    latencies.sort_unstable();
    Ok(Run {
        name: format!(
            "group commit: outbox_append, {appenders} appender{}",
            if appenders == 1 { "" } else { "s" }
        ),
        records: latencies.len() as u64,
        elapsed,
        latencies,
        // The warm-up's tail overlaps the measurement by at most one batch per appender.
        commits: Some(commits),
    })
}

/// `tasks` tokio tasks on a 2-worker runtime (the agent's shape on a 2-core box), each
/// awaiting `outbox_submit` in a loop for `secs`: how components' telemetry publishes reach
/// the outbox in the agent.
fn grouped_tasks(dir: &Path, tasks: usize, secs: Duration) -> BenchResult<Run> {
    let store = Arc::new(SledStore::open(dir, &SledOptions::default())?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()?;
    let start_line = Arc::new(tokio::sync::Barrier::new(tasks + 1));
    let (latencies, elapsed, commits) = runtime.block_on(async {
        let handles: Vec<_> = (0..tasks)
            .map(|task| {
                let store = Arc::clone(&store);
                let start_line = Arc::clone(&start_line);
                tokio::spawn(async move {
                    let mut n = 0;
                    let warm = Instant::now();
                    while warm.elapsed() < WARM_UP {
                        n += 1;
                        store.outbox_submit(&record(task, n)).await?;
                    }
                    start_line.wait().await;
                    let start = Instant::now();
                    let mut latencies = Vec::new();
                    while start.elapsed() < secs {
                        n += 1;
                        let r = record(task, n);
                        let t = Instant::now();
                        store.outbox_submit(&r).await?;
                        latencies.push(t.elapsed());
                    }
                    Ok::<_, perch_store::StoreError>(latencies)
                })
            })
            .collect();
        start_line.wait().await;
        let before = store.outbox_stats()?.commits;
        let start = Instant::now();
        let mut latencies = Vec::new();
        for handle in handles {
            latencies.extend(handle.await??);
        }
        let elapsed = start.elapsed();
        let commits = store.outbox_stats()?.commits - before;
        Ok::<_, Box<dyn std::error::Error>>((latencies, elapsed, commits))
    })?;
    let mut latencies = latencies;
    latencies.sort_unstable();
    Ok(Run {
        name: format!("group commit: outbox_submit, {tasks} async tasks"),
        records: latencies.len() as u64,
        elapsed,
        latencies,
        commits: Some(commits),
    })
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

fn main() -> BenchResult<()> {
    // `cargo bench` passes `--bench`; nothing to filter.
    let secs = Duration::from_secs_f64(
        std::env::var("PERCH_BENCH_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3.0),
    );
    let parent = std::env::var_os("PERCH_BENCH_DIR").map(std::path::PathBuf::from);
    let tempdir = || match &parent {
        Some(parent) => tempfile::tempdir_in(parent),
        None => tempfile::tempdir(),
    };
    let where_ = tempdir()?;
    println!(
        "outbox bench: {} s per run, {PAYLOAD_LEN}-byte payloads, store under {}",
        secs.as_secs_f64(),
        where_.path().parent().unwrap_or(where_.path()).display()
    );

    let levels: Vec<usize> = match std::env::var("PERCH_BENCH_APPENDERS") {
        Ok(list) => list
            .split(',')
            .map(|n| n.trim().parse())
            .collect::<Result<_, _>>()?,
        Err(_) => vec![1, 8, 64],
    };
    let tasks: Vec<usize> = match std::env::var("PERCH_BENCH_TASKS") {
        Ok(list) => list
            .split(',')
            .map(|n| n.trim().parse())
            .collect::<Result<_, _>>()?,
        Err(_) => vec![64, 1024],
    };
    let mut runs = vec![baseline(tempdir()?.path(), secs)?];
    for appenders in levels {
        runs.push(grouped(tempdir()?.path(), appenders, secs)?);
    }
    for n in tasks {
        runs.push(grouped_tasks(tempdir()?.path(), n, secs)?);
    }

    let base = runs[0].rate();
    println!();
    println!(
        "| {:<48} | {:>9} | {:>8} | {:>9} | {:>9} | {:>9} | {:>8} |",
        "configuration", "msg/s", "vs base", "p50 ms", "p99 ms", "max ms", "rec/sync"
    );
    println!(
        "|{:-<50}|{:->11}|{:->10}|{:->11}|{:->11}|{:->11}|{:->10}|",
        "", "", "", "", "", "", ""
    );
    for run in &runs {
        let per_sync = run
            .commits
            .filter(|c| *c > 0)
            .map(|c| format!("{:.1}", run.records as f64 / c as f64))
            .unwrap_or_default();
        println!(
            "| {:<48} | {:>9.0} | {:>7.1}x | {:>9} | {:>9} | {:>9} | {:>8} |",
            run.name,
            run.rate(),
            run.rate() / base,
            ms(run.percentile(0.50)),
            ms(run.percentile(0.99)),
            ms(run.latencies.last().copied().unwrap_or_default()),
            per_sync,
        );
    }
    Ok(())
}
