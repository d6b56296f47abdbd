//! The runtime: owns the engine and linker, runs components' triggers, supervises
//! invocations and serves HTTP routes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use wasmtime::component::Linker;
use wasmtime::{Engine, Store as WtStore};
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

use perch_core::command::{ComponentState, ComponentStatus, ErrorRecord, LogLevel, LogLine};
use perch_core::spec::Limits;
use perch_core::{AgentConfig, ByteSize, ComponentSpec, HumanDuration, Trigger};
use perch_store::Store;

use crate::board::{self, Board};
use crate::bus::Bus;
use crate::component::{self, LoadError, Loaded};
use crate::engine::{self, AllocatorKind, EngineError, EpochTicker};
use crate::host::{ComponentCtx, Host};
use crate::provider::Providers;
use crate::supervisor::{ComponentLog, Outcome, Supervisor, now_ms};

/// Queue depth of a component's message subscription.
pub const MESSAGE_QUEUE: usize = 256;

/// Most messages one instance takes from a component's queue at once (see `arm`).
const MAX_MESSAGE_BATCH: usize = 32;

/// Effective limits of a running component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EffectiveLimits {
    pub memory: u64,
    pub timeout: Duration,
    pub instances: u32,
    /// Calls one instance serves before a fresh one replaces it (1: a fresh one per call).
    pub calls_per_instance: u32,
}

impl EffectiveLimits {
    fn as_spec(self) -> Limits {
        Limits {
            memory: Some(ByteSize(self.memory)),
            timeout: Some(HumanDuration(self.timeout)),
            instances: Some(self.instances),
            calls_per_instance: Some(self.calls_per_instance),
        }
    }
}

/// An instance kept between calls (`limits.calls-per-instance` above 1), with its store.
struct Warm {
    store: WtStore<Host>,
    instance: wasmtime::component::Instance,
    calls: u32,
}

impl std::fmt::Debug for Warm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Warm")
            .field("calls", &self.calls)
            .finish_non_exhaustive()
    }
}

/// A component that is loaded and has its triggers armed.
#[derive(Debug)]
pub struct Running {
    pub loaded: Loaded,
    pub limits: EffectiveLimits,
    pub supervisor: Supervisor,
    ctx: Arc<ComponentCtx>,
    permits: Arc<Semaphore>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    subscriptions: Mutex<Vec<u64>>,
    /// Idle instances waiting for their next call; at most `limits.instances`, since each
    /// was used under one of the permits.
    warm: Mutex<Vec<Warm>>,
    /// Set when the component is stopped (removed or replaced): the rest of a message
    /// batch already taken from its queue is dropped, like the messages still queued.
    stopped: std::sync::atomic::AtomicBool,
}

impl Running {
    /// The component's name.
    pub fn name(&self) -> &str {
        &self.loaded.spec.name
    }

    /// Drops an invocation's store (killing its instance) and records its memory peak.
    fn end_instance(&self, store: WtStore<Host>) {
        let peak = store.data().limiter.memory_peak as u64;
        drop(store);
        self.supervisor.instance_ended(peak);
    }
}

/// How an invocation ended: its result, or the timeout that cut it short.
fn classify(result: Result<CallResult, tokio::time::error::Elapsed>, timeout: Duration) -> Outcome {
    match result {
        Err(_) => Outcome::Crash(format!("timed out after {}", HumanDuration(timeout))),
        Ok(Err(e)) => Outcome::Crash(describe_error(&e)),
        Ok(Ok(Err(msg))) => Outcome::GuestError(msg),
        Ok(Ok(Ok(()))) => Outcome::Ok,
    }
}

/// A component that could not be loaded, kept for status.
#[derive(Debug, Clone)]
struct Failed {
    spec: ComponentSpec,
    error: ErrorRecord,
    log: Arc<ComponentLog>,
}

/// What an invocation calls.
#[derive(Debug, Clone)]
pub enum Call {
    Start,
    Tick,
    Message { subject: String, payload: Bytes },
    Gpio { line: String, high: bool },
}

impl Call {
    fn describe(&self) -> String {
        self.to_string()
    }
}

impl std::fmt::Display for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Call::Start => f.write_str("on-start"),
            Call::Tick => f.write_str("on-tick"),
            Call::Message { subject, .. } => write!(f, "on-message `{subject}`"),
            Call::Gpio { line, high } => write!(f, "on-edge `{line}` high={high}"),
        }
    }
}

/// Errors of the runtime as a whole.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("cannot set up the host interfaces: {0}")]
    Linker(String),
    #[error("board: {0}")]
    Board(String),
}

/// Why an HTTP request could not be answered by a component.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// no route
    #[error("no component serves `{0}`")]
    NoRoute(String),
    /// backing off or at its instance limit
    #[error("component `{component}` is unavailable: {reason}")]
    Unavailable {
        component: String,
        reason: String,
        retry_after: Option<Duration>,
    },
    /// the invocation failed before a response was produced
    #[error("component `{component}` failed: {message}")]
    Failed { component: String, message: String },
}

/// Counters for metrics.
#[derive(Debug, Clone, Default)]
pub struct RuntimeMetrics {
    pub messages_published: u64,
    pub messages_dropped: u64,
}

/// The runtime.
pub struct Runtime {
    engine: Engine,
    linker: Linker<Host>,
    allocator: AllocatorKind,
    fingerprint: String,
    store: Arc<dyn Store>,
    bus: Arc<Bus>,
    board: Arc<dyn Board>,
    providers: Providers,
    config: AgentConfig,
    running: RwLock<BTreeMap<String, Arc<Running>>>,
    failed: RwLock<BTreeMap<String, Failed>>,
    _ticker: EpochTicker,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("allocator", &self.allocator)
            .finish_non_exhaustive()
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Renders a wasmtime error (trap, limiter error, link error) as one readable line.
pub fn describe_error(e: &wasmtime::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    if let Some(trap) = e.downcast_ref::<wasmtime::Trap>() {
        parts.push(format!("trapped: {trap}"));
    }
    for cause in e.chain() {
        let text = cause.to_string();
        let first = text.lines().next().unwrap_or("").trim().to_string();
        if !first.is_empty()
            && !parts.iter().any(|p| p.contains(&first))
            && !first.starts_with("error while executing at wasm backtrace")
        {
            parts.push(first);
        }
    }
    if parts.is_empty() {
        format!("{e}")
    } else {
        parts.join(": ")
    }
}

impl Runtime {
    /// Creates the engine (pooling where possible), the linker and the epoch ticker.
    pub fn new(config: AgentConfig, store: Arc<dyn Store>) -> Result<Arc<Self>, RuntimeError> {
        let board_config = board::load(&config).map_err(RuntimeError::Board)?;
        let board: Arc<dyn Board> = Arc::new(board::from_config(
            &board_config,
            &config.sysfs_root,
            &config.dev_root,
        ));
        for missing in board.missing() {
            tracing::warn!(board = %board_config.name, %missing, "board hardware not available");
        }
        let (engine, allocator) = engine::build_engine(&config)?;
        let mut linker = Linker::new(&engine);
        let providers = Providers::standard();
        providers
            .add_to_linker(&mut linker)
            .map_err(|e| RuntimeError::Linker(format!("{e:#}")))?;
        let fingerprint = engine::engine_fingerprint(&engine);
        let ticker = EpochTicker::start(&engine, config.runtime.epoch_tick);
        tracing::info!(allocator = allocator.as_str(), %fingerprint, "runtime ready");
        Ok(Arc::new(Self {
            engine,
            linker,
            allocator,
            fingerprint,
            store,
            bus: Bus::new(),
            board,
            providers,
            config,
            running: RwLock::new(BTreeMap::new()),
            failed: RwLock::new(BTreeMap::new()),
            _ticker: ticker,
        }))
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The allocator in use.
    pub fn allocator(&self) -> AllocatorKind {
        self.allocator
    }

    /// The engine fingerprint precompiled artifacts are keyed by.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The local message bus.
    pub fn bus(&self) -> &Arc<Bus> {
        &self.bus
    }

    /// The board's hardware.
    pub fn board(&self) -> &Arc<dyn Board> {
        &self.board
    }

    /// Every provider's problems with `spec`'s grants on this board: lines and sensors
    /// the board lacks, write grants on input lines, triggers on lines not granted.
    pub fn check_grants(&self, spec: &ComponentSpec) -> Result<(), Vec<String>> {
        self.providers.validate(spec, self.board.as_ref())
    }

    /// Limits of `spec` with the agent's defaults filled in.
    pub fn effective_limits(&self, limits: &Limits) -> EffectiveLimits {
        let d = &self.config.limits;
        EffectiveLimits {
            memory: limits.memory.map_or(d.memory.bytes(), |m| m.bytes()),
            timeout: limits.timeout.map_or(d.timeout, |t| t.0),
            instances: limits.instances.unwrap_or(d.instances),
            calls_per_instance: limits.calls_per_instance.unwrap_or(1),
        }
    }

    /// Checks limits against what the engine can grant.
    pub fn check_limits(&self, spec: &ComponentSpec) -> Result<(), String> {
        let l = self.effective_limits(&spec.limits);
        if l.memory > self.config.limits.memory.bytes() {
            return Err(format!(
                "component `{}` asks for {} of memory but this agent allows at most {} (`limits.memory` in its config)",
                spec.name,
                ByteSize(l.memory),
                self.config.limits.memory
            ));
        }
        Ok(())
    }

    /// Loads `spec` (from the precompiled cache when possible) on a blocking thread.
    pub async fn prepare(self: &Arc<Self>, spec: ComponentSpec) -> Result<Loaded, LoadError> {
        let rt = self.clone();
        let name = spec.name.clone();
        tokio::task::spawn_blocking(move || {
            component::load(&rt.engine, &rt.fingerprint, &rt.linker, &rt.store, &spec)
        })
        .await
        .map_err(|e| LoadError::Task {
            component: name,
            message: e.to_string(),
        })?
    }

    /// Starts a loaded component, replacing (and stopping) any running one of the same name.
    pub fn activate(self: &Arc<Self>, loaded: Loaded) -> Arc<Running> {
        let name = loaded.spec.name.clone();
        let limits = self.effective_limits(&loaded.spec.limits);
        let log = self.log_for(&name);
        log.push(
            LogLevel::Info,
            "agent",
            format!(
                "started {} ({}, {} us)",
                loaded.spec.digest.short(),
                loaded.source.as_str(),
                loaded.load_us
            ),
        );
        let ctx = Arc::new(ComponentCtx {
            name: name.clone(),
            store: self.store.clone(),
            bus: self.bus.clone(),
            log,
            grants: loaded.spec.grants.clone().unwrap_or_default(),
            config: loaded.spec.config.clone(),
            board: self.board.clone(),
            denied: std::sync::atomic::AtomicU64::new(0),
        });
        let running = Arc::new(Running {
            permits: Arc::new(Semaphore::new(limits.instances as usize)),
            supervisor: Supervisor::new(
                self.config.runtime.backoff_base,
                self.config.runtime.backoff_max,
            ),
            limits,
            ctx,
            loaded,
            tasks: Mutex::new(Vec::new()),
            subscriptions: Mutex::new(Vec::new()),
            warm: Mutex::new(Vec::new()),
            stopped: std::sync::atomic::AtomicBool::new(false),
        });
        write(&self.failed).remove(&name);
        if let Some(old) = write(&self.running).insert(name.clone(), running.clone()) {
            self.stop(&old);
        }
        self.arm(&running);
        tracing::info!(component = %name, digest = %running.loaded.spec.digest.short(), source = running.loaded.source.as_str(), load_us = running.loaded.load_us, "component started");
        running
    }

    fn log_for(&self, name: &str) -> Arc<ComponentLog> {
        // Keep the log across restarts and redeploys of the same name.
        if let Some(r) = read(&self.running).get(name) {
            return r.ctx.log.clone();
        }
        if let Some(f) = read(&self.failed).get(name) {
            return f.log.clone();
        }
        Arc::new(ComponentLog::new(name, self.config.runtime.log_lines))
    }

    /// Records a component that failed to load, so status can show it.
    pub fn mark_failed(&self, spec: ComponentSpec, error: &LoadError) {
        let log = self.log_for(&spec.name);
        log.push(LogLevel::Error, "agent", format!("cannot start: {error}"));
        tracing::error!(component = %spec.name, %error, "component failed to load");
        if let Some(old) = write(&self.running).remove(&spec.name) {
            self.stop(&old);
        }
        let error = ErrorRecord {
            at_ms: now_ms(),
            message: error.to_string(),
        };
        write(&self.failed).insert(spec.name.clone(), Failed { spec, error, log });
    }

    /// Stops and forgets a component.
    pub fn remove(&self, name: &str) -> bool {
        let was_failed = write(&self.failed).remove(name).is_some();
        match write(&self.running).remove(name) {
            Some(r) => {
                self.stop(&r);
                tracing::info!(component = name, "component stopped");
                true
            }
            None => was_failed,
        }
    }

    fn stop(&self, r: &Running) {
        r.stopped.store(true, std::sync::atomic::Ordering::Relaxed);
        for id in r
            .subscriptions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
        {
            self.bus.unsubscribe(id);
        }
        for t in r
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
        {
            t.abort();
        }
        let warm = std::mem::take(
            &mut *r
                .warm
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for w in warm {
            r.end_instance(w.store);
        }
    }

    /// Stops every component.
    pub fn stop_all(&self) {
        let all: Vec<_> = std::mem::take(&mut *write(&self.running))
            .into_values()
            .collect();
        for r in all {
            self.stop(&r);
        }
    }

    /// The running component `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Running>> {
        read(&self.running).get(name).cloned()
    }

    /// Specs of everything running or failed, by name.
    pub fn specs(&self) -> HashMap<String, ComponentSpec> {
        let mut out: HashMap<String, ComponentSpec> = read(&self.running)
            .iter()
            .map(|(k, v)| (k.clone(), v.loaded.spec.clone()))
            .collect();
        out.extend(
            read(&self.failed)
                .iter()
                .map(|(k, v)| (k.clone(), v.spec.clone())),
        );
        out
    }

    fn arm(self: &Arc<Self>, r: &Arc<Running>) {
        let mut tasks = Vec::new();
        let mut subs = Vec::new();
        let spec = &r.loaded.spec;
        let starts = spec.triggers.contains(&Trigger::Startup);
        let intervals: Vec<Duration> = spec
            .triggers
            .iter()
            .filter_map(|t| {
                if let Trigger::Every(d) = t {
                    Some(d.0)
                } else {
                    None
                }
            })
            .collect();
        // Startup runs first; timers begin once it has returned.
        let (rt, run) = (self.clone(), r.clone());
        tasks.push(tokio::spawn(async move {
            if starts {
                rt.invoke(&run, Call::Start, true).await;
            }
            let mut timers = Vec::new();
            for every in intervals {
                let (rt, run) = (rt.clone(), run.clone());
                timers.push(async move {
                    let mut iv = tokio::time::interval(every);
                    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                    loop {
                        iv.tick().await;
                        rt.invoke(&run, Call::Tick, false).await;
                    }
                });
            }
            futures::future::join_all(timers).await;
        }));
        for t in &spec.triggers {
            let Trigger::Gpio {
                line,
                edge,
                debounce,
            } = t
            else {
                continue;
            };
            let Some(mut rx) = self.board.edges() else {
                continue;
            };
            let (rt, run) = (self.clone(), r.clone());
            let (line, edge, debounce) = (line.clone(), *edge, debounce.map(|d| d.0));
            tasks.push(tokio::spawn(async move {
                let mut last: Option<Instant> = None;
                loop {
                    let (changed, high) = match rx.recv().await {
                        Ok(ev) => ev,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            tracing::warn!(component = %run.name(), line = %line, missed = n, "GPIO edges dropped: the component is slower than the line");
                            continue;
                        }
                        Err(_) => return,
                    };
                    if changed != line || !edge.matches(high) {
                        continue;
                    }
                    // Contact bounce: drop changes within `debounce` of the last one passed on.
                    let now = Instant::now();
                    if let (Some(d), Some(prev)) = (debounce, last)
                        && now.duration_since(prev) < d
                    {
                        continue;
                    }
                    last = Some(now);
                    let (rt, run, line) = (rt.clone(), run.clone(), line.clone());
                    tokio::spawn(async move {
                        rt.invoke(&run, Call::Gpio { line, high }, false).await;
                    });
                }
            }));
        }
        for t in &spec.triggers {
            if let Trigger::Message(pattern) = t {
                let (id, mut rx) = self.bus.subscribe(&spec.name, pattern, MESSAGE_QUEUE);
                subs.push(id);
                let (rt, run) = (self.clone(), r.clone());
                let instances = r.limits.instances.max(1) as usize;
                tasks.push(tokio::spawn(async move {
                    let mut batch = Vec::with_capacity(MAX_MESSAGE_BATCH);
                    loop {
                        // A backlog is shared out in batches, one task and one instance
                        // each, so that every instance has work and a busy component pays
                        // for a task per batch rather than per message; one waiting
                        // message goes alone.
                        let share = (rx.len() / instances).clamp(1, MAX_MESSAGE_BATCH);
                        if rx.recv_many(&mut batch, share).await == 0 {
                            return;
                        }
                        // Wait for a free instance here, so the queue applies backpressure.
                        let Ok(permit) = run.permits.clone().acquire_owned().await else {
                            return;
                        };
                        let (rt, run) = (rt.clone(), run.clone());
                        let calls: Vec<Call> = batch
                            .drain(..)
                            .map(|m| Call::Message {
                                subject: m.subject,
                                payload: m.payload,
                            })
                            .collect();
                        tokio::spawn(async move {
                            let _permit = permit;
                            for call in calls {
                                if run.stopped.load(std::sync::atomic::Ordering::Relaxed) {
                                    break;
                                }
                                rt.invoke_held(&run, call).await;
                            }
                        });
                    }
                }));
            }
        }
        *r.tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = tasks;
        *r.subscriptions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = subs;
    }

    fn new_store(&self, r: &Running) -> WtStore<Host> {
        let mut store = WtStore::new(
            &self.engine,
            Host::new(r.ctx.clone(), r.limits.memory as usize),
        );
        store.limiter(|h| &mut h.limiter);
        // Yield to tokio on every epoch tick: a guest spinning in a loop cannot hold a worker
        // thread, and the invocation's timeout can fire and drop the store.
        store.set_epoch_deadline(1);
        // `tokio::task::yield_now` rather than wasmtime's plain yield: a plain yield wakes the
        // task at once, tokio re-polls it from its LIFO slot, and a looping guest starved the
        // API and other components' tasks on that worker for whole timeouts (seen here:
        // 400 ms). `yield_now` lets everything else that is ready run first.
        store.epoch_deadline_callback(|_| {
            Ok(wasmtime::UpdateDeadline::YieldCustom(
                1,
                Box::pin(tokio::task::yield_now()),
            ))
        });
        store
    }

    /// Invokes `call` on `r`, waiting for a free instance if `wait`, else skipping when busy.
    pub async fn invoke(self: &Arc<Self>, r: &Arc<Running>, call: Call, wait: bool) -> Outcome {
        let permit = if wait {
            r.permits.clone().acquire_owned().await.ok()
        } else {
            r.permits.clone().try_acquire_owned().ok()
        };
        match permit {
            Some(p) => self.invoke_with_permit(r, call, p).await,
            None => {
                r.supervisor.skipped();
                Outcome::Skipped("all instances busy")
            }
        }
    }

    async fn invoke_with_permit(
        self: &Arc<Self>,
        r: &Arc<Running>,
        call: Call,
        _permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Outcome {
        self.invoke_held(r, call).await
    }

    /// Invokes `call` on `r`; the caller holds one of `r`'s instance permits for it.
    async fn invoke_held(self: &Arc<Self>, r: &Arc<Running>, call: Call) -> Outcome {
        if r.supervisor.admit().is_err() {
            return Outcome::Skipped("backing off after repeated crashes");
        }
        let started = Instant::now();
        let warm = if r.limits.calls_per_instance > 1 {
            r.warm
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .pop()
        } else {
            None
        };
        let (mut store, mut instance, calls) = match warm {
            Some(w) => (w.store, Some(w.instance), w.calls),
            None => {
                r.supervisor.instance_started();
                (self.new_store(r), None, 0)
            }
        };
        // A kept store has used up its epoch deadline; every call starts with a fresh one.
        store.set_epoch_deadline(1);
        let result = {
            let fut = call_export(&mut store, &r.loaded, &mut instance, &call);
            tokio::time::timeout(r.limits.timeout, fut).await
        };
        let outcome = classify(result, r.limits.timeout);
        let calls = calls + 1;
        match instance {
            // A trap or a timeout may leave the instance mid-way: it is never called again.
            Some(instance)
                if calls < r.limits.calls_per_instance
                    && matches!(outcome, Outcome::Ok | Outcome::GuestError(_)) =>
            {
                r.warm
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(Warm {
                        store,
                        instance,
                        calls,
                    });
            }
            _ => r.end_instance(store),
        }
        self.finish(r, &call, &outcome, started);
        outcome
    }

    /// Logs and records an invocation's outcome. `what` is formatted only when something is
    /// logged: a message call's description would be an allocation on every message's path.
    fn finish(
        &self,
        r: &Running,
        what: &dyn std::fmt::Display,
        outcome: &Outcome,
        started: Instant,
    ) {
        let name = r.name();
        let us = started.elapsed().as_micros() as u64;
        match outcome {
            Outcome::Ok => tracing::debug!(component = name, call = %what, us, "invocation ok"),
            Outcome::GuestError(msg) => {
                tracing::warn!(component = name, call = %what, error = %msg, "invocation returned an error");
                r.ctx.log.push(
                    LogLevel::Warn,
                    "agent",
                    format!("{what} returned an error: {msg}"),
                );
            }
            Outcome::Crash(msg) => {
                tracing::warn!(component = name, call = %what, error = %msg, "invocation crashed; instance dropped");
                r.ctx
                    .log
                    .push(LogLevel::Error, "agent", format!("{what} crashed: {msg}"));
            }
            Outcome::Skipped(_) => {}
        }
        if let Some(delay) = r.supervisor.record(outcome) {
            let msg = format!("crash-looping: next invocation in {} ms", delay.as_millis());
            tracing::warn!(
                component = name,
                backoff_ms = delay.as_millis() as u64,
                "component is crash-looping"
            );
            r.ctx.log.push(LogLevel::Warn, "agent", msg);
        }
    }

    /// Publishes on the local bus.
    pub fn publish(&self, subject: &str, payload: Bytes) -> usize {
        self.bus.publish(subject, payload, None)
    }

    /// The component serving `path`: the longest route that equals it or is a `/`-prefix of it.
    pub fn route(&self, path: &str) -> Option<Arc<Running>> {
        let running = read(&self.running);
        let mut best: Option<(&str, &Arc<Running>)> = None;
        for r in running.values() {
            for route in r.loaded.spec.routes() {
                let hit = path == route
                    || route == "/"
                    || (path.starts_with(route) && path.as_bytes().get(route.len()) == Some(&b'/'));
                if hit && best.is_none_or(|(b, _)| route.len() > b.len()) {
                    best = Some((route, r));
                }
            }
        }
        best.map(|(_, r)| r.clone())
    }

    /// Serves one HTTP request with the component whose route matches its path.
    pub async fn serve_http<B>(
        self: &Arc<Self>,
        req: http::Request<B>,
    ) -> Result<http::Response<HyperOutgoingBody>, HttpError>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: std::fmt::Display,
    {
        let path = req.uri().path().to_string();
        let r = self
            .route(&path)
            .ok_or_else(|| HttpError::NoRoute(path.clone()))?;
        let name = r.name().to_string();
        let unavailable = |reason: &str, retry_after| HttpError::Unavailable {
            component: name.clone(),
            reason: reason.to_string(),
            retry_after,
        };
        if let Err(wait) = r.supervisor.admit() {
            return Err(unavailable(
                "backing off after repeated crashes",
                Some(wait),
            ));
        }
        let permit =
            match tokio::time::timeout(r.limits.timeout, r.permits.clone().acquire_owned()).await {
                Ok(Ok(p)) => p,
                _ => {
                    r.supervisor.skipped();
                    return Err(unavailable("all instances busy", None));
                }
            };
        let Some(proxy) = r.loaded.proxy.clone() else {
            return Err(HttpError::NoRoute(path));
        };
        let req = req.map(|body| {
            use http_body_util::BodyExt;
            body.map_err(|e| {
                tracing::debug!(error = %e, "request body failed");
                wasmtime_wasi_http::Error::ConnectionTerminated
            })
        });
        let mut store = self.new_store(&r);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let prepared = (|| {
            let req = store
                .data_mut()
                .http()
                .new_incoming_request(Scheme::Http, req)?;
            let out = store.data_mut().http().new_response_outparam(tx)?;
            Ok::<_, wasmtime::Error>((req, out))
        })();
        let (wreq, out) = prepared.map_err(|e| HttpError::Failed {
            component: name.clone(),
            message: describe_error(&e),
        })?;
        r.supervisor.instance_started();
        let (rt, run) = (self.clone(), r.clone());
        let task = tokio::spawn(async move {
            let _permit = permit;
            let started = Instant::now();
            let result = {
                let fut = async {
                    let p = proxy.instantiate_async(&mut store).await?;
                    p.wasi_http_incoming_handler()
                        .call_handle(&mut store, wreq, out)
                        .await
                };
                tokio::time::timeout(run.limits.timeout, fut).await
            };
            run.end_instance(store);
            let outcome = classify(result.map(|r| r.map(Ok)), run.limits.timeout);
            rt.finish(&run, &"http handle", &outcome, started);
            outcome
        });
        match rx.await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(code)) => Err(HttpError::Failed {
                component: name,
                message: format!("responded with error {code:?}"),
            }),
            Err(_) => {
                let message = match task.await {
                    Ok(Outcome::Crash(m)) => m,
                    Ok(_) => "the component returned without setting a response".to_string(),
                    Err(e) => e.to_string(),
                };
                Err(HttpError::Failed {
                    component: name,
                    message,
                })
            }
        }
    }

    /// Status of every component, running or failed, sorted by name.
    pub fn status(&self) -> Vec<ComponentStatus> {
        let mut out: Vec<ComponentStatus> = read(&self.running)
            .values()
            .map(|r| self.running_status(r))
            .collect();
        for f in read(&self.failed).values() {
            out.push(ComponentStatus {
                name: f.spec.name.clone(),
                digest: f.spec.digest,
                state: ComponentState::Failed,
                triggers: f.spec.triggers.clone(),
                limits: self.effective_limits(&f.spec.limits).as_spec(),
                invocations: 0,
                failures: 0,
                consecutive_failures: 0,
                skipped: 0,
                last_error: Some(f.error.clone()),
                memory_peak_bytes: 0,
                live_instances: 0,
                loaded_from: String::new(),
                load_us: 0,
                grants: f.spec.grants.clone().unwrap_or_default(),
                denied: 0,
                signer: f.spec.signer.clone(),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn running_status(&self, r: &Running) -> ComponentStatus {
        let s = r.supervisor.snapshot();
        ComponentStatus {
            name: r.name().to_string(),
            digest: r.loaded.spec.digest,
            state: s.state,
            triggers: r.loaded.spec.triggers.clone(),
            limits: r.limits.as_spec(),
            invocations: s.invocations,
            failures: s.failures,
            consecutive_failures: s.consecutive_failures,
            skipped: s.skipped,
            last_error: s.last_error,
            memory_peak_bytes: s.memory_peak_bytes,
            live_instances: s.live_instances,
            loaded_from: r.loaded.source.as_str().to_string(),
            load_us: r.loaded.load_us,
            grants: r.ctx.grants.clone(),
            denied: r.ctx.denied.load(std::sync::atomic::Ordering::Relaxed),
            signer: r.loaded.spec.signer.clone(),
        }
    }

    /// Recent log lines of a component (running or failed).
    pub fn logs(&self, name: &str, limit: usize) -> Option<Vec<LogLine>> {
        if let Some(r) = read(&self.running).get(name) {
            return Some(r.ctx.log.recent(limit));
        }
        read(&self.failed).get(name).map(|f| f.log.recent(limit))
    }

    /// Bus counters.
    pub fn metrics(&self) -> RuntimeMetrics {
        RuntimeMetrics {
            messages_published: self.bus.published(),
            messages_dropped: self.bus.dropped(),
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop_all();
    }
}

type CallResult = wasmtime::Result<Result<(), String>>;

/// Calls `call`'s export on `instance`, instantiating the component first when there is
/// none yet.
async fn call_export(
    store: &mut WtStore<Host>,
    loaded: &Loaded,
    instance: &mut Option<wasmtime::component::Instance>,
    call: &Call,
) -> CallResult {
    let instance = match instance {
        Some(i) => *i,
        None => *instance.insert(loaded.pre.instantiate_async(&mut *store).await?),
    };
    let missing = || {
        wasmtime::format_err!(
            "the component does not export the function for {}",
            call.describe()
        )
    };
    match call {
        Call::Start => {
            let idx = loaded.on_start.as_ref().ok_or_else(missing)?;
            let f = instance.get_typed_func::<(), (Result<(), String>,)>(&mut *store, idx)?;
            Ok(f.call_async(&mut *store, ()).await?.0)
        }
        Call::Tick => {
            let idx = loaded.on_tick.as_ref().ok_or_else(missing)?;
            let f = instance.get_typed_func::<(), (Result<(), String>,)>(&mut *store, idx)?;
            Ok(f.call_async(&mut *store, ()).await?.0)
        }
        Call::Gpio { line, high } => {
            let idx = loaded.on_edge.as_ref().ok_or_else(missing)?;
            let f =
                instance.get_typed_func::<(&str, bool), (Result<(), String>,)>(&mut *store, idx)?;
            Ok(f.call_async(&mut *store, (line.as_str(), *high)).await?.0)
        }
        Call::Message { subject, payload } => {
            let idx = loaded.on_message.as_ref().ok_or_else(missing)?;
            let f = instance
                .get_typed_func::<(&str, &[u8]), (Result<(), String>,)>(&mut *store, idx)?;
            Ok(
                f.call_async(&mut *store, (subject.as_str(), payload.as_ref()))
                    .await?
                    .0,
            )
        }
    }
}
