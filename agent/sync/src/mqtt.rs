//! MQTT v5: telemetry as QoS 1 publishes carrying the outbox message id in a user property,
//! presence and reported state as retained messages, desired state from a retained topic.
//!
//! Topics are the NATS subject tree with `/` (`perch/v1/<device>/…`, see
//! `docs/protocol.md`). One connection is one *session* here: a task owns rumqttc's
//! `EventLoop` and polls it without pause, and the transport talks to it through the
//! client's request channel and a [`Tracker`] that pairs every QoS 1 publish with its
//! PUBACK. When the connection fails the session is dropped whole (rumqttc's in-flight
//! state with it) and the next [`Transport::connect`] opens a fresh one; what was not
//! acknowledged is still in the outbox and is sent again from there. rumqttc's own
//! retransmission is never relied on: it keeps in-flight messages only in memory.
//!
//! Why v5 and not 3.1.1: a v5 PUBACK carries a reason code, so a publish the broker refuses
//! (ACL denial, payload too large, quota) stays in the outbox instead of being deleted
//! after a positive ack that a 3.1.1 broker must send or disconnect; user properties carry
//! the message id, component and time like the NATS headers, with topics and payloads
//! unchanged; the session expiry interval bounds how long the broker keeps the device's
//! session; the broker's receive maximum sets rumqttc's in-flight limit.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use perch_core::config::SyncConfig;
use perch_store::OutboxRecord;
use rumqttc::tokio_rustls::rustls;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    LastWill, Packet, PubAck, PubAckReason, PublishProperties, SubAck, SubscribeReasonCode,
};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{Outgoing, TlsConfiguration};
use tokio::sync::{oneshot, watch};

use crate::{SyncError, Transport, subjects};

/// How long connecting (TCP, TLS and CONNACK) may take.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// How long a PUBACK or SUBACK may take once its packet is handed to the client; a broker
/// silent for longer ends the session.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// MQTT keep-alive: rumqttc pings this often, and the broker publishes the last will when
/// it hears nothing for 1.5 times as long.
pub const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// How long the broker keeps the device's session (its subscription and the QoS 1
/// messages queued for it) after the connection drops.
pub const SESSION_EXPIRY: Duration = Duration::from_secs(24 * 3600);
/// Largest packet the device accepts (a desired-state document); the broker learns it in
/// CONNECT.
pub const MAX_INCOMING_PACKET: u32 = 4 << 20;
/// Requests queued towards rumqttc's event loop; it takes them as its in-flight window
/// (the broker's receive maximum, at most `window`) allows.
const REQUEST_CAPACITY: usize = 64;
/// Default ports.
const MQTT_PORT: u16 = 1883;
const MQTTS_PORT: u16 = 8883;
/// Where a system's CA bundle usually is, for `mqtts://` without `ca-file`.
const CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// User property carrying the outbox message id `<device>:<seq>` receivers dedup on.
pub const MSG_ID_PROPERTY: &str = "perch-msg-id";
/// User property naming the component that published a record.
pub const COMPONENT_PROPERTY: &str = "perch-component";
/// User property with the record's publish time, Unix milliseconds.
pub const TIME_PROPERTY: &str = "perch-time";
/// Presence payloads on `perch/v1/<device>/online` (retained).
pub const ONLINE: &[u8] = b"1";
pub const OFFLINE: &[u8] = b"0";

/// `perch/v1/<device>/telemetry/<stream>`
pub fn telemetry_topic(device: &str, stream: &str) -> String {
    subjects::mqtt_topic(&subjects::telemetry(device, stream))
}

/// `perch/v1/<device>/hb`
pub fn heartbeat_topic(device: &str) -> String {
    subjects::mqtt_topic(&subjects::heartbeat(device))
}

/// `perch/v1/<device>/online`: `1` (retained) while connected, `0` as the last will.
pub fn online_topic(device: &str) -> String {
    format!("{}/online", device_root(device))
}

/// `perch/v1/<device>/reported` (retained).
pub fn reported_topic(device: &str) -> String {
    format!("{}/reported", device_root(device))
}

/// `perch/v1/<device>/desired` (retained by the fleet).
pub fn desired_topic(device: &str) -> String {
    format!("{}/desired", device_root(device))
}

/// `perch/v1/<device>/desired/get`: an empty message asking the fleet to publish the
/// desired state again (for fleets that do not retain it).
pub fn desired_get_topic(device: &str) -> String {
    format!("{}/desired/get", device_root(device))
}

/// `perch/v1/<device>/cmd/+`: commands from the fleet, one level per operation.
pub fn commands_filter(device: &str) -> String {
    format!("{}/cmd/+", device_root(device))
}

/// `perch/v1/<device>/cmd/<op>/reply`: where a command without a response topic is
/// answered (MQTT 3.1.1 requesters cannot set one).
pub fn default_reply_topic(device: &str, op: &str) -> String {
    format!("{}/cmd/{op}/reply", device_root(device))
}

/// `perch/v1/<device>/in/#`: messages from the fleet for the device's local bus; the
/// levels after `in/` are the local subject's tokens.
pub fn inbound_filter(device: &str) -> String {
    format!("{}/in/#", device_root(device))
}

/// `perch/v1/<device>/out/<subject with / for .>`: a local-bus message for the fleet.
pub fn outbound_topic(device: &str, subject: &str) -> String {
    subjects::mqtt_topic(&subjects::outbound(device, subject))
}

/// QoS 1 messages the broker may have in flight to the device unacknowledged (the receive
/// maximum sent in CONNECT). Local-bus messages are acknowledged once the bus took them,
/// so this is also how far the broker runs ahead of slow components.
const RECEIVE_MAXIMUM: u16 = 256;
/// Local-bus messages received and not yet handed to the bus: room for every QoS 1
/// message the broker may send unacknowledged, and more; only a QoS 0 flood overflows it.
const MESSAGE_QUEUE: usize = 2 * RECEIVE_MAXIMUM as usize;

/// User property naming a command, echoed in its answer; a repeated id runs once.
pub const CMD_ID_PROPERTY: &str = "perch-cmd-id";
/// Commands received and not yet taken by the sync loop; more are dropped (and logged).
const COMMAND_QUEUE: usize = 256;

fn device_root(device: &str) -> String {
    format!("{}/{device}", subjects::mqtt_topic(subjects::ROOT))
}

/// The MQTT transport.
pub struct Mqtt {
    device: String,
    url: String,
    options: MqttOptions,
    session: Option<Session>,
    /// Why the last session was ended here, until the next one is open.
    lost: Option<String>,
    /// Most outbox records unacknowledged at once (the broker's receive maximum and the
    /// request channel usually allow fewer).
    window: usize,
    /// Outbox records handed to the session and not acknowledged yet, oldest first.
    in_flight: VecDeque<(u64, AckReceiver)>,
}

type AckReceiver = oneshot::Receiver<Result<(), AckError>>;

impl std::fmt::Debug for Mqtt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mqtt")
            .field("device", &self.device)
            .field("url", &self.url)
            .field(
                "connected",
                &self.session.as_ref().is_some_and(Session::alive),
            )
            .finish_non_exhaustive()
    }
}

/// Where the broker is: `mqtt://host[:port]` or `mqtts://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Broker {
    tls: bool,
    host: String,
    port: u16,
}

fn parse_url(url: &str) -> Result<Broker, SyncError> {
    let bad = |why: &str| SyncError::Config(format!("sync.url: `{url}` {why}"));
    let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("mqtt://") {
        (false, rest)
    } else {
        return Err(bad("must start with mqtt:// or mqtts://"));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') || rest.contains('@') || rest.contains('?') {
        return Err(bad(
            "must be only a host and port; credentials go in `user` and `password`",
        ));
    }
    let default = if tls { MQTTS_PORT } else { MQTT_PORT };
    // `host:port`, `[v6]:port` or a bare host.
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') && (!h.contains(':') || h.ends_with(']')) => (
            h,
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad("has a port that is not a number from 1 to 65535"))?,
        ),
        _ => (rest, default),
    };
    if host.is_empty() {
        return Err(bad("has no host"));
    }
    Ok(Broker {
        tls,
        host: host.to_string(),
        port,
    })
}

fn read_file(key: &str, path: &std::path::Path) -> Result<Vec<u8>, SyncError> {
    std::fs::read(path)
        .map_err(|e| SyncError::Config(format!("sync.{key}: cannot read {}: {e}", path.display())))
}

/// A rustls client config with the ring provider (the one async-nats brings; rumqttc is
/// built without a provider of its own), trusting `ca-file` or the system's CA bundle,
/// with the client certificate of `cert-file` and `key-file` if given.
pub(crate) fn tls_config(config: &SyncConfig) -> Result<rustls::ClientConfig, SyncError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let (ca_key, ca_path) = match &config.ca_file {
        Some(p) => ("ca-file", p.clone()),
        None => match CA_BUNDLES
            .iter()
            .map(std::path::PathBuf::from)
            .find(|p| p.is_file())
        {
            Some(p) => ("ca-file (system bundle)", p),
            None => {
                return Err(SyncError::Config(format!(
                    "sync.ca-file: `{}` needs the broker's CA certificate: there is no system CA bundle ({})",
                    config.url,
                    CA_BUNDLES.join(", ")
                )));
            }
        },
    };
    let ca = read_file(ca_key, &ca_path)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&ca) {
        let cert = cert
            .map_err(|e| SyncError::Config(format!("sync.{ca_key}: {}: {e}", ca_path.display())))?;
        roots
            .add(cert)
            .map_err(|e| SyncError::Config(format!("sync.{ca_key}: {}: {e}", ca_path.display())))?;
    }
    if roots.is_empty() {
        return Err(SyncError::Config(format!(
            "sync.{ca_key}: {} holds no PEM certificate",
            ca_path.display()
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SyncError::Config(format!("sync: TLS: {e}")))?
        .with_root_certificates(roots);
    match (&config.cert_file, &config.key_file) {
        (Some(cert_path), Some(key_path)) => {
            let pem = read_file("cert-file", cert_path)?;
            let chain = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    SyncError::Config(format!("sync.cert-file: {}: {e}", cert_path.display()))
                })?;
            if chain.is_empty() {
                return Err(SyncError::Config(format!(
                    "sync.cert-file: {} holds no PEM certificate",
                    cert_path.display()
                )));
            }
            let key =
                PrivateKeyDer::from_pem_slice(&read_file("key-file", key_path)?).map_err(|e| {
                    SyncError::Config(format!("sync.key-file: {}: {e}", key_path.display()))
                })?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                SyncError::Config(format!(
                    "sync.cert-file/key-file: {} and {}: {e}",
                    cert_path.display(),
                    key_path.display()
                ))
            })
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

impl Mqtt {
    /// A transport for `config`; reads the TLS files now, so a missing or broken file is a
    /// start-up error rather than a connect loop.
    pub fn new(config: &SyncConfig) -> Result<Self, SyncError> {
        let broker = parse_url(&config.url)?;
        if config.token.is_some() || config.nkey_seed_file.is_some() {
            return Err(SyncError::Config(
                "sync.token / sync.nkey-seed-file: NATS credentials; MQTT takes `user` and `password`"
                    .into(),
            ));
        }
        let mut options = MqttOptions::new(
            format!("perch-{}", config.device),
            broker.host.clone(),
            broker.port,
        );
        // Nagle's algorithm would hold a publish back until the broker acked the previous
        // segment, and the broker delays that ack (up to 40 ms on Linux) hoping to piggyback
        // it: every small burst (an acknowledged window, a heartbeat) would wait for the timer.
        let mut network = options.network_options();
        network.set_tcp_nodelay(true);
        options
            .set_keep_alive(KEEP_ALIVE)
            .set_clean_start(false)
            .set_session_expiry_interval(Some(SESSION_EXPIRY.as_secs() as u32))
            .set_max_packet_size(Some(MAX_INCOMING_PACKET))
            .set_connection_timeout(TIMEOUT.as_secs())
            .set_network_options(network)
            .set_request_channel_capacity(REQUEST_CAPACITY)
            // Incoming QoS 1 publishes are acknowledged by the transport: local-bus messages
            // only once the bus took them, so none is lost between PUBACK and delivery.
            .set_manual_acks(true)
            .set_receive_maximum(Some(RECEIVE_MAXIMUM))
            // rumqttc sizes its in-flight table by this; the broker's receive maximum may
            // lower it.
            .set_outgoing_inflight_upper_limit(config.window.clamp(1, u16::MAX as usize) as u16)
            .set_last_will(LastWill::new(
                online_topic(&config.device),
                OFFLINE.to_vec(),
                QoS::AtLeastOnce,
                true,
                None,
            ));
        if let Some(user) = &config.user {
            options.set_credentials(user.clone(), config.password.clone().unwrap_or_default());
        }
        if broker.tls {
            options.set_transport(rumqttc::Transport::Tls(TlsConfiguration::Rustls(Arc::new(
                tls_config(config)?,
            ))));
        } else if config.ca_file.is_some() || config.cert_file.is_some() {
            return Err(SyncError::Config(format!(
                "sync.ca-file / sync.cert-file: TLS files given, but `{}` is not mqtts://",
                config.url
            )));
        }
        Ok(Self {
            device: config.device.clone(),
            url: config.url.clone(),
            options,
            session: None,
            lost: None,
            window: config.window.max(1),
            in_flight: VecDeque::new(),
        })
    }

    /// The session, if its connection is up; otherwise why `what` cannot be done (the
    /// reason the connection ended, when there was one).
    /// One QoS 1 publish, waited for: a refusal is an error; a lost connection also ends
    /// the session.
    async fn publish_acked(
        &mut self,
        what: &str,
        topic: String,
        retain: bool,
        payload: Bytes,
        properties: Option<PublishProperties>,
    ) -> Result<(), SyncError> {
        let session = self.live(what)?;
        let result = match session
            .publish(topic.clone(), retain, payload, properties)
            .await
        {
            Ok(ack) => session.ack(ack).await,
            Err(reason) => Err(AckError::Lost(reason)),
        };
        let fail = |reason: String| SyncError::Publish {
            what: format!("{what} to {topic}"),
            reason,
        };
        match result {
            Ok(()) => Ok(()),
            Err(AckError::Refused(reason)) => Err(fail(reason)),
            Err(AckError::Lost(reason)) => {
                self.end_session(&reason);
                Err(fail(reason))
            }
        }
    }

    fn live(&self, what: &str) -> Result<&Session, SyncError> {
        match &self.session {
            Some(s) if s.alive() => Ok(s),
            Some(s) => Err(SyncError::Publish {
                what: format!("{what} to {}", self.url),
                reason: format!("the connection was lost: {}", s.end_reason()),
            }),
            None => match &self.lost {
                Some(reason) => Err(SyncError::Publish {
                    what: format!("{what} to {}", self.url),
                    reason: format!("the connection was given up: {reason}"),
                }),
                None => Err(SyncError::NotConnected {
                    url: self.url.clone(),
                }),
            },
        }
    }

    /// The session, if its connection is up.
    fn connected(&self) -> Result<&Session, SyncError> {
        match &self.session {
            Some(s) if s.alive() => Ok(s),
            _ => Err(SyncError::NotConnected {
                url: self.url.clone(),
            }),
        }
    }

    /// [`Self::connected`], mutably (to take the session's feeds).
    fn connected_mut(&mut self) -> Result<&mut Session, SyncError> {
        self.connected()?;
        let url = &self.url;
        self.session
            .as_mut()
            .ok_or_else(|| SyncError::NotConnected { url: url.clone() })
    }

    /// Ends a `publish` or `flush`: keeps what is still in flight, or after a failure
    /// nothing (the next sync session resends from the outbox) and, when the connection was
    /// lost, ends the session.
    fn finish_publish(
        &mut self,
        in_flight: VecDeque<(u64, AckReceiver)>,
        Prefix { acked, stopped }: Prefix,
    ) -> (Option<u64>, Result<(), SyncError>) {
        let fail = |seq: u64, reason: String| SyncError::Publish {
            what: format!("outbox record {seq} to {}", self.url),
            reason,
        };
        match stopped {
            None => {
                self.in_flight = in_flight;
                (acked, Ok(()))
            }
            // Refused by the broker: the session is fine, the record stays in the outbox.
            Some((seq, AckError::Refused(reason))) => (acked, Err(fail(seq, reason))),
            Some((seq, AckError::Lost(reason))) => {
                let error = fail(seq, reason.clone());
                self.end_session(&reason);
                (acked, Err(error))
            }
        }
    }

    /// Ends the session because of `reason`: the connection closes without DISCONNECT, so
    /// the broker publishes the last will; the next `connect` opens a fresh one.
    fn end_session(&mut self, reason: &str) {
        if self.session.take().is_some() {
            tracing::warn!(url = %self.url, %reason, "mqtt connection given up");
            self.lost = Some(reason.to_string());
        }
    }
}

impl Transport for Mqtt {
    fn name(&self) -> &'static str {
        "mqtt"
    }

    fn connect(&mut self) -> BoxFuture<'_, Result<(), SyncError>> {
        Box::pin(async move {
            // A new sync session starts from the oldest record in the outbox.
            self.in_flight.clear();
            if self.session.as_ref().is_some_and(Session::alive) {
                return Ok(());
            }
            // The event loop of a dead session is gone already; this drops the client.
            self.session = None;
            let session = Session::open(&self.options, &self.device, &self.url).await?;
            self.session = Some(session);
            self.lost = None;
            Ok(())
        })
    }

    fn publish<'a>(
        &'a mut self,
        records: &'a [(u64, OutboxRecord)],
    ) -> BoxFuture<'a, (Option<u64>, Result<(), SyncError>)> {
        Box::pin(async move {
            // Nothing stays in flight after a failure: taken here, put back when all is well.
            let mut in_flight = std::mem::take(&mut self.in_flight);
            let session = match self.live("telemetry") {
                Ok(s) => s,
                Err(e) => return (None, Err(e)),
            };
            // Hand each record to the event loop (it sends them as its in-flight window
            // allows) and take the PUBACKs in order as they come; those still due stay in
            // flight for the next call.
            let mut prefix = Prefix::default();
            'records: for (seq, r) in records {
                while in_flight.len() >= self.window {
                    if !prefix.settle(settle_oldest(session, &mut in_flight, true).await) {
                        break 'records;
                    }
                }
                let properties = PublishProperties {
                    user_properties: vec![
                        (
                            MSG_ID_PROPERTY.into(),
                            subjects::message_id(&self.device, *seq),
                        ),
                        (COMPONENT_PROPERTY.into(), r.component.clone()),
                        (TIME_PROPERTY.into(), r.timestamp_ms.to_string()),
                    ],
                    ..PublishProperties::default()
                };
                let sent = session
                    .publish(
                        telemetry_topic(&self.device, &r.stream),
                        false,
                        Bytes::copy_from_slice(&r.payload),
                        Some(properties),
                    )
                    .await;
                match sent {
                    Ok(ack) => in_flight.push_back((*seq, ack)),
                    Err(reason) => {
                        prefix.settle(Some((*seq, Err(AckError::Lost(reason)))));
                        break;
                    }
                }
            }
            // What is acknowledged already counts now, without waiting for the rest.
            while prefix.settle(settle_oldest(session, &mut in_flight, false).await) {}
            self.finish_publish(in_flight, prefix)
        })
    }

    fn flush(&mut self) -> BoxFuture<'_, (Option<u64>, Result<(), SyncError>)> {
        Box::pin(async move {
            let mut in_flight = std::mem::take(&mut self.in_flight);
            let session = match self.live("telemetry") {
                Ok(s) => s,
                Err(e) => return (None, Err(e)),
            };
            let mut prefix = Prefix::default();
            while prefix.settle(settle_oldest(session, &mut in_flight, true).await) {}
            self.finish_publish(in_flight, prefix)
        })
    }

    fn heartbeat(&mut self, body: Vec<u8>) -> BoxFuture<'_, Result<(), SyncError>> {
        Box::pin(async move {
            let session = self.live("heartbeat")?;
            let sent = tokio::time::timeout(
                ACK_TIMEOUT,
                session
                    .client
                    .publish(heartbeat_topic(&self.device), QoS::AtMostOnce, false, body),
            )
            .await;
            let failed = match sent {
                Ok(Ok(())) => None,
                Ok(Err(_)) => Some(session.end_reason()),
                Err(_) => Some(format!(
                    "the broker took no new message for {ACK_TIMEOUT:?}"
                )),
            };
            if let Some(reason) = failed {
                self.end_session(&reason);
                return Err(SyncError::Publish {
                    what: format!("heartbeat to {}", self.url),
                    reason,
                });
            }
            // The event loop task sees a closed socket at once and a silent broker after a
            // missed ping (keep-alive); either ends the session.
            self.live("heartbeat").map(drop)
        })
    }

    fn put_reported(&mut self, body: Vec<u8>) -> BoxFuture<'_, Result<(), SyncError>> {
        Box::pin(async move {
            let topic = reported_topic(&self.device);
            self.publish_acked("reported state", topic, true, body.into(), None)
                .await
        })
    }

    fn fetch_desired(&mut self) -> BoxFuture<'_, Result<Option<Vec<u8>>, SyncError>> {
        Box::pin(async move {
            // The retained document arrives right after the SUBACK; one that arrives after
            // this read comes through `watch_desired` (the loop opens it first), so nothing
            // waits here and the backlog starts draining at once.
            let session = self.connected()?;
            let doc = session.desired.borrow().doc.clone();
            Ok(doc)
        })
    }

    fn commands(&mut self) -> BoxFuture<'_, Result<BoxStream<'static, crate::Request>, SyncError>> {
        Box::pin(async move { take_feed(&mut self.connected_mut()?.commands, "commands") })
    }

    fn messages(&mut self) -> BoxFuture<'_, Result<crate::Messages, SyncError>> {
        Box::pin(async move {
            let device = self.device.clone();
            let session = self.connected_mut()?;
            let incoming = take_feed(&mut session.messages, "local-bus messages")?;
            Ok(crate::Messages {
                incoming,
                outgoing: Arc::new(BusOutgoing {
                    client: session.client.clone(),
                    device,
                }),
            })
        })
    }

    fn reply<'a>(
        &'a mut self,
        to: &'a crate::ReplyTo,
        body: Vec<u8>,
    ) -> BoxFuture<'a, Result<(), SyncError>> {
        Box::pin(async move {
            let properties = PublishProperties {
                correlation_data: to.correlation.clone().map(Bytes::from),
                user_properties: to
                    .id
                    .iter()
                    .map(|id| (CMD_ID_PROPERTY.to_string(), id.clone()))
                    .collect(),
                content_type: Some("application/json".into()),
                ..Default::default()
            };
            self.publish_acked(
                "the answer to a command",
                to.address.clone(),
                false,
                body.into(),
                Some(properties),
            )
            .await
        })
    }

    fn watch_desired(&mut self) -> BoxFuture<'_, Result<BoxStream<'static, Vec<u8>>, SyncError>> {
        Box::pin(async move {
            let session = self.connected()?;
            if session.subscribed_at.is_none() {
                return Err(SyncError::Setup {
                    what: format!("subscribing to {}", desired_topic(&self.device)),
                    reason: "the broker refused the subscription".into(),
                });
            }
            let mut rx = session.desired.clone();
            // What is there now is for `fetch_desired`; the stream carries what follows.
            rx.borrow_and_update();
            let stream = futures::stream::unfold(rx, |mut rx| async move {
                loop {
                    rx.changed().await.ok()?;
                    let doc = rx.borrow_and_update().doc.clone();
                    if let Some(doc) = doc {
                        return Some((doc, rx));
                    }
                }
            });
            use futures::StreamExt;
            Ok(stream.boxed())
        })
    }
}

/// The last desired-state document received in a session.
#[derive(Debug, Clone, Default)]
struct Desired {
    /// The document; `None` when the fleet cleared the retained message (empty payload).
    doc: Option<Vec<u8>>,
}

/// Why an acknowledgement did not come.
#[derive(Debug, Clone, PartialEq, Eq)]
enum AckError {
    /// The broker answered with a failure reason code; the connection is fine.
    Refused(String),
    /// The connection failed or the broker did not answer in time.
    Lost(String),
}

type Waiter = oneshot::Sender<Result<(), AckError>>;

/// Pairs QoS 1 publishes and subscriptions with their acknowledgements. rumqttc reports
/// `Outgoing::Publish(pkid)` in the order it takes requests from its channel, and the
/// transport registers a waiter just before handing each request to the client, so the
/// n-th QoS 1 publish event belongs to the n-th registered waiter.
#[derive(Debug, Default)]
struct Tracker {
    /// QoS 1 publishes handed to the client and not yet sent, in order.
    unsent: VecDeque<Waiter>,
    /// A publish rumqttc holds back because its packet id is still in flight
    /// (`Outgoing::AwaitAck`); it is sent (`Outgoing::Publish`) when that id is acked.
    collided: Option<Waiter>,
    /// Sent QoS 1 publishes by packet id.
    unacked: HashMap<u16, Waiter>,
    /// The same for subscriptions.
    subs_unsent: VecDeque<Waiter>,
    subs_unacked: HashMap<u16, Waiter>,
    /// Set when the session ended: later waiters fail at once.
    ended: Option<String>,
}

impl Tracker {
    fn register_publish(&mut self) -> oneshot::Receiver<Result<(), AckError>> {
        let (tx, rx) = oneshot::channel();
        match &self.ended {
            Some(reason) => {
                let _ = tx.send(Err(AckError::Lost(reason.clone())));
            }
            None => self.unsent.push_back(tx),
        }
        rx
    }

    fn register_subscribe(&mut self) -> oneshot::Receiver<Result<(), AckError>> {
        let (tx, rx) = oneshot::channel();
        match &self.ended {
            Some(reason) => {
                let _ = tx.send(Err(AckError::Lost(reason.clone())));
            }
            None => self.subs_unsent.push_back(tx),
        }
        rx
    }

    /// Follows one event of the event loop.
    fn on_event(&mut self, event: &Event) {
        match event {
            // Packet id 0 is a QoS 0 publish: nothing to wait for.
            Event::Outgoing(Outgoing::Publish(0)) => {}
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                if let Some(w) = self.collided.take().or_else(|| self.unsent.pop_front()) {
                    self.unacked.insert(*pkid, w);
                }
            }
            Event::Outgoing(Outgoing::AwaitAck(_)) => {
                self.collided = self.unsent.pop_front();
            }
            Event::Outgoing(Outgoing::Subscribe(pkid)) => {
                if let Some(w) = self.subs_unsent.pop_front() {
                    self.subs_unacked.insert(*pkid, w);
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(w) = self.unacked.remove(&ack.pkid) {
                    let _ = w.send(puback_result(ack));
                }
            }
            Event::Incoming(Packet::SubAck(ack)) => {
                if let Some(w) = self.subs_unacked.remove(&ack.pkid) {
                    let _ = w.send(suback_result(ack));
                }
            }
            _ => {}
        }
    }

    /// The connection is gone: every waiter fails with `reason`.
    fn end(&mut self, reason: &str) {
        self.ended = Some(reason.to_string());
        let waiters = self
            .unsent
            .drain(..)
            .chain(self.collided.take())
            .chain(self.unacked.drain().map(|(_, w)| w))
            .chain(self.subs_unsent.drain(..))
            .chain(self.subs_unacked.drain().map(|(_, w)| w));
        for w in waiters {
            let _ = w.send(Err(AckError::Lost(reason.to_string())));
        }
    }
}

fn puback_result(ack: &PubAck) -> Result<(), AckError> {
    match ack.reason {
        PubAckReason::Success | PubAckReason::NoMatchingSubscribers => Ok(()),
        reason => {
            let detail = ack
                .properties
                .as_ref()
                .and_then(|p| p.reason_string.as_deref())
                .map(|s| format!(" ({s})"))
                .unwrap_or_default();
            Err(AckError::Refused(format!(
                "the broker refused it: {reason:?}{detail}"
            )))
        }
    }
}

fn suback_result(ack: &SubAck) -> Result<(), AckError> {
    match ack.return_codes.first() {
        Some(SubscribeReasonCode::Success(_)) => Ok(()),
        other => Err(AckError::Refused(format!(
            "the broker refused the subscription: {other:?}"
        ))),
    }
}

/// Local-bus messages to the fleet: QoS 0 publishes on `perch/v1/<device>/out/…`.
struct BusOutgoing {
    client: AsyncClient,
    device: String,
}

impl crate::Outgoing for BusOutgoing {
    fn send(&self, message: crate::BusMessage) -> BoxFuture<'_, Result<(), SyncError>> {
        Box::pin(async move {
            let topic = outbound_topic(&self.device, &message.subject);
            match tokio::time::timeout(
                ACK_TIMEOUT,
                self.client
                    .publish_bytes(topic, QoS::AtMostOnce, false, message.payload),
            )
            .await
            {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!(
                    "the broker took no new message for {ACK_TIMEOUT:?}"
                )),
            }
            .map_err(|reason| SyncError::Publish {
                what: format!("local-bus message `{}`", message.subject),
                reason,
            })
        })
    }
}

/// One connection to the broker and the task polling it; dropping it closes the
/// connection.
struct Session {
    client: AsyncClient,
    tracker: Arc<Mutex<Tracker>>,
    /// `Some(reason)` once the connection failed.
    ended: watch::Receiver<Option<String>>,
    desired: watch::Receiver<Desired>,
    /// When the desired-state subscription was acknowledged (`None`: refused).
    subscribed_at: Option<Instant>,
    /// Commands from the fleet, until [`Transport::commands`] takes them.
    commands: Option<tokio::sync::mpsc::Receiver<crate::Request>>,
    /// Local-bus messages from the fleet, until [`Transport::messages`] takes them.
    messages: Option<tokio::sync::mpsc::Receiver<crate::Inbound>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Session {
    /// Connects, subscribes to the desired state, says the device is online and asks the
    /// fleet for its desired state.
    async fn open(options: &MqttOptions, device: &str, url: &str) -> Result<Self, SyncError> {
        let (client, events) = AsyncClient::new(options.clone(), REQUEST_CAPACITY);
        let tracker = Arc::new(Mutex::new(Tracker::default()));
        let (ended_tx, ended) = watch::channel(None);
        let (desired_tx, desired) = watch::channel(Desired::default());
        let (connack_tx, connack) = oneshot::channel();
        let (commands_tx, commands) = tokio::sync::mpsc::channel(COMMAND_QUEUE);
        let (messages_tx, messages) = tokio::sync::mpsc::channel(MESSAGE_QUEUE);
        let feeds = Feeds {
            client: client.clone(),
            tracker: tracker.clone(),
            connack: connack_tx,
            ended: ended_tx,
            desired: desired_tx,
            commands: commands_tx,
            messages: messages_tx,
        };
        let task = tokio::spawn(drive(events, feeds, device.to_string(), url.to_string()));
        let mut session = Self {
            client,
            tracker,
            ended,
            desired,
            subscribed_at: None,
            commands: Some(commands),
            messages: Some(messages),
            task,
        };
        let connect_error = |reason: String| SyncError::Connect {
            url: url.to_string(),
            reason,
        };
        match tokio::time::timeout(TIMEOUT + Duration::from_secs(1), connack).await {
            Ok(Ok(Ok(session_present))) => {
                tracing::info!(%url, %device, session_present, "mqtt connected");
            }
            Ok(Ok(Err(reason))) => return Err(connect_error(reason)),
            Ok(Err(_)) => return Err(connect_error("the connection task ended".into())),
            Err(_) => return Err(connect_error(format!("no CONNACK within {TIMEOUT:?}"))),
        }

        // Desired state: the fleet retains it; the broker sends it right after the SUBACK.
        // Telemetry depends on neither subscription: a refused one is said and done without.
        if session
            .subscribe(
                &desired_topic(device),
                url,
                "desired state will not be received",
            )
            .await?
        {
            session.subscribed_at = Some(Instant::now());
        }

        // Commands: the broker keeps the subscription with the session and queues QoS 1
        // commands sent while the device is away (up to its `max_queued_messages`).
        session
            .subscribe(
                &commands_filter(device),
                url,
                "commands from the fleet will not be received",
            )
            .await?;

        // Local-bus messages: queued by the broker with the session like commands.
        session
            .subscribe(
                &inbound_filter(device),
                url,
                "messages from the fleet will not be received",
            )
            .await?;

        // Presence, replacing the `0` the last will of an earlier connection left.
        let topic = online_topic(device);
        let online = match session
            .publish(topic.clone(), true, Bytes::from_static(ONLINE), None)
            .await
        {
            Ok(ack) => session.ack(ack).await,
            Err(reason) => Err(AckError::Lost(reason)),
        };
        match online {
            Ok(()) => {}
            Err(AckError::Refused(reason)) => {
                tracing::warn!(%topic, %reason, "presence not published");
            }
            Err(AckError::Lost(reason)) => {
                return Err(SyncError::Publish {
                    what: format!("presence to {topic} on {url}"),
                    reason,
                });
            }
        }

        // Fleets that do not retain the desired state answer this by publishing it; the
        // ack is not waited for (a fleet may not allow it, which is no error here).
        if let Err(reason) = session
            .publish(desired_get_topic(device), false, Bytes::new(), None)
            .await
        {
            return Err(SyncError::Publish {
                what: format!("{} on {url}", desired_get_topic(device)),
                reason,
            });
        }
        Ok(session)
    }

    /// Subscribes to `topic` with QoS 1 and waits for the SUBACK. Returns whether the
    /// broker granted it; a refusal is logged with `refused` and is no error.
    async fn subscribe(&self, topic: &str, url: &str, refused: &str) -> Result<bool, SyncError> {
        let rx = self.lock().register_subscribe();
        let subscribed = match self.client.subscribe(topic, QoS::AtLeastOnce).await {
            Ok(()) => self.ack(rx).await,
            Err(e) => Err(AckError::Lost(e.to_string())),
        };
        match subscribed {
            Ok(()) => Ok(true),
            Err(AckError::Refused(reason)) => {
                tracing::warn!(%topic, %reason, "{refused}");
                Ok(false)
            }
            Err(AckError::Lost(reason)) => Err(SyncError::Setup {
                what: format!("subscribing to {topic} on {url}"),
                reason,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn alive(&self) -> bool {
        self.ended.borrow().is_none() && !self.task.is_finished()
    }

    fn end_reason(&self) -> String {
        self.ended
            .borrow()
            .clone()
            .unwrap_or_else(|| "the connection task ended".into())
    }

    /// Hands a QoS 1 publish to the event loop; the receiver resolves with its PUBACK.
    async fn publish(
        &self,
        topic: String,
        retain: bool,
        payload: Bytes,
        properties: Option<PublishProperties>,
    ) -> Result<oneshot::Receiver<Result<(), AckError>>, String> {
        let rx = self.lock().register_publish();
        let send = async {
            match properties {
                Some(p) => {
                    self.client
                        .publish_bytes_with_properties(topic, QoS::AtLeastOnce, retain, payload, p)
                        .await
                }
                None => {
                    self.client
                        .publish_bytes(topic, QoS::AtLeastOnce, retain, payload)
                        .await
                }
            }
        };
        // The channel is full while the in-flight window is: a broker that stops acking
        // stops us here.
        match tokio::time::timeout(ACK_TIMEOUT, send).await {
            Ok(Ok(())) => Ok(rx),
            Ok(Err(_)) => Err(self.end_reason()),
            Err(_) => Err(format!(
                "the broker took no new message for {ACK_TIMEOUT:?} (no acks)"
            )),
        }
    }

    /// Waits for one acknowledgement.
    async fn ack(&self, rx: oneshot::Receiver<Result<(), AckError>>) -> Result<(), AckError> {
        match tokio::time::timeout(ACK_TIMEOUT, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(AckError::Lost(self.end_reason())),
            Err(_) => Err(AckError::Lost(format!(
                "no acknowledgement within {ACK_TIMEOUT:?}"
            ))),
        }
    }
}

/// The acknowledged prefix of the records in flight, settled oldest first: it ends at the
/// first failure, and nothing acknowledged after that counts.
#[derive(Debug, Default)]
struct Prefix {
    /// The last record of the prefix.
    acked: Option<u64>,
    /// The record that ended it, and why.
    stopped: Option<(u64, AckError)>,
}

impl Prefix {
    /// Takes the next outcome (`None`: nothing settled); returns whether to go on.
    fn settle(&mut self, outcome: Option<(u64, Result<(), AckError>)>) -> bool {
        if self.stopped.is_some() {
            return false;
        }
        match outcome {
            Some((seq, Ok(()))) => {
                self.acked = Some(seq);
                true
            }
            Some((seq, Err(e))) => {
                self.stopped = Some((seq, e));
                false
            }
            None => false,
        }
    }
}

/// The oldest record in flight with its acknowledgement: waiting for it (`wait`), or only
/// when it has arrived already. `None` when nothing is in flight (or, not waiting, the
/// oldest is still due).
async fn settle_oldest(
    session: &Session,
    in_flight: &mut VecDeque<(u64, AckReceiver)>,
    wait: bool,
) -> Option<(u64, Result<(), AckError>)> {
    let (seq, rx) = in_flight.front_mut()?;
    let seq = *seq;
    if wait {
        let (_, rx) = in_flight.pop_front()?;
        return Some((seq, session.ack(rx).await));
    }
    let result = match rx.try_recv() {
        Ok(result) => result,
        Err(oneshot::error::TryRecvError::Empty) => return None,
        Err(oneshot::error::TryRecvError::Closed) => Err(AckError::Lost(session.end_reason())),
    };
    in_flight.pop_front();
    Some((seq, result))
}

/// Where the event loop's task reports what it sees.
struct Feeds {
    client: AsyncClient,
    tracker: Arc<Mutex<Tracker>>,
    connack: oneshot::Sender<Result<bool, String>>,
    ended: watch::Sender<Option<String>>,
    desired: watch::Sender<Desired>,
    commands: tokio::sync::mpsc::Sender<crate::Request>,
    messages: tokio::sync::mpsc::Sender<crate::Inbound>,
}

/// Takes a feed of this session (commands, local-bus messages) as a stream; once only.
fn take_feed<T: Send + 'static>(
    feed: &mut Option<tokio::sync::mpsc::Receiver<T>>,
    what: &str,
) -> Result<BoxStream<'static, T>, SyncError> {
    let rx = feed.take().ok_or_else(|| SyncError::Setup {
        what: what.into(),
        reason: "already taken in this session".into(),
    })?;
    Ok(crate::receiver_stream(rx))
}

/// Acknowledges an incoming QoS 1 publish without waiting in the event loop's task (which
/// is the one that empties the request channel the ack goes through).
fn ack_now(client: &AsyncClient, p: &rumqttc::v5::mqttbytes::v5::Publish) {
    if p.qos == QoS::AtMostOnce {
        return;
    }
    if client.try_ack(p).is_err() {
        let (client, p) = (client.clone(), p.clone());
        tokio::spawn(async move {
            let _ = client.ack(&p).await;
        });
    }
}

/// Polls the event loop until the connection fails, then ends the session (rumqttc would
/// reconnect on the next poll; a fresh session is opened instead, see the module docs).
async fn drive(mut events: EventLoop, feeds: Feeds, device: String, url: String) {
    let Feeds {
        client,
        tracker,
        connack,
        ended,
        desired,
        commands,
        messages,
    } = feeds;
    let desired_topic = desired_topic(&device);
    let command_prefix = format!("{}/cmd/", device_root(&device));
    let inbound_prefix = format!("{}/in/", device_root(&device));
    let mut connack = Some(connack);
    let reason = loop {
        let event = match events.poll().await {
            Ok(event) => event,
            Err(e) => break e.to_string(),
        };
        tracker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .on_event(&event);
        match event {
            Event::Incoming(Packet::ConnAck(ack)) => {
                if let Some(tx) = connack.take() {
                    let _ = tx.send(Ok(ack.session_present));
                }
            }
            Event::Incoming(Packet::Publish(p)) if p.topic == desired_topic.as_bytes() => {
                tracing::debug!(topic = %desired_topic, bytes = p.payload.len(), retained = p.retain, "desired state received");
                ack_now(&client, &p);
                let doc = (!p.payload.is_empty()).then(|| p.payload.to_vec());
                desired.send_replace(Desired { doc });
            }
            Event::Incoming(Packet::Publish(p))
                if p.topic.starts_with(inbound_prefix.as_bytes()) =>
            {
                let subject =
                    String::from_utf8_lossy(&p.topic[inbound_prefix.len()..]).replace('/', ".");
                if perch_core::spec::check_subject_pattern(&subject).is_err()
                    || subject.contains(['*', '>'])
                {
                    tracing::warn!(topic = %String::from_utf8_lossy(&p.topic), "a message from the fleet with no usable local subject is dropped");
                    ack_now(&client, &p);
                    continue;
                }
                let taken: Option<BoxFuture<'static, ()>> = (p.qos != QoS::AtMostOnce).then(|| {
                    let (client, p) = (client.clone(), p.clone());
                    Box::pin(async move {
                        let _ = client.ack(&p).await;
                    }) as BoxFuture<'static, ()>
                });
                let inbound = crate::Inbound {
                    message: crate::BusMessage {
                        subject,
                        payload: p.payload.clone(),
                    },
                    taken,
                };
                // QoS 1 deliveries are bounded by the receive maximum and fit; a full queue
                // means a QoS 0 flood, which is at most once.
                if let Err(e) = messages.try_send(inbound) {
                    tracing::warn!(error = %e, "a message from the fleet dropped: too many waiting");
                }
            }
            Event::Incoming(Packet::Publish(p)) => {
                ack_now(&client, &p);
                let topic = String::from_utf8_lossy(&p.topic);
                match topic
                    .strip_prefix(&command_prefix)
                    .filter(|op| !op.is_empty() && !op.contains('/'))
                {
                    Some(op) => {
                        let request = command_request(&device, op, &p);
                        if let Err(e) = commands.try_send(request) {
                            tracing::warn!(%topic, error = %e, "command dropped: too many waiting");
                        }
                    }
                    None => tracing::debug!(%topic, "unexpected mqtt message"),
                }
            }
            _ => {}
        }
    };
    if connack.is_none() {
        tracing::warn!(%url, %reason, "mqtt connection lost");
    } else {
        tracing::debug!(%url, %reason, "mqtt connection failed");
    }
    tracker
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .end(&reason);
    ended.send_replace(Some(reason.clone()));
    if let Some(tx) = connack.take() {
        let _ = tx.send(Err(reason));
    }
    // Dropping the event loop closes the socket (no DISCONNECT: the broker sends the will)
    // and the request channel, so a publish in progress fails at once.
    drop(events);
}

/// A command publish as a [`crate::Request`]: answered on its response topic (or
/// [`default_reply_topic`]) with its correlation data and `perch-cmd-id`.
fn command_request(
    device: &str,
    op: &str,
    p: &rumqttc::v5::mqttbytes::v5::Publish,
) -> crate::Request {
    let props = p.properties.as_ref();
    crate::Request {
        op: op.to_string(),
        body: p.payload.to_vec(),
        reply_to: crate::ReplyTo {
            address: props
                .and_then(|pr| pr.response_topic.clone())
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| default_reply_topic(device, op)),
            correlation: props.and_then(|pr| pr.correlation_data.as_ref().map(|c| c.to_vec())),
            id: props.and_then(|pr| {
                pr.user_properties
                    .iter()
                    .find(|(k, _)| k == CMD_ID_PROPERTY)
                    .map(|(_, v)| v.clone())
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_acknowledged_prefix_ends_at_the_first_refusal() {
        let mut prefix = Prefix::default();
        assert!(prefix.settle(Some((5, Ok(())))));
        assert!(prefix.settle(Some((6, Ok(())))));
        assert!(!prefix.settle(Some((7, Err(AckError::Refused("not authorized".into()))))));
        // A later acknowledgement (another stream the broker allows) does not move it.
        assert!(!prefix.settle(Some((8, Ok(())))));
        assert!(!prefix.settle(None));
        assert_eq!(prefix.acked, Some(6));
        assert!(matches!(prefix.stopped, Some((7, AckError::Refused(_)))));

        let mut idle = Prefix::default();
        assert!(!idle.settle(None));
        assert_eq!((idle.acked, idle.stopped.is_none()), (None, true));
    }

    #[test]
    fn topics_are_the_subject_tree_with_slashes() {
        assert_eq!(
            telemetry_topic("gw-1", "climate"),
            "perch/v1/gw-1/telemetry/climate"
        );
        assert_eq!(
            telemetry_topic("gw-1", "room.temp"),
            "perch/v1/gw-1/telemetry/room/temp"
        );
        assert_eq!(heartbeat_topic("gw-1"), "perch/v1/gw-1/hb");
        assert_eq!(online_topic("gw-1"), "perch/v1/gw-1/online");
        assert_eq!(reported_topic("gw-1"), "perch/v1/gw-1/reported");
        assert_eq!(desired_topic("gw-1"), "perch/v1/gw-1/desired");
        assert_eq!(desired_get_topic("gw-1"), "perch/v1/gw-1/desired/get");
    }

    #[test]
    fn urls_name_host_and_port() {
        let b = |tls, host: &str, port| Broker {
            tls,
            host: host.into(),
            port,
        };
        assert_eq!(
            parse_url("mqtt://127.0.0.1:1884").ok(),
            Some(b(false, "127.0.0.1", 1884))
        );
        assert_eq!(
            parse_url("mqtts://hub.example.com").ok(),
            Some(b(true, "hub.example.com", 8883))
        );
        assert_eq!(parse_url("mqtt://hub/").ok(), Some(b(false, "hub", 1883)));
        assert_eq!(
            parse_url("mqtt://[::1]:1884").ok(),
            Some(b(false, "[::1]", 1884))
        );
        for bad in [
            "nats://hub",
            "mqtt://",
            "mqtt://hub:0",
            "mqtt://hub:x",
            "mqtt://u:p@hub",
            "mqtt://hub/topic",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    fn sync_config(lines: &str) -> SyncConfig {
        let text = format!("[sync]\ndevice = \"gw-1\"\ntransport = \"mqtt\"\n{lines}");
        perch_core::config::AgentConfig::from_toml(&text, "test")
            .expect("valid config")
            .sync
            .expect("a [sync] section")
    }

    fn start_error(lines: &str) -> String {
        match Mqtt::new(&sync_config(lines)) {
            Ok(m) => panic!("{m:?} accepted `{lines}`"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn unusable_settings_are_start_errors_naming_the_key() {
        let e =
            start_error("url = \"mqtts://127.0.0.1:8883\"\nca-file = \"/nonexistent/ca.pem\"\n");
        assert!(
            e.starts_with("sync.ca-file: cannot read /nonexistent/ca.pem"),
            "{e}"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let e = start_error(&format!(
            "url = \"mqtts://127.0.0.1:8883\"\nca-file = \"{}\"\n",
            empty.display()
        ));
        assert!(e.contains("holds no PEM certificate"), "{e}");
        let e = start_error("url = \"mqtt://127.0.0.1:1883\"\ntoken = \"t\"\n");
        assert!(e.contains("MQTT takes `user` and `password`"), "{e}");
        let e = start_error("url = \"mqtt://127.0.0.1:1883\"\nca-file = \"/etc/hosts\"\n");
        assert!(e.contains("is not mqtts://"), "{e}");
        let m = Mqtt::new(&sync_config(
            "url = \"mqtt://127.0.0.1:1883\"\nuser = \"gw-1\"\n",
        ))
        .expect("plain MQTT with a user name");
        assert_eq!(m.options.client_id(), "perch-gw-1");
        assert!(!m.options.clean_start());
        assert_eq!(m.options.keep_alive(), KEEP_ALIVE);
    }

    fn puback(pkid: u16, reason: PubAckReason) -> Event {
        Event::Incoming(Packet::PubAck(PubAck {
            pkid,
            reason,
            properties: None,
        }))
    }

    #[test]
    fn acks_find_their_publish_in_send_order_and_through_a_collision() {
        let mut t = Tracker::default();
        let mut rx: Vec<_> = (0..4).map(|_| t.register_publish()).collect();
        // A QoS 0 heartbeat between them takes no waiter.
        t.on_event(&Event::Outgoing(Outgoing::Publish(1)));
        t.on_event(&Event::Outgoing(Outgoing::Publish(0)));
        t.on_event(&Event::Outgoing(Outgoing::Publish(2)));
        // The third reuses id 1 before it is acked: held back, sent after the ack.
        t.on_event(&Event::Outgoing(Outgoing::AwaitAck(1)));
        t.on_event(&puback(2, PubAckReason::Success));
        t.on_event(&puback(1, PubAckReason::NoMatchingSubscribers));
        t.on_event(&Event::Outgoing(Outgoing::Publish(1)));
        t.on_event(&Event::Outgoing(Outgoing::Publish(2)));
        t.on_event(&puback(1, PubAckReason::NotAuthorized));
        let results: Vec<_> = rx.iter_mut().map(|r| r.try_recv().ok()).collect();
        assert_eq!(results[0], Some(Ok(())));
        assert_eq!(results[1], Some(Ok(())));
        assert!(
            matches!(&results[2], Some(Err(AckError::Refused(r))) if r.contains("NotAuthorized")),
            "{results:?}"
        );
        // Sent, not acked yet.
        assert_eq!(results[3], None);
        t.end("I/O: connection reset");
        assert_eq!(
            rx[3].try_recv().ok(),
            Some(Err(AckError::Lost("I/O: connection reset".into())))
        );
        // After the end, a new waiter fails at once.
        let mut late = t.register_publish();
        assert!(matches!(late.try_recv(), Ok(Err(AckError::Lost(_)))));
    }

    #[test]
    fn subscriptions_are_tracked_apart_from_publishes() {
        let mut t = Tracker::default();
        let mut p = t.register_publish();
        let mut s = t.register_subscribe();
        t.on_event(&Event::Outgoing(Outgoing::Subscribe(1)));
        t.on_event(&Event::Outgoing(Outgoing::Publish(2)));
        t.on_event(&Event::Incoming(Packet::SubAck(SubAck {
            pkid: 1,
            return_codes: vec![SubscribeReasonCode::NotAuthorized],
            properties: None,
        })));
        assert!(matches!(s.try_recv(), Ok(Err(AckError::Refused(_)))));
        assert!(p.try_recv().is_err(), "the publish is still in flight");
        t.on_event(&puback(2, PubAckReason::Success));
        assert_eq!(p.try_recv().ok(), Some(Ok(())));
    }
}
