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
//! The loop never gives up: a failed connect or publish backs off (100 ms doubling to 5 s)
//! and starts again from what the outbox still holds.

pub mod mqtt;
pub mod nats;
pub mod subjects;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use perch_core::command::{
    CommandError, DesiredInput, DesiredOutcome, ErrorKind, LinkState, SyncStatus,
};
use perch_core::config::{SyncConfig, SyncTransport};
use perch_store::{OutboxRecord, Store};
use tokio::sync::watch;

/// First delay after a failed attempt.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest delay between attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Outbox records read per publish call, in windows.
const READ_WINDOWS: usize = 4;

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

    /// Publishes `records` (in sequence order) and waits for their acks. Returns the
    /// sequence of the last record of the longest acknowledged prefix, if any, with the
    /// error that stopped it.
    fn publish<'a>(
        &'a mut self,
        records: &'a [(u64, OutboxRecord)],
    ) -> BoxFuture<'a, (Option<u64>, Result<(), SyncError>)>;

    /// Sends a heartbeat; an error means the link is down.
    fn heartbeat(&mut self, body: Vec<u8>) -> BoxFuture<'_, Result<(), SyncError>>;

    /// Puts the reported state; an error is reported and retried, and does not mean the
    /// link is down (the fleet side may be away while a local leaf node is up).
    fn put_reported(&mut self, body: Vec<u8>) -> BoxFuture<'_, Result<(), SyncError>>;

    /// The device's current desired-state document, if the fleet has one.
    fn fetch_desired(&mut self) -> BoxFuture<'_, Result<Option<Vec<u8>>, SyncError>>;

    /// Documents put while connected, as they arrive (ends when the link drops).
    fn watch_desired(&mut self) -> BoxFuture<'_, Result<BoxStream<'static, Vec<u8>>, SyncError>>;
}

/// Applies a desired state received from the fleet: the agent validates it fully and
/// switches to it, or keeps what runs and says why.
pub type Applier =
    Arc<dyn Fn(DesiredInput) -> BoxFuture<'static, Result<(), CommandError>> + Send + Sync>;

/// What the agent reports upstream with each heartbeat and reported-state put.
pub type Reporter = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// Shared state of the link, read by the API and metrics.
#[derive(Debug)]
pub struct SyncState {
    device: String,
    transport: &'static str,
    url: String,
    inner: Mutex<Inner>,
    sent: AtomicU64,
    connects: AtomicU64,
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
        }
    }
}

/// The running sync loop; stops when dropped.
#[derive(Debug)]
pub struct Link {
    state: Arc<SyncState>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Link {
    /// Starts syncing `store`'s outbox with the broker of `config`. Must be called inside a
    /// tokio runtime.
    pub fn start(
        config: &SyncConfig,
        store: Arc<dyn Store>,
        reporter: Reporter,
        applier: Applier,
    ) -> Result<Self, SyncError> {
        let transport: Box<dyn Transport> = match config.transport {
            SyncTransport::Nats => Box::new(nats::Nats::new(config)?),
            SyncTransport::Mqtt => Box::new(mqtt::Mqtt::new(config)?),
        };
        Ok(Self::with_transport(
            config, store, reporter, applier, transport,
        ))
    }

    /// Starts the loop over a given transport.
    pub fn with_transport(
        config: &SyncConfig,
        store: Arc<dyn Store>,
        reporter: Reporter,
        applier: Applier,
        transport: Box<dyn Transport>,
    ) -> Self {
        let state = Arc::new(SyncState::new(config));
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run(
            transport,
            store,
            state.clone(),
            config.clone(),
            reporter,
            applier,
            stopped,
        ));
        Self { state, stop, task }
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

async fn run(
    mut transport: Box<dyn Transport>,
    store: Arc<dyn Store>,
    state: Arc<SyncState>,
    config: SyncConfig,
    reporter: Reporter,
    applier: Applier,
    mut stopped: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut appended = store.outbox_watch();
    loop {
        if *stopped.borrow() {
            return;
        }
        if let Err(e) = transport.connect().await {
            state.set_link(LinkState::Disconnected);
            state.error(&e);
            if pause(backoff, &mut stopped).await {
                return;
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
            continue;
        }
        backoff = BACKOFF_MIN;
        state.connects.fetch_add(1, Ordering::Relaxed);
        state.set_link(LinkState::Connected);
        let mut reported_pending = true;
        let mut beat = tokio::time::interval(config.heartbeat);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut updates = match transport.watch_desired().await {
            Ok(u) => Some(u),
            Err(e) => {
                tracing::warn!(error = %e, "desired-state updates will be polled only");
                None
            }
        };
        // What the fleet wants now: it may have changed while the device was away.
        match transport.fetch_desired().await {
            Ok(Some(doc)) => {
                if handle_desired(&state, &applier, doc).await {
                    reported_pending = true;
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the desired state"),
        }
        let failure = 'session: loop {
            if reported_pending {
                let body = serde_json::to_vec(&reporter()).unwrap_or_default();
                match transport.put_reported(body).await {
                    Ok(()) => reported_pending = false,
                    Err(e) => tracing::debug!(error = %e, "reported state not delivered yet"),
                }
            }
            // Drain everything there is, one window at a time.
            loop {
                // Several windows per read: the transport keeps `window` records in flight
                // and the pipeline only drains at the end of a read.
                let records = match store.outbox_read(0, config.window * READ_WINDOWS) {
                    Ok(r) => r,
                    Err(e) => break 'session SyncError::Store(e.to_string()),
                };
                if records.is_empty() {
                    break;
                }
                let (acked, result) = transport.publish(&records).await;
                if let Some(through) = acked {
                    let n = records.iter().take_while(|(s, _)| *s <= through).count();
                    if let Err(e) = store.outbox_ack(through) {
                        break 'session SyncError::Store(e.to_string());
                    }
                    state.delivered(n as u64);
                }
                if let Err(e) = result {
                    break 'session e;
                }
            }
            tokio::select! {
                r = appended.changed() => {
                    if r.is_err() {
                        return;
                    }
                }
                Some(doc) = next_update(&mut updates) => {
                    if handle_desired(&state, &applier, doc).await {
                        reported_pending = true;
                    }
                }
                _ = beat.tick() => {
                    let mut body = reporter();
                    if let Some(obj) = body.as_object_mut() {
                        obj.insert("at-ms".into(), now_ms().into());
                    }
                    if let Err(e) = transport
                        .heartbeat(serde_json::to_vec(&body).unwrap_or_default())
                        .await
                    {
                        break 'session e;
                    }
                    // The reported state follows every heartbeat: it carries the backlog.
                    reported_pending = true;
                    // A poll catches what a live update missed (a mirror catching up).
                    match transport.fetch_desired().await {
                        Ok(Some(doc)) => {
                            handle_desired(&state, &applier, doc).await;
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
        state.set_link(LinkState::Disconnected);
        state.error(&failure);
        if pause(backoff, &mut stopped).await {
            return;
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// The next live desired-state document, or never when there is no live feed.
async fn next_update(updates: &mut Option<BoxStream<'static, Vec<u8>>>) -> Option<Vec<u8>> {
    match updates {
        Some(u) => match u.next().await {
            Some(doc) => Some(doc),
            None => {
                *updates = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

/// Applies `doc` unless it is the one handled last; returns whether there is a new outcome
/// to report.
async fn handle_desired(state: &SyncState, applier: &Applier, doc: Vec<u8>) -> bool {
    if state.lock().desired_seen.as_ref() == Some(&doc) {
        return false;
    }
    state.lock().desired_seen = Some(doc.clone());
    let outcome = match serde_json::from_slice::<DesiredInput>(&doc) {
        Err(e) => DesiredOutcome {
            // The revision of a document that does not parse as a whole, if it has one.
            revision: serde_json::from_slice::<serde_json::Value>(&doc)
                .ok()
                .and_then(|v| v.get("revision")?.as_u64()),
            result: "rejected".into(),
            error: Some(format!(
                "the desired state from the fleet is not valid: {e}"
            )),
            details: Vec::new(),
            at_ms: now_ms(),
        },
        Ok(input) if input.revision.is_none() => DesiredOutcome {
            revision: None,
            result: "rejected".into(),
            error: Some("the desired state from the fleet must carry a `revision`".into()),
            details: Vec::new(),
            at_ms: now_ms(),
        },
        Ok(input) => {
            let revision = input.revision;
            match applier(input).await {
                Ok(()) => DesiredOutcome {
                    revision,
                    result: "applied".into(),
                    error: None,
                    details: Vec::new(),
                    at_ms: now_ms(),
                },
                // Not newer than what runs: already applied (or superseded locally).
                Err(e) if e.kind == ErrorKind::Conflict => {
                    tracing::debug!(?revision, error = %e.message, "desired state already applied");
                    return false;
                }
                Err(e) => DesiredOutcome {
                    revision,
                    result: "rejected".into(),
                    error: Some(e.message),
                    details: e.details,
                    at_ms: now_ms(),
                },
            }
        }
    };
    match &outcome.error {
        None => {
            tracing::info!(revision = ?outcome.revision, "desired state from the fleet applied")
        }
        Some(e) => tracing::warn!(
            revision = ?outcome.revision,
            error = %e,
            details = ?outcome.details,
            "desired state from the fleet rejected; the running set is kept"
        ),
    }
    state.lock().desired = Some(outcome);
    true
}
