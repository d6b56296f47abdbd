//! The agent's config file (`perchd.toml`).
//!
//! Parsed from a TOML table by walking it key by key so that *every* problem is reported at
//! once, each with its key path (`limits.memory: ...`), instead of stopping at the first.
//! Unknown keys are errors with a "did you mean" hint.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::units::{ByteSize, HumanDuration};
use crate::walk::Walker;

/// Default data directory of the sled store.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/perch";
/// Default address of the local API and HTTP triggers.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
/// Where board files are looked up by name.
pub const DEFAULT_BOARDS_DIR: &str = "/etc/perch/boards";
/// Default board: the simulated board, which needs no hardware.
pub const DEFAULT_BOARD: &str = "sim";
/// Default largest linear memory of a component.
pub const DEFAULT_MEMORY: ByteSize = ByteSize::mib(32);
/// Default wall-clock limit of one invocation.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default most concurrent instances of one component.
pub const DEFAULT_INSTANCES: u32 = 8;
/// Default number of instance slots in the pooling allocator.
pub const DEFAULT_POOL_INSTANCES: u32 = 100;
/// Start of each pool slot reset in place when an instance ends (`runtime.keep-resident`).
pub const DEFAULT_KEEP_RESIDENT: ByteSize = ByteSize::mib(1);
/// Default epoch tick: the granularity of invocation timeouts.
pub const DEFAULT_EPOCH_TICK: Duration = Duration::from_millis(10);
/// Default cap of the crash-loop backoff.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Default first delay of the crash-loop backoff.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Default number of log lines kept per component.
pub const DEFAULT_LOG_LINES: usize = 200;
/// Default sled page cache.
pub const DEFAULT_STORE_CACHE: ByteSize = ByteSize::mib(4);

/// How the runtime allocates instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Allocator {
    /// Pooling allocator, falling back to on-demand if the pool cannot be reserved.
    Auto,
    /// Pooling allocator only; failing to reserve it is fatal.
    Pooling,
    /// Allocate each instance on demand.
    OnDemand,
}

/// Runtime tuning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RuntimeConfig {
    /// Instance allocation strategy.
    pub allocator: Allocator,
    /// Instance slots reserved by the pooling allocator (across all components).
    pub pool_instances: u32,
    /// Bytes at the start of each linear memory and table slot the pooling allocator resets
    /// in place (memset and image copy) instead of decommitting them when an instance ends
    /// (default 1 MiB; 0, `off` in the file, decommits everything). Resetting in place
    /// saves a `madvise` (a TLB shootdown on every core) and the next instance's page faults,
    /// at the cost of keeping up to that much of each slot in use resident.
    pub keep_resident: ByteSize,
    /// Granularity of timeouts.
    pub epoch_tick: Duration,
    /// First crash-loop backoff delay; doubles per consecutive failure.
    pub backoff_base: Duration,
    /// Largest crash-loop backoff delay.
    pub backoff_max: Duration,
    /// Log lines kept per component.
    pub log_lines: usize,
}

/// Default per-component limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DefaultLimits {
    /// Largest linear memory; also the size of a pool slot, so no component may exceed it.
    pub memory: ByteSize,
    /// Wall-clock limit of one invocation.
    pub timeout: Duration,
    /// Concurrent instances of one component.
    pub instances: u32,
}

/// Which component signatures the agent accepts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SigningConfig {
    /// Public keys (`ed25519:<base64>`, as `perch key show` prints them) whose signatures
    /// are accepted.
    pub trusted_keys: Vec<String>,
    /// Public keys whose signatures are refused, even when also trusted.
    pub revoked_keys: Vec<String>,
    /// Accept components without a signature. For development only.
    pub allow_unsigned: bool,
}

/// Whether `key` looks like `ed25519:` followed by 32 bytes in standard base64.
pub fn is_public_key_text(key: &str) -> bool {
    key.strip_prefix("ed25519:").is_some_and(|b| {
        b.len() == 44
            && b.ends_with('=')
            && b[..43]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '/')
    })
}

/// The validated agent config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AgentConfig {
    /// Where the sled store lives.
    pub data_dir: PathBuf,
    /// Address of the local API and HTTP triggers.
    pub listen: SocketAddr,
    /// Board name (looked up as `<boards-dir>/<name>.toml`) or path of a board file; `sim`
    /// is built in.
    pub board: String,
    /// Directories searched for board files, in order.
    pub boards_dir: Vec<PathBuf>,
    /// Where sysfs is mounted (sensors are read below it); tests point it at a fake tree.
    pub sysfs_root: PathBuf,
    /// Where device nodes live (`gpiochipN`, `i2c-N` are opened below it).
    pub dev_root: PathBuf,
    /// Components a firmware image ships (`*.wasm`): deployed on a first boot, when the
    /// store holds no desired state yet, so a new device runs them offline.
    pub preload_dir: Option<PathBuf>,
    /// sled page cache size.
    pub store_cache: ByteSize,
    /// Default limits for components.
    pub limits: DefaultLimits,
    /// Runtime tuning.
    pub runtime: RuntimeConfig,
    /// Which signatures are accepted.
    pub signing: SigningConfig,
    /// Bounds of the telemetry outbox.
    pub outbox: OutboxConfig,
    /// The link to the fleet control plane; `None` runs the device standalone.
    pub sync: Option<SyncConfig>,
}

/// Default most bytes the outbox keeps while offline.
pub const DEFAULT_OUTBOX_MAX_BYTES: ByteSize = ByteSize::mib(64);
/// Default oldest record the outbox keeps while offline.
pub const DEFAULT_OUTBOX_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default heartbeat interval.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
/// Default outbox records in flight to the broker at once.
pub const DEFAULT_SYNC_WINDOW: usize = 1024;

/// Bounds of the telemetry outbox: past them the oldest records are dropped (counted in
/// metrics and reported upstream).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct OutboxConfig {
    /// Most bytes of records kept.
    pub max_bytes: ByteSize,
    /// Oldest record kept.
    pub max_age: Duration,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_OUTBOX_MAX_BYTES,
            max_age: DEFAULT_OUTBOX_MAX_AGE,
        }
    }
}

/// Which broker protocol the device syncs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyncTransport {
    /// NATS: JetStream for telemetry, KV for desired and reported state.
    Nats,
    /// MQTT 5: QoS 1, persistent session, retained state.
    Mqtt,
}

/// The `[sync]` section: how the device reaches its fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SyncConfig {
    /// This device's id: the `<device>` in `perch.v1.<device>.…`.
    pub device: String,
    /// Broker protocol.
    pub transport: SyncTransport,
    /// Broker URL: `nats://host:port` or `tls://…` for NATS, `mqtt://host:port` or
    /// `mqtts://…` for MQTT. A local leaf node is `nats://127.0.0.1:4222`.
    pub url: String,
    /// JetStream domain of the server the device publishes to (a leaf node's own domain);
    /// `None` publishes to the server's default JetStream.
    pub domain: Option<String>,
    /// JetStream domain of the hub, whose `perch-desired` KV a leaf node mirrors (only
    /// used with `domain`).
    pub hub_domain: String,
    /// User name (NATS user/password auth, MQTT username).
    pub user: Option<String>,
    /// Password for `user`.
    #[serde(skip_serializing)]
    pub password: Option<String>,
    /// NATS token.
    #[serde(skip_serializing)]
    pub token: Option<String>,
    /// File holding a NATS nkey seed (`SU…`).
    pub nkey_seed_file: Option<PathBuf>,
    /// CA certificates (PEM) to verify the broker with; enables TLS.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    pub key_file: Option<PathBuf>,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Outbox records in flight to the broker at once.
    pub window: usize,
    /// Local-bus subjects sent to the fleet (patterns; `[">"]`, the default, sends every
    /// message published on the device's bus, `[]` none).
    pub forward: Vec<String>,
}

/// Whether `id` is a valid device id: 1-64 of lowercase letters, digits, `-` and `_`,
/// so that it is one token in NATS subjects and one level in MQTT topics.
pub fn is_device_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            listen: DEFAULT_LISTEN
                .parse()
                .unwrap_or_else(|_| unreachable!("valid constant")),
            board: DEFAULT_BOARD.into(),
            boards_dir: vec![PathBuf::from(DEFAULT_BOARDS_DIR)],
            sysfs_root: PathBuf::from("/sys"),
            dev_root: PathBuf::from("/dev"),
            preload_dir: None,
            store_cache: DEFAULT_STORE_CACHE,
            limits: DefaultLimits {
                memory: DEFAULT_MEMORY,
                timeout: DEFAULT_TIMEOUT,
                instances: DEFAULT_INSTANCES,
            },
            runtime: RuntimeConfig {
                allocator: Allocator::Auto,
                pool_instances: DEFAULT_POOL_INSTANCES,
                keep_resident: DEFAULT_KEEP_RESIDENT,
                epoch_tick: DEFAULT_EPOCH_TICK,
                backoff_base: DEFAULT_BACKOFF_BASE,
                backoff_max: DEFAULT_BACKOFF_MAX,
                log_lines: DEFAULT_LOG_LINES,
            },
            signing: SigningConfig::default(),
            outbox: OutboxConfig::default(),
            sync: None,
        }
    }
}

/// One problem in a config file, with the key it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Dotted key path, or empty for the file as a whole.
    pub key: String,
    /// What is wrong and how to fix it.
    pub problem: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}", self.problem)
        } else {
            write!(f, "{}: {}", self.key, self.problem)
        }
    }
}

/// Every problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// Where the config came from (file path or `<string>`).
    pub source_name: String,
    /// All problems, in file order.
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_problems(f, &self.source_name, "", &self.problems)
    }
}

/// `source: N problem(s)<what>` followed by one `  - key: problem` line each.
pub(crate) fn write_problems(
    f: &mut fmt::Formatter<'_>,
    source_name: &str,
    what: &str,
    problems: &[ConfigProblem],
) -> fmt::Result {
    let n = problems.len();
    write!(
        f,
        "{source_name}: {n} problem{}{what}",
        if n == 1 { "" } else { "s" }
    )?;
    for p in problems {
        write!(f, "\n  - {p}")?;
    }
    Ok(())
}

impl AgentConfig {
    /// Parses and validates a config file's text. `source_name` names it in errors.
    pub fn from_toml(text: &str, source_name: &str) -> Result<Self, ConfigError> {
        let fail = |problems| ConfigError {
            source_name: source_name.to_string(),
            problems,
        };
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            fail(vec![ConfigProblem {
                key: String::new(),
                problem: format!("not valid TOML: {}", e.to_string().trim()),
            }])
        })?;
        let mut problems = Vec::new();
        let mut cfg = AgentConfig::default();
        let mut root = Walker {
            prefix: String::new(),
            table,
            problems: &mut problems,
        };

        if let Some(dir) = root.take::<PathBuf>("data-dir") {
            if dir.as_os_str().is_empty() {
                root.problem("data-dir", "must not be empty");
            } else {
                cfg.data_dir = dir;
            }
        }
        if let Some(listen) = root.take::<String>("listen") {
            match listen.parse() {
                Ok(addr) => cfg.listen = addr,
                Err(_) => root.problem(
                    "listen",
                    format!("`{listen}` is not an address: write IP:PORT, e.g. `{DEFAULT_LISTEN}`"),
                ),
            }
        }
        if let Some(board) = root.take::<String>("board") {
            let is_path = board.ends_with(".toml") || board.contains('/');
            if board.is_empty()
                || !(is_path
                    || board
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            {
                root.problem(
                    "board",
                    format!(
                        "`{board}` is not a board name (letters, digits, `-`, `_`) or the path of a `.toml` board file"
                    ),
                );
            } else {
                cfg.board = board;
            }
        }
        if let Some(dirs) = root.take::<Vec<PathBuf>>("boards-dir") {
            cfg.boards_dir = dirs;
        }
        if let Some(sysfs) = root.take::<PathBuf>("sysfs-root") {
            cfg.sysfs_root = sysfs;
        }
        if let Some(dev) = root.take::<PathBuf>("dev-root") {
            cfg.dev_root = dev;
        }
        cfg.preload_dir = root.take::<PathBuf>("preload-dir");
        if let Some(cache) = root.take::<ByteSize>("store-cache") {
            cfg.store_cache = cache;
        }
        if let Some(mut limits) = root.section("limits") {
            if let Some(m) = limits.take::<ByteSize>("memory") {
                if m.bytes() < 64 << 10 {
                    limits.problem(
                        "memory",
                        format!("`{m}` is below one WebAssembly page (64KiB)"),
                    );
                } else {
                    cfg.limits.memory = m;
                }
            }
            if let Some(t) = limits.take::<HumanDuration>("timeout") {
                cfg.limits.timeout = t.0;
            }
            if let Some(n) = limits.take::<u32>("instances") {
                if n == 0 {
                    limits.problem("instances", "must be at least 1");
                } else {
                    cfg.limits.instances = n;
                }
            }
            limits.finish(&["memory", "timeout", "instances"]);
        }
        if let Some(mut rt) = root.section("runtime") {
            if let Some(a) = rt.take::<String>("allocator") {
                match a.as_str() {
                    "auto" => cfg.runtime.allocator = Allocator::Auto,
                    "pooling" => cfg.runtime.allocator = Allocator::Pooling,
                    "on-demand" => cfg.runtime.allocator = Allocator::OnDemand,
                    _ => rt.problem(
                        "allocator",
                        format!("`{a}` is not an allocator: use `auto`, `pooling` or `on-demand`"),
                    ),
                }
            }
            if let Some(n) = rt.take::<u32>("pool-instances") {
                if n == 0 {
                    rt.problem("pool-instances", "must be at least 1");
                } else {
                    cfg.runtime.pool_instances = n;
                }
            }
            match rt.take::<String>("keep-resident").as_deref() {
                None => {}
                Some("off") => cfg.runtime.keep_resident = ByteSize(0),
                Some(text) => match text.parse::<ByteSize>() {
                    Ok(b) => cfg.runtime.keep_resident = b,
                    Err(e) => rt.problem("keep-resident", format!("{e}, or `off`")),
                },
            }
            if let Some(t) = rt.take::<HumanDuration>("epoch-tick") {
                cfg.runtime.epoch_tick = t.0;
            }
            if let Some(t) = rt.take::<HumanDuration>("backoff-base") {
                cfg.runtime.backoff_base = t.0;
            }
            if let Some(t) = rt.take::<HumanDuration>("backoff-max") {
                cfg.runtime.backoff_max = t.0;
            }
            if let Some(n) = rt.take::<usize>("log-lines") {
                cfg.runtime.log_lines = n.max(1);
            }
            rt.finish(&[
                "allocator",
                "pool-instances",
                "keep-resident",
                "epoch-tick",
                "backoff-base",
                "backoff-max",
                "log-lines",
            ]);
        }
        if let Some(mut signing) = root.section("signing") {
            for (key, slot) in [
                ("trusted-keys", &mut cfg.signing.trusted_keys),
                ("revoked-keys", &mut cfg.signing.revoked_keys),
            ] {
                if let Some(keys) = signing.take::<Vec<String>>(key) {
                    for (i, k) in keys.iter().enumerate() {
                        if !is_public_key_text(k) {
                            signing.problem(
                                &format!("{key}[{i}]"),
                                format!(
                                    "`{k}` is not a public key: write `ed25519:` and 44 base64 characters, as `perch key show` prints it"
                                ),
                            );
                        }
                    }
                    *slot = keys;
                }
            }
            if let Some(allow) = signing.take::<bool>("allow-unsigned") {
                cfg.signing.allow_unsigned = allow;
            }
            signing.finish(&["trusted-keys", "revoked-keys", "allow-unsigned"]);
        }
        if let Some(mut outbox) = root.section("outbox") {
            if let Some(b) = outbox.take::<ByteSize>("max-bytes") {
                if b.bytes() < 64 << 10 {
                    outbox.problem("max-bytes", format!("`{b}` is below the minimum of 64KiB"));
                } else {
                    cfg.outbox.max_bytes = b;
                }
            }
            if let Some(t) = outbox.take::<HumanDuration>("max-age") {
                cfg.outbox.max_age = t.0;
            }
            outbox.finish(&["max-bytes", "max-age"]);
        }
        if let Some(mut sync) = root.section("sync") {
            let device = sync.take::<String>("device");
            match &device {
                Some(d) if !is_device_id(d) => sync.problem(
                    "device",
                    format!(
                        "`{d}` is not a device id: use 1 to 64 lowercase letters, digits, `-` and `_`"
                    ),
                ),
                Some(_) => {}
                None => sync.problem(
                    "device",
                    "is required: the id this device has in the fleet, e.g. `device = \"gw-0042\"`",
                ),
            }
            let transport = match sync.take::<String>("transport").as_deref() {
                None | Some("nats") => Some(SyncTransport::Nats),
                Some("mqtt") => Some(SyncTransport::Mqtt),
                Some(other) => {
                    sync.problem(
                        "transport",
                        format!("`{other}` is not a transport: use `nats` or `mqtt`"),
                    );
                    None
                }
            };
            let url = sync.take::<String>("url");
            if let (Some(u), Some(t)) = (&url, transport) {
                let schemes: &[&str] = match t {
                    SyncTransport::Nats => &["nats://", "tls://"],
                    SyncTransport::Mqtt => &["mqtt://", "mqtts://"],
                };
                if !schemes.iter().any(|s| u.starts_with(s)) {
                    sync.problem(
                        "url",
                        format!("`{u}` must start with {}", schemes.join(" or ")),
                    );
                }
            }
            let heartbeat = sync.take::<HumanDuration>("heartbeat").map(|h| h.0);
            let window = sync.take::<usize>("window");
            if window == Some(0) {
                sync.problem("window", "must be at least 1");
            }
            let forward = sync.take::<Vec<String>>("forward");
            for pattern in forward.iter().flatten() {
                if let Err(e) = crate::spec::check_subject_pattern(pattern) {
                    sync.problem("forward", e);
                }
            }
            let cfg_sync = SyncConfig {
                device: device.unwrap_or_default(),
                transport: transport.unwrap_or(SyncTransport::Nats),
                url: url.unwrap_or_else(|| match transport {
                    Some(SyncTransport::Mqtt) => "mqtt://127.0.0.1:1883".into(),
                    _ => "nats://127.0.0.1:4222".into(),
                }),
                domain: sync.take::<String>("domain"),
                hub_domain: sync
                    .take::<String>("hub-domain")
                    .unwrap_or_else(|| "hub".into()),
                user: sync.take::<String>("user"),
                password: sync.take::<String>("password"),
                token: sync.take::<String>("token"),
                nkey_seed_file: sync.take::<PathBuf>("nkey-seed-file"),
                ca_file: sync.take::<PathBuf>("ca-file"),
                cert_file: sync.take::<PathBuf>("cert-file"),
                key_file: sync.take::<PathBuf>("key-file"),
                heartbeat: heartbeat.unwrap_or(DEFAULT_HEARTBEAT),
                window: window.unwrap_or(DEFAULT_SYNC_WINDOW).max(1),
                forward: forward.unwrap_or_else(|| vec![">".into()]),
            };
            if cfg_sync.cert_file.is_some() != cfg_sync.key_file.is_some() {
                sync.problem(
                    "cert-file",
                    "a client certificate needs both `cert-file` and `key-file`",
                );
            }
            if cfg_sync.password.is_some() && cfg_sync.user.is_none() {
                sync.problem("password", "a password needs a `user`");
            }
            sync.finish(&[
                "device",
                "transport",
                "url",
                "domain",
                "hub-domain",
                "user",
                "password",
                "token",
                "nkey-seed-file",
                "ca-file",
                "cert-file",
                "key-file",
                "heartbeat",
                "window",
                "forward",
            ]);
            cfg.sync = Some(cfg_sync);
        }
        root.finish(&[
            "data-dir",
            "listen",
            "board",
            "boards-dir",
            "sysfs-root",
            "dev-root",
            "preload-dir",
            "store-cache",
            "limits",
            "runtime",
            "signing",
            "outbox",
            "sync",
        ]);

        if cfg.runtime.backoff_base > cfg.runtime.backoff_max {
            problems.push(ConfigProblem {
                key: "runtime.backoff-base".into(),
                problem: "must not exceed runtime.backoff-max".into(),
            });
        }
        if cfg.limits.timeout < cfg.runtime.epoch_tick {
            problems.push(ConfigProblem {
                key: "limits.timeout".into(),
                problem: "must be at least runtime.epoch-tick".into(),
            });
        }
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(fail(problems))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_gives_defaults() {
        let cfg = AgentConfig::from_toml("", "t").expect("empty is fine");
        assert_eq!(cfg, AgentConfig::default());
        assert_eq!(cfg.listen.to_string(), DEFAULT_LISTEN);
    }

    #[test]
    fn full_config_parses() {
        let cfg = AgentConfig::from_toml(
            r#"
            data-dir = "/tmp/x"
            listen = "127.0.0.1:9000"
            board = "rpi4"
            [limits]
            memory = "16MiB"
            timeout = "250ms"
            instances = 2
            [runtime]
            allocator = "on-demand"
            pool-instances = 10
            epoch-tick = "5ms"
            "#,
            "t",
        )
        .expect("valid");
        assert_eq!(cfg.limits.memory, ByteSize::mib(16));
        assert_eq!(cfg.limits.timeout, Duration::from_millis(250));
        assert_eq!(cfg.runtime.allocator, Allocator::OnDemand);
        assert_eq!(cfg.listen.port(), 9000);
    }

    #[test]
    fn sync_and_outbox_sections_parse_and_complain_by_key() {
        let cfg = AgentConfig::from_toml(
            r#"
            [sync]
            device = "gw-0042"
            url = "nats://127.0.0.1:4222"
            domain = "gw0042"
            token = "s3cret"
            heartbeat = "2s"
            [outbox]
            max-bytes = "1MiB"
            max-age = "1h"
            "#,
            "t",
        )
        .expect("valid");
        let sync = cfg.sync.expect("sync section");
        assert_eq!(sync.device, "gw-0042");
        assert_eq!(sync.transport, SyncTransport::Nats);
        assert_eq!(sync.domain.as_deref(), Some("gw0042"));
        assert_eq!(sync.heartbeat, Duration::from_secs(2));
        assert_eq!(sync.window, DEFAULT_SYNC_WINDOW);
        assert_eq!(cfg.outbox.max_bytes, ByteSize::mib(1));
        assert_eq!(cfg.outbox.max_age, Duration::from_secs(3600));
        // Secrets are not echoed by `perchd --check-config`.
        let shown = serde_json::to_string(&sync).expect("json");
        assert!(!shown.contains("s3cret"), "{shown}");

        let err = AgentConfig::from_toml(
            r#"
            [sync]
            transport = "mqtt"
            url = "nats://hub"
            cert-file = "/c.pem"
            window = 0
            [outbox]
            max-bytes = "1KiB"
            "#,
            "perchd.toml",
        )
        .expect_err("invalid");
        let text = err.to_string();
        for expected in [
            "outbox.max-bytes: `1KiB` is below the minimum of 64KiB",
            "sync.device: is required",
            "sync.url: `nats://hub` must start with mqtt:// or mqtts://",
            "sync.window: must be at least 1",
            "sync.cert-file: a client certificate needs both `cert-file` and `key-file`",
        ] {
            assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
        }
    }

    #[test]
    fn every_problem_is_listed_with_its_key() {
        let err = AgentConfig::from_toml(
            r#"
            listen = "localhost"
            lisen = "x"
            [limits]
            memory = "16"
            timeout = 5
            [runtime]
            allocator = "fast"
            "#,
            "perchd.toml",
        )
        .expect_err("invalid");
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "listen",
                "limits.memory",
                "limits.timeout",
                "runtime.allocator",
                "lisen"
            ]
        );
        let text = err.to_string();
        assert!(text.starts_with("perchd.toml: 5 problems"), "{text}");
        assert!(
            text.contains("lisen: unknown key; did you mean `listen`?"),
            "{text}"
        );
        assert!(text.contains("limits.memory: `16` is not a size"), "{text}");
    }

    #[test]
    fn signing_keys_are_checked() {
        let good = "ed25519:11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";
        let cfg = AgentConfig::from_toml(&format!("[signing]\ntrusted-keys = [\"{good}\"]\n"), "t")
            .expect("valid");
        assert_eq!(cfg.signing.trusted_keys, [good]);
        assert!(!cfg.signing.allow_unsigned);
        let err = AgentConfig::from_toml(
            "[signing]\nrevoked-keys = [\"abc\"]\nallow-unsigend = true\n",
            "t",
        )
        .expect_err("invalid");
        let text = err.to_string();
        assert!(
            text.contains("signing.revoked-keys[0]: `abc` is not a public key"),
            "{text}"
        );
        assert!(
            text.contains("signing.allow-unsigend: unknown key; did you mean `allow-unsigned`?"),
            "{text}"
        );
    }

    #[test]
    fn syntax_errors_are_reported() {
        let err = AgentConfig::from_toml("listen = ", "f.toml").expect_err("syntax");
        assert!(err.to_string().contains("not valid TOML"), "{err}");
    }
}
