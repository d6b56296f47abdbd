//! The commands the agent core handles, and their replies.
//!
//! The local API (and later the sync layer and the CLI's in-process agent) only parse input
//! into a [`Command`] and render a [`Reply`]; they never reach into the runtime directly.

use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::spec::{ComponentSpec, DesiredState, Grants, Limits, Trigger};

/// A request to the agent core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Liveness.
    Health,
    /// Agent and component status.
    Status,
    /// All components.
    ListComponents,
    /// One component.
    GetComponent { name: String },
    /// Store a component's bytes and run it under `name` (the embedded manifest's name when
    /// `None`), replacing any component of that name. Triggers and limits given here override
    /// the manifest's.
    DeployComponent {
        name: Option<String>,
        bytes: Vec<u8>,
        expected_digest: Option<Digest>,
        triggers: Vec<Trigger>,
        limits: Limits,
    },
    /// Store bytes in the blob cache without running them.
    PutBlob {
        bytes: Vec<u8>,
        expected_digest: Option<Digest>,
    },
    /// Replace the whole desired state; every digest must already be in the cache.
    ApplyDesired(DesiredInput),
    /// The current desired state.
    GetDesired,
    /// Stop and forget a component (its key-value data is removed too).
    RemoveComponent { name: String },
    /// The most recent log lines of a component.
    Logs { name: String, limit: usize },
    /// Prometheus text metrics.
    Metrics,
    /// Publish on the local message bus.
    Publish { subject: String, payload: Vec<u8> },
    /// The newest telemetry records held in the outbox.
    Telemetry { limit: usize },
    /// Sets a simulated GPIO input line (the sim board's button).
    SetGpioInput { line: String, high: bool },
    /// Installs a system image (a slot's filesystem) into the inactive A/B slot and reboots
    /// into it for a one-shot trial (docs/images.md).
    InstallUpdate {
        bytes: Vec<u8>,
        expected_digest: Option<Digest>,
    },
}

/// A desired-state document as submitted: the revision is optional (next one if absent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DesiredInput {
    /// Must be greater than the current revision when given.
    #[serde(default)]
    pub revision: Option<u64>,
    /// Components to run.
    #[serde(default)]
    pub components: Vec<ComponentSpec>,
}

/// The reply to a [`Command`].
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Reply {
    Health(Health),
    Status(Box<AgentStatus>),
    Components(Vec<ComponentStatus>),
    Component(Box<ComponentStatus>),
    Deployed(Box<Deployed>),
    Blob(BlobInfo),
    Desired(DesiredState),
    Revision(RevisionInfo),
    Logs(Vec<LogLine>),
    Metrics(String),
    Published(Published),
    Telemetry(Vec<TelemetryRecord>),
    Gpio(GpioLevel),
    Update(UpdateStarted),
}

/// A system update written to the inactive slot; the device reboots into it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct UpdateStarted {
    /// The slot that now holds the update.
    pub slot: String,
    pub digest: Digest,
    pub bytes: u64,
    /// The device reboots into the slot for a trial; it commits only when healthy.
    pub rebooting: bool,
}

/// The A/B boot state (only on devices booted from a Perch image with A/B slots).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BootStatus {
    /// The slot this boot came from: `a` or `b`.
    pub slot: String,
    /// Whether this boot is a one-shot trial of a new slot.
    pub trial: bool,
    /// Whether the booted slot is the committed default.
    pub committed: bool,
    /// A slot installed and waiting for its trial boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<String>,
    /// A slot whose trial failed, so the device went back to this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back_from: Option<String>,
}

/// A GPIO line's level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GpioLevel {
    pub line: String,
    pub high: bool,
}

/// A telemetry record from the outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct TelemetryRecord {
    /// Sequence number on this device.
    pub seq: u64,
    /// Publishing component.
    pub component: String,
    /// Stream name.
    pub stream: String,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// The payload, as text when it is UTF-8.
    pub payload: String,
}

/// Liveness reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Health {
    /// Always `ok` when the agent answers.
    pub status: String,
    /// Agent version.
    pub version: String,
}

/// Lifecycle state of a component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ComponentState {
    /// Loading (compiling or deserializing) and linking.
    Starting,
    /// Loaded; its triggers are armed.
    Running,
    /// Failing repeatedly; invocations are being delayed with exponential backoff.
    CrashLooping,
    /// Could not be loaded (bad blob, link error); it will not run until redeployed.
    Failed,
}

impl ComponentState {
    /// The kebab-case name used in JSON and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::CrashLooping => "crash-looping",
            Self::Failed => "failed",
        }
    }
}

/// A recorded error with the time it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ErrorRecord {
    /// Unix time in milliseconds.
    pub at_ms: u64,
    /// What happened.
    pub message: String,
}

/// Status of one component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ComponentStatus {
    pub name: String,
    pub digest: Digest,
    pub state: ComponentState,
    pub triggers: Vec<Trigger>,
    /// Effective limits (agent defaults filled in).
    pub limits: Limits,
    /// Completed invocations, successful or not.
    pub invocations: u64,
    /// Invocations that trapped, timed out, ran out of memory or returned an error.
    pub failures: u64,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// Invocations skipped because the component was backing off or at its instance limit.
    pub skipped: u64,
    /// Most recent failure.
    pub last_error: Option<ErrorRecord>,
    /// Largest linear memory any instance grew to, in bytes.
    pub memory_peak_bytes: u64,
    /// Instances alive now.
    pub live_instances: u32,
    /// How it was loaded: `compiled` or `cached` (deserialized precompiled artifact).
    pub loaded_from: String,
    /// Time spent loading, in microseconds.
    pub load_us: u64,
    /// What the component may reach by name.
    #[serde(default, skip_serializing_if = "Grants::is_empty")]
    pub grants: Grants,
    /// Calls denied for lack of a grant.
    #[serde(default)]
    pub denied: u64,
    /// The key that signed the component (`None` for unsigned, development deploys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
}

/// Agent status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct AgentStatus {
    pub version: String,
    pub uptime_ms: u64,
    pub board: String,
    /// Revision of the desired state being run.
    pub revision: u64,
    /// `pooling` or `on-demand`.
    pub allocator: String,
    /// Resident memory of the agent process.
    pub rss_bytes: u64,
    /// Address space of the agent process.
    pub vm_bytes: u64,
    /// Bytes the store occupies on disk.
    pub store_bytes: u64,
    /// Hardware the board names that is not available now, one line each.
    #[serde(default)]
    pub hardware_missing: Vec<String>,
    /// The telemetry outbox.
    #[serde(default)]
    pub outbox: OutboxStatus,
    /// The link to the fleet; absent when the device runs standalone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncStatus>,
    /// The A/B boot state; absent when the device was not booted from A/B slots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootStatus>,
    pub components: Vec<ComponentStatus>,
}

/// The durable telemetry outbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct OutboxStatus {
    /// Records waiting to be delivered.
    pub backlog: u64,
    /// Their size in bytes.
    pub bytes: u64,
    /// Sequence number of the newest record ever appended.
    pub last_seq: u64,
    /// Records dropped by the outbox bounds over the store's life (oldest first).
    pub dropped: u64,
    /// Time of the oldest waiting record, in Unix milliseconds.
    pub oldest_ms: Option<u64>,
}

/// State of the link to the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkState {
    /// Trying to reach the broker.
    Connecting,
    /// Connected: the outbox drains.
    Connected,
    /// Not connected; the next attempt is scheduled.
    Disconnected,
}

/// The sync layer's view of the link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SyncStatus {
    /// This device's id in the fleet.
    pub device: String,
    /// `nats` or `mqtt`.
    pub transport: String,
    /// The broker URL.
    pub url: String,
    /// The link now.
    pub link: LinkState,
    /// When the link last changed, in Unix milliseconds.
    pub since_ms: u64,
    /// When the broker last acknowledged outbox records, in Unix milliseconds.
    pub last_sync_ms: Option<u64>,
    /// Outbox records delivered since the agent started.
    pub sent: u64,
    /// Connections made since the agent started.
    pub connects: u64,
    /// The last error of the link, if any since it was last connected.
    pub last_error: Option<String>,
    /// The last desired state received from the fleet and what became of it.
    pub desired: Option<DesiredOutcome>,
    /// Component artifacts fetched from the fleet (object store or URL) since start.
    pub artifacts_fetched: u64,
    /// Their bytes.
    pub artifact_bytes: u64,
    /// Commands from the fleet answered since start.
    pub commands: u64,
    /// Messages from the fleet handed to the local bus since start.
    #[serde(default)]
    pub messages_in: u64,
    /// Local-bus messages sent to the fleet since start.
    #[serde(default)]
    pub messages_out: u64,
    /// Local-bus messages for the fleet dropped: published while the link was down, or
    /// their send failed (messages are at most once; telemetry is the durable path).
    #[serde(default)]
    pub messages_dropped: u64,
}

/// What became of a desired state received from the fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DesiredOutcome {
    /// Its revision (none if it could not be read).
    pub revision: Option<u64>,
    /// `applied` or `rejected`. A document rejected because an artifact could not be
    /// fetched yet is tried again at each heartbeat (`retrying`).
    pub result: String,
    /// Whether the same document is tried again (an artifact that may still arrive).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retrying: bool,
    /// Why it was rejected; the running set was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// One line per problem.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
    /// When, in Unix milliseconds.
    pub at_ms: u64,
}

/// Reply to a deploy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Deployed {
    pub revision: u64,
    pub component: ComponentStatus,
}

/// A stored blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlobInfo {
    pub digest: Digest,
    pub size: u64,
}

/// The revision now in effect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RevisionInfo {
    pub revision: u64,
}

/// Result of a publish.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Published {
    /// Subscribed components that received the message.
    pub delivered: usize,
}

/// Severity of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// One log line of a component: from its log import, its stdout/stderr, or the agent about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct LogLine {
    /// Unix time in milliseconds.
    pub at_ms: u64,
    pub level: LogLevel,
    /// `guest` (log import), `stdout`, `stderr` or `agent`.
    pub source: String,
    pub message: String,
}

/// What kind of failure a command met; the API maps it to an HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The request was malformed (400).
    BadRequest,
    /// The named thing does not exist (404).
    NotFound,
    /// The request conflicts with current state, e.g. an old revision (409).
    Conflict,
    /// The component was understood but refused: bad digest, not a component, unknown import (422).
    Rejected,
    /// The agent cannot serve this now, e.g. shutting down (503).
    Unavailable,
    /// The agent failed (500).
    Internal,
}

/// A failed command: a kind, a one-line message and optional details (one per problem).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{message}")]
pub struct CommandError {
    pub kind: ErrorKind,
    pub message: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
}

impl CommandError {
    /// A new error without details.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            details: Vec::new(),
        }
    }

    /// Adds one detail line per problem.
    pub fn with_details<I: IntoIterator<Item = D>, D: ToString>(mut self, details: I) -> Self {
        self.details = details.into_iter().map(|d| d.to_string()).collect();
        self
    }
}

/// A boxed future, so handlers can be trait objects without pulling in an async runtime.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Something that executes commands: the agent, or a test double in API unit tests.
pub trait CommandHandler: Send + Sync + 'static {
    /// Executes one command.
    fn handle(&self, command: Command) -> BoxFuture<'_, Result<Reply, CommandError>>;
}

/// Commands the fleet may send over the sync link (`perch.v1.<device>.cmd.<op>`), with the
/// body each takes. Reads, plus removing a component and setting a simulated input; a
/// component is deployed through the desired state, never by command.
pub const REMOTE_OPS: &[(&str, &str)] = &[
    ("health", "(none)"),
    ("status", "(none)"),
    ("components", "(none)"),
    ("component", r#"{"name": "<component>"}"#),
    ("logs", r#"{"name": "<component>", "limit": 100}"#),
    ("desired", "(none)"),
    ("telemetry", r#"{"limit": 100}"#),
    ("metrics", "(none)"),
    ("remove", r#"{"name": "<component>"}"#),
    ("gpio-input", r#"{"line": "<line>", "high": true}"#),
];

/// Lines and records a remote `logs` or `telemetry` returns when `limit` is not given.
pub const REMOTE_DEFAULT_LIMIT: usize = 100;

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RemoteArgs {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    line: Option<String>,
    #[serde(default)]
    high: Option<bool>,
}

impl Command {
    /// The command for fleet operation `op` with JSON body `body` (empty for none). Every
    /// mistake is a [`ErrorKind::BadRequest`] (an unknown operation: [`ErrorKind::NotFound`])
    /// naming what was wrong and what is expected.
    pub fn remote(op: &str, body: &[u8]) -> Result<Self, CommandError> {
        let bad = |m: String| CommandError::new(ErrorKind::BadRequest, m);
        let Some((_, usage)) = REMOTE_OPS.iter().find(|(name, _)| *name == op) else {
            let known: Vec<&str> = REMOTE_OPS.iter().map(|(n, _)| *n).collect();
            return Err(CommandError::new(
                ErrorKind::NotFound,
                format!(
                    "unknown command `{op}`: expected one of {}",
                    known.join(", ")
                ),
            ));
        };
        let blank = body.iter().all(u8::is_ascii_whitespace);
        let args: RemoteArgs = if blank {
            RemoteArgs {
                name: None,
                limit: None,
                line: None,
                high: None,
            }
        } else {
            serde_json::from_slice(body).map_err(|e| {
                bad(format!(
                    "command `{op}`: the body is not valid: {e}; expected {usage}"
                ))
            })?
        };
        let takes: &[&str] = match op {
            "component" | "remove" => &["name"],
            "logs" => &["name", "limit"],
            "telemetry" => &["limit"],
            "gpio-input" => &["line", "high"],
            _ => &[],
        };
        for (field, given) in [
            ("name", args.name.is_some()),
            ("limit", args.limit.is_some()),
            ("line", args.line.is_some()),
            ("high", args.high.is_some()),
        ] {
            if given && !takes.contains(&field) {
                return Err(bad(format!(
                    "command `{op}` takes no `{field}`: expected {usage}"
                )));
            }
        }
        let need = |v: Option<String>, field: &str| {
            v.ok_or_else(|| bad(format!("command `{op}` needs `{field}`: expected {usage}")))
        };
        let limit = args.limit.unwrap_or(REMOTE_DEFAULT_LIMIT);
        Ok(match op {
            "health" => Command::Health,
            "status" => Command::Status,
            "components" => Command::ListComponents,
            "component" => Command::GetComponent {
                name: need(args.name, "name")?,
            },
            "logs" => Command::Logs {
                name: need(args.name, "name")?,
                limit,
            },
            "desired" => Command::GetDesired,
            "telemetry" => Command::Telemetry { limit },
            "metrics" => Command::Metrics,
            "remove" => Command::RemoveComponent {
                name: need(args.name, "name")?,
            },
            "gpio-input" => Command::SetGpioInput {
                line: need(args.line, "line")?,
                high: args
                    .high
                    .ok_or_else(|| bad(format!("command `{op}` needs `high`: expected {usage}")))?,
            },
            _ => unreachable!("every op in REMOTE_OPS is matched"),
        })
    }
}

#[cfg(test)]
mod remote_tests {
    use super::*;

    #[test]
    fn every_remote_op_parses_from_its_usage() {
        for (op, usage) in REMOTE_OPS {
            let body = if usage.starts_with('{') {
                usage
                    .replace("<component>", "thermostat")
                    .replace("<line>", "button")
            } else {
                String::new()
            };
            Command::remote(op, body.as_bytes()).unwrap_or_else(|e| panic!("{op}: {e}"));
        }
        assert!(matches!(
            Command::remote("logs", br#"{"name":"t"}"#),
            Ok(Command::Logs {
                limit: REMOTE_DEFAULT_LIMIT,
                ..
            })
        ));
    }

    #[test]
    fn remote_mistakes_name_what_was_wrong() {
        let e = Command::remote("reboot", b"").expect_err("unknown");
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert!(e.message.contains("unknown command `reboot`") && e.message.contains("status"));
        let e = Command::remote("logs", b"").expect_err("no name");
        assert!(e.message.contains("needs `name`"), "{e}");
        let e = Command::remote("status", br#"{"name":"x"}"#).expect_err("extra");
        assert!(e.message.contains("takes no `name`"), "{e}");
        let e = Command::remote("logs", br#"{"nmae":"x"}"#).expect_err("typo");
        assert!(e.message.contains("unknown field `nmae`"), "{e}");
        let e = Command::remote("gpio-input", br#"{"line":"b"}"#).expect_err("no level");
        assert!(e.message.contains("needs `high`"), "{e}");
    }
}
