//! Perch's benchmarks, each run side by side with its baseline in the same process run and
//! printed as one Markdown table (copied into docs/performance.md).
//!
//! ```text
//! cargo run --release -p perch-tests --bin perch-bench -- [--idle-secs 60] [--launches 30] [--drain-records N] [--pipeline-messages N] [--only NAME]
//! ```
//! `scripts/bench.sh` installs the load generator (wrk) and `wasmtime` (for `wasmtime serve`)
//! first; without them the HTTP row says what is missing.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use perch_core::{AgentConfig, ComponentSpec, Trigger};
use perch_runtime::host::{ComponentCtx, Host};
use perch_runtime::supervisor::ComponentLog;
use perch_runtime::{Call, Outcome, Runtime};
use perch_store::{SledOptions, SledStore, Store};
use perch_tests::{Launch, Perchd, examples, free_port, perchd_bin};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store as WtStore};

struct Row {
    name: String,
    perch: String,
    baseline: String,
    ratio: String,
    goal: String,
}

/// The pipeline's runs, in the order they run.
const PIPELINE_MODES: &[&str] = &["native", "fresh", "reuse", "fresh-off"];

struct Args {
    idle_secs: u64,
    launches: usize,
    drain_records: u64,
    pipeline_messages: u64,
    /// Which pipeline runs: `native`, `fresh`, `reuse`, `fresh-off` (all by default; one
    /// alone is for profiling it).
    pipeline_modes: Vec<String>,
    only: Option<String>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        idle_secs: 60,
        launches: 30,
        drain_records: 1_000_000,
        pipeline_messages: 200_000,
        pipeline_modes: PIPELINE_MODES.iter().map(|m| m.to_string()).collect(),
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--idle-secs" => args.idle_secs = it.next().context("--idle-secs N")?.parse()?,
            "--launches" => args.launches = it.next().context("--launches N")?.parse()?,
            "--drain-records" => {
                args.drain_records = it.next().context("--drain-records N")?.parse()?
            }
            "--pipeline-messages" => {
                args.pipeline_messages = it.next().context("--pipeline-messages N")?.parse()?
            }
            "--pipeline-modes" => {
                let list = it
                    .next()
                    .context("--pipeline-modes native,fresh,reuse,fresh-off")?;
                args.pipeline_modes = list.split(',').map(str::to_string).collect();
                if let Some(m) = args
                    .pipeline_modes
                    .iter()
                    .find(|m| !PIPELINE_MODES.contains(&m.as_str()))
                {
                    bail!(
                        "`{m}` is not a pipeline mode; expected {}",
                        PIPELINE_MODES.join(", ")
                    );
                }
            }
            "--only" => args.only = Some(it.next().context("--only NAME")?),
            other => bail!(
                "unknown argument `{other}`; expected --idle-secs N, --launches N, --drain-records N, --pipeline-messages N, --pipeline-modes LIST, --only NAME"
            ),
        }
    }
    Ok(args)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn us(d: Duration) -> String {
    format!("{:.1} us", d.as_secs_f64() * 1e6)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

fn status_kib(pid: &str, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn progress(msg: &str) {
    eprintln!("bench: {msg}");
}

fn config_in(dir: &Path) -> AgentConfig {
    AgentConfig {
        data_dir: dir.to_path_buf(),
        ..AgentConfig::default()
    }
}

// --- fresh store + instantiate + call + drop ---------------------------------------------

/// The tokio runtime the in-process benches use: two workers, like the device.
fn bench_tokio() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Runs `wasm` as component `name` in an in-process runtime whose store is in `dir`.
async fn start_in_process(
    dir: &Path,
    wasm: &[u8],
    name: &str,
    triggers: Vec<Trigger>,
    limits: perch_core::Limits,
    grants: Option<perch_core::Grants>,
) -> Result<(AgentConfig, Arc<Runtime>, Arc<perch_runtime::Running>)> {
    let cfg = config_in(dir);
    let store: Arc<dyn Store> =
        Arc::new(SledStore::open(dir.join("data"), &SledOptions::default())?);
    let digest = store.put_blob(wasm, None)?;
    let runtime = Runtime::new(cfg.clone(), store)?;
    let spec = ComponentSpec {
        name: name.into(),
        digest,
        source: None,
        triggers,
        limits,
        grants,
        config: Default::default(),
        signer: None,
    };
    let running = runtime.activate(runtime.prepare(spec).await?);
    Ok((cfg, runtime, running))
}

struct BareState {
    wasi: wasmtime_wasi::WasiCtx,
    table: ResourceTable,
}

impl wasmtime_wasi::WasiView for BareState {
    fn ctx(&mut self) -> wasmtime_wasi::WasiCtxView<'_> {
        wasmtime_wasi::WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

fn bench_invoke(rows: &mut Vec<Row>) -> Result<()> {
    progress("fresh store + instantiate + call + drop (noop) vs a bare wasmtime embedding");
    let rt = bench_tokio()?;
    let dir = tempfile::tempdir()?;
    rt.block_on(async {
        let noop = examples::bytes(examples::NOOP);
        let (cfg, runtime, running) = start_in_process(
            dir.path(),
            &noop,
            "noop",
            vec![Trigger::Every(perch_core::HumanDuration(
                Duration::from_secs(3600),
            ))],
            Default::default(),
            None,
        )
        .await?;

        // The bare embedding: the same engine settings (pooling allocator), plain WASI.
        let (engine, _) = perch_runtime::engine::build_engine(&cfg)?;
        let ticker = perch_runtime::engine::EpochTicker::start(&engine, cfg.runtime.epoch_tick);
        let mut linker: Linker<BareState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let component = Component::new(&engine, &noop).map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let pre = linker
            .instantiate_pre(&component)
            .map_err(|e| anyhow::anyhow!("bare link: {e:#}"))?;
        let (_, inst) = component
            .get_export(None, "perch:device/timer@0.1.0")
            .context("timer export")?;
        let (_, func) = component
            .get_export(Some(&inst), "on-tick")
            .context("on-tick export")?;

        let rounds = 10;
        let per_round = 2000;
        let (mut perch, mut bare) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            for _ in 0..per_round {
                let t = Instant::now();
                let out = runtime.invoke(&running, Call::Tick, true).await;
                perch.push(t.elapsed());
                if out != Outcome::Ok {
                    bail!("perch invocation failed: {out:?}");
                }
            }
            for _ in 0..per_round {
                let t = Instant::now();
                let mut s = WtStore::new(
                    &engine,
                    BareState {
                        wasi: wasmtime_wasi::WasiCtx::builder().build(),
                        table: ResourceTable::new(),
                    },
                );
                s.set_epoch_deadline(1_000_000);
                let i = pre
                    .instantiate_async(&mut s)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e:#}"))?;
                let f = i
                    .get_typed_func::<(), (Result<(), String>,)>(&mut s, &func)
                    .map_err(|e| anyhow::anyhow!("{e:#}"))?;
                let (r,) = f
                    .call_async(&mut s, ())
                    .await
                    .map_err(|e| anyhow::anyhow!("{e:#}"))?;
                drop(s);
                bare.push(t.elapsed());
                r.map_err(|e| anyhow::anyhow!(e))?;
            }
            progress(&format!("  round {}/{rounds}", round + 1));
        }
        drop(ticker);
        perch.sort();
        bare.sort();
        let (p50, b50) = (pct(&perch, 0.5), pct(&bare, 0.5));
        rows.push(Row {
            name: format!(
                "fresh store + instantiate + call + drop, noop ({} calls each, interleaved)",
                rounds * per_round
            ),
            perch: format!("p50 {} / p99 {}", us(p50), us(pct(&perch, 0.99))),
            baseline: format!(
                "bare wasmtime 48, same engine config: p50 {} / p99 {}",
                us(b50),
                us(pct(&bare, 0.99))
            ),
            ratio: format!("{:.2}x", p50.as_secs_f64() / b50.as_secs_f64()),
            goal: "p50 <= 25 us and <= 1.1x".into(),
        });
        Ok(())
    })
}

// --- deserialize vs compile --------------------------------------------------------------

fn bench_load(rows: &mut Vec<Row>) -> Result<()> {
    progress("load from the precompiled cache (deserialize) vs compile");
    let dir = tempfile::tempdir()?;
    let (engine, _) = perch_runtime::engine::build_engine(&config_in(dir.path()))?;
    for (name, path) in [
        ("timer", examples::TIMER),
        ("http-hello", examples::HTTP_HELLO),
    ] {
        let bytes = examples::bytes(path);
        let mut compile = Vec::new();
        let mut deser = Vec::new();
        let mut art = Vec::new();
        for _ in 0..10 {
            let t = Instant::now();
            let c = Component::new(&engine, &bytes).map_err(|e| anyhow::anyhow!("{e:#}"))?;
            compile.push(t.elapsed());
            art = c.serialize().map_err(|e| anyhow::anyhow!("{e:#}"))?;
            for _ in 0..20 {
                let t = Instant::now();
                // SAFETY: `art` was just produced by `serialize` with this same engine.
                #[allow(unsafe_code)]
                let c = unsafe { Component::deserialize(&engine, &art) }
                    .map_err(|e| anyhow::anyhow!("{e:#}"))?;
                deser.push(t.elapsed());
                drop(c);
            }
        }
        compile.sort();
        deser.sort();
        let (d, c) = (pct(&deser, 0.5), pct(&compile, 0.5));
        rows.push(Row {
            name: format!(
                "load {name} ({} KiB wasm, {} KiB native)",
                bytes.len() / 1024,
                art.len() / 1024
            ),
            perch: format!("deserialize p50 {}", ms(d)),
            baseline: format!("compile (Cranelift) p50 {}", ms(c)),
            ratio: format!("{:.0}x faster", c.as_secs_f64() / d.as_secs_f64()),
            goal: "deserialize at boot, never compile".into(),
        });
    }
    Ok(())
}

// --- cold start ----------------------------------------------------------------------------

/// A data dir with timer (every 1s), hello (HTTP) and misbehave (messages) deployed.
fn seeded_dir() -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    let mut agent = Perchd::start(dir.path(), Launch::default())?;
    for (name, path, q) in [
        ("timer", examples::TIMER, "every=1s"),
        ("hello", examples::BENCH_HELLO, "http=/"),
        ("bad", examples::MISBEHAVE, "message=misbehave.%3E"),
    ] {
        let r = agent.deploy(name, &examples::bytes(path), q)?;
        if r.status != 201 {
            bail!("deploy {name}: {}", r.body);
        }
    }
    agent.stop()?;
    Ok(dir)
}

/// Time from spawning perchd to its first timer invocation (the guest's `tick` log line).
fn launch_to_first_tick(dir: &Path) -> Result<Duration> {
    let cfg = dir.join("perchd.toml");
    let port = free_port();
    std::fs::write(
        &cfg,
        format!(
            "data-dir = \"{}\"\nlisten = \"127.0.0.1:{port}\"\n",
            dir.join("data").display()
        ),
    )?;
    let t = Instant::now();
    let mut child = Command::new(perchd_bin())
        .arg("--config")
        .arg(&cfg)
        .env(
            "PERCH_LOG",
            if std::env::var_os("PERCH_BENCH_VERBOSE").is_some() {
                "info"
            } else {
                "warn,perch::guest=info"
            },
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().context("stderr")?;
    let mut elapsed = None;
    let verbose = std::env::var_os("PERCH_BENCH_VERBOSE").is_some();
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        if verbose {
            eprintln!(
                "    {:>8.2} ms  {}",
                t.elapsed().as_secs_f64() * 1e3,
                line.chars().take(140).collect::<String>()
            );
        }
        if line.contains(" tick ") {
            elapsed = Some(t.elapsed());
            break;
        }
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    child.wait()?;
    elapsed.context("perchd exited before the first tick")
}

fn prune_artifacts(dir: &Path) -> Result<()> {
    let store = SledStore::open(dir.join("data"), &SledOptions::default())?;
    store.prune_artifacts("none")?;
    store.sync()?;
    Ok(())
}

fn bench_cold_start(rows: &mut Vec<Row>, launches: usize) -> Result<()> {
    progress(&format!(
        "cold start to first timer invocation, 3 cached components, {launches} launches"
    ));
    let dir = seeded_dir()?;
    let (mut cached, mut compiled) = (Vec::new(), Vec::new());
    launch_to_first_tick(dir.path())?; // warm the page cache once
    for i in 0..launches {
        cached.push(launch_to_first_tick(dir.path())?);
        if std::env::var_os("PERCH_BENCH_VERBOSE").is_some() {
            progress(&format!("  launch {i}: cached {:?}", cached.last()));
        }
        prune_artifacts(dir.path())?;
        compiled.push(launch_to_first_tick(dir.path())?);
        // Let one boot finish compiling and store every artifact again before the next
        // cached launch.
        Perchd::start(dir.path(), Launch::default())?.stop()?;
        if (i + 1) % 10 == 0 {
            progress(&format!("  {}/{launches}", i + 1));
        }
    }
    cached.sort();
    compiled.sort();
    rows.push(Row {
        name: format!("cold start: exec perchd to first timer invocation, 3 cached components ({launches} launches)"),
        perch: format!("p50 {} / p99 {}", ms(pct(&cached, 0.5)), ms(pct(&cached, 0.99))),
        baseline: format!(
            "same boot compiling instead (no precompiled cache): p50 {} / p99 {}",
            ms(pct(&compiled, 0.5)),
            ms(pct(&compiled, 0.99))
        ),
        ratio: format!("{:.1}x faster", pct(&compiled, 0.5).as_secs_f64() / pct(&cached, 0.5).as_secs_f64()),
        goal: "p50 <= 20 ms, p99 <= 60 ms".into(),
    });
    Ok(())
}

// --- hardware calls through the component boundary ---------------------------------------

fn bench_boundary(rows: &mut Vec<Row>) -> Result<()> {
    progress("sensor read and GPIO write through the component boundary vs native calls");
    let rt = bench_tokio()?;
    let dir = tempfile::tempdir()?;
    rt.block_on(async {
        let grants: perch_core::Grants =
            serde_json::from_str(r#"{"gpio":{"write":["led"]},"sensors":["room-temp"]}"#)?;
        let (_, runtime, running) = start_in_process(
            dir.path(),
            &examples::bytes(examples::HWLOOP),
            "hwloop",
            vec![Trigger::Message("hwloop".into())],
            perch_core::Limits {
                timeout: Some(perch_core::HumanDuration(Duration::from_secs(60))),
                ..Default::default()
            },
            Some(grants),
        )
        .await?;
        let board = runtime.board().clone();
        let n: u32 = 20_000;
        let rounds = 7;

        let call = |payload: String| Call::Message {
            subject: "hwloop".into(),
            payload: bytes::Bytes::from(payload),
        };
        for (what, label) in [
            ("sensor", "sensor read (`room-temp`, sim board)"),
            ("gpio", "GPIO write (`led`, sim board)"),
        ] {
            let (mut through, mut native) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                // One invocation of N calls minus one of 0 calls: the per-call cost alone.
                let t = Instant::now();
                let out = runtime
                    .invoke(&running, call(format!("{what} 0")), true)
                    .await;
                let empty = t.elapsed();
                if out != Outcome::Ok {
                    bail!("hwloop failed: {out:?}");
                }
                let t = Instant::now();
                let out = runtime
                    .invoke(&running, call(format!("{what} {n}")), true)
                    .await;
                let full = t.elapsed();
                if out != Outcome::Ok {
                    bail!("hwloop failed: {out:?}");
                }
                through.push(full.saturating_sub(empty) / n);
                let t = Instant::now();
                for i in 0..n {
                    if what == "sensor" {
                        std::hint::black_box(
                            board
                                .sensor_read("room-temp")
                                .map_err(|e| anyhow::anyhow!("{e}"))?,
                        );
                    } else {
                        board
                            .gpio_write("led", i % 2 == 0)
                            .map_err(|e| anyhow::anyhow!("{e}"))?;
                    }
                }
                native.push(t.elapsed() / n);
            }
            through.sort();
            native.sort();
            let (c, b) = (pct(&through, 0.5), pct(&native, 0.5));
            rows.push(Row {
                name: format!("{label}, per call, median of {rounds} rounds of {n}"),
                perch: format!("{:.2} us through the component", c.as_secs_f64() * 1e6),
                baseline: format!(
                    "{:.2} us native call, same board object",
                    b.as_secs_f64() * 1e6
                ),
                ratio: format!(
                    "+{:.2} us boundary overhead",
                    (c.as_secs_f64() - b.as_secs_f64()).max(0.0) * 1e6
                ),
                goal: "overhead <= 2 us".into(),
            });
        }
        Ok(())
    })
}

// --- idle RSS -----------------------------------------------------------------------------

fn bench_idle_rss(rows: &mut Vec<Row>, idle_secs: u64) -> Result<()> {
    progress(&format!(
        "idle RSS after {idle_secs} s with 3 components vs an empty agent"
    ));
    let dir = seeded_dir()?;
    let empty = tempfile::tempdir()?;
    // PERCH_BENCH_CONFIG: extra perchd.toml lines for both agents (to compare settings).
    let launch = Launch {
        extra_config: std::env::var("PERCH_BENCH_CONFIG").unwrap_or_default(),
        ..Launch::default()
    };
    // The empty agent runs a copy of the binary: two processes mapping one file share its
    // pages, and the kernel reclaims only pages a single process maps, so sharing would hide
    // what a device (one agent) pages out after startup.
    let copy = empty.path().join("perchd-copy");
    std::fs::copy(perchd_bin(), &copy)?;
    let with = Perchd::start(dir.path(), launch.clone())?;
    let without = Perchd::start(
        empty.path(),
        Launch {
            bin: Some(copy),
            ..launch
        },
    )?;
    std::thread::sleep(Duration::from_secs(idle_secs));
    let comps = with.get("/v1/components")?;
    if comps.as_array().map(Vec::len) != Some(3) {
        bail!("expected 3 components: {comps}");
    }
    let rss = status_kib(&with.pid().to_string(), "VmRSS:");
    let base = status_kib(&without.pid().to_string(), "VmRSS:");
    rows.push(Row {
        name: format!("idle RSS after {idle_secs} s, 3 components (timer ticking every 1 s)"),
        perch: mib(rss),
        baseline: format!(
            "perchd with no components: {}; Greengrass nucleus lite (published): 14.8 MB",
            mib(base)
        ),
        ratio: format!("{:.2}x of empty", rss as f64 / base.max(1) as f64),
        goal: "<= 12 MB".into(),
    });
    Ok(())
}

// --- memory per instance and address space ------------------------------------------------

fn bench_instances(rows: &mut Vec<Row>) -> Result<()> {
    progress("memory per live instance and address space for 1000 instances");
    let rt = bench_tokio()?;
    let dir = tempfile::tempdir()?;
    let me = std::process::id().to_string();
    let n = 1000;
    rt.block_on(async {
        let mut cfg = config_in(dir.path());
        cfg.runtime.pool_instances = n;
        cfg.runtime.allocator = perch_core::config::Allocator::Pooling;
        let store: Arc<dyn Store> = Arc::new(SledStore::open(
            dir.path().join("data"),
            &SledOptions::default(),
        )?);
        let noop = examples::bytes(examples::NOOP);

        let vm0 = status_kib(&me, "VmSize:");
        let (engine, _) = perch_runtime::engine::build_engine(&cfg)?;
        let pool_vm = status_kib(&me, "VmSize:").saturating_sub(vm0);
        let mut linker: Linker<Host> = Linker::new(&engine);
        perch_runtime::provider::Providers::standard()
            .add_to_linker(&mut linker)
            .map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let component = Component::new(&engine, &noop).map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let pre = linker
            .instantiate_pre(&component)
            .map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let ctx = Arc::new(ComponentCtx {
            name: "noop".into(),
            store: store.clone(),
            bus: perch_runtime::bus::Bus::new(),
            log: Arc::new(ComponentLog::new("noop", 10)),
            grants: Default::default(),
            config: Default::default(),
            board: Arc::new(perch_runtime::board::SimBoard::new()),
            denied: Default::default(),
        });
        let rss0 = status_kib(&me, "VmRSS:");
        let mut live = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let mut s = WtStore::new(
                &engine,
                Host::new(ctx.clone(), cfg.limits.memory.bytes() as usize),
            );
            s.limiter(|h| &mut h.limiter);
            s.set_epoch_deadline(1_000_000);
            let i = pre
                .instantiate_async(&mut s)
                .await
                .map_err(|e| anyhow::anyhow!("{e:#}"))?;
            live.push((s, i));
        }
        let per_instance = status_kib(&me, "VmRSS:").saturating_sub(rss0) / u64::from(n);
        drop(live);
        drop(engine);

        // Baseline: wasmtime's default pooling allocator for the same 1000 instances.
        let vm1 = status_kib(&me, "VmSize:");
        let mut c = wasmtime::Config::new();
        let mut pool = wasmtime::PoolingAllocationConfig::new();
        pool.total_component_instances(n);
        c.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        let default_vm = match Engine::new(&c) {
            Ok(e) => {
                let v = status_kib(&me, "VmSize:").saturating_sub(vm1);
                drop(e);
                format!("{:.0} GiB", v as f64 / (1u64 << 30) as f64)
            }
            Err(e) => format!("cannot reserve: {e}"),
        };
        rows.push(Row {
            name: "memory per live (idle) noop instance, 1000 alive".into(),
            perch: format!("{:.1} KiB", per_instance as f64 / 1024.0),
            baseline: "-".into(),
            ratio: "-".into(),
            goal: "<= 64 KiB".into(),
        });
        rows.push(Row {
            name: format!("address space reserved by the pool for {n} instances (32 MiB memories)"),
            perch: format!("{:.1} GiB", pool_vm as f64 / (1u64 << 30) as f64),
            baseline: format!("wasmtime default pooling config: {default_vm}"),
            ratio: "-".into(),
            goal: "<= 64 GiB (Raspberry Pi: 512 GiB VA)".into(),
        });
        Ok(())
    })
}

// --- HTTP requests/s vs wasmtime serve -------------------------------------------------------

fn wrk_rps(url: &str, secs: u64) -> Result<f64> {
    let out = Command::new("wrk")
        .args(["-t2", "-c16", &format!("-d{secs}s"), url])
        .output()
        .context("run wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("Non-2xx")
        || text.contains("Socket errors")
            && !text.contains("Socket errors: connect 0, read 0, write 0, timeout 0")
    {
        bail!("wrk saw errors:\n{text}");
    }
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk output:\n{text}"))
}

fn wasmtime_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WASMTIME") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var_os("HOME")?;
    let p = PathBuf::from(home).join(".cache/perch/tools/bin/wasmtime");
    p.exists().then_some(p)
}

fn wait_http(url: &str) -> Result<()> {
    let client = reqwest::blocking::Client::new();
    for _ in 0..500 {
        if client
            .get(url)
            .send()
            .map(|r| r.status().is_success())
            .unwrap_or(false)
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{url} did not answer")
}

fn bench_http(rows: &mut Vec<Row>) -> Result<()> {
    progress("HTTP requests/s: perchd vs wasmtime serve, same component, wrk, interleaved");
    let name = "HTTP hello requests/s (wrk -t2 -c16, 3 interleaved 5 s runs each)".to_string();
    let missing = |what: &str| Row {
        name: name.clone(),
        perch: "not run".into(),
        baseline: format!("{what} missing: run scripts/bench.sh"),
        ratio: "-".into(),
        goal: ">= 1.2x".into(),
    };
    if Command::new("wrk").arg("--version").output().is_err() {
        rows.push(missing("wrk"));
        return Ok(());
    }
    let Some(wasmtime) = wasmtime_bin() else {
        rows.push(missing("wasmtime (wasmtime-cli 48.0.8)"));
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let agent = Perchd::start(
        dir.path(),
        Launch {
            extra_config: "[runtime]\n".into(),
            ..Launch::default()
        },
    )?;
    let r = agent.deploy("hello", &examples::bytes(examples::BENCH_HELLO), "http=/")?;
    if r.status != 201 {
        bail!("deploy: {}", r.body);
    }
    let perch_url = format!("http://{}/", agent.addr);
    let port = free_port();
    let mut serve = Command::new(&wasmtime)
        .args([
            "serve",
            "--addr",
            &format!("127.0.0.1:{port}"),
            examples::BENCH_HELLO,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start wasmtime serve")?;
    let serve_url = format!("http://127.0.0.1:{port}/");
    let result = (|| {
        wait_http(&perch_url)?;
        wait_http(&serve_url)?;
        let (mut p, mut w) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            p.push(wrk_rps(&perch_url, 5)?);
            w.push(wrk_rps(&serve_url, 5)?);
        }
        Ok::<_, anyhow::Error>((p, w))
    })();
    let _ = serve.kill();
    let _ = serve.wait();
    let (p, w) = result?;
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (pm, wm) = (med(p.clone()), med(w.clone()));
    rows.push(Row {
        name,
        perch: format!("median {pm:.0} req/s ({p:.0?})"),
        baseline: format!("wasmtime serve 48.0.8 (defaults): median {wm:.0} req/s ({w:.0?})"),
        ratio: format!("{:.2}x", pm / wm),
        goal: ">= 1.2x".into(),
    });
    Ok(())
}

// --- outbox backlog drained to JetStream --------------------------------------------------

/// A store in `dir` whose outbox holds about `n` 100-byte records; returns it with the
/// exact count.
fn filled_outbox(dir: &std::path::Path, n: u64, bench: &str) -> Result<(Arc<SledStore>, u64)> {
    let opts = SledOptions {
        outbox_max_bytes: 1 << 30,
        ..SledOptions::default()
    };
    let store = Arc::new(SledStore::open(dir.join("store"), &opts)?);
    progress(&format!("{bench}: filling the outbox with {n} records"));
    fill_outbox(&store, n)?;
    let n = store.outbox_stats()?.len;
    Ok((store, n))
}

/// Fills an outbox with `n` 100-byte records (64 appenders sharing group commits).
fn fill_outbox(store: &Arc<SledStore>, n: u64) -> Result<()> {
    let threads = 64u64;
    let per = n / threads;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    std::thread::scope(|scope| -> Result<()> {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let store = store.clone();
                scope.spawn(move || -> Result<()> {
                    for _ in 0..per {
                        store.outbox_append(&perch_store::OutboxRecord {
                            component: "bench".into(),
                            stream: "climate".into(),
                            timestamp_ms: now,
                            payload: vec![b'x'; 100],
                        })?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("appender panicked"))??;
        }
        Ok(())
    })
}

/// A 1,000,000-record backlog drained by the sync loop after the link comes up, against
/// the same number of messages published straight to JetStream by async-nats with the same
/// window (no outbox). Also time to the first acknowledged record and resident growth.
fn bench_drain(rows: &mut Vec<Row>, n: u64) -> Result<()> {
    use perch_tests::nats::{JsApi, NatsServer};
    let dir = tempfile::tempdir()?;
    let server = NatsServer::standalone(&dir.path().join("nats"), "hub")?;
    let api = JsApi::connect(&server.url(), None)?;
    for (name, subject) in [
        ("PERCH_TELEMETRY", "perch.v1.*.telemetry.>"),
        ("BASELINE", "baseline.>"),
    ] {
        api.create_stream(&serde_json::json!({
            "name": name, "subjects": [subject], "storage": "file", "num_replicas": 1,
            "duplicate_window": 120_000_000_000u64,
        }))?;
    }
    let (store, n) = filled_outbox(dir.path(), n, "drain")?;

    let rt = bench_tokio()?;
    let me = std::process::id().to_string();
    let rss0 = status_kib(&me, "VmRSS:");
    let mut config = perch_core::AgentConfig::from_toml(
        &format!(
            "[sync]\ndevice = \"bench\"\nurl = \"{}\"\nheartbeat = \"1h\"\n",
            server.url()
        ),
        "bench",
    )?
    .sync
    .context("sync section")?;
    config.window = perch_core::config::DEFAULT_SYNC_WINDOW;
    progress("drain: perch");
    let (first, total, rss_peak) = drain_with_link(&rt, &config, &store, n)?;
    progress("drain: baseline (async-nats straight to JetStream)");
    let base = rt.block_on(async {
        let client = async_nats::connect(server.url()).await?;
        let js = async_nats::jetstream::context::ContextBuilder::new()
            .max_ack_inflight(perch_core::config::DEFAULT_SYNC_WINDOW)
            .backpressure_on_inflight(true)
            .build(client);
        let payload = bytes::Bytes::from(vec![b'x'; 100]);
        let start = Instant::now();
        let mut acks = std::collections::VecDeque::new();
        for i in 0..n {
            if acks.len() >= perch_core::config::DEFAULT_SYNC_WINDOW
                && let Some(a) = acks.pop_front()
            {
                a.await?;
            }
            let ack = js
                .send_publish(
                    "baseline.climate",
                    async_nats::jetstream::message::PublishMessage::build()
                        .payload(payload.clone())
                        .message_id(format!("bench:{i}")),
                )
                .await?;
            acks.push_back(ack);
        }
        for a in acks.drain(..) {
            a.await?;
        }
        Ok::<_, anyhow::Error>(start.elapsed())
    })?;
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    rows.push(Row {
        name: format!("drain a {n}-record outbox backlog over JetStream (direct, window 1024)"),
        perch: format!("{:.0} msg/s", rate(total)),
        baseline: format!(
            "{:.0} msg/s (async-nats publish, same window, no outbox)",
            rate(base)
        ),
        ratio: format!("{:.2}x", base.as_secs_f64() / total.as_secs_f64()),
        goal: ">= 100,000 msg/s".into(),
    });
    rows.push(Row {
        name: "first record acknowledged after the link is up".into(),
        perch: ms(first),
        baseline: "-".into(),
        ratio: "-".into(),
        goal: "<= 1 s".into(),
    });
    rows.push(Row {
        name: "resident growth while draining".into(),
        perch: mib(rss_peak.saturating_sub(rss0)),
        baseline: "-".into(),
        ratio: "-".into(),
        goal: "<= 16 MB".into(),
    });
    Ok(())
}

/// Starts a sync link over `store`'s outbox and waits until `n` records are acknowledged:
/// time to the first, time to all, peak resident size (KiB).
fn drain_with_link(
    rt: &tokio::runtime::Runtime,
    config: &perch_core::config::SyncConfig,
    store: &Arc<SledStore>,
    n: u64,
) -> Result<(Duration, Duration, u64)> {
    let me = std::process::id().to_string();
    rt.block_on(async {
        let start = Instant::now();
        let link = perch_sync::Link::start(
            config,
            store.clone() as Arc<dyn Store>,
            Arc::new(perch_sync::Idle),
        )?;
        let mut first = None;
        let mut peak = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(2)).await;
            let st = link.state().status();
            if first.is_none() && st.sent > 0 {
                first = Some(start.elapsed());
            }
            peak = peak.max(status_kib(&me, "VmRSS:"));
            if st.sent >= n {
                break;
            }
            if start.elapsed() > Duration::from_secs(900) {
                bail!("the backlog did not drain in 15 minutes ({} sent)", st.sent);
            }
            if start.elapsed() > Duration::from_secs(30) && st.sent == 0 {
                bail!("nothing was acknowledged in 30 s: {:?}", st.last_error);
            }
        }
        Ok::<_, anyhow::Error>((first.unwrap_or_default(), start.elapsed(), peak))
    })
}

/// The same backlog drained over MQTT 5 QoS 1 to mosquitto, against rumqttc publishing the
/// same number of QoS 1 messages (same payload and user property, the broker's in-flight
/// limit) with no outbox.
fn bench_drain_mqtt(rows: &mut Vec<Row>, n: u64) -> Result<()> {
    use perch_tests::mqtt::Mosquitto;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};

    let dir = tempfile::tempdir()?;
    let broker = Mosquitto::start(&dir.path().join("mosquitto"), "")?;
    let (store, n) = filled_outbox(dir.path(), n, "drain-mqtt")?;
    let rt = bench_tokio()?;
    let me = std::process::id().to_string();
    let rss0 = status_kib(&me, "VmRSS:");
    let config = perch_core::AgentConfig::from_toml(
        &format!(
            "[sync]\ndevice = \"bench\"\ntransport = \"mqtt\"\nurl = \"{}\"\nheartbeat = \"1h\"\n",
            broker.url()
        ),
        "bench",
    )?
    .sync
    .context("sync section")?;
    progress("drain-mqtt: perch");
    let (first, total, rss_peak) = drain_with_link(&rt, &config, &store, n)?;
    progress("drain-mqtt: baseline (rumqttc straight to the broker)");
    let base = rt.block_on(async {
        let mut options = MqttOptions::new("bench-baseline", "127.0.0.1", broker.port);
        options
            .set_clean_start(false)
            .set_session_expiry_interval(Some(3600));
        let (client, mut events) = AsyncClient::new(options, 64);
        let payload = bytes::Bytes::from(vec![b'x'; 100]);
        let start = Instant::now();
        let publisher = tokio::spawn(async move {
            for i in 0..n {
                let props = PublishProperties {
                    user_properties: vec![("perch-msg-id".into(), format!("bench:{i}"))],
                    ..Default::default()
                };
                client
                    .publish_bytes_with_properties(
                        "perch/v1/baseline/telemetry/climate",
                        QoS::AtLeastOnce,
                        false,
                        payload.clone(),
                        props,
                    )
                    .await?;
            }
            Ok::<_, anyhow::Error>(client)
        });
        let mut acked = 0;
        while acked < n {
            if let Event::Incoming(Packet::PubAck(_)) = events.poll().await? {
                acked += 1;
            }
        }
        let elapsed = start.elapsed();
        publisher.await??;
        Ok::<_, anyhow::Error>(elapsed)
    })?;
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    rows.push(Row {
        name: format!(
            "drain a {n}-record outbox backlog over MQTT 5 QoS 1 (mosquitto, its receive maximum)"
        ),
        perch: format!("{:.0} msg/s", rate(total)),
        baseline: format!(
            "{:.0} msg/s (rumqttc QoS 1 publish, same in-flight limit, no outbox)",
            rate(base)
        ),
        ratio: format!("{:.2}x", base.as_secs_f64() / total.as_secs_f64()),
        goal: ">= 25,000 msg/s".into(),
    });
    rows.push(Row {
        name: "first record acknowledged after the link is up (MQTT)".into(),
        perch: ms(first),
        baseline: "-".into(),
        ratio: "-".into(),
        goal: "-".into(),
    });
    rows.push(Row {
        name: "resident growth while draining (MQTT)".into(),
        perch: mib(rss_peak.saturating_sub(rss0)),
        baseline: "-".into(),
        ratio: "-".into(),
        goal: "<= 16 MB".into(),
    });
    Ok(())
}

// --- NATS message -> component -> publish ------------------------------------------------

/// What the fleet sees of one pipeline run: messages answered per second, and whether every
/// one came back exactly once.
struct PipelineRun {
    rate: f64,
    lossless: bool,
    detail: String,
}

/// Sends `n` messages to `perch.v1.bench.in.work.job` from a fleet-side NATS client, at
/// most `window` unanswered at once, and waits for all `n` answers on
/// `perch.v1.bench.out.done.job`. Payloads are the message numbers, so a loss or a
/// duplicate is seen.
async fn pipeline_run(
    url: &str,
    agent: &perchd::Agent,
    n: u64,
    window: u64,
) -> Result<PipelineRun> {
    use futures::StreamExt;
    let client = async_nats::connect(url).await?;
    let mut answers = client.subscribe("perch.v1.bench.out.done.job").await?;
    client.flush().await?;
    let dropped_before = agent.runtime().bus().dropped();
    let mut seen = vec![false; n as usize];
    let (mut sent, mut received, mut duplicates) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    while received < n {
        while sent < n && sent - received < window {
            client
                .publish("perch.v1.bench.in.work.job", sent.to_string().into())
                .await?;
            sent += 1;
        }
        let next = tokio::time::timeout(Duration::from_secs(10), answers.next()).await;
        let Ok(Some(m)) = next else {
            return Ok(PipelineRun {
                rate: received as f64 / start.elapsed().as_secs_f64(),
                lossless: false,
                detail: format!("stalled: {received} of {sent} answered after 10 s of silence"),
            });
        };
        let i: usize = std::str::from_utf8(&m.payload)?.parse()?;
        if std::mem::replace(&mut seen[i], true) {
            duplicates += 1;
        } else {
            received += 1;
        }
    }
    let elapsed = start.elapsed();
    let dropped = agent.runtime().bus().dropped() - dropped_before;
    Ok(PipelineRun {
        rate: n as f64 / elapsed.as_secs_f64(),
        lossless: duplicates == 0 && dropped == 0,
        detail: format!("{duplicates} duplicates, {dropped} dropped on the bus"),
    })
}

/// Starts an agent with `config` linked to `url` and runs the pipeline through it in each of
/// `modes` (`native`, `fresh`, `reuse`).
async fn pipeline_agent(
    url: &str,
    config: AgentConfig,
    relay: &[u8],
    n: u64,
    modes: &[&str],
    results: &mut Vec<(String, PipelineRun)>,
) -> Result<()> {
    if modes.is_empty() {
        return Ok(());
    }
    const WINDOW: u64 = 1024;
    let keep = match config.runtime.keep_resident.bytes() {
        0 => "off".to_string(),
        _ => format!("\"{}\"", config.runtime.keep_resident),
    };
    let agent = perchd::Agent::start(config).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent
        .sync_status()
        .is_none_or(|s| s.link != perch_core::command::LinkState::Connected)
    {
        if Instant::now() > deadline {
            bail!("the agent did not connect to {url}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let runtime = agent.runtime().clone();
    if modes.contains(&"native") {
        progress("pipeline: native handler");
        let bus = runtime.bus().clone();
        let (id, mut rx) = bus.subscribe("native", "work.>", perch_runtime::runtime::MESSAGE_QUEUE);
        let native = tokio::spawn({
            let bus = bus.clone();
            async move {
                while let Some(m) = rx.recv().await {
                    let rest = m.subject.strip_prefix("work.").unwrap_or(&m.subject);
                    bus.publish(&format!("done.{rest}"), m.payload, Some("native"));
                }
            }
        });
        let run = pipeline_run(url, &agent, n, WINDOW).await?;
        results.push(("native handler (tokio task on the bus)".into(), run));
        bus.unsubscribe(id);
        native.abort();
    }
    let digest = agent.store().put_blob(relay, None)?;
    let mut runs = Vec::new();
    if modes.contains(&"fresh") {
        runs.push((
            format!("component, fresh instance per message (`keep-resident` {keep})"),
            1,
        ));
    }
    if modes.contains(&"reuse") {
        runs.push((
            "component, instance reuse (`calls-per-instance = 100000`)".to_string(),
            100_000,
        ));
    }
    for (label, calls) in runs {
        progress(&format!("pipeline: {label}"));
        let spec = ComponentSpec {
            name: "relay".into(),
            digest,
            source: None,
            triggers: vec![Trigger::Message("work.>".into())],
            limits: perch_core::Limits {
                calls_per_instance: Some(calls),
                ..Default::default()
            },
            grants: None,
            config: Default::default(),
            signer: None,
        };
        runtime.activate(runtime.prepare(spec).await?);
        let run = pipeline_run(url, &agent, n, WINDOW).await?;
        results.push((label, run));
        runtime.remove("relay");
    }
    Ok(())
}

/// A message from the fleet handed to a component whose answer goes back to the fleet:
/// the relay fixture with a fresh instance per message (with `runtime.keep-resident` at its
/// default and off, each in its own agent) and with instance reuse, against a native handler
/// (a tokio task on the same bus doing what the component does) in the same agent, link
/// and NATS server.
fn bench_pipeline(rows: &mut Vec<Row>, n: u64, modes: &[String]) -> Result<()> {
    use perch_tests::nats::NatsServer;
    let dir = tempfile::tempdir()?;
    let server = NatsServer::standalone(&dir.path().join("nats"), "hub")?;
    let rt = bench_tokio()?;
    let relay = std::fs::read(examples::RELAY)?;
    let mut results = Vec::new();
    // `keep-resident` at its default (1 MiB) and off.
    for keep_resident in [None, Some("off")] {
        let want = |m: &'static str| modes.iter().any(|w| w == m).then_some(m);
        let agent_modes: Vec<&str> = match keep_resident {
            None => [want("native"), want("fresh"), want("reuse")],
            Some(_) => [None, want("fresh-off").map(|_| "fresh"), None],
        }
        .into_iter()
        .flatten()
        .collect();
        if agent_modes.is_empty() {
            continue;
        }
        let runtime = keep_resident.map_or(String::new(), |k| {
            format!("[runtime]\nkeep-resident = \"{k}\"\n")
        });
        let mut config = perch_core::AgentConfig::from_toml(
            &format!(
                "{runtime}[sync]\ndevice = \"bench\"\nurl = \"{}\"\nheartbeat = \"1h\"\n",
                server.url()
            ),
            "bench",
        )?;
        config.data_dir = dir
            .path()
            .join(format!("agent-{}", keep_resident.unwrap_or("default")));
        rt.block_on(pipeline_agent(
            &server.url(),
            config,
            &relay,
            n,
            &agent_modes,
            &mut results,
        ))?;
    }
    let native = results
        .iter()
        .find(|(label, _)| label.starts_with("native"))
        .map(|(_, run)| run.rate);
    for (label, run) in &results {
        let goal = if label.contains("fresh") {
            ">= 30,000 msg/s lossless, >= 60 % of native"
        } else if label.contains("reuse") {
            ">= 100,000 msg/s lossless, >= 60 % of native"
        } else {
            "(the baseline)"
        };
        rows.push(Row {
            name: format!("NATS message -> {label} -> NATS publish, {n} messages, 1024 in flight"),
            perch: format!(
                "{:.0} msg/s, {} ({})",
                run.rate,
                if run.lossless {
                    "lossless"
                } else {
                    "LOST OR DUPLICATED"
                },
                run.detail
            ),
            baseline: native.map_or("not run".into(), |r| {
                format!("native handler: {r:.0} msg/s")
            }),
            ratio: native.map_or("-".into(), |r| format!("{:.0} %", 100.0 * run.rate / r)),
            goal: goal.into(),
        });
    }
    Ok(())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = Command::new("uname")
        .arg("-rm")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!("{cpu}, {cores} cores, Linux {kernel}")
}

fn main() -> Result<()> {
    // Like perchd: two malloc arenas. With glibc's default (8 per core) the threads of the
    // in-process benches each grow their own arena, and resident figures measure that.
    perchd::memory::limit_arenas();
    let args = parse_args()?;
    let want = |name: &str| args.only.as_deref().is_none_or(|o| o == name);
    let mut rows = Vec::new();
    if want("invoke") {
        bench_invoke(&mut rows)?;
    }
    if want("load") {
        bench_load(&mut rows)?;
    }
    if want("cold-start") {
        bench_cold_start(&mut rows, args.launches)?;
    }
    if want("instances") {
        bench_instances(&mut rows)?;
    }
    if want("http") {
        bench_http(&mut rows)?;
    }
    if want("idle-rss") {
        bench_idle_rss(&mut rows, args.idle_secs)?;
    }
    if want("boundary") {
        bench_boundary(&mut rows)?;
    }
    if want("drain") {
        bench_drain(&mut rows, args.drain_records)?;
    }
    if want("drain-mqtt") {
        bench_drain_mqtt(&mut rows, args.drain_records)?;
    }
    if want("pipeline") {
        bench_pipeline(&mut rows, args.pipeline_messages, &args.pipeline_modes)?;
    }
    println!("Machine: {}\n", machine());
    println!("| benchmark | perch | baseline (same run) | ratio | goal |");
    println!("|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            r.name, r.perch, r.baseline, r.ratio, r.goal
        );
    }
    Ok(())
}
