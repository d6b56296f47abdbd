//! `perch-sync`: the device's link to its fleet.
//!
//! One loop per agent drains the durable outbox (`perch-store`) to the broker in sequence
//! order, deletes records only once the broker acknowledged them, heartbeats, and puts the
//! reported state. The broker protocol sits behind [`Transport`]: NATS JetStream
//! ([`nats::Nats`]) or MQTT 5 ([`mqtt::Mqtt`]). Subjects are in [`subjects`] and
//! documented in `docs/protocol.md`.
//!
//! Delivery is at-least-once: a record is deleted from the outbox only after its ack, and
//! every record carries the message id `<device>:<seq>` (a NATS header, an MQTT user
//! property) so that JetStream drops a resend of a record it already holds (a lost ack, an
//! agent killed between ack and delete) and MQTT receivers can.
//!
//! The fleet's desired state is fetched and watched; the component artifacts it names and
//! the cache lacks are fetched ([`artifact`]) and verified before the agent switches. The
//! fleet's commands (`cmd.<op>`) are answered by the agent ([`Device::command`]).
//!
//! The loop never gives up: a failed connect or publish backs off (100 ms doubling to 5 s)
//! and starts again from what the outbox still holds.

pub mod artifact;
pub mod mqtt;
pub mod nats;
pub mod subjects;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use perch_core::Digest;
use perch_core::command::{
    CommandError, DesiredInput, DesiredOutcome, ErrorKind, LinkState, SyncStatus,
};
use perch_core::config::{SyncConfig, SyncTransport};
use perch_store::{OutboxRecord, Store};
use tokio::sync::{mpsc, watch};

use crate::artifact::{FetchError, Partial, Progress};

/// First delay after a failed attempt.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest delay between attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Outbox records read per publish call, in windows.
const READ_WINDOWS: usize = 4;
/// Answers kept by command id, so a command delivered twice (MQTT QoS 1 after a
/// reconnect, a NATS requester retrying with the same id) runs once.
const ANSWERS_KEPT: usize = 64;
/// Commands running at once; more wait in the transport.
const COMMANDS_AT_ONCE: usize = 8;

/// Why the link failed. Messages name the broker and what was being done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    /// The broker could not be reached or the connection was refused.
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    /// The link is down (the client is reconnecting).
    #[error("not connected to {url}")]
    NotConnected { url: String },
    /// A publish was not acknowledged.
    #[error("publishing {what} failed: {reason}")]
    Publish { what: String, reason: String },
    /// Setting up the device's streams failed.
    #[error("setting up {what}: {reason}")]
    Setup { what: String, reason: String },
    /// The agent config is unusable (a credential file that cannot be read).
    #[error("{0}")]
    Config(String),
    /// The outbox could not be read or trimmed.
    #[error("outbox: {0}")]
    Store(String),
}

/// A broker protocol. Calls are made by one loop, one at a time.
pub trait Transport: Send + 'static {
    /// `nats` or `mqtt`.
    fn name(&self) -> &'static str;

    /// Makes sure the link is up (connecting, or checking the client's own reconnection).
    fn connect(&mut self) -> BoxFuture<'_, Result<(), SyncError>>;

    /// Publishes `records` (in sequence order, after every record published before on this
    /// connection). Returns the sequence of the last record of the longest acknowledged
    /// prefix so far, if it grew, with the error that stopped it. Up to a window of records
    /// may still be in flight when it returns, acknowledged by a later call or
    /// [`Transport::flush`], so the window stays full from one outbox read to the next;
    /// after an error, or a new connection, nothing is in flight any more.
    fn publish<'a>(
        &'a mut self,
        records: &'a [(u64, OutboxRecord)],
    ) -> BoxFuture<'a, (Option<u64>, Result<(), SyncError>)>;

    /// Waits for the acknowledgement of every record still in flight; returns as
    /// [`Transport::publish`] does.
    fn flush(&mut self) -> BoxFuture<'_, (Option<u64>, Result<(), SyncError>)> {
        Box::pin(async { (None, Ok(())) })
    }

    /// Sends a heartbeat; an error means the link is down.
    fn heartbeat(&mut self, body: Vec<u8>) -> BoxFuture<'_, Result<(), SyncError>>;

    /// Puts the reported state; an error is reported and retried, and does not mean the
    /// link is down (the fleet side may be away while a local leaf node is up).
    fn put_reported(&mut self, body: Vec<u8>) -> BoxFuture<'_, Result<(), SyncError>>;

    /// The device's current desired-state document, if the fleet has one.
    fn fetch_desired(&mut self) -> BoxFuture<'_, Result<Option<Vec<u8>>, SyncError>>;

    /// Documents put while connected, as they arrive (ends when the link drops).
    fn watch_desired(&mut self) -> BoxFuture<'_, Result<BoxStream<'static, Vec<u8>>, SyncError>>;

    /// Fetches artifact `digest` from the fleet's own store into `partial`, going on from
    /// what it holds. Transports without a store refuse: their components need a `source`.
    fn fetch_artifact<'a>(
        &'a mut self,
        digest: &'a Digest,
        partial: &'a mut Partial,
        progress: &'a mut Progress,
    ) -> BoxFuture<'a, Result<(), FetchError>> {
        let _ = (digest, partial, progress);
        let name = self.name();
        Box::pin(async move {
            Err(FetchError::permanent(format!(
                "over {name} artifacts are fetched from the component's `source` URL, and it has none"
            )))
        })
    }

    /// The fleet's commands, as they arrive (ends when the link drops).
    fn commands(&mut self) -> BoxFuture<'_, Result<BoxStream<'static, Request>, SyncError>>;

    /// The fleet side of the device's local bus for this connection: messages the fleet
    /// sends the device, and a sender for the device's messages to the fleet.
    fn messages(&mut self) -> BoxFuture<'_, Result<Messages, SyncError>> {
        let name = self.name();
        Box::pin(async move {
            Err(SyncError::Setup {
                what: "local-bus messages".into(),
                reason: format!("the {name} transport does not carry them"),
            })
        })
    }

    /// Sends the answer to a command.
    fn reply<'a>(
        &'a mut self,
        to: &'a ReplyTo,
        body: Vec<u8>,
    ) -> BoxFuture<'a, Result<(), SyncError>>;
}

/// A message of the device's local bus on its way to or from the fleet. Subjects are the
/// local ones (`cmd.fan`); the transport maps them into the device's tree
/// (`perch.v1.<device>.in.cmd.fan`, `perch/v1/<device>/out/cmd/fan`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusMessage {
    pub subject: String,
    pub payload: bytes::Bytes,
}

/// A message from the fleet and, where the transport acknowledges deliveries (MQTT QoS 1),
/// the acknowledgement to send once the device's bus has taken it.
pub struct Inbound {
    pub message: BusMessage,
    pub taken: Option<BoxFuture<'static, ()>>,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("message", &self.message)
            .field("acked", &self.taken.is_some())
            .finish()
    }
}

/// Sends the device's local-bus messages to the fleet over one connection.
pub trait Outgoing: Send + Sync + 'static {
    /// Sends one message (at most once: no acknowledgement is waited for).
    fn send(&self, message: BusMessage) -> BoxFuture<'_, Result<(), SyncError>>;
}

/// The fleet side of the local bus for one connection ([`Transport::messages`]).
pub struct Messages {
    /// Messages from the fleet, in order; ends when the link drops.
    pub incoming: BoxStream<'static, Inbound>,
    /// Where the device's messages go.
    pub outgoing: Arc<dyn Outgoing>,
}

impl std::fmt::Debug for Messages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Messages").finish_non_exhaustive()
    }
}

/// A device that runs nothing: reports `null`, refuses desired states and commands.
/// For benchmarks and tools that only drain an outbox.
#[derive(Debug, Clone, Copy)]
pub struct Idle;

impl Device for Idle {
    fn reported(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    fn applied_revision(&self) -> u64 {
        0
    }

    fn apply(&self, _: DesiredInput) -> BoxFuture<'static, Result<(), CommandError>> {
        Box::pin(async {
            Err(CommandError::new(
                ErrorKind::Unavailable,
                "this device runs no components",
            ))
        })
    }

    fn admit(&self, _: &str, _: &[u8]) -> Result<(), String> {
        Err("this device runs no components".into())
    }

    fn command(
        &self,
        op: String,
        _: Vec<u8>,
    ) -> BoxFuture<'static, Result<serde_json::Value, CommandError>> {
        Box::pin(async move {
            Err(CommandError::new(
                ErrorKind::Unavailable,
                format!("this device answers no commands (`{op}`)"),
            ))
        })
    }
}

/// A command from the fleet: `cmd.<op>` with a JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The operation, the last subject token or topic level.
    pub op: String,
    /// Its JSON arguments (may be empty).
    pub body: Vec<u8>,
    /// Where the answer goes.
    pub reply_to: ReplyTo,
}

/// Where a command's answer goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyTo {
    /// The reply subject (NATS) or response topic (MQTT).
    pub address: String,
    /// MQTT correlation data, echoed.
    pub correlation: Option<Vec<u8>>,
    /// The command's id (`Perch-Cmd-Id` header, `perch-cmd-id` user property), echoed;
    /// a second command with the same id gets the first one's answer without running.
    pub id: Option<String>,
}

/// The agent as the link sees it.
pub trait Device: Send + Sync + 'static {
    /// The reported state sent upstream with each heartbeat and reported-state put.
    fn reported(&self) -> serde_json::Value;

    /// The revision of the desired state running now.
    fn applied_revision(&self) -> u64;

    /// Validates a desired state fully and switches to it, or keeps what runs and says why.
    fn apply(&self, input: DesiredInput) -> BoxFuture<'static, Result<(), CommandError>>;

    /// Checks a fetched artifact before it is cached (signature, manifest); the error says
    /// why it is refused.
    fn admit(&self, name: &str, bytes: &[u8]) -> Result<(), String>;

    /// Runs fleet command `op` (see [`perch_core::command::REMOTE_OPS`]).
    fn command(
        &self,
        op: String,
        body: Vec<u8>,
    ) -> BoxFuture<'static, Result<serde_json::Value, CommandError>>;

    /// Hands a message from the fleet to the local bus; resolves once every subscriber has
    /// queued it, so a slow component slows the fleet's sender down instead of losing
    /// messages. The default drops it.
    fn deliver(&self, message: BusMessage) -> BoxFuture<'static, ()> {
        let _ = message;
        Box::pin(async {})
    }

    /// The local-bus messages to send to the fleet; taken once, when the link starts.
    fn outgoing(&self) -> Option<BoxStream<'static, BusMessage>> {
        None
    }
}

/// Shared state of the link, read by the API and metrics.
#[derive(Debug)]
pub struct SyncState {
    device: String,
    transport: &'static str,
    url: String,
    inner: Mutex<Inner>,
    sent: AtomicU64,
    connects: AtomicU64,
    artifacts_fetched: AtomicU64,
    artifact_bytes: AtomicU64,
    commands: AtomicU64,
    messages_in: AtomicU64,
    messages_out: AtomicU64,
    messages_dropped: AtomicU64,
}

#[derive(Debug)]
struct Inner {
    link: LinkState,
    since_ms: u64,
    last_sync_ms: Option<u64>,
    last_error: Option<String>,
    desired: Option<DesiredOutcome>,
    /// The bytes of the last document handled, so a poll does not apply it twice.
    desired_seen: Option<Vec<u8>>,
}

impl SyncState {
    fn new(config: &SyncConfig) -> Self {
        Self {
            device: config.device.clone(),
            transport: match config.transport {
                SyncTransport::Nats => "nats",
                SyncTransport::Mqtt => "mqtt",
            },
            url: config.url.clone(),
            inner: Mutex::new(Inner {
                link: LinkState::Connecting,
                since_ms: now_ms(),
                last_sync_ms: None,
                last_error: None,
                desired: None,
                desired_seen: None,
            }),
            sent: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            artifacts_fetched: AtomicU64::new(0),
            artifact_bytes: AtomicU64::new(0),
            commands: AtomicU64::new(0),
            messages_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            messages_dropped: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_link(&self, link: LinkState) {
        let mut i = self.lock();
        if i.link != link {
            tracing::info!(device = %self.device, url = %self.url, ?link, "sync link");
            i.link = link;
            i.since_ms = now_ms();
            if link == LinkState::Connected {
                i.last_error = None;
            }
        }
    }

    fn error(&self, e: &SyncError) {
        let mut i = self.lock();
        let text = e.to_string();
        if i.last_error.as_deref() != Some(text.as_str()) {
            tracing::warn!(device = %self.device, error = %text, "sync");
        }
        i.last_error = Some(text);
    }

    fn delivered(&self, n: u64) {
        self.sent.fetch_add(n, Ordering::Relaxed);
        self.lock().last_sync_ms = Some(now_ms());
    }

    /// A snapshot for the API.
    pub fn status(&self) -> SyncStatus {
        let i = self.lock();
        SyncStatus {
            device: self.device.clone(),
            transport: self.transport.into(),
            url: self.url.clone(),
            link: i.link,
            since_ms: i.since_ms,
            last_sync_ms: i.last_sync_ms,
            sent: self.sent.load(Ordering::Relaxed),
            connects: self.connects.load(Ordering::Relaxed),
            last_error: i.last_error.clone(),
            desired: i.desired.clone(),
            artifacts_fetched: self.artifacts_fetched.load(Ordering::Relaxed),
            artifact_bytes: self.artifact_bytes.load(Ordering::Relaxed),
            commands: self.commands.load(Ordering::Relaxed),
            messages_in: self.messages_in.load(Ordering::Relaxed),
            messages_out: self.messages_out.load(Ordering::Relaxed),
            messages_dropped: self.messages_dropped.load(Ordering::Relaxed),
        }
    }
}

/// The running sync loop; stops when dropped.
#[derive(Debug)]
pub struct Link {
    state: Arc<SyncState>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    uplink: Option<tokio::task::JoinHandle<()>>,
}

impl Link {
    /// Starts syncing `store`'s outbox with the broker of `config`. Must be called inside a
    /// tokio runtime.
    pub fn start(
        config: &SyncConfig,
        store: Arc<dyn Store>,
        device: Arc<dyn Device>,
    ) -> Result<Self, SyncError> {
        let transport: Box<dyn Transport> = match config.transport {
            SyncTransport::Nats => Box::new(nats::Nats::new(config)?),
            SyncTransport::Mqtt => Box::new(mqtt::Mqtt::new(config)?),
        };
        Ok(Self::with_transport(config, store, device, transport))
    }

    /// Starts the loop over a given transport.
    pub fn with_transport(
        config: &SyncConfig,
        store: Arc<dyn Store>,
        device: Arc<dyn Device>,
        transport: Box<dyn Transport>,
    ) -> Self {
        let state = Arc::new(SyncState::new(config));
        let (stop, stopped) = watch::channel(false);
        let (outgoing, current) = watch::channel(None);
        let uplink = device
            .outgoing()
            .map(|rx| tokio::spawn(uplink(rx, current, state.clone())));
        let link = Session {
            outgoing,
            transport,
            store,
            state: state.clone(),
            config: config.clone(),
            device,
            downloads: HashMap::new(),
            refused: HashMap::new(),
            tls: None,
        };
        let task = tokio::spawn(run(link, stopped));
        Self {
            state,
            stop,
            task,
            uplink,
        }
    }

    /// The link's state.
    pub fn state(&self) -> &Arc<SyncState> {
        &self.state
    }

    /// Stops the loop (records in flight stay in the outbox).
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop();
        self.task.abort();
        if let Some(t) = &self.uplink {
            t.abort();
        }
    }
}

/// Sends the device's local-bus messages over the connection of the moment; while there is
/// none they are dropped and counted (messages are at most once; telemetry is durable).
async fn uplink(
    mut rx: BoxStream<'static, BusMessage>,
    current: watch::Receiver<Option<Arc<dyn Outgoing>>>,
    state: Arc<SyncState>,
) {
    while let Some(message) = rx.next().await {
        let out = current.borrow().clone();
        let sent = match out {
            Some(out) => match out.send(message).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!(error = %e, "a local-bus message for the fleet was not sent");
                    false
                }
            },
            None => false,
        };
        let counter = if sent {
            &state.messages_out
        } else {
            &state.messages_dropped
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Hands the fleet's messages to the device's bus, one at a time and in order, each
/// acknowledged (where the transport does) only once the bus has taken it.
async fn downlink(
    mut incoming: BoxStream<'static, Inbound>,
    device: Arc<dyn Device>,
    state: Arc<SyncState>,
) {
    while let Some(Inbound { message, taken }) = incoming.next().await {
        device.deliver(message).await;
        if let Some(ack) = taken {
            ack.await;
        }
        state.messages_in.fetch_add(1, Ordering::Relaxed);
    }
}

/// A channel's receiving end as a stream (ends when every sender is gone).
pub fn receiver_stream<T: Send + 'static>(rx: mpsc::Receiver<T>) -> BoxStream<'static, T> {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) }).boxed()
}

/// Aborts a task when dropped: the per-connection message tasks end with the connection.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Waits `d` or until stopped; returns whether to stop.
async fn pause(d: Duration, stopped: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *stopped.borrow(),
        r = stopped.changed() => r.is_err() || *stopped.borrow(),
    }
}

/// What the loop owns.
struct Session {
    /// The current connection's sender for local-bus messages (`None` while down).
    outgoing: watch::Sender<Option<Arc<dyn Outgoing>>>,
    transport: Box<dyn Transport>,
    store: Arc<dyn Store>,
    state: Arc<SyncState>,
    config: SyncConfig,
    device: Arc<dyn Device>,
    /// Downloads broken off, resumed at the next attempt.
    downloads: HashMap<Digest, Partial>,
    /// Artifacts refused for good (digest mismatch, bad signature), with the reason; not
    /// fetched again.
    refused: HashMap<Digest, String>,
    /// TLS for `https://` sources, built on first use.
    tls: Option<Arc<rumqttc::tokio_rustls::rustls::ClientConfig>>,
}

/// Answers to commands: by id, so a repeated command is answered without running again.
#[derive(Default)]
struct Answers {
    done: VecDeque<(String, Vec<u8>)>,
    running: HashSet<String>,
}

async fn run(mut s: Session, mut stopped: watch::Receiver<bool>) {
    let mut backoff = BACKOFF_MIN;
    let mut appended = s.store.outbox_watch();
    let mut answers = Answers::default();
    let limit = Arc::new(tokio::sync::Semaphore::new(COMMANDS_AT_ONCE));
    let (answered_tx, mut answered) = mpsc::channel::<(ReplyTo, Vec<u8>)>(COMMANDS_AT_ONCE);
    loop {
        if *stopped.borrow() {
            return;
        }
        if let Err(e) = s.transport.connect().await {
            s.state.set_link(LinkState::Disconnected);
            s.state.error(&e);
            if pause(backoff, &mut stopped).await {
                return;
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
            continue;
        }
        backoff = BACKOFF_MIN;
        // The fleet side of the local bus, for as long as this connection lasts (set up
        // before the link is said to be up, so a message sent then is not missed).
        let downlink_task = match s.transport.messages().await {
            Ok(m) => {
                s.outgoing.send_replace(Some(m.outgoing));
                Some(AbortOnDrop(tokio::spawn(downlink(
                    m.incoming,
                    s.device.clone(),
                    s.state.clone(),
                ))))
            }
            Err(e) => {
                tracing::warn!(error = %e, "local-bus messages will not be exchanged with the fleet");
                None
            }
        };
        s.state.connects.fetch_add(1, Ordering::Relaxed);
        s.state.set_link(LinkState::Connected);
        let mut reported_pending = true;
        let mut beat = tokio::time::interval(s.config.heartbeat);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut updates = match s.transport.watch_desired().await {
            Ok(u) => Some(u),
            Err(e) => {
                tracing::warn!(error = %e, "desired-state updates will be polled only");
                None
            }
        };
        let mut commands = match s.transport.commands().await {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "commands from the fleet will not be received");
                None
            }
        };
        // What the fleet wants now: it may have changed while the device was away.
        match s.transport.fetch_desired().await {
            Ok(Some(doc)) => {
                if s.handle_desired(doc).await {
                    reported_pending = true;
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the desired state"),
        }
        let failure = 'session: loop {
            if reported_pending {
                let body = serde_json::to_vec(&s.device.reported()).unwrap_or_default();
                match s.transport.put_reported(body).await {
                    Ok(()) => reported_pending = false,
                    Err(e) => tracing::debug!(error = %e, "reported state not delivered yet"),
                }
            }
            // Drain everything there is. The transport keeps up to a window of records in
            // flight across reads, so reading the next records never empties the pipe
            // (an empty pipe waits a round trip, and a broker with Nagle's algorithm on holds
            // its last acks back for the peer's delayed-ack timer, 40 ms on Linux).
            let mut sent = 0;
            loop {
                let records = match s.store.outbox_read(sent, s.config.window * READ_WINDOWS) {
                    Ok(r) => r,
                    Err(e) => break 'session SyncError::Store(e.to_string()),
                };
                let (acked, result) = match records.last() {
                    Some((last, _)) => {
                        sent = *last;
                        s.transport.publish(&records).await
                    }
                    None => s.transport.flush().await,
                };
                if let Some(through) = acked {
                    match s.store.outbox_ack(through) {
                        Ok(n) => s.state.delivered(n),
                        Err(e) => break 'session SyncError::Store(e.to_string()),
                    }
                }
                if let Err(e) = result {
                    break 'session e;
                }
                if records.is_empty() {
                    break;
                }
            }
            tokio::select! {
                r = appended.changed() => {
                    if r.is_err() {
                        return;
                    }
                }
                Some(doc) = next_item(&mut updates) => {
                    if s.handle_desired(doc).await {
                        reported_pending = true;
                    }
                }
                Some(request) = next_item(&mut commands) => {
                    start_command(&s, &mut answers, &limit, &answered_tx, request);
                }
                Some((to, body)) = answered.recv() => {
                    if let Some(id) = &to.id {
                        answers.running.remove(id);
                        answers.done.push_back((id.clone(), body.clone()));
                        if answers.done.len() > ANSWERS_KEPT {
                            answers.done.pop_front();
                        }
                    }
                    s.state.commands.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = s.transport.reply(&to, body).await {
                        tracing::warn!(to = %to.address, error = %e, "the answer to a command was not sent");
                    }
                }
                _ = beat.tick() => {
                    let mut body = s.device.reported();
                    if let Some(obj) = body.as_object_mut() {
                        obj.insert("at-ms".into(), now_ms().into());
                    }
                    if let Err(e) = s
                        .transport
                        .heartbeat(serde_json::to_vec(&body).unwrap_or_default())
                        .await
                    {
                        break 'session e;
                    }
                    // The reported state follows every heartbeat: it carries the backlog.
                    reported_pending = true;
                    // A poll catches what a live update missed (a mirror catching up) and
                    // retries a document waiting for its artifacts.
                    match s.transport.fetch_desired().await {
                        Ok(Some(doc)) => {
                            s.handle_desired(doc).await;
                        }
                        Ok(None) => {}
                        Err(e) => tracing::debug!(error = %e, "cannot read the desired state"),
                    }
                }
                r = stopped.changed() => {
                    if r.is_err() || *stopped.borrow() {
                        return;
                    }
                }
            }
        };
        s.outgoing.send_replace(None);
        drop(downlink_task);
        s.state.set_link(LinkState::Disconnected);
        s.state.error(&failure);
        if pause(backoff, &mut stopped).await {
            return;
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Runs a command on its own task (the loop keeps draining meanwhile); the answer comes
/// back through `answered` to be sent by the transport. A command whose id was answered
/// already gets that answer again; one still running is not started twice.
fn start_command(
    s: &Session,
    answers: &mut Answers,
    limit: &Arc<tokio::sync::Semaphore>,
    answered: &mpsc::Sender<(ReplyTo, Vec<u8>)>,
    request: Request,
) {
    let Request { op, body, reply_to } = request;
    if let Some(id) = &reply_to.id {
        if let Some((_, done)) = answers.done.iter().find(|(d, _)| d == id) {
            tracing::debug!(%op, %id, "command answered before; sending the same answer");
            let (tx, done) = (answered.clone(), done.clone());
            tokio::spawn(async move {
                let _ = tx.send((reply_to, done)).await;
            });
            return;
        }
        if !answers.running.insert(id.clone()) {
            tracing::debug!(%op, %id, "command already running");
            return;
        }
    }
    tracing::info!(%op, id = ?reply_to.id, "command from the fleet");
    let (device, limit, tx) = (s.device.clone(), limit.clone(), answered.clone());
    tokio::spawn(async move {
        let _permit = limit.acquire_owned().await;
        let result = device.command(op.clone(), body).await;
        if let Err(e) = &result {
            tracing::info!(%op, error = %e.message, "command refused");
        }
        let _ = tx.send((reply_to, answer(result))).await;
    });
}

/// The JSON answer to a command: `{"ok": true, "result": …}` or
/// `{"ok": false, "error": {"kind", "message", "details"}}`.
pub fn answer(result: Result<serde_json::Value, CommandError>) -> Vec<u8> {
    let v = match result {
        Ok(result) => serde_json::json!({ "ok": true, "result": result }),
        Err(e) => serde_json::json!({ "ok": false, "error": e }),
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

/// The next item of a live feed, or never when there is none (a feed that ends is
/// dropped until the next session).
async fn next_item<T>(feed: &mut Option<BoxStream<'static, T>>) -> Option<T> {
    match feed {
        Some(f) => match f.next().await {
            Some(item) => Some(item),
            None => {
                *feed = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

impl Session {
    /// Handles a desired-state document unless it is the one handled last: fetches the
    /// artifacts it names that the cache lacks, then has the agent apply it. Returns
    /// whether there is a new outcome to report.
    async fn handle_desired(&mut self, doc: Vec<u8>) -> bool {
        if self.state.lock().desired_seen.as_ref() == Some(&doc) {
            return false;
        }
        let rejected = |revision, error: String, details: Vec<String>| DesiredOutcome {
            revision,
            result: "rejected".into(),
            retrying: false,
            error: Some(error),
            details,
            at_ms: now_ms(),
        };
        let mut retry = false;
        let outcome = match serde_json::from_slice::<DesiredInput>(&doc) {
            Err(e) => rejected(
                // The revision of a document that does not parse as a whole, if it has one.
                serde_json::from_slice::<serde_json::Value>(&doc)
                    .ok()
                    .and_then(|v| v.get("revision")?.as_u64()),
                format!("the desired state from the fleet is not valid: {e}"),
                Vec::new(),
            ),
            Ok(input) if input.revision.is_none() => rejected(
                None,
                "the desired state from the fleet must carry a `revision`".into(),
                Vec::new(),
            ),
            Ok(input) if input.revision <= Some(self.device.applied_revision()) => {
                // Not newer than what runs: already applied (or superseded locally).
                tracing::debug!(revision = ?input.revision, "desired state already applied");
                self.state.lock().desired_seen = Some(doc);
                return false;
            }
            Ok(input) => {
                let revision = input.revision;
                let failed = self.fetch_artifacts(&input).await;
                if !failed.is_empty() {
                    retry = failed.iter().any(|(_, e)| !e.permanent);
                    let mut outcome = rejected(
                        revision,
                        "artifacts of the desired state could not be had".into(),
                        failed
                            .iter()
                            .map(|(what, e)| format!("{what}: {e}"))
                            .collect(),
                    );
                    outcome.retrying = retry;
                    outcome
                } else {
                    match self.device.apply(input).await {
                        Ok(()) => DesiredOutcome {
                            revision,
                            result: "applied".into(),
                            retrying: false,
                            error: None,
                            details: Vec::new(),
                            at_ms: now_ms(),
                        },
                        Err(e) if e.kind == ErrorKind::Conflict => {
                            tracing::debug!(?revision, error = %e.message, "desired state already applied");
                            self.state.lock().desired_seen = Some(doc);
                            return false;
                        }
                        Err(e) => rejected(revision, e.message, e.details),
                    }
                }
            }
        };
        let mut state = self.state.lock();
        // A document waiting for artifacts is tried again at the next poll.
        state.desired_seen = (!retry).then_some(doc);
        let same = state.desired.as_ref().is_some_and(|d| {
            d.revision == outcome.revision
                && d.error == outcome.error
                && d.details == outcome.details
        });
        match &outcome.error {
            None => {
                tracing::info!(revision = ?outcome.revision, "desired state from the fleet applied")
            }
            // The same failure at every poll is logged once.
            Some(_) if same => {}
            Some(e) => tracing::warn!(
                revision = ?outcome.revision,
                error = %e,
                details = ?outcome.details,
                retrying = outcome.retrying,
                "desired state from the fleet rejected; the running set is kept"
            ),
        }
        state.desired = Some(outcome);
        !same
    }

    /// Fetches, verifies and caches every artifact of `input` the cache lacks. Returns the
    /// ones that could not be had, named by component.
    async fn fetch_artifacts(&mut self, input: &DesiredInput) -> Vec<(String, FetchError)> {
        let mut failed = Vec::new();
        let mut done = HashSet::new();
        for c in &input.components {
            if !done.insert(c.digest) {
                continue;
            }
            let what = format!("component `{}` ({})", c.name, c.digest.short());
            match self.store.has_blob(&c.digest) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    failed.push((what, FetchError::transient(format!("the cache: {e}"))));
                    continue;
                }
            }
            if let Some(reason) = self.refused.get(&c.digest) {
                failed.push((what, FetchError::permanent(reason.clone())));
                continue;
            }
            match self.fetch_one(c).await {
                Ok(()) => {}
                Err(e) => {
                    if e.permanent {
                        self.refused.insert(c.digest, e.reason.clone());
                    }
                    failed.push((what, e));
                }
            }
        }
        failed
    }

    async fn fetch_one(&mut self, c: &perch_core::ComponentSpec) -> Result<(), FetchError> {
        let mut partial = self.downloads.remove(&c.digest).unwrap_or_default();
        let mut progress = Progress::new(&c.digest);
        let from = partial.bytes.len();
        let started = std::time::Instant::now();
        let fetched = match &c.source {
            Some(url) => {
                let tls = match &self.tls {
                    Some(t) => Ok(t.clone()),
                    None => match mqtt::tls_config(&self.config) {
                        Ok(t) => {
                            let t = Arc::new(t);
                            self.tls = Some(t.clone());
                            Ok(t)
                        }
                        Err(e) => Err(format!("TLS for https:// sources: {e}")),
                    },
                };
                artifact::fetch_http(url, tls, &mut partial, &mut progress).await
            }
            None => {
                self.transport
                    .fetch_artifact(&c.digest, &mut partial, &mut progress)
                    .await
            }
        };
        if let Err(e) = fetched {
            if !e.permanent && !partial.bytes.is_empty() {
                tracing::info!(
                    digest = %c.digest.short(),
                    bytes = partial.bytes.len(),
                    error = %e,
                    "artifact download broken off; it resumes at the next attempt"
                );
                self.downloads.insert(c.digest, partial);
            }
            return Err(e);
        }
        let bytes = std::mem::take(&mut partial.bytes);
        let got = Digest::of(&bytes);
        if got != c.digest {
            // A download resumed across a changed source can mix two files: start over.
            return Err(if from > 0 {
                FetchError::transient(format!(
                    "the bytes hash to {got} after resuming at byte {from}; fetching again"
                ))
            } else {
                FetchError::permanent(format!("the bytes hash to {got}, not to the digest"))
            });
        }
        self.device
            .admit(&c.name, &bytes)
            .map_err(FetchError::permanent)?;
        self.store
            .put_blob(&bytes, Some(&c.digest))
            .map_err(|e| FetchError::transient(format!("caching it: {e}")))?;
        self.state.artifacts_fetched.fetch_add(1, Ordering::Relaxed);
        self.state
            .artifact_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        tracing::info!(
            component = %c.name,
            digest = %c.digest.short(),
            bytes = bytes.len(),
            resumed_at = from,
            elapsed_ms = started.elapsed().as_millis() as u64,
            source = c.source.as_deref().unwrap_or(self.transport.name()),
            "artifact fetched and verified"
        );
        Ok(())
    }
}
