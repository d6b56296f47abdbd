//! What to run: component specs and the desired-state document.
//!
//! A desired state is a revision plus a list of components, each naming its code by digest,
//! its triggers and optional limits. It is what the agent journals and restores at boot.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::units::{ByteSize, HumanDuration};

/// Longest accepted component name.
pub const MAX_NAME_LEN: usize = 63;

/// Why a spec or desired-state document was rejected. Every message names the component.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// component name `{0}` is invalid: use 1-63 lowercase letters, digits and `-`, starting with a letter
    #[error(
        "component name `{0}` is invalid: use 1-63 lowercase letters, digits and `-`, starting with a letter"
    )]
    Name(String),
    /// component `{0}` appears twice in the desired state
    #[error("component `{0}` appears twice in the desired state")]
    DuplicateName(String),
    /// components `{first}` and `{second}` both claim HTTP route `{route}`
    #[error("components `{first}` and `{second}` both claim HTTP route `{route}`")]
    DuplicateRoute {
        route: String,
        first: String,
        second: String,
    },
    /// component `{component}`: {problem}
    #[error("component `{component}`: {problem}")]
    Trigger { component: String, problem: String },
    /// component `{component}` has no triggers: give it at least one of every, http, message or startup
    #[error(
        "component `{0}` has no triggers: give it at least one of `every`, `http`, `message` or `startup`"
    )]
    NoTriggers(String),
    /// component `{component}`: limit `instances` must be between 1 and {max}
    #[error("component `{component}`: limit `instances` must be between 1 and {max}")]
    Instances { component: String, max: u32 },
    /// component `{component}`: limit `calls-per-instance` must be between 1 and {max}
    #[error("component `{component}`: limit `calls-per-instance` must be between 1 and {max}")]
    CallsPerInstance { component: String, max: u32 },
    /// component `{component}`: source `{url}` must be an http:// or https:// URL
    #[error("component `{component}`: source `{url}` must be an http:// or https:// URL")]
    Source { component: String, url: String },
}

/// One way a component gets invoked.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Trigger {
    /// Call `perch:device/timer.on-tick` at this interval.
    Every(HumanDuration),
    /// Serve `wasi:http/incoming-handler` under this path prefix of the agent's listener.
    Http(String),
    /// Call `perch:device/message-handler.on-message` for messages matching this subject
    /// pattern (`.`-separated tokens; `*` matches one token, a final `>` the rest).
    Message(String),
    /// Call `perch:device/lifecycle.on-start` once when the component starts.
    Startup,
    /// Call `perch:device/gpio-handler.on-edge` when GPIO line `line` changes level. Changes
    /// within `debounce` of the last one passed on are dropped (contact bounce).
    Gpio {
        line: String,
        edge: Edge,
        debounce: Option<HumanDuration>,
    },
}

/// Which level changes of a GPIO line trigger a component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Edge {
    /// Low to high.
    Rising,
    /// High to low.
    Falling,
    /// Either.
    Both,
}

impl Edge {
    /// Whether a change to level `high` is an edge of this kind.
    pub fn matches(self, high: bool) -> bool {
        match self {
            Edge::Rising => high,
            Edge::Falling => !high,
            Edge::Both => true,
        }
    }
}

impl std::str::FromStr for Edge {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "rising" => Ok(Edge::Rising),
            "falling" => Ok(Edge::Falling),
            "both" => Ok(Edge::Both),
            other => Err(format!(
                "`{other}` is not an edge: use `rising`, `falling` or `both`"
            )),
        }
    }
}

/// The wire form of a trigger: a table with exactly one key, e.g. `{ every = "5s" }`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawTrigger {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    every: Option<HumanDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    http: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    startup: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gpio: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    edge: Option<Edge>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    debounce: Option<HumanDuration>,
}

impl Serialize for Trigger {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut raw = RawTrigger::default();
        match self {
            Trigger::Every(d) => raw.every = Some(*d),
            Trigger::Http(r) => raw.http = Some(r.clone()),
            Trigger::Message(m) => raw.message = Some(m.clone()),
            Trigger::Startup => raw.startup = Some(true),
            Trigger::Gpio {
                line,
                edge,
                debounce,
            } => {
                raw.gpio = Some(line.clone());
                raw.edge = Some(*edge);
                raw.debounce = *debounce;
            }
        }
        raw.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Trigger {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawTrigger::deserialize(d)?;
        let mut found = Vec::new();
        if let Some(e) = raw.every {
            found.push(Trigger::Every(e));
        }
        if let Some(h) = raw.http {
            found.push(Trigger::Http(h));
        }
        if let Some(m) = raw.message {
            found.push(Trigger::Message(m));
        }
        match raw.gpio {
            Some(line) => found.push(Trigger::Gpio {
                line,
                edge: raw.edge.unwrap_or(Edge::Both),
                debounce: raw.debounce,
            }),
            None if raw.edge.is_some() || raw.debounce.is_some() => {
                return Err(serde::de::Error::custom(
                    "`edge` and `debounce` belong to a `gpio` trigger, e.g. `{ gpio = \"button\", edge = \"falling\" }`",
                ));
            }
            None => {}
        }
        match raw.startup {
            Some(true) => found.push(Trigger::Startup),
            Some(false) => {
                return Err(serde::de::Error::custom(
                    "`startup = false` is not a trigger: leave the trigger out instead",
                ));
            }
            None => {}
        }
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => Err(serde::de::Error::custom(
                "a trigger needs one of `every`, `http`, `message`, `startup` or `gpio`",
            )),
            _ => Err(serde::de::Error::custom(
                "a trigger has exactly one of `every`, `http`, `message`, `startup` or `gpio`; write one trigger per entry",
            )),
        }
    }
}

impl Trigger {
    /// The parse form of a trigger used on the command line and in query strings:
    /// `every:5s`, `http:/hello`, `message:cmd.x`, `startup`.
    pub fn parse_short(s: &str) -> Result<Self, String> {
        let (kind, value) = s.split_once(':').unwrap_or((s, ""));
        match kind {
            "every" => value.parse().map(Trigger::Every).map_err(|e| e.to_string()),
            "http" => Ok(Trigger::Http(value.to_string())),
            "message" => Ok(Trigger::Message(value.to_string())),
            "startup" if value.is_empty() => Ok(Trigger::Startup),
            "gpio" if !value.is_empty() => {
                // gpio:LINE[:EDGE[:DEBOUNCE]]
                let mut parts = value.split(':');
                let line = parts.next().unwrap_or_default().to_string();
                let edge = match parts.next() {
                    Some(e) => e.parse()?,
                    None => Edge::Both,
                };
                let debounce = match parts.next() {
                    Some(d) => Some(
                        d.parse()
                            .map_err(|e: crate::units::UnitError| e.to_string())?,
                    ),
                    None => None,
                };
                Ok(Trigger::Gpio {
                    line,
                    edge,
                    debounce,
                })
            }
            _ => Err(format!(
                "unknown trigger `{s}`: expected `every:<duration>`, `http:<route>`, `message:<subject>`, `startup` or `gpio:<line>[:<edge>[:<debounce>]]`"
            )),
        }
    }

    pub(crate) fn check(&self) -> Result<(), String> {
        match self {
            Trigger::Every(d) if d.0.as_millis() < 10 => {
                Err(format!("timer interval `{d}` is below the 10ms minimum"))
            }
            Trigger::Http(route) => check_route(route),
            Trigger::Message(subject) => check_subject_pattern(subject),
            Trigger::Gpio { line, debounce, .. } => {
                if line.is_empty()
                    || !line
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                {
                    return Err(format!("GPIO line name `{line}` is invalid"));
                }
                match debounce {
                    Some(d) if d.0 > std::time::Duration::from_secs(10) => {
                        Err(format!("debounce `{d}` is above the 10s maximum"))
                    }
                    _ => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }
}

fn check_route(route: &str) -> Result<(), String> {
    if !route.starts_with('/') {
        return Err(format!("HTTP route `{route}` must start with `/`"));
    }
    if route.starts_with("/v1/") || route == "/v1" {
        return Err(format!(
            "HTTP route `{route}` is reserved for the agent's API (`/v1`)"
        ));
    }
    if route.len() > 1 && route.ends_with('/') {
        return Err(format!("HTTP route `{route}` must not end with `/`"));
    }
    if route.contains(|c: char| c.is_whitespace() || c == '?' || c == '#' || c == '*') {
        return Err(format!(
            "HTTP route `{route}` may not contain spaces, `?`, `#` or `*`"
        ));
    }
    Ok(())
}

/// Checks a subject pattern: non-empty `.`-separated tokens, `*` as a whole token, `>` last.
/// `/`, `+` and `#` are refused too, so every subject is also an MQTT topic (`.` → `/`) and
/// comes back from the fleet unchanged.
pub fn check_subject_pattern(subject: &str) -> Result<(), String> {
    // One pass, no allocation: every message a component publishes is checked.
    let mut tokens = subject.split('.').peekable();
    while let Some(t) = tokens.next() {
        let last = tokens.peek().is_none();
        let bad = t.is_empty()
            || t.contains(char::is_whitespace)
            || t.contains(['/', '+', '#'])
            || (t.contains('*') && t != "*")
            || (t.contains('>') && (t != ">" || !last));
        if bad {
            return Err(format!(
                "message subject `{subject}` is invalid: use `.`-separated tokens without `/`, `+` or `#`, `*` for one token and a final `>` for the rest"
            ));
        }
    }
    Ok(())
}

/// Whether `subject` (no wildcards) matches `pattern`.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Per-component resource limits; unset fields take the agent's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Limits {
    /// Largest linear memory the component may grow to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ByteSize>,
    /// Wall-clock limit of one invocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<HumanDuration>,
    /// Most instances of this component alive at once (concurrent invocations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<u32>,
    /// Calls one instance serves before it is dropped and a fresh one is made; 1 (the
    /// default) gives every call a fresh instance. Above 1 the guest's memory and globals
    /// persist from one call to the next; an instance that traps or times out is dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calls_per_instance: Option<u32>,
}

/// Most calls one instance may serve before it is replaced.
pub const MAX_CALLS_PER_INSTANCE: u32 = 1_000_000;

/// Most concurrent instances one component may ask for.
pub const MAX_INSTANCES_PER_COMPONENT: u32 = 1000;

/// One component of a desired state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ComponentSpec {
    /// Unique name on this device; also its key-value namespace and log name.
    pub name: String,
    /// sha256 of the component's bytes.
    pub digest: Digest,
    /// Where to fetch the bytes when the cache lacks them: an `http://` or `https://` URL.
    /// Without it a device linked over NATS fetches them by digest from the fleet's
    /// `perch-components` object store (`docs/protocol.md`). The bytes must hash to
    /// `digest` whatever their source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// How it is invoked. May be left empty in a submitted document when the component's
    /// manifest lists its triggers.
    #[serde(default)]
    pub triggers: Vec<Trigger>,
    /// Resource limits (agent defaults where unset).
    #[serde(default, skip_serializing_if = "is_default_limits")]
    pub limits: Limits,
    /// What the component may reach, by name. `None` in a submitted document means "what the
    /// component's manifest grants"; the agent resolves it before journaling, and a value
    /// given here may only narrow the manifest's grants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grants: Option<Grants>,
    /// Config values the component reads through `wasi:config/store`: the manifest's
    /// defaults overlaid with the values given here.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
    /// The public key that signed the component's artifact, recorded by the agent when it
    /// verified the signature (`None` for an unsigned development deploy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
}

/// GPIO lines a component may use, by board name. A line granted for `write` may also be read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct GpioGrants {
    /// Lines the component may read.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub read: BTreeSet<String>,
    /// Lines the component may drive (and read back).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub write: BTreeSet<String>,
}

impl GpioGrants {
    /// Whether no line is granted.
    pub fn is_empty(&self) -> bool {
        self.read.is_empty() && self.write.is_empty()
    }
}

/// Everything a component may reach beyond its own kv namespace, log and the local bus.
/// Grants are by name and per component; a call outside them is denied, never trapped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Grants {
    /// GPIO lines by board name.
    #[serde(default, skip_serializing_if = "GpioGrants::is_empty")]
    pub gpio: GpioGrants,
    /// Sensors by board name.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub sensors: BTreeSet<String>,
    /// Telemetry streams the component may publish to.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub telemetry: BTreeSet<String>,
    /// Hosts reachable with outgoing HTTP (`host` or `host:port`).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub http: BTreeSet<String>,
}

impl Grants {
    /// Whether nothing is granted.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Whether the component may read GPIO line `line`.
    pub fn gpio_read(&self, line: &str) -> bool {
        self.gpio.read.contains(line) || self.gpio.write.contains(line)
    }

    /// Whether the component may drive GPIO line `line`.
    pub fn gpio_write(&self, line: &str) -> bool {
        self.gpio.write.contains(line)
    }

    /// Every grant in `self` that `wider` does not hold, as `kind name` strings (empty when
    /// `self` only narrows `wider`).
    pub fn beyond(&self, wider: &Grants) -> Vec<String> {
        let mut extra = Vec::new();
        let mut diff = |kind: &str, mine: &BTreeSet<String>, theirs: &dyn Fn(&str) -> bool| {
            extra.extend(
                mine.iter()
                    .filter(|n| !theirs(n))
                    .map(|n| format!("{kind} `{n}`")),
            );
        };
        diff("gpio.read", &self.gpio.read, &|n| wider.gpio_read(n));
        diff("gpio.write", &self.gpio.write, &|n| wider.gpio_write(n));
        diff("sensors", &self.sensors, &|n| wider.sensors.contains(n));
        diff("telemetry", &self.telemetry, &|n| {
            wider.telemetry.contains(n)
        });
        diff("http", &self.http, &|n| wider.http.contains(n));
        extra
    }
}

fn is_default_limits(l: &Limits) -> bool {
    *l == Limits::default()
}

/// Checks a component name.
pub fn check_name(name: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(SpecError::Name(name.to_string()))
    }
}

/// Whether `s` is an `http://` or `https://` URL with a host.
pub fn is_http_url(s: &str) -> bool {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"));
    rest.is_some_and(|r| {
        let host = r.split(['/', '?', '#']).next().unwrap_or_default();
        !host.is_empty() && !host.contains(char::is_whitespace) && !r.contains(char::is_whitespace)
    })
}

impl ComponentSpec {
    /// Validates the name, triggers and limits, returning every problem found.
    pub fn validate(&self) -> Vec<SpecError> {
        let mut errors = Vec::new();
        if let Err(e) = check_name(&self.name) {
            errors.push(e);
        }
        if self.triggers.is_empty() {
            errors.push(SpecError::NoTriggers(self.name.clone()));
        }
        for t in &self.triggers {
            if let Err(problem) = t.check() {
                errors.push(SpecError::Trigger {
                    component: self.name.clone(),
                    problem,
                });
            }
        }
        let unique: BTreeSet<_> = self.triggers.iter().collect();
        if unique.len() != self.triggers.len() {
            errors.push(SpecError::Trigger {
                component: self.name.clone(),
                problem: "the same trigger is listed twice".into(),
            });
        }
        if let Some(n) = self.limits.instances
            && !(1..=MAX_INSTANCES_PER_COMPONENT).contains(&n)
        {
            errors.push(SpecError::Instances {
                component: self.name.clone(),
                max: MAX_INSTANCES_PER_COMPONENT,
            });
        }
        if let Some(n) = self.limits.calls_per_instance
            && !(1..=MAX_CALLS_PER_INSTANCE).contains(&n)
        {
            errors.push(SpecError::CallsPerInstance {
                component: self.name.clone(),
                max: MAX_CALLS_PER_INSTANCE,
            });
        }
        if let Some(source) = &self.source
            && !is_http_url(source)
        {
            errors.push(SpecError::Source {
                component: self.name.clone(),
                url: source.clone(),
            });
        }
        errors
    }

    /// HTTP routes this component serves.
    pub fn routes(&self) -> impl Iterator<Item = &str> {
        self.triggers.iter().filter_map(|t| match t {
            Trigger::Http(r) => Some(r.as_str()),
            _ => None,
        })
    }
}

/// The desired state of the device: what the agent runs, restores at boot and reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DesiredState {
    /// Monotonic revision; each accepted change increments it.
    pub revision: u64,
    /// Components to run.
    #[serde(default)]
    pub components: Vec<ComponentSpec>,
}

impl DesiredState {
    /// Validates every component and cross-component constraints, returning every problem.
    pub fn validate(&self) -> Vec<SpecError> {
        let mut errors = Vec::new();
        let mut names = BTreeSet::new();
        let mut routes: Vec<(&str, &str)> = Vec::new();
        for c in &self.components {
            errors.extend(c.validate());
            if !names.insert(c.name.as_str()) {
                errors.push(SpecError::DuplicateName(c.name.clone()));
            }
            for r in c.routes() {
                if let Some((_, owner)) = routes.iter().find(|(route, _)| *route == r) {
                    errors.push(SpecError::DuplicateRoute {
                        route: r.to_string(),
                        first: owner.to_string(),
                        second: c.name.clone(),
                    });
                } else {
                    routes.push((r, &c.name));
                }
            }
        }
        errors
    }

    /// The component named `name`.
    pub fn get(&self, name: &str) -> Option<&ComponentSpec> {
        self.components.iter().find(|c| c.name == name)
    }

    /// A copy with `spec` added or replacing the component of the same name, at `revision + 1`.
    pub fn with_component(&self, spec: ComponentSpec) -> Self {
        let mut next = self.clone();
        next.revision += 1;
        match next.components.iter_mut().find(|c| c.name == spec.name) {
            Some(slot) => *slot = spec,
            None => next.components.push(spec),
        }
        next
    }

    /// A copy without the component `name`, at `revision + 1`, or `None` if it is not there.
    pub fn without_component(&self, name: &str) -> Option<Self> {
        let idx = self.components.iter().position(|c| c.name == name)?;
        let mut next = self.clone();
        next.revision += 1;
        next.components.remove(idx);
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn spec(name: &str, triggers: Vec<Trigger>) -> ComponentSpec {
        ComponentSpec {
            name: name.into(),
            digest: Digest::of(name.as_bytes()),
            source: None,
            triggers,
            limits: Limits::default(),
            grants: None,
            config: BTreeMap::new(),
            signer: None,
        }
    }

    #[test]
    fn a_source_must_be_an_http_url() {
        let mut c = spec("thermostat", vec![Trigger::Startup]);
        for ok in [
            "https://fleet.example/c/t.wasm",
            "http://127.0.0.1:8080/x?d=1",
        ] {
            c.source = Some(ok.into());
            assert!(c.validate().is_empty(), "{ok}");
        }
        for bad in ["ftp://x/y", "https://", "/local/path", "https://a b/c"] {
            c.source = Some(bad.into());
            let e = c.validate();
            assert_eq!(e.len(), 1, "{bad}");
            assert!(
                e[0].to_string().contains(&format!("source `{bad}`")),
                "{}",
                e[0]
            );
        }
    }

    #[test]
    fn grants_narrow_but_never_widen() {
        let wide: Grants = toml::from_str(
            r#"
            gpio = { read = ["button"], write = ["fan"] }
            sensors = ["room-temp"]
            "#,
        )
        .expect("grants");
        assert!(wide.gpio_read("fan") && wide.gpio_write("fan"));
        assert!(wide.gpio_read("button") && !wide.gpio_write("button"));
        let narrow: Grants = toml::from_str(r#"gpio = { read = ["fan"] }"#).expect("grants");
        assert!(narrow.beyond(&wide).is_empty());
        let wider: Grants = toml::from_str(
            r#"gpio = { write = ["button"] }
sensors = ["door"]"#,
        )
        .expect("grants");
        assert_eq!(
            wider.beyond(&wide),
            ["gpio.write `button`", "sensors `door`"]
        );
    }

    #[test]
    fn triggers_round_trip_in_json_and_toml() {
        let json = r#"[{"every":"5s"},{"http":"/hello"},{"message":"cmd.>"},{"startup":true}]"#;
        let ts: Vec<Trigger> = serde_json::from_str(json).expect("parse");
        assert_eq!(
            ts,
            vec![
                Trigger::Every(HumanDuration(Duration::from_secs(5))),
                Trigger::Http("/hello".into()),
                Trigger::Message("cmd.>".into()),
                Trigger::Startup
            ]
        );
        assert_eq!(serde_json::to_string(&ts).expect("ser"), json);
    }

    #[test]
    fn gpio_triggers_round_trip() {
        let json = r#"[{"gpio":"button","edge":"falling","debounce":"20ms"},{"gpio":"door","edge":"both"}]"#;
        let ts: Vec<Trigger> = serde_json::from_str(json).expect("parse");
        assert_eq!(
            ts[0],
            Trigger::Gpio {
                line: "button".into(),
                edge: Edge::Falling,
                debounce: Some(HumanDuration(Duration::from_millis(20)))
            }
        );
        assert_eq!(serde_json::to_string(&ts).expect("ser"), json);
        assert_eq!(
            Trigger::parse_short("gpio:button:falling:20ms"),
            Ok(ts[0].clone())
        );
        let e = serde_json::from_str::<Trigger>(r#"{"edge":"falling"}"#).expect_err("no line");
        assert!(e.to_string().contains("belong to a `gpio` trigger"), "{e}");
        assert!(Edge::Falling.matches(false) && !Edge::Falling.matches(true));
    }

    #[test]
    fn trigger_mistakes_are_explained() {
        let e = serde_json::from_str::<Trigger>(r#"{"evrey":"5s"}"#).expect_err("typo");
        assert!(e.to_string().contains("unknown field `evrey`"), "{e}");
        let e = serde_json::from_str::<Trigger>(r#"{"every":"5s","http":"/x"}"#).expect_err("two");
        assert!(e.to_string().contains("exactly one"), "{e}");
        let e = serde_json::from_str::<Trigger>(r#"{"every":"5"}"#).expect_err("unit");
        assert!(e.to_string().contains("not a duration"), "{e}");
        assert!(Trigger::parse_short("every:1s").is_ok());
        assert!(
            Trigger::parse_short("cron:1s")
                .expect_err("kind")
                .contains("unknown trigger")
        );
    }

    #[test]
    fn desired_state_validation_lists_every_problem() {
        let ds = DesiredState {
            revision: 1,
            components: vec![
                spec("Bad Name", vec![Trigger::Http("nope".into())]),
                spec("a", vec![Trigger::Http("/x".into())]),
                spec(
                    "b",
                    vec![Trigger::Http("/x".into()), Trigger::Message("a..b".into())],
                ),
                spec("b", vec![]),
            ],
        };
        let errors = ds.validate();
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert!(
            errors.contains(&SpecError::Name("Bad Name".into())),
            "{text:?}"
        );
        assert!(
            text.iter().any(|t| t.contains("must start with `/`")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|t| t.contains("both claim HTTP route `/x`")),
            "{text:?}"
        );
        assert!(
            text.iter().any(|t| t.contains("subject `a..b`")),
            "{text:?}"
        );
        assert!(
            errors.contains(&SpecError::DuplicateName("b".into())),
            "{text:?}"
        );
        assert!(
            errors.contains(&SpecError::NoTriggers("b".into())),
            "{text:?}"
        );
    }

    #[test]
    fn subjects_match_like_nats() {
        assert!(subject_matches("a.b", "a.b"));
        assert!(subject_matches("a.*", "a.b"));
        assert!(!subject_matches("a.*", "a.b.c"));
        assert!(subject_matches("a.>", "a.b.c"));
        assert!(!subject_matches("a.>", "a"));
        assert!(!subject_matches("a.b", "a.c"));
        assert!(check_subject_pattern("a.>.b").is_err());
        assert!(check_subject_pattern("a.b*").is_err());
        for ok in ["a", "a.b", "a.*", "a.*.c", "a.>", ">", "*.>", "done.job-1"] {
            assert!(check_subject_pattern(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a..b",
            "a.",
            ".a",
            "a b",
            "a.\u{a0}b",
            "a/b",
            "a.+",
            "a.#",
            "a.>x",
            ">.a",
        ] {
            assert!(check_subject_pattern(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn with_and_without_component_bump_revision() {
        let ds = DesiredState::default().with_component(spec("a", vec![Trigger::Startup]));
        assert_eq!(ds.revision, 1);
        let ds2 = ds.with_component(spec(
            "a",
            vec![Trigger::Every(HumanDuration(Duration::from_secs(1)))],
        ));
        assert_eq!((ds2.revision, ds2.components.len()), (2, 1));
        let ds3 = ds2.without_component("a").expect("present");
        assert_eq!((ds3.revision, ds3.components.len()), (3, 0));
        assert!(ds3.without_component("a").is_none());
    }
}
