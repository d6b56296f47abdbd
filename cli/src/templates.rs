//! `perch new`: a component crate of two files, `Cargo.toml` and `src/lib.rs`, that builds
//! and has a test.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

/// The starting points `perch new` offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Template {
    /// Runs every few seconds and keeps a counter in its key-value store.
    Timer,
    /// Answers HTTP requests under a route of the agent.
    Http,
    /// Reads a sensor on a timer and publishes the readings as telemetry.
    Sensor,
}

/// Where the SDK comes from: `$PERCH_SDK_PATH`, else the SDK next to this CLI's sources
/// (a checkout of the Perch repository), else the published crate.
fn sdk_dependency() -> String {
    let local = std::env::var_os("PERCH_SDK_PATH")
        .map(PathBuf::from)
        .or_else(|| {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk");
            p.join("Cargo.toml").is_file().then_some(p)
        })
        .and_then(|p| p.canonicalize().ok());
    match local {
        Some(p) => format!("perch-sdk = {{ path = {:?} }}", p.display().to_string()),
        None => format!("perch-sdk = \"{}\"", env!("CARGO_PKG_VERSION")),
    }
}

fn cargo_toml(crate_name: &str, metadata: &str) -> String {
    format!(
        r#"[package]
name = "{crate_name}"
version = "0.1.0"
edition = "2024"

[lib]
crate-type = ["cdylib"]

[dependencies]
{sdk}

# What the component needs from the device: `perch build` embeds this in the component.
# Format: https://github.com/perch-edge/perch/blob/main/docs/manifest.md
[package.metadata.perch]
{metadata}
# Components ship to small devices: small beats fast.
[profile.release]
opt-level = "s"
lto = true
strip = true

# A component is a crate of its own, even inside another workspace.
[workspace]
"#,
        sdk = sdk_dependency()
    )
}

fn timer() -> (&'static str, &'static str) {
    (
        r#"triggers = [{ every = "5s" }]
"#,
        r#"//! Counts ticks in the component's key-value store; the count survives restarts.

use perch_sdk::{App, Result, kv, log};

struct Component;

impl App for Component {
    fn on_tick() -> Result<()> {
        let count = next(kv::get_string("count")?.as_deref())?;
        kv::set("count", count.to_string())?;
        log::info(format!("tick {count}"));
        Ok(())
    }
}

/// The count after `stored` (absent means none yet).
fn next(stored: Option<&str>) -> Result<u64> {
    Ok(stored.map(str::parse::<u64>).transpose()?.unwrap_or(0) + 1)
}

perch_sdk::export!(Component);

#[cfg(test)]
mod tests {
    #[test]
    fn counts_from_one() {
        assert_eq!(super::next(None).ok(), Some(1));
        assert_eq!(super::next(Some("41")).ok(), Some(42));
        assert!(super::next(Some("x")).is_err());
    }
}
"#,
    )
}

fn http() -> (&'static str, &'static str) {
    (
        r#"triggers = [{ http = "/NAME" }]
"#,
        r#"//! Answers requests under its route with a greeting.

use perch_sdk::{App, Request, Response};

struct Component;

impl App for Component {
    fn on_http(request: Request) -> Response {
        Response::text(200, greeting(&request.path))
    }
}

fn greeting(path: &str) -> String {
    format!("hello from perch, you asked for {path}\n")
}

perch_sdk::export!(Component);

#[cfg(test)]
mod tests {
    #[test]
    fn greets_with_the_path() {
        assert_eq!(
            super::greeting("/NAME"),
            "hello from perch, you asked for /NAME\n"
        );
    }
}
"#,
    )
}

fn sensor() -> (&'static str, &'static str) {
    (
        r#"triggers = [{ every = "1s" }]
grants = { sensors = ["room-temp"], telemetry = ["climate"] }
config = { sensor = "room-temp" }
limits = { memory = "4MiB", timeout = "500ms" }
"#,
        r##"//! Reads a sensor every second and publishes each reading as telemetry.

use perch_sdk::{App, Result, config, log, sensors, telemetry};

struct Component;

impl App for Component {
    fn on_tick() -> Result<()> {
        let name = config::get("sensor").unwrap_or_else(|| "room-temp".into());
        let reading = sensors::read(&name)?;
        let record = to_json(&name, reading.value, &reading.unit, reading.timestamp_ms);
        let seq = telemetry::publish("climate", &record)?;
        log::info(format!("#{seq} {record}"));
        Ok(())
    }
}

/// One reading as a JSON object.
fn to_json(sensor: &str, value: f64, unit: &str, at_ms: u64) -> String {
    format!(r#"{{"sensor":"{sensor}","value":{value:.2},"unit":"{unit}","at":{at_ms}}}"#)
}

perch_sdk::export!(Component);

#[cfg(test)]
mod tests {
    #[test]
    fn readings_become_json() {
        assert_eq!(
            super::to_json("room-temp", 21.456, "°C", 7),
            r#"{"sensor":"room-temp","value":21.46,"unit":"°C","at":7}"#
        );
    }
}
"##,
    )
}

/// Creates the crate `name` in `dir/name` (which must not exist) and returns its path.
pub fn create(dir: &Path, name: &str, template: Template) -> Result<PathBuf> {
    if perch_core::spec::check_name(name).is_err() {
        bail!(
            "`{name}` cannot be a component name: use 1-63 lowercase letters, digits and `-`, starting with a letter"
        );
    }
    let root = dir.join(name);
    if root.exists() {
        bail!(
            "{} already exists; pick another name or directory",
            root.display()
        );
    }
    let (metadata, lib) = match template {
        Template::Timer => timer(),
        Template::Http => http(),
        Template::Sensor => sensor(),
    };
    let metadata = metadata.replace("NAME", name);
    let lib = lib.replace("NAME", name);
    std::fs::create_dir_all(root.join("src"))
        .with_context(|| format!("creating {}", root.display()))?;
    std::fs::write(root.join("Cargo.toml"), cargo_toml(name, &metadata))
        .with_context(|| format!("writing {}/Cargo.toml", root.display()))?;
    std::fs::write(root.join("src/lib.rs"), lib)
        .with_context(|| format!("writing {}/src/lib.rs", root.display()))?;
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_has_a_valid_manifest() {
        for t in [Template::Timer, Template::Http, Template::Sensor] {
            let dir = tempfile::tempdir().expect("tempdir");
            let root = create(dir.path(), "demo", t).expect("create");
            let text = std::fs::read_to_string(root.join("Cargo.toml")).expect("read");
            let m = perch_core::Manifest::from_cargo_toml(&text, "Cargo.toml")
                .unwrap_or_else(|e| panic!("{t:?}: {e}"));
            assert_eq!(m.name, "demo");
            let mut files: Vec<String> = walk(&root);
            files.sort();
            assert_eq!(files, ["Cargo.toml", "src/lib.rs"], "{t:?}");
        }
    }

    #[test]
    fn names_and_existing_dirs_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = create(dir.path(), "Demo", Template::Timer).expect_err("bad name");
        assert!(e.to_string().contains("cannot be a component name"), "{e}");
        create(dir.path(), "demo", Template::Timer).expect("first");
        let e = create(dir.path(), "demo", Template::Timer).expect_err("exists");
        assert!(e.to_string().contains("already exists"), "{e}");
    }

    fn walk(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).expect("read_dir") {
                let p = e.expect("entry").path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let rel = p.strip_prefix(root).expect("prefix");
                    out.push(rel.display().to_string());
                }
            }
        }
        out
    }
}
