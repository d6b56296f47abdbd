//! The component manifest: what a component needs, written under `[package.metadata.perch]`
//! in its own `Cargo.toml` and embedded by `perch build` into the component's
//! `perch-manifest` custom section.
//!
//! Parsing walks the table key by key so that every mistake is reported at once, each with
//! its key path (`package.metadata.perch.limits.memory`) and a hint saying how to fix it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::config::ConfigProblem;
use crate::spec::{
    Grants, Limits, MAX_CALLS_PER_INSTANCE, MAX_INSTANCES_PER_COMPONENT, Trigger, check_name,
};
use crate::units::{ByteSize, HumanDuration};
use crate::walk::{Walker, closest};

/// Where the manifest lives in `Cargo.toml`.
pub const MANIFEST_TABLE: &str = "package.metadata.perch";
/// Name of the custom section that carries the manifest (JSON) inside a component.
pub const MANIFEST_SECTION: &str = "perch-manifest";
/// Longest config key or grant name.
pub const MAX_NAME: usize = 128;

const TRIGGER_KINDS: &[&str] = &["every", "http", "message", "startup", "gpio"];
const GRANT_KINDS: &[&str] = &["gpio", "sensors", "telemetry", "http"];
const GPIO_MODES: &[&str] = &["read", "write"];
const LIMIT_KEYS: &[&str] = &["memory", "timeout", "instances", "calls-per-instance"];
const MANIFEST_KEYS: &[&str] = &[
    "name", "triggers", "grants", "config", "limits", "compose", "stack",
];

/// A component's manifest: its name on the device, triggers, grants, config defaults and
/// limits. This is also the JSON form embedded in the component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Manifest {
    /// Component name on the device (defaults to the package name).
    pub name: String,
    /// Package version, for display.
    #[serde(default)]
    pub version: String,
    /// How the component is invoked.
    pub triggers: Vec<Trigger>,
    /// What it may reach, by name.
    #[serde(default, skip_serializing_if = "Grants::is_empty")]
    pub grants: Grants,
    /// Config defaults, readable through `wasi:config/store`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
    /// Resource limits (the agent's defaults where unset).
    #[serde(default)]
    pub limits: Limits,
    /// Build-time composition: interface name -> the component (a crate directory or a
    /// `.wasm` file, relative to the crate) whose export of that interface is plugged into
    /// this component's import.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub compose: BTreeMap<String, String>,
    /// Size of the guest's own stack (the shadow stack at the start of its linear memory),
    /// set when `perch build` links it; build time only, not embedded.
    #[serde(skip)]
    pub stack: Option<ByteSize>,
}

/// The guest stack `perch build` links a component with unless its manifest says `stack`.
/// Rust's own default is 1 MiB; every fresh instance pays for the pages it resets, and a
/// handler rarely needs more than a few KiB (see docs/performance.md).
pub const DEFAULT_STACK: ByteSize = ByteSize::kib(128);
/// Smallest and largest `stack`.
pub const MIN_STACK: ByteSize = ByteSize::kib(16);
pub const MAX_STACK: ByteSize = ByteSize::mib(8);

impl Manifest {
    /// The guest stack to link with: the manifest's `stack` or [`DEFAULT_STACK`].
    pub fn stack_bytes(&self) -> u64 {
        self.stack.unwrap_or(DEFAULT_STACK).bytes()
    }
}

/// Every problem found in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    /// Where the manifest came from (a `Cargo.toml` path).
    pub source_name: String,
    /// All problems, in file order (unknown keys last).
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::config::write_problems(
            f,
            &self.source_name,
            " in the component manifest",
            &self.problems,
        )
    }
}

impl Manifest {
    /// Reads `[package.metadata.perch]` from the text of a `Cargo.toml`. The component name
    /// defaults to the package name, the version is the package version.
    pub fn from_cargo_toml(text: &str, source_name: &str) -> Result<Self, ManifestError> {
        let fail = |key: &str, problem: String| ManifestError {
            source_name: source_name.to_string(),
            problems: vec![ConfigProblem {
                key: key.to_string(),
                problem,
            }],
        };
        let mut doc: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            fail("", format!("not valid TOML: {}", e.to_string().trim()))
        })?;
        let Some(toml::Value::Table(mut package)) = doc.remove("package") else {
            return Err(fail(
                "package",
                "no `[package]` table: a component is one crate with its own `[package]`".into(),
            ));
        };
        let package_name = package
            .get("name")
            .and_then(toml::Value::as_str)
            .unwrap_or_default()
            .to_string();
        let version = package
            .get("version")
            .and_then(toml::Value::as_str)
            .unwrap_or_default()
            .to_string();
        let perch = match package.remove("metadata") {
            Some(toml::Value::Table(mut metadata)) => metadata.remove("perch"),
            _ => None,
        };
        let perch = match perch {
            Some(toml::Value::Table(t)) => t,
            Some(other) => {
                return Err(fail(
                    MANIFEST_TABLE,
                    format!(
                        "expected a table `[{MANIFEST_TABLE}]`, found {}",
                        other.type_str()
                    ),
                ));
            }
            None => {
                return Err(fail(
                    MANIFEST_TABLE,
                    format!(
                        "missing: add `[{MANIFEST_TABLE}]` with at least one trigger, e.g. `triggers = [{{ every = \"5s\" }}]`"
                    ),
                ));
            }
        };
        Self::from_table(perch, &package_name, &version, MANIFEST_TABLE).map_err(|problems| {
            ManifestError {
                source_name: source_name.to_string(),
                problems,
            }
        })
    }

    /// Parses the manifest table itself; `prefix` is prepended to every key path in errors.
    fn from_table(
        table: toml::Table,
        package_name: &str,
        version: &str,
        prefix: &str,
    ) -> Result<Self, Vec<ConfigProblem>> {
        let mut problems = Vec::new();
        let mut manifest = Manifest {
            name: package_name.replace('_', "-"),
            version: version.to_string(),
            triggers: Vec::new(),
            grants: Grants::default(),
            config: BTreeMap::new(),
            limits: Limits::default(),
            compose: BTreeMap::new(),
            stack: None,
        };
        let mut root = Walker::new(prefix, table, &mut problems);
        if let Some(name) = root.take::<String>("name") {
            manifest.name = name;
        }
        if let Err(e) = check_name(&manifest.name) {
            root.problem("name", format!("{e}; set `name = \"...\"` here"));
        }
        match root.table.remove("triggers") {
            None => root.problem(
                "triggers",
                "missing: list at least one trigger, e.g. `triggers = [{ every = \"5s\" }]`",
            ),
            Some(toml::Value::Array(items)) => {
                for (i, item) in items.into_iter().enumerate() {
                    let key = format!("triggers[{i}]");
                    if let Some(t) = parse_trigger(&mut root, &key, item)
                        && !manifest.triggers.contains(&t)
                    {
                        manifest.triggers.push(t);
                    }
                }
                if manifest.triggers.is_empty()
                    && !root.problems.iter().any(|p| p.key.contains("triggers"))
                {
                    root.problem(
                        "triggers",
                        "is empty: list at least one trigger, e.g. `triggers = [{ every = \"5s\" }]`",
                    );
                }
            }
            Some(other) => root.problem(
                "triggers",
                format!(
                    "expected a list of triggers like `[{{ every = \"5s\" }}]`, found {}",
                    other.type_str()
                ),
            ),
        }
        if let Some(grants) = root.section("grants") {
            manifest.grants = parse_grants(grants);
        }
        if let Some(config) = root.section("config") {
            manifest.config = parse_config(config);
        }
        if let Some(limits) = root.section("limits") {
            manifest.limits = parse_limits(limits);
        }
        if let Some(compose) = root.section("compose") {
            manifest.compose = parse_compose(compose);
        }
        match root.table.remove("stack") {
            None => {}
            Some(toml::Value::String(s)) => match s.parse::<ByteSize>() {
                Ok(b) if (MIN_STACK.bytes()..=MAX_STACK.bytes()).contains(&b.bytes()) && b.bytes() % 16 == 0 => {
                    manifest.stack = Some(b);
                }
                Ok(_) => root.problem(
                    "stack",
                    format!("`{s}` is out of range: use {MIN_STACK} to {MAX_STACK}, a multiple of 16 bytes"),
                ),
                Err(e) => root.problem("stack", e.to_string()),
            },
            Some(other) => root.problem(
                "stack",
                format!("`{other}` has no unit: write a size such as `\"256KiB\"`"),
            ),
        }
        root.finish(MANIFEST_KEYS);
        if problems.is_empty() {
            Ok(manifest)
        } else {
            Err(problems)
        }
    }

    /// The manifest as embedded in a component (compact JSON).
    pub fn to_section(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_else(|_| unreachable!("a manifest always serializes"))
    }

    /// Reads an embedded manifest back.
    pub fn from_section(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("the embedded manifest is invalid: {e}"))
    }
}

fn parse_trigger(root: &mut Walker<'_>, key: &str, item: toml::Value) -> Option<Trigger> {
    let toml::Value::Table(t) = item else {
        root.problem(
            key,
            format!(
                "expected a table with one key, like `{{ every = \"5s\" }}`, found {}",
                item.type_str()
            ),
        );
        return None;
    };
    if t.contains_key("gpio") {
        return parse_gpio_trigger(root, key, t);
    }
    if t.len() != 1 {
        let found: Vec<&str> = t.keys().map(String::as_str).collect();
        root.problem(
            key,
            format!(
                "a trigger has exactly one of `every`, `http`, `message` or `startup`, found {}; write one trigger per entry",
                if found.is_empty() { "none".to_string() } else { found.join(", ") }
            ),
        );
        return None;
    }
    let (kind, value) = t.into_iter().next()?;
    let here = format!("{key}.{kind}");
    let text = |v: &toml::Value| v.as_str().map(str::to_string);
    let trigger = match kind.as_str() {
        "every" => match text(&value) {
            Some(s) => match s.parse::<HumanDuration>() {
                Ok(d) => Trigger::Every(d),
                Err(e) => {
                    root.problem(&here, e.to_string());
                    return None;
                }
            },
            None => {
                root.problem(
                    &here,
                    format!(
                        "`{value}` has no unit: write a duration string such as `\"5s\"` or `\"200ms\"`"
                    ),
                );
                return None;
            }
        },
        "http" | "message" => match text(&value) {
            Some(s) if kind == "http" => Trigger::Http(s),
            Some(s) => Trigger::Message(s),
            None => {
                root.problem(
                    &here,
                    format!("expected a string, found {}", value.type_str()),
                );
                return None;
            }
        },
        "startup" => match value.as_bool() {
            Some(true) => Trigger::Startup,
            _ => {
                root.problem(
                    &here,
                    "write `{ startup = true }`, or leave the trigger out".to_string(),
                );
                return None;
            }
        },
        other => {
            let hint = closest(other, TRIGGER_KINDS)
                .map(|k| format!("did you mean `{k}`?"))
                .unwrap_or_else(|| format!("use one of {}", TRIGGER_KINDS.join(", ")));
            root.problem(key, format!("unknown trigger kind `{other}`; {hint}"));
            return None;
        }
    };
    if let Err(problem) = trigger.check() {
        root.problem(&here, problem);
        return None;
    }
    Some(trigger)
}

/// `{ gpio = "button", edge = "falling", debounce = "20ms" }`.
fn parse_gpio_trigger(root: &mut Walker<'_>, key: &str, t: toml::Table) -> Option<Trigger> {
    let mut ok = true;
    let mut line = String::new();
    let mut edge = crate::spec::Edge::Both;
    let mut debounce = None;
    for (k, v) in t {
        let here = format!("{key}.{k}");
        match (k.as_str(), v.as_str()) {
            ("gpio", Some(l)) => line = l.to_string(),
            ("edge", Some(e)) => match e.parse() {
                Ok(e) => edge = e,
                Err(problem) => {
                    root.problem(&here, problem);
                    ok = false;
                }
            },
            ("debounce", Some(d)) => match d.parse::<HumanDuration>() {
                Ok(d) => debounce = Some(d),
                Err(e) => {
                    root.problem(&here, e.to_string());
                    ok = false;
                }
            },
            ("gpio" | "edge" | "debounce", None) => {
                root.problem(&here, format!("expected a string, found {}", v.type_str()));
                ok = false;
            }
            (other, _) => {
                root.problem(
                    &here,
                    format!("a gpio trigger has `gpio`, `edge` and `debounce`, not `{other}`"),
                );
                ok = false;
            }
        }
    }
    let trigger = Trigger::Gpio {
        line,
        edge,
        debounce,
    };
    if let Err(problem) = trigger.check() {
        root.problem(&format!("{key}.gpio"), problem);
        return None;
    }
    ok.then_some(trigger)
}

/// A list of resource names, each checked.
fn take_names(w: &mut Walker<'_>, key: &str, example: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    match w.table.remove(key) {
        None => {}
        Some(toml::Value::Array(items)) => {
            for (i, item) in items.into_iter().enumerate() {
                match item.as_str() {
                    Some(n) if valid_name(n) => {
                        names.insert(n.to_string());
                    }
                    Some(n) => w.problem(
                        &format!("{key}[{i}]"),
                        format!(
                            "`{n}` is not a valid name: use letters, digits, `-`, `_`, `.` and `:` (at most {MAX_NAME})"
                        ),
                    ),
                    None => w.problem(
                        &format!("{key}[{i}]"),
                        format!("expected a name in quotes, found {}", item.type_str()),
                    ),
                }
            }
        }
        Some(other) => w.problem(
            key,
            format!(
                "expected a list of names like `{example}`, found {}",
                other.type_str()
            ),
        ),
    }
    names
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= MAX_NAME
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
}

fn parse_grants(mut w: Walker<'_>) -> Grants {
    let mut grants = Grants::default();
    match w.table.remove("gpio") {
        None => {}
        Some(toml::Value::Table(t)) => {
            let path = w.path("gpio");
            let mut gpio = Walker::new(path, t, &mut *w.problems);
            grants.gpio.read = take_names(&mut gpio, "read", "[\"button\"]");
            grants.gpio.write = take_names(&mut gpio, "write", "[\"fan\"]");
            gpio.finish(GPIO_MODES);
        }
        Some(other) => w.problem(
            "gpio",
            format!(
                "expected a table like `{{ read = [\"button\"], write = [\"fan\"] }}`, found {}",
                other.type_str()
            ),
        ),
    }
    grants.sensors = take_names(&mut w, "sensors", "[\"room-temp\"]");
    grants.telemetry = take_names(&mut w, "telemetry", "[\"climate\"]");
    grants.http = take_names(&mut w, "http", "[\"api.example.com\"]");
    let unknown: Vec<String> = w.table.keys().cloned().collect();
    for key in unknown {
        w.table.remove(&key);
        let hint = closest(&key, GRANT_KINDS)
            .map(|k| format!("did you mean `{k}`?"))
            .unwrap_or_else(|| format!("the grants are {}", GRANT_KINDS.join(", ")));
        w.problem(&key, format!("unknown grant `{key}`; {hint}"));
    }
    grants
}

fn parse_config(mut w: Walker<'_>) -> BTreeMap<String, String> {
    let mut config = BTreeMap::new();
    let keys: Vec<String> = w.table.keys().cloned().collect();
    for key in keys {
        let Some(value) = w.table.remove(&key) else {
            continue;
        };
        if !valid_name(&key) {
            w.problem(
                &key,
                "is not a valid config key: use letters, digits, `-`, `_`, `.` and `:`",
            );
            continue;
        }
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => {
                w.problem(
                    &key,
                    format!(
                        "config values are strings, numbers or booleans, found {}",
                        other.type_str()
                    ),
                );
                continue;
            }
        };
        config.insert(key, text);
    }
    config
}

/// Whether `name` is `namespace:package/interface`, optionally with `@version`.
fn is_interface_name(name: &str) -> bool {
    let base = name.split('@').next().unwrap_or_default();
    let Some((package, interface)) = base.split_once('/') else {
        return false;
    };
    let Some((namespace, pkg)) = package.split_once(':') else {
        return false;
    };
    let word = |w: &str| {
        !w.is_empty()
            && w.starts_with(|c: char| c.is_ascii_lowercase())
            && w.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    word(namespace) && word(pkg) && word(interface)
}

fn parse_compose(mut w: Walker<'_>) -> BTreeMap<String, String> {
    let mut compose = BTreeMap::new();
    let keys: Vec<String> = w.table.keys().cloned().collect();
    for key in keys {
        let Some(value) = w.table.remove(&key) else {
            continue;
        };
        if !is_interface_name(&key) {
            w.problem(
                &key,
                "is not an interface name: write `namespace:package/interface`, e.g. `\"perch:fixture/smooth\" = \"../smoother\"`",
            );
            continue;
        }
        match value.as_str() {
            Some(path) if !path.trim().is_empty() => {
                compose.insert(key, path.to_string());
            }
            _ => w.problem(
                &key,
                "expected the path of a component crate or `.wasm` file, relative to this Cargo.toml",
            ),
        }
    }
    compose
}

fn parse_limits(mut w: Walker<'_>) -> Limits {
    let mut limits = Limits::default();
    match w.table.remove("memory") {
        None => {}
        Some(toml::Value::String(s)) => match s.parse::<ByteSize>() {
            Ok(m) if m.bytes() < 64 << 10 => w.problem(
                "memory",
                format!("`{m}` is below one WebAssembly page (64KiB)"),
            ),
            Ok(m) => limits.memory = Some(m),
            Err(e) => w.problem("memory", e.to_string()),
        },
        Some(other) => w.problem(
            "memory",
            format!("`{other}` has no unit: write a size such as `\"16MiB\"`"),
        ),
    }
    match w.table.remove("timeout") {
        None => {}
        Some(toml::Value::String(s)) => match s.parse::<HumanDuration>() {
            Ok(t) => limits.timeout = Some(t),
            Err(e) => w.problem("timeout", e.to_string()),
        },
        Some(other) => w.problem(
            "timeout",
            format!("`{other}` has no unit: write a duration such as `\"200ms\"`"),
        ),
    }
    if let Some(n) = w.take::<i64>("instances") {
        match u32::try_from(n) {
            Ok(n) if (1..=MAX_INSTANCES_PER_COMPONENT).contains(&n) => limits.instances = Some(n),
            _ => w.problem(
                "instances",
                format!("`{n}` is out of range: use 1 to {MAX_INSTANCES_PER_COMPONENT}"),
            ),
        }
    }
    if let Some(n) = w.take::<i64>("calls-per-instance") {
        match u32::try_from(n) {
            Ok(n) if (1..=MAX_CALLS_PER_INSTANCE).contains(&n) => {
                limits.calls_per_instance = Some(n);
            }
            _ => w.problem(
                "calls-per-instance",
                format!("`{n}` is out of range: use 1 to {MAX_CALLS_PER_INSTANCE}"),
            ),
        }
    }
    w.finish(LIMIT_KEYS);
    limits
}

/// What the agent must hold for a component to use an imported interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportNeed {
    /// Always provided (wasi:logging, wasi:keyvalue, wasi:config, messaging, WASI 0.2
    /// basics).
    Free,
    /// Provided only with a grant of this kind (`gpio`, `sensors`, `telemetry`, `http`).
    Grant(&'static str),
    /// The agent does not provide this interface at all.
    Unknown,
}

/// Classifies a component import by its interface name (`perch:device/gpio@0.1.0`).
pub fn import_need(import: &str) -> ImportNeed {
    let name = import.split('@').next().unwrap_or(import);
    match name {
        "perch:device/gpio" => ImportNeed::Grant("gpio"),
        "perch:device/sensors" => ImportNeed::Grant("sensors"),
        "perch:device/telemetry" => ImportNeed::Grant("telemetry"),
        "wasi:http/outgoing-handler" => ImportNeed::Grant("http"),
        "perch:device/types"
        | "perch:device/messaging"
        | "wasi:logging/logging"
        | "wasi:keyvalue/store"
        | "wasi:keyvalue/atomics"
        | "wasi:config/store" => ImportNeed::Free,
        _ => {
            let package = name.split('/').next().unwrap_or_default();
            let wasi = [
                "wasi:io",
                "wasi:clocks",
                "wasi:random",
                "wasi:cli",
                "wasi:filesystem",
                "wasi:sockets",
                "wasi:http",
            ];
            if wasi.contains(&package) {
                ImportNeed::Free
            } else {
                ImportNeed::Unknown
            }
        }
    }
}

impl Grants {
    /// Whether any grant of `kind` (as named by [`ImportNeed::Grant`]) is present.
    pub fn has_kind(&self, kind: &str) -> bool {
        match kind {
            "gpio" => !self.gpio.is_empty(),
            "sensors" => !self.sensors.is_empty(),
            "telemetry" => !self.telemetry.is_empty(),
            "http" => !self.http.is_empty(),
            _ => false,
        }
    }
}

/// One import of a component that its grants do not cover.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportProblem {
    /// The component imports a gated interface with no grant of that kind.
    #[error(
        "the component imports `{import}` but its manifest grants no {kind}: add `grants.{kind} = {example}` to [package.metadata.perch]"
    )]
    NotGranted {
        import: String,
        kind: &'static str,
        example: &'static str,
    },
    /// The component imports an interface no Perch agent provides.
    #[error(
        "the component imports `{0}`, which Perch agents do not provide (they provide perch:device, WASI 0.2, wasi:logging, wasi:keyvalue and wasi:config)"
    )]
    Unknown(String),
}

/// Checks a component's imports against its grants, returning every problem.
pub fn check_imports<'a>(
    imports: impl IntoIterator<Item = &'a str>,
    grants: &Grants,
) -> Vec<ImportProblem> {
    let mut problems = Vec::new();
    for import in imports {
        match import_need(import) {
            ImportNeed::Free => {}
            ImportNeed::Grant(kind) if grants.has_kind(kind) => {}
            ImportNeed::Grant(kind) => problems.push(ImportProblem::NotGranted {
                import: import.to_string(),
                kind,
                example: match kind {
                    "gpio" => "{ read = [\"button\"], write = [\"fan\"] }",
                    "sensors" => "[\"room-temp\"]",
                    "telemetry" => "[\"climate\"]",
                    _ => "[\"api.example.com\"]",
                },
            }),
            ImportNeed::Unknown => problems.push(ImportProblem::Unknown(import.to_string())),
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cargo(perch: &str) -> String {
        format!(
            "[package]\nname = \"thermo_stat\"\nversion = \"0.3.0\"\nedition = \"2024\"\n\n[package.metadata.perch]\n{perch}\n"
        )
    }

    fn problems(perch: &str) -> Vec<String> {
        Manifest::from_cargo_toml(&cargo(perch), "Cargo.toml")
            .expect_err("invalid manifest")
            .problems
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn the_design_example_parses() {
        let m = Manifest::from_cargo_toml(
            &cargo(
                r#"
triggers = [{ every = "5s" }, { message = "cmd.thermostat" }, { http = "/thermostat" }]
grants   = { gpio = { write = ["fan"] }, sensors = ["room-temp"], telemetry = ["climate"] }
config   = { threshold-c = "28.5", hysteresis = 1 }
limits   = { memory = "16MiB", timeout = "200ms" }
"#,
            ),
            "Cargo.toml",
        )
        .expect("valid");
        assert_eq!(m.name, "thermo-stat");
        assert_eq!(m.version, "0.3.0");
        assert_eq!(
            m.triggers,
            [
                Trigger::Every(HumanDuration(Duration::from_secs(5))),
                Trigger::Message("cmd.thermostat".into()),
                Trigger::Http("/thermostat".into()),
            ]
        );
        assert!(m.grants.gpio_write("fan"));
        assert!(m.grants.sensors.contains("room-temp"));
        assert_eq!(m.config["threshold-c"], "28.5");
        assert_eq!(m.config["hysteresis"], "1");
        assert_eq!(m.limits.memory, Some(ByteSize::mib(16)));
        let back = Manifest::from_section(&m.to_section()).expect("round trip");
        assert_eq!(back, m);
    }

    #[test]
    fn a_misspelled_trigger_kind_names_the_key_and_the_fix() {
        assert_eq!(
            problems(r#"triggers = [{ every = "5s" }, { evry = "5s" }]"#),
            [
                "package.metadata.perch.triggers[1]: unknown trigger kind `evry`; did you mean `every`?"
            ]
        );
    }

    #[test]
    fn an_unknown_grant_names_the_key_and_the_fix() {
        assert_eq!(
            problems(
                r#"triggers = [{ startup = true }]
grants = { sensor = ["room-temp"], camera = ["front"] }"#
            ),
            [
                "package.metadata.perch.grants.camera: unknown grant `camera`; the grants are gpio, sensors, telemetry, http",
                "package.metadata.perch.grants.sensor: unknown grant `sensor`; did you mean `sensors`?",
            ]
        );
    }

    #[test]
    fn gpio_triggers_take_an_edge_and_a_debounce() {
        let m = Manifest::from_cargo_toml(
            &cargo(
                r#"triggers = [{ gpio = "button", edge = "falling", debounce = "20ms" }]
grants = { gpio = { read = ["button"] } }"#,
            ),
            "Cargo.toml",
        )
        .expect("valid");
        assert_eq!(
            m.triggers,
            [Trigger::Gpio {
                line: "button".into(),
                edge: crate::spec::Edge::Falling,
                debounce: Some(HumanDuration(Duration::from_millis(20)))
            }]
        );
        assert_eq!(
            problems(r#"triggers = [{ gpio = "button", edge = "down", bounce = "2ms" }]"#),
            [
                "package.metadata.perch.triggers[0].bounce: a gpio trigger has `gpio`, `edge` and `debounce`, not `bounce`",
                "package.metadata.perch.triggers[0].edge: `down` is not an edge: use `rising`, `falling` or `both`",
            ]
        );
    }

    #[test]
    fn a_bad_duration_names_the_key_and_the_fix() {
        assert_eq!(
            problems(r#"triggers = [{ every = "5 sec" }]"#),
            [
                "package.metadata.perch.triggers[0].every: `5 sec` is not a duration: write a number and a unit (ms, s, m, h, d), e.g. `200ms` or `5s`"
            ]
        );
        assert_eq!(
            problems(r#"triggers = [{ every = 5 }]"#),
            [
                "package.metadata.perch.triggers[0].every: `5` has no unit: write a duration string such as `\"5s\"` or `\"200ms\"`"
            ]
        );
    }

    #[test]
    fn a_limit_without_unit_names_the_key_and_the_fix() {
        assert_eq!(
            problems(
                r#"triggers = [{ startup = true }]
limits = { memory = 16, timeout = "200" }"#
            ),
            [
                "package.metadata.perch.limits.memory: `16` has no unit: write a size such as `\"16MiB\"`",
                "package.metadata.perch.limits.timeout: `200` is not a duration: write a number and a unit (ms, s, m, h, d), e.g. `200ms` or `5s`",
            ]
        );
    }

    #[test]
    fn the_guest_stack_is_read_and_bounded() -> Result<(), ManifestError> {
        let m = Manifest::from_cargo_toml(&cargo("triggers = [{ startup = true }]"), "Cargo.toml")?;
        assert_eq!(m.stack_bytes(), DEFAULT_STACK.bytes());
        let m = Manifest::from_cargo_toml(
            &cargo("triggers = [{ startup = true }]\nstack = \"1MiB\""),
            "Cargo.toml",
        )?;
        assert_eq!(m.stack_bytes(), 1 << 20);
        // Build time only: not in the embedded manifest.
        assert!(!String::from_utf8_lossy(&m.to_section()).contains("stack"));
        assert_eq!(
            problems("triggers = [{ startup = true }]\nstack = \"1KiB\""),
            [
                "package.metadata.perch.stack: `1KiB` is out of range: use 16KiB to 8MiB, a multiple of 16 bytes"
            ]
        );
        Ok(())
    }

    #[test]
    fn calls_per_instance_is_read_and_bounded() -> Result<(), ManifestError> {
        let m = Manifest::from_cargo_toml(
            &cargo("triggers = [{ message = \"work.>\" }]\nlimits = { calls-per-instance = 1000 }"),
            "Cargo.toml",
        )?;
        assert_eq!(m.limits.calls_per_instance, Some(1000));
        assert_eq!(
            problems("triggers = [{ startup = true }]\nlimits = { calls-per-instance = 0 }"),
            [
                "package.metadata.perch.limits.calls-per-instance: `0` is out of range: use 1 to 1000000"
            ]
        );
        Ok(())
    }

    #[test]
    fn every_problem_is_listed_at_once() {
        let all = problems(
            r#"trigers = [{ every = "5s" }]
grants = { gpio = ["fan"] }
limits = { memroy = "1MiB", instances = 0 }"#,
        );
        assert_eq!(
            all,
            [
                "package.metadata.perch.triggers: missing: list at least one trigger, e.g. `triggers = [{ every = \"5s\" }]`",
                "package.metadata.perch.grants.gpio: expected a table like `{ read = [\"button\"], write = [\"fan\"] }`, found array",
                "package.metadata.perch.limits.instances: `0` is out of range: use 1 to 1000",
                "package.metadata.perch.limits.memroy: unknown key; did you mean `memory`?",
                "package.metadata.perch.trigers: unknown key; did you mean `triggers`?",
            ]
        );
    }

    #[test]
    fn a_missing_table_says_what_to_add() {
        let e = Manifest::from_cargo_toml("[package]\nname = \"x\"\n", "demo/Cargo.toml")
            .expect_err("no table");
        assert_eq!(
            e.to_string(),
            "demo/Cargo.toml: 1 problem in the component manifest\n  - package.metadata.perch: missing: add `[package.metadata.perch]` with at least one trigger, e.g. `triggers = [{ every = \"5s\" }]`"
        );
    }

    #[test]
    fn bad_trigger_values_and_names() {
        let all = problems(
            r#"name = "Thermo"
triggers = [{ http = "hello" }, { startup = false }, { every = "5s", http = "/x" }, "5s"]"#,
        );
        assert_eq!(
            all,
            [
                "package.metadata.perch.name: component name `Thermo` is invalid: use 1-63 lowercase letters, digits and `-`, starting with a letter; set `name = \"...\"` here",
                "package.metadata.perch.triggers[0].http: HTTP route `hello` must start with `/`",
                "package.metadata.perch.triggers[1].startup: write `{ startup = true }`, or leave the trigger out",
                "package.metadata.perch.triggers[2]: a trigger has exactly one of `every`, `http`, `message` or `startup`, found every, http; write one trigger per entry",
                "package.metadata.perch.triggers[3]: expected a table with one key, like `{ every = \"5s\" }`, found string",
            ]
        );
    }

    #[test]
    fn compose_entries_name_an_interface_and_a_path() {
        let text = cargo(
            r#"triggers = [{ startup = true }]
[package.metadata.perch.compose]
"perch:fixture/smooth" = "../smoother"
"smooth" = "../x"
"acme:lib/filter@1.0.0" = 3"#,
        );
        let e = Manifest::from_cargo_toml(&text, "Cargo.toml").expect_err("invalid");
        let text: Vec<String> = e.problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "package.metadata.perch.compose.acme:lib/filter@1.0.0: expected the path of a component crate or `.wasm` file, relative to this Cargo.toml",
                "package.metadata.perch.compose.smooth: is not an interface name: write `namespace:package/interface`, e.g. `\"perch:fixture/smooth\" = \"../smoother\"`",
            ]
        );
        let ok = cargo(
            "triggers = [{ startup = true }]\n[package.metadata.perch.compose]\n\"perch:fixture/smooth\" = \"../smoother\"",
        );
        let m = Manifest::from_cargo_toml(&ok, "Cargo.toml").expect("valid");
        assert_eq!(m.compose["perch:fixture/smooth"], "../smoother");
    }

    #[test]
    fn imports_are_checked_against_grants() {
        let grants: Grants = toml::from_str(r#"sensors = ["room-temp"]"#).expect("grants");
        let problems = check_imports(
            [
                "wasi:cli/environment@0.2.6",
                "wasi:logging/logging@0.1.0-draft",
                "wasi:keyvalue/store@0.2.0-draft",
                "perch:device/sensors@0.1.0",
                "perch:device/gpio@0.1.0",
                "perch:fixture/teleport",
            ],
            &grants,
        );
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "the component imports `perch:device/gpio@0.1.0` but its manifest grants no gpio: add `grants.gpio = { read = [\"button\"], write = [\"fan\"] }` to [package.metadata.perch]",
                "the component imports `perch:fixture/teleport`, which Perch agents do not provide (they provide perch:device, WASI 0.2, wasi:logging, wasi:keyvalue and wasi:config)",
            ]
        );
    }
}
