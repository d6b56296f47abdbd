//! The per-invocation store data (`Host`) and the host side of `perch:device` imports.
//!
//! Every invocation gets a fresh `wasmtime::Store<Host>`; what must outlive it (key-value
//! data, logs, counters) lives behind the shared [`ComponentCtx`].

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use wasmtime::component::{Resource, ResourceTable};
use wasmtime::{ResourceLimiter, Result as WtResult};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use perch_core::Grants;
use perch_core::command::LogLevel;
use perch_store::OutboxRecord;

use crate::board::Board;
use crate::bus::Bus;
use crate::supervisor::ComponentLog;

wasmtime::component::bindgen!({
    path: "../../wit",
    world: "perch:device/imports",
    // A telemetry publish waits for its record's commit (a shared `fdatasync`): as an async
    // import the component's call yields meanwhile instead of holding a runtime worker, so
    // publishes from many components and instances share one commit.
    imports: {
        "perch:device/telemetry.publish": async,
    },
    with: {
        "wasi:keyvalue/store.bucket": Bucket,
    },
});

use perch::device::types::Error as GuestError;
use wasi::keyvalue::store::Error as KvError;

/// An open `wasi:keyvalue` bucket: the component's one durable namespace.
#[derive(Debug)]
pub struct Bucket;

/// The identifiers that open a component's bucket.
const BUCKET_NAMES: [&str; 2] = ["default", ""];
/// Keys per `list-keys` page.
pub const KV_PAGE: usize = 1000;

/// Largest key accepted by the kv interface.
pub const MAX_KV_KEY: usize = 1024;
/// Largest value accepted by the kv interface.
pub const MAX_KV_VALUE: usize = 1 << 20;
/// Largest message payload a component may publish.
pub const MAX_MESSAGE: usize = 1 << 20;
/// Largest log line kept from a component.
pub const MAX_LOG_LINE: usize = 4096;

/// What an invocation's host functions share with the rest of the agent.
pub struct ComponentCtx {
    /// Component name: its log name and key-value namespace.
    pub name: String,
    /// Durable store for the kv interface.
    pub store: Arc<dyn perch_store::Store>,
    /// Local message bus for the messaging interface.
    pub bus: Arc<Bus>,
    /// Where the component's log lines go.
    pub log: Arc<ComponentLog>,
    /// What the component may reach by name.
    pub grants: Grants,
    /// Config values for `wasi:config/store`.
    pub config: BTreeMap<String, String>,
    /// The board's hardware.
    pub board: Arc<dyn Board>,
    /// Calls denied for lack of a grant.
    pub denied: AtomicU64,
}

impl ComponentCtx {
    /// Records a denied call (component log, agent log, counter) and returns the guest error.
    fn deny(&self, interface: &str, what: String) -> GuestError {
        self.denied.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(component = %self.name, interface, resource = %what, "call denied: no grant");
        let message = format!("{interface}: {what} is not granted to `{}`", self.name);
        self.log
            .push(LogLevel::Warn, "agent", format!("denied {message}"));
        GuestError::Denied(message)
    }
}

impl std::fmt::Debug for ComponentCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComponentCtx")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Enforces a component's memory limit and records its peak, for status.
#[derive(Debug)]
pub struct Limiter {
    /// Largest linear memory allowed, in bytes.
    pub memory_limit: usize,
    /// Largest linear memory requested so far, in bytes.
    pub memory_peak: usize,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> WtResult<bool> {
        if desired > self.memory_limit {
            // An error (rather than `Ok(false)`) traps right at the `memory.grow`, so the
            // guest cannot mask it and the failure message says what happened.
            return Err(wasmtime::format_err!(
                "out of memory: the component tried to grow its linear memory to {} bytes, above its limit of {} bytes",
                desired,
                self.memory_limit
            ));
        }
        self.memory_peak = self.memory_peak.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> WtResult<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// Store data of one invocation.
pub struct Host {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    hooks: GrantedOutgoing,
    /// Memory limit and peak.
    pub limiter: Limiter,
    /// Shared, long-lived component context.
    pub ctx: Arc<ComponentCtx>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("component", &self.ctx.name)
            .finish_non_exhaustive()
    }
}

impl Host {
    /// Fresh store data for one invocation of the component behind `ctx`.
    pub fn new(ctx: Arc<ComponentCtx>, memory_limit: usize) -> Self {
        let wasi = WasiCtx::builder()
            .stdout(LogStream {
                log: ctx.log.clone(),
                source: "stdout",
                level: LogLevel::Info,
            })
            .stderr(LogStream {
                log: ctx.log.clone(),
                source: "stderr",
                level: LogLevel::Warn,
            })
            .build();
        Self {
            wasi,
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            hooks: GrantedOutgoing { ctx: ctx.clone() },
            limiter: Limiter {
                memory_limit,
                memory_peak: 0,
            },
            ctx,
        }
    }
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for Host {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// Outgoing HTTP goes only to the hosts the component's manifest grants (`grants.http`,
/// `host` or `host:port`); any other request is refused with `HTTP-request-denied`, logged
/// and counted, and never reaches the network.
#[derive(Clone)]
struct GrantedOutgoing {
    ctx: Arc<ComponentCtx>,
}

impl GrantedOutgoing {
    fn allows(&self, authority: Option<&http::uri::Authority>) -> bool {
        authority.is_some_and(|a| {
            let hosts = &self.ctx.grants.http;
            hosts.contains(a.host()) || hosts.contains(a.as_str())
        })
    }
}

impl wasmtime_wasi_http::WasiHttpHooks for GrantedOutgoing {
    fn send_request(
        &mut self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<
        dyn Future<
                Output = Result<
                    (
                        http::Response<wasmtime_wasi_http::WasiBody>,
                        Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
                    ),
                    wasmtime_wasi_http::Error,
                >,
            > + Send,
    > {
        let authority = request.uri().authority().cloned();
        if !self.allows(authority.as_ref()) {
            let host = authority.map_or_else(|| "(none)".to_string(), |a| a.to_string());
            let _ = self.ctx.deny("http.outgoing", format!("host `{host}`"));
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        _ = fut;
        Box::new(async move {
            use http_body_util::BodyExt;
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = _> + Send>,
            ))
        })
    }
}

fn io_error(e: impl std::fmt::Display) -> GuestError {
    GuestError::Io(e.to_string())
}

impl perch::device::types::Host for Host {}

impl wasi::logging::logging::Host for Host {
    fn log(&mut self, level: wasi::logging::logging::Level, context: String, message: String) {
        use wasi::logging::logging::Level;
        let level = match level {
            Level::Trace => LogLevel::Trace,
            Level::Debug => LogLevel::Debug,
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error | Level::Critical => LogLevel::Error,
        };
        let mut message = message;
        truncate_utf8(&mut message, MAX_LOG_LINE);
        let source = if context.is_empty() {
            "guest".to_string()
        } else {
            let mut context = context;
            truncate_utf8(&mut context, 64);
            format!("guest:{context}")
        };
        self.ctx.log.push(level, &source, message);
    }
}

fn kv_io(e: impl std::fmt::Display) -> KvError {
    KvError::Other(e.to_string())
}

fn check_key(key: &str) -> Result<(), KvError> {
    if key.is_empty() || key.len() > MAX_KV_KEY {
        return Err(KvError::Other(format!(
            "invalid key: keys must be 1 to {MAX_KV_KEY} bytes long, this one is {}",
            key.len()
        )));
    }
    Ok(())
}

impl wasi::keyvalue::store::Host for Host {
    fn open(&mut self, identifier: String) -> Result<Resource<Bucket>, KvError> {
        if !BUCKET_NAMES.contains(&identifier.as_str()) {
            tracing::debug!(component = %self.ctx.name, identifier, "kv: no such bucket");
            return Err(KvError::NoSuchStore);
        }
        self.table.push(Bucket).map_err(kv_io)
    }
}

impl wasi::keyvalue::store::HostBucket for Host {
    fn get(&mut self, _: Resource<Bucket>, key: String) -> Result<Option<Vec<u8>>, KvError> {
        check_key(&key)?;
        self.ctx.store.kv_get(&self.ctx.name, &key).map_err(kv_io)
    }

    fn set(&mut self, _: Resource<Bucket>, key: String, value: Vec<u8>) -> Result<(), KvError> {
        check_key(&key)?;
        if value.len() > MAX_KV_VALUE {
            return Err(KvError::Other(format!(
                "invalid value: `{key}` is {} bytes; the limit is {MAX_KV_VALUE}",
                value.len()
            )));
        }
        self.ctx
            .store
            .kv_set(&self.ctx.name, &key, &value)
            .map_err(kv_io)
    }

    fn delete(&mut self, _: Resource<Bucket>, key: String) -> Result<(), KvError> {
        check_key(&key)?;
        self.ctx
            .store
            .kv_delete(&self.ctx.name, &key)
            .map(drop)
            .map_err(kv_io)
    }

    fn exists(&mut self, _: Resource<Bucket>, key: String) -> Result<bool, KvError> {
        check_key(&key)?;
        self.ctx
            .store
            .kv_get(&self.ctx.name, &key)
            .map(|v| v.is_some())
            .map_err(kv_io)
    }

    fn list_keys(
        &mut self,
        _: Resource<Bucket>,
        cursor: Option<u64>,
    ) -> Result<wasi::keyvalue::store::KeyResponse, KvError> {
        let all = self.ctx.store.kv_keys(&self.ctx.name).map_err(kv_io)?;
        let start = usize::try_from(cursor.unwrap_or(0)).unwrap_or(usize::MAX);
        let keys: Vec<String> = all.iter().skip(start).take(KV_PAGE).cloned().collect();
        let end = start.saturating_add(keys.len());
        Ok(wasi::keyvalue::store::KeyResponse {
            keys,
            cursor: (end < all.len()).then_some(end as u64),
        })
    }

    fn drop(&mut self, bucket: Resource<Bucket>) -> WtResult<()> {
        self.table.delete(bucket)?;
        Ok(())
    }
}

impl wasi::keyvalue::atomics::Host for Host {
    fn increment(&mut self, _: Resource<Bucket>, key: String, delta: u64) -> Result<u64, KvError> {
        check_key(&key)?;
        self.ctx
            .store
            .kv_increment(&self.ctx.name, &key, delta)
            .map_err(kv_io)
    }
}

impl wasi::config::store::Host for Host {
    fn get(&mut self, key: String) -> Result<Option<String>, wasi::config::store::Error> {
        Ok(self.ctx.config.get(&key).cloned())
    }

    fn get_all(&mut self) -> Result<Vec<(String, String)>, wasi::config::store::Error> {
        Ok(self
            .ctx
            .config
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

impl perch::device::gpio::Host for Host {
    fn read(&mut self, line: String) -> Result<bool, GuestError> {
        if !self.ctx.grants.gpio_read(&line) {
            return Err(self.ctx.deny("gpio.read", format!("line `{line}`")));
        }
        self.ctx.board.gpio_read(&line).map_err(io_error)
    }

    fn write(&mut self, line: String, value: bool) -> Result<(), GuestError> {
        if !self.ctx.grants.gpio_write(&line) {
            return Err(self.ctx.deny("gpio.write", format!("line `{line}`")));
        }
        self.ctx.board.gpio_write(&line, value).map_err(io_error)
    }
}

impl perch::device::sensors::Host for Host {
    fn read(&mut self, sensor: String) -> Result<perch::device::sensors::Reading, GuestError> {
        if !self.ctx.grants.sensors.contains(&sensor) {
            return Err(self.ctx.deny("sensors.read", format!("sensor `{sensor}`")));
        }
        let r = self.ctx.board.sensor_read(&sensor).map_err(io_error)?;
        Ok(perch::device::sensors::Reading {
            value: r.value,
            unit: r.unit.to_string(),
            timestamp_ms: r.timestamp_ms,
        })
    }
}

impl perch::device::telemetry::Host for Host {
    async fn publish(&mut self, stream: String, payload: Vec<u8>) -> Result<u64, GuestError> {
        if !self.ctx.grants.telemetry.contains(&stream) {
            return Err(self
                .ctx
                .deny("telemetry.publish", format!("stream `{stream}`")));
        }
        if payload.len() > MAX_MESSAGE {
            return Err(GuestError::Invalid(format!(
                "payload is {} bytes; the limit is {MAX_MESSAGE}",
                payload.len()
            )));
        }
        let record = OutboxRecord {
            component: self.ctx.name.clone(),
            stream,
            timestamp_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            payload,
        };
        self.ctx
            .store
            .outbox_submit(&record)
            .await
            .map_err(io_error)
    }
}

impl perch::device::messaging::Host for Host {
    fn publish(&mut self, subject: String, payload: Vec<u8>) -> Result<(), GuestError> {
        if payload.len() > MAX_MESSAGE {
            return Err(GuestError::Invalid(format!(
                "payload is {} bytes; the limit is {MAX_MESSAGE}",
                payload.len()
            )));
        }
        if subject.contains(['*', '>']) {
            return Err(GuestError::Invalid(format!(
                "cannot publish to wildcard subject `{subject}`"
            )));
        }
        perch_core::spec::check_subject_pattern(&subject).map_err(GuestError::Invalid)?;
        self.ctx
            .bus
            .publish(&subject, payload.into(), Some(&self.ctx.name));
        Ok(())
    }
}

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
}

/// A guest's stdout or stderr, split into lines in its component log.
#[derive(Clone)]
struct LogStream {
    log: Arc<ComponentLog>,
    source: &'static str,
    level: LogLevel,
}

impl IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStream {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(LineWriter {
            stream: self.clone(),
            pending: Vec::new(),
        })
    }
}

struct LineWriter {
    stream: LogStream,
    pending: Vec<u8>,
}

impl LineWriter {
    fn emit(&mut self, line: &[u8]) {
        let mut text = String::from_utf8_lossy(line)
            .trim_end_matches('\r')
            .to_string();
        truncate_utf8(&mut text, MAX_LOG_LINE);
        self.stream
            .log
            .push(self.stream.level, self.stream.source, text);
    }
}

impl tokio::io::AsyncWrite for LineWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        this.pending.extend_from_slice(buf);
        while let Some(pos) = this.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = this.pending.drain(..=pos).collect();
            this.emit(&line[..line.len() - 1]);
        }
        if this.pending.len() > MAX_LOG_LINE {
            let line = std::mem::take(&mut this.pending);
            this.emit(&line);
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if !self.pending.is_empty() {
            let line = std::mem::take(&mut self.pending);
            self.emit(&line);
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.pending.is_empty() {
            let line = std::mem::take(&mut self.pending);
            self.emit(&line);
        }
    }
}
