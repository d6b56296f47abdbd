//! NATS: telemetry into JetStream with `Nats-Msg-Id = <device>:<seq>`, heartbeats on core
//! NATS, the reported state as a put into the `perch-reported` KV bucket.
//!
//! Two deployments, one code path:
//! - **direct**: `url` is the hub; its JetStream must have a stream capturing
//!   `perch.v1.*.telemetry.>` (fleet-side setup, `docs/protocol.md`).
//! - **leaf** (recommended): `url` is a nats-server on the device running as a leaf node of
//!   the hub with its own JetStream domain, named by `domain`. The agent creates its stream
//!   `PERCH_OUT` there, so telemetry is acknowledged by the device's own server even when
//!   the hub is away, and the hub's stream sources `PERCH_OUT` across the leaf connection.
//!
//! Streams are created through the JetStream JSON API rather than the client's typed
//! helpers, which expect fields a 2.9 server does not send.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use futures::future::BoxFuture;
use perch_core::config::SyncConfig;
use perch_store::OutboxRecord;

use perch_core::Digest;

use crate::artifact::{FetchError, Partial, Progress, Resume};
use crate::{ReplyTo, Request, SyncError, Transport, subjects};

/// How long a connect, a request or an ack may take.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// How long `PERCH_OUT` remembers message ids to drop resends.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(600);
/// JetStream's error code for "stream name already in use" (it exists).
const STREAM_EXISTS: u64 = 10058;
/// JetStream's error code for "no message found".
const NO_MESSAGE: u64 = 10037;
/// JetStream's error code for "stream not found".
const NO_STREAM: u64 = 10059;

/// Subscribes to `subject`; a failure is a set-up error saying `what` was being done.
async fn subscribe(
    client: &async_nats::Client,
    subject: String,
    what: impl FnOnce() -> String,
) -> Result<async_nats::Subscriber, SyncError> {
    client
        .subscribe(subject)
        .await
        .map_err(|e| SyncError::Setup {
            what: what(),
            reason: e.to_string(),
        })
}

/// Local-bus messages to the fleet: core NATS publishes on `perch.v1.<device>.out.…`.
struct Outgoing {
    client: async_nats::Client,
    device: String,
}

impl crate::Outgoing for Outgoing {
    fn send(&self, message: crate::BusMessage) -> BoxFuture<'_, Result<(), SyncError>> {
        Box::pin(async move {
            let subject = subjects::outbound(&self.device, &message.subject);
            self.client
                .publish(subject, message.payload)
                .await
                .map_err(|e| SyncError::Publish {
                    what: format!("local-bus message `{}`", message.subject),
                    reason: e.to_string(),
                })
        })
    }
}

/// The NATS transport.
pub struct Nats {
    device: String,
    url: String,
    domain: Option<String>,
    window: usize,
    auth: Auth,
    tls: Tls,
    hub_domain: String,
    client: Option<async_nats::Client>,
    js: Option<jetstream::Context>,
    stream_ready: bool,
    mirror_ready: bool,
    /// Outbox records published and not acknowledged yet, oldest first.
    in_flight: VecDeque<(u64, jetstream::context::PublishAckFuture)>,
}

impl std::fmt::Debug for Nats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nats")
            .field("device", &self.device)
            .field("url", &self.url)
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

enum Auth {
    None,
    UserPassword(String, String),
    Token(String),
    Nkey(String),
}

struct Tls {
    ca: Option<std::path::PathBuf>,
    client: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl Nats {
    /// A transport for `config`; reads the nkey seed file now, so a missing file is a
    /// start-up error rather than a connect loop.
    pub fn new(config: &SyncConfig) -> Result<Self, SyncError> {
        let auth = if let Some(path) = &config.nkey_seed_file {
            let seed = std::fs::read_to_string(path).map_err(|e| {
                SyncError::Config(format!(
                    "sync.nkey-seed-file: cannot read {}: {e}",
                    path.display()
                ))
            })?;
            Auth::Nkey(seed.trim().to_string())
        } else if let Some(token) = &config.token {
            Auth::Token(token.clone())
        } else if let Some(user) = &config.user {
            Auth::UserPassword(user.clone(), config.password.clone().unwrap_or_default())
        } else {
            Auth::None
        };
        for (key, path) in [
            ("ca-file", &config.ca_file),
            ("cert-file", &config.cert_file),
            ("key-file", &config.key_file),
        ] {
            if let Some(p) = path
                && !p.is_file()
            {
                return Err(SyncError::Config(format!(
                    "sync.{key}: {} is not a readable file",
                    p.display()
                )));
            }
        }
        Ok(Self {
            device: config.device.clone(),
            url: config.url.clone(),
            domain: config.domain.clone(),
            window: config.window,
            auth,
            tls: Tls {
                ca: config.ca_file.clone(),
                client: config.cert_file.clone().zip(config.key_file.clone()),
            },
            hub_domain: config.hub_domain.clone(),
            client: None,
            js: None,
            stream_ready: false,
            in_flight: VecDeque::new(),
            mirror_ready: false,
        })
    }

    fn options(&self) -> async_nats::ConnectOptions {
        let mut o = match &self.auth {
            Auth::None => async_nats::ConnectOptions::new(),
            Auth::UserPassword(u, p) => {
                async_nats::ConnectOptions::with_user_and_password(u.clone(), p.clone())
            }
            Auth::Token(t) => async_nats::ConnectOptions::with_token(t.clone()),
            Auth::Nkey(seed) => async_nats::ConnectOptions::with_nkey(seed.clone()),
        };
        if let Some(ca) = &self.tls.ca {
            o = o.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let Some((cert, key)) = &self.tls.client {
            o = o.add_client_certificate(cert.clone(), key.clone());
        }
        o.name(format!("perchd {}", self.device))
            .connection_timeout(TIMEOUT)
            .request_timeout(Some(TIMEOUT))
            .ping_interval(Duration::from_secs(10))
            // The client reconnects on its own once connected; the sync loop waits for it.
            .max_reconnects(None)
            .event_callback(|event| async move {
                match event {
                    // The fleet sends faster than the components take messages and the
                    // client's buffer is full: NATS drops (core NATS is at most once).
                    async_nats::Event::SlowConsumer(sid) => tracing::warn!(
                        subscription = sid,
                        "messages from the fleet dropped: the device takes them slower than they arrive"
                    ),
                    event => tracing::debug!(%event, "nats client"),
                }
            })
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((100u64 << attempts.min(6)).min(2000))
            })
    }

    /// The client, if it is connected now.
    fn connected(&self) -> Result<&async_nats::Client, SyncError> {
        match &self.client {
            Some(c) if c.connection_state() == State::Connected => Ok(c),
            _ => Err(SyncError::NotConnected {
                url: self.url.clone(),
            }),
        }
    }

    /// The JetStream API prefix: the leaf's domain, or the connected server's own.
    fn api_prefix(&self) -> String {
        match &self.domain {
            Some(d) => format!("$JS.{d}.API"),
            None => "$JS.API".to_string(),
        }
    }

    /// The hub's JetStream API prefix, where the fleet's object store is: across the leaf
    /// connection in leaf mode, the connected server's own in direct mode.
    fn hub_api_prefix(&self) -> String {
        match &self.domain {
            Some(_) => format!("$JS.{}.API", self.hub_domain),
            None => "$JS.API".to_string(),
        }
    }

    /// One JetStream API request through the configured prefix; an `error` in the answer
    /// is returned as its JSON text.
    async fn api(&self, call: &str, body: &serde_json::Value) -> Result<serde_json::Value, String> {
        self.api_at(&self.api_prefix(), call, body).await
    }

    /// One JetStream API request through `prefix`.
    async fn api_at(
        &self,
        prefix: &str,
        call: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| "not connected".to_string())?;
        let subject = format!("{prefix}.{call}");
        let reply = client
            .request(subject, Bytes::from(body.to_string()))
            .await
            .map_err(|e| e.to_string())?;
        serde_json::from_slice(&reply.payload).map_err(|e| e.to_string())
    }

    /// Creates a stream from `config` unless one of that name exists.
    async fn create_stream(&self, config: serde_json::Value) -> Result<(), SyncError> {
        let name = config["name"].as_str().unwrap_or_default().to_string();
        let setup = |reason: String| SyncError::Setup {
            what: format!("stream {name} on {}", self.url),
            reason,
        };
        let body = self
            .api(&format!("STREAM.CREATE.{name}"), &config)
            .await
            .map_err(setup)?;
        if let Some(err) = body.get("error")
            && err.get("err_code").and_then(|c| c.as_u64()) != Some(STREAM_EXISTS)
        {
            return Err(setup(err.to_string()));
        }
        Ok(())
    }

    /// On a leaf node: a mirror of the hub's `perch-desired` KV filtered to this device, so
    /// the desired state is there whenever the leaf is, and catches up when the hub is back.
    async fn ensure_desired_mirror(&mut self) -> Result<(), SyncError> {
        if self.mirror_ready || self.domain.is_none() {
            return Ok(());
        }
        let stream = format!("KV_{}", subjects::DESIRED_BUCKET);
        self.create_stream(serde_json::json!({
            "name": stream,
            "storage": "file",
            "num_replicas": 1,
            "max_msgs_per_subject": 1,
            "mirror": {
                "name": stream,
                "external": { "api": format!("$JS.{}.API", self.hub_domain), "deliver": "" },
                "filter_subject": subjects::desired_kv(&self.device),
            },
        }))
        .await?;
        self.mirror_ready = true;
        Ok(())
    }

    /// Creates `PERCH_OUT` on the leaf node if it is not there.
    async fn ensure_leaf_stream(&mut self) -> Result<(), SyncError> {
        if self.stream_ready || self.domain.is_none() {
            return Ok(());
        }
        let config = serde_json::json!({
            "name": subjects::LEAF_STREAM,
            "subjects": [subjects::telemetry_all(&self.device)],
            "retention": "limits",
            "storage": "file",
            "discard": "old",
            "num_replicas": 1,
            "duplicate_window": DUPLICATE_WINDOW.as_nanos() as u64,
        });
        self.create_stream(config).await?;
        // JetStream does not capture publishes across domains, so the reported state goes
        // into the leaf's own `KV_perch-reported` too (this device's key only), and the
        // hub's bucket sources it like the telemetry.
        self.create_stream(serde_json::json!({
            "name": format!("KV_{}", subjects::REPORTED_BUCKET),
            "subjects": [subjects::reported_kv(&self.device)],
            "storage": "file",
            "num_replicas": 1,
            "max_msgs_per_subject": 1,
        }))
        .await?;
        tracing::info!(stream = subjects::LEAF_STREAM, domain = ?self.domain, "leaf stream ready");
        self.stream_ready = true;
        Ok(())
    }
}

/// The `data` of a `STREAM.MSG.GET` answer, decoded.
fn message_data(body: &serde_json::Value) -> Result<Vec<u8>, String> {
    use base64::Engine as _;
    body["message"]["data"]
        .as_str()
        .map(|d| base64::engine::general_purpose::STANDARD.decode(d))
        .transpose()
        .map(Option::unwrap_or_default)
        .map_err(|e| e.to_string())
}

/// An object's metadata, as object store clients write it (the fields read here).
#[derive(Debug, serde::Deserialize)]
struct ObjectMeta {
    nuid: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    deleted: bool,
}

impl Nats {
    /// Reads object `digest` of `perch-components` chunk by chunk, one `STREAM.MSG.GET`
    /// with `next_by_subj` per chunk, so a broken link resumes at the next chunk.
    async fn fetch_object(
        &self,
        digest: &Digest,
        partial: &mut Partial,
        progress: &mut Progress,
    ) -> Result<(), FetchError> {
        if self.connected().is_err() {
            return Err(FetchError::transient(format!(
                "not connected to {}",
                self.url
            )));
        }
        let bucket = subjects::OBJECT_BUCKET;
        let stream = subjects::object_stream(bucket);
        let prefix = self.hub_api_prefix();
        let get = format!("STREAM.MSG.GET.{stream}");
        let failed = |what: &str, e: String| {
            FetchError::transient(format!("{what} in object store `{bucket}`: {e}"))
        };
        let name = digest.to_string();
        let meta = self
            .api_at(
                &prefix,
                &get,
                &serde_json::json!({ "last_by_subj": subjects::object_meta(bucket, &name) }),
            )
            .await
            .map_err(|e| failed("reading the object's metadata", e))?;
        if let Some(err) = meta.get("error") {
            return Err(match err.get("err_code").and_then(|c| c.as_u64()) {
                Some(NO_MESSAGE) => FetchError::transient(format!(
                    "no object `{name}` in object store `{bucket}` yet"
                )),
                Some(NO_STREAM) => FetchError::transient(format!(
                    "the fleet has no object store `{bucket}` (stream {stream})"
                )),
                _ => failed("reading the object's metadata", err.to_string()),
            });
        }
        let meta: ObjectMeta = message_data(&meta)
            .and_then(|d| serde_json::from_slice(&d).map_err(|e| e.to_string()))
            .map_err(|e| failed(&format!("object `{name}` has unreadable metadata"), e))?;
        if meta.deleted {
            return Err(FetchError::transient(format!(
                "object `{name}` in object store `{bucket}` is deleted"
            )));
        }
        if meta.size > perch_core::MAX_COMPONENT_BYTES as u64 {
            return Err(FetchError::permanent(format!(
                "object `{name}` is {} bytes, more than the {} MiB an artifact may have",
                meta.size,
                perch_core::MAX_COMPONENT_BYTES >> 20
            )));
        }
        let mut next_seq = match &partial.resume {
            Resume::Object { nuid, next_seq } if *nuid == meta.nuid => *next_seq,
            _ => {
                partial.reset();
                1
            }
        };
        partial.total = Some(meta.size);
        let chunks = subjects::object_chunks(bucket, &meta.nuid);
        while (partial.bytes.len() as u64) < meta.size {
            let answer = self
                .api_at(
                    &prefix,
                    &get,
                    &serde_json::json!({ "seq": next_seq, "next_by_subj": chunks }),
                )
                .await
                .map_err(|e| {
                    failed(
                        &format!("reading `{name}` after {} bytes", partial.bytes.len()),
                        e,
                    )
                })?;
            if let Some(err) = answer.get("error") {
                return Err(failed(
                    &format!(
                        "object `{name}` ends after {} of {} bytes",
                        partial.bytes.len(),
                        meta.size
                    ),
                    err.to_string(),
                ));
            }
            let seq = answer["message"]["seq"].as_u64().ok_or_else(|| {
                failed(
                    "reading a chunk",
                    format!("an answer without a sequence: {answer}"),
                )
            })?;
            let data = message_data(&answer).map_err(|e| failed("reading a chunk", e))?;
            partial.push(&data)?;
            next_seq = seq + 1;
            partial.resume = Resume::Object {
                nuid: meta.nuid.clone(),
                next_seq,
            };
            progress.update(partial);
        }
        if partial.bytes.len() as u64 != meta.size {
            partial.reset();
            return Err(FetchError::transient(format!(
                "object `{name}` holds more chunks than its {} bytes; fetching again",
                meta.size
            )));
        }
        Ok(())
    }
}

impl Transport for Nats {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn connect(&mut self) -> BoxFuture<'_, Result<(), SyncError>> {
        Box::pin(async move {
            // A new sync session starts from the oldest record in the outbox.
            self.in_flight.clear();
            match &self.client {
                Some(c) if c.connection_state() == State::Connected => {}
                Some(_) => {
                    return Err(SyncError::NotConnected {
                        url: self.url.clone(),
                    });
                }
                None => {
                    let client = self.options().connect(&self.url).await.map_err(|e| {
                        SyncError::Connect {
                            url: self.url.clone(),
                            reason: e.to_string(),
                        }
                    })?;
                    let js = jetstream::context::ContextBuilder::new()
                        .api_prefix(self.api_prefix())
                        .timeout(TIMEOUT)
                        .ack_timeout(TIMEOUT)
                        .max_ack_inflight(self.window.max(1))
                        .backpressure_on_inflight(true)
                        .build(client.clone());
                    self.client = Some(client);
                    self.js = Some(js);
                }
            }
            self.ensure_leaf_stream().await?;
            if let Err(e) = self.ensure_desired_mirror().await {
                // Telemetry does not depend on it: report and try again next connect.
                tracing::warn!(error = %e, "desired state will not be mirrored to the leaf yet");
            }
            Ok(())
        })
    }

    fn publish<'a>(
        &'a mut self,
        records: &'a [(u64, OutboxRecord)],
    ) -> BoxFuture<'a, (Option<u64>, Result<(), SyncError>)> {
        Box::pin(async move {
            let (Some(js), Ok(_)) = (&self.js, self.connected()) else {
                self.in_flight.clear();
                return (
                    None,
                    Err(SyncError::NotConnected {
                        url: self.url.clone(),
                    }),
                );
            };
            // A sliding window: at most `window` records unacknowledged. The client holds
            // one permit per unawaited ack, so acks are awaited as the window fills (holding
            // more futures than permits would block the next publish for good).
            let mut acked = None;
            let mut error = None;
            for (seq, r) in records {
                if self.in_flight.len() >= self.window {
                    match settle_oldest(&mut self.in_flight).await {
                        Ok(Some(s)) => acked = Some(s),
                        Ok(None) => {}
                        Err(e) => {
                            error = Some(e);
                            break;
                        }
                    }
                }
                let message = PublishMessage::build()
                    .payload(Bytes::copy_from_slice(&r.payload))
                    .message_id(subjects::message_id(&self.device, *seq))
                    .header("Perch-Component", r.component.as_str())
                    .header("Perch-Time", r.timestamp_ms.to_string().as_str());
                match js
                    .send_publish(subjects::telemetry(&self.device, &r.stream), message)
                    .await
                {
                    Ok(ack) => self.in_flight.push_back((*seq, ack)),
                    Err(e) => {
                        error = Some(publish_failed(*seq, e.to_string()));
                        break;
                    }
                }
            }
            if error.is_some() {
                // Nothing after the failure counts: the next connection resends from the
                // oldest record in the outbox.
                self.in_flight.clear();
            }
            (acked, error.map_or(Ok(()), Err))
        })
    }

    fn flush(&mut self) -> BoxFuture<'_, (Option<u64>, Result<(), SyncError>)> {
        Box::pin(async move {
            let mut acked = None;
            while !self.in_flight.is_empty() {
                match settle_oldest(&mut self.in_flight).await {
                    Ok(Some(s)) => acked = Some(s),
                    Ok(None) => {}
                    Err(e) => {
                        self.in_flight.clear();
                        return (acked, Err(e));
                    }
                }
            }
            (acked, Ok(()))
        })
    }

    fn heartbeat(&mut self, body: Vec<u8>) -> BoxFuture<'_, Result<(), SyncError>> {
        Box::pin(async move {
            let client = self.connected()?;
            client
                .publish(subjects::heartbeat(&self.device), body.into())
                .await
                .map_err(|e| SyncError::Publish {
                    what: "heartbeat".into(),
                    reason: e.to_string(),
                })?;
            // A publish only fills the client's buffer; the client's own state says whether
            // the server is there (a closed socket at once, a silent one after missed pings).
            self.connected().map(drop)
        })
    }

    fn put_reported(&mut self, body: Vec<u8>) -> BoxFuture<'_, Result<(), SyncError>> {
        Box::pin(async move {
            let client = self.connected()?;
            // A KV put is a publish to `$KV.<bucket>.<key>`, acknowledged by the hub's KV
            // stream (direct) or the leaf's own, which the hub's sources (leaf).
            let hub = jetstream::new(client.clone());
            let fail = |reason: String| SyncError::Publish {
                what: format!("reported state to KV `{}`", subjects::REPORTED_BUCKET),
                reason,
            };
            let ack = hub
                .publish(subjects::reported_kv(&self.device), body.into())
                .await
                .map_err(|e| fail(e.to_string()))?;
            ack.await.map_err(|e| fail(e.to_string()))?;
            Ok(())
        })
    }

    fn fetch_desired(&mut self) -> BoxFuture<'_, Result<Option<Vec<u8>>, SyncError>> {
        Box::pin(async move {
            self.connected()?;
            let stream = format!("KV_{}", subjects::DESIRED_BUCKET);
            let fail = |reason: String| SyncError::Setup {
                what: format!(
                    "reading the desired state from KV `{}`",
                    subjects::DESIRED_BUCKET
                ),
                reason,
            };
            let body = self
                .api(
                    &format!("STREAM.MSG.GET.{stream}"),
                    &serde_json::json!({ "last_by_subj": subjects::desired_kv(&self.device) }),
                )
                .await
                .map_err(fail)?;
            if let Some(err) = body.get("error") {
                // No desired state for this device yet, or no bucket yet.
                return match err.get("err_code").and_then(|c| c.as_u64()) {
                    Some(NO_MESSAGE) | Some(NO_STREAM) => Ok(None),
                    _ => Err(fail(err.to_string())),
                };
            }
            use base64::Engine as _;
            let b64 = base64::engine::general_purpose::STANDARD;
            let m = &body["message"];
            let headers = m["hdrs"]
                .as_str()
                .and_then(|h| b64.decode(h).ok())
                .map(|h| String::from_utf8_lossy(&h).into_owned())
                .unwrap_or_default();
            // A deleted or purged key: no desired state.
            if headers.contains("KV-Operation: DEL") || headers.contains("KV-Operation: PURGE") {
                return Ok(None);
            }
            let data = m["data"]
                .as_str()
                .map(|d| b64.decode(d))
                .transpose()
                .map_err(|e| fail(e.to_string()))?
                .unwrap_or_default();
            Ok(Some(data))
        })
    }

    fn fetch_artifact<'a>(
        &'a mut self,
        digest: &'a Digest,
        partial: &'a mut Partial,
        progress: &'a mut Progress,
    ) -> BoxFuture<'a, Result<(), FetchError>> {
        Box::pin(self.fetch_object(digest, partial, progress))
    }

    fn commands(
        &mut self,
    ) -> BoxFuture<'_, Result<futures::stream::BoxStream<'static, Request>, SyncError>> {
        Box::pin(async move {
            let client = self.connected()?;
            let subject = subjects::commands(&self.device);
            let sub = subscribe(client, subject.clone(), || {
                format!("subscribing to {subject}")
            })
            .await?;
            use futures::StreamExt;
            Ok(sub
                .filter_map(|m| async move {
                    let Some(reply) = m.reply else {
                        tracing::debug!(subject = %m.subject, "a command without a reply subject is ignored");
                        return None;
                    };
                    let op = m.subject.rsplit('.').next().unwrap_or_default().to_string();
                    let id = m
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(subjects::CMD_ID).map(|v| v.to_string()));
                    Some(Request {
                        op,
                        body: m.payload.to_vec(),
                        reply_to: ReplyTo {
                            address: reply.to_string(),
                            correlation: None,
                            id,
                        },
                    })
                })
                .boxed())
        })
    }

    fn messages(&mut self) -> BoxFuture<'_, Result<crate::Messages, SyncError>> {
        Box::pin(async move {
            let client = self.connected()?.clone();
            let prefix = subjects::inbound_prefix(&self.device);
            let filter = format!("{prefix}>");
            let sub = subscribe(&client, filter.clone(), || {
                format!("subscribing to {filter}")
            })
            .await?;
            // The server knows the subscription before the link is called up.
            client.flush().await.map_err(|e| SyncError::Setup {
                what: format!("subscribing to {filter}"),
                reason: e.to_string(),
            })?;
            use futures::StreamExt;
            let incoming = sub
                .filter_map(move |m| {
                    let subject = m.subject.strip_prefix(prefix.as_str()).map(str::to_string);
                    async move {
                        Some(crate::Inbound {
                            message: crate::BusMessage {
                                subject: subject?,
                                payload: m.payload,
                            },
                            taken: None,
                        })
                    }
                })
                .boxed();
            Ok(crate::Messages {
                incoming,
                outgoing: Arc::new(Outgoing {
                    client,
                    device: self.device.clone(),
                }),
            })
        })
    }

    fn reply<'a>(
        &'a mut self,
        to: &'a ReplyTo,
        body: Vec<u8>,
    ) -> BoxFuture<'a, Result<(), SyncError>> {
        Box::pin(async move {
            let client = self.connected()?;
            let fail = |e: String| SyncError::Publish {
                what: format!("the answer to a command on {}", to.address),
                reason: e,
            };
            match &to.id {
                Some(id) => {
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert(subjects::CMD_ID, id.as_str());
                    client
                        .publish_with_headers(to.address.clone(), headers, body.into())
                        .await
                }
                None => client.publish(to.address.clone(), body.into()).await,
            }
            .map_err(|e| fail(e.to_string()))?;
            client.flush().await.map_err(|e| fail(e.to_string()))
        })
    }

    fn watch_desired(
        &mut self,
    ) -> BoxFuture<'_, Result<futures::stream::BoxStream<'static, Vec<u8>>, SyncError>> {
        Box::pin(async move {
            let client = self.connected()?;
            let sub = subscribe(client, subjects::desired_kv(&self.device), || {
                "subscribing to desired-state updates".into()
            })
            .await?;
            use futures::StreamExt;
            Ok(sub
                .filter_map(|m| async move {
                    let op = m
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("KV-Operation").map(|v| v.to_string()));
                    (op.is_none()).then(|| m.payload.to_vec())
                })
                .boxed())
        })
    }
}

/// Waits for the oldest record in flight to be acknowledged; its sequence number, or the
/// error (acks arrive in order: the acknowledged prefix ends there).
async fn settle_oldest(
    in_flight: &mut VecDeque<(u64, jetstream::context::PublishAckFuture)>,
) -> Result<Option<u64>, SyncError> {
    let Some((seq, ack)) = in_flight.pop_front() else {
        return Ok(None);
    };
    match ack.await {
        Ok(_) => Ok(Some(seq)),
        Err(e) => Err(publish_failed(seq, e.to_string())),
    }
}

fn publish_failed(seq: u64, reason: String) -> SyncError {
    SyncError::Publish {
        what: format!("outbox record {seq}"),
        reason,
    }
}
