//! Providers: the host capabilities a component is linked with, one value per capability.
//!
//! Shaped like Spin's factors: a provider links its WIT interfaces into the runtime's one
//! linker, validates a component's grants against the board **at deploy time** (so a
//! grant of hardware the board lacks, or a write grant on an input line, is refused before
//! anything runs), and owns the host implementation behind its interfaces (in
//! [`crate::host`], where the per-invocation store data lives). Hardware providers reach
//! the board through [`Board`](crate::board::Board), which composes the per-board backends:
//! the simulated board, Linux GPIO character devices (`perch-provider-gpio`) and sysfs / I2C
//! sensors (`perch-provider-sensors`).
//!
//! [`Providers::standard`] is the set every agent runs with; the order is the order of
//! problems reported for a deploy.

use std::fmt::Debug;

use perch_core::{ComponentSpec, Grants, Trigger};
use wasmtime::component::{HasSelf, Linker};

use crate::board::Board;
use crate::host::{self, Host};

/// One host capability.
pub trait Provider: Send + Sync + Debug {
    /// Short name used in problems and logs (`gpio`, `sensors`, ...).
    fn name(&self) -> &'static str;

    /// The WIT interfaces it implements, unversioned (`perch:device/gpio`).
    fn interfaces(&self) -> &'static [&'static str];

    /// Adds its host functions to `linker`.
    fn add_to_linker(&self, linker: &mut Linker<Host>) -> wasmtime::Result<()>;

    /// What is wrong with `spec`'s grants on `board`, one sentence each naming the
    /// component, the resource and the fix. Empty when the deploy may go ahead.
    fn validate(&self, spec: &ComponentSpec, grants: &Grants, board: &dyn Board) -> Vec<String> {
        let _ = (spec, grants, board);
        Vec::new()
    }
}

/// The providers an agent runs with.
#[derive(Debug)]
pub struct Providers {
    list: Vec<Box<dyn Provider>>,
}

impl Providers {
    /// Every capability Perch offers: WASI 0.2, outgoing HTTP, logging, key-value, config,
    /// messaging, GPIO, sensors and telemetry.
    pub fn standard() -> Self {
        Self {
            list: vec![
                Box::new(Wasi),
                Box::new(OutgoingHttp),
                Box::new(Logging),
                Box::new(KeyValue),
                Box::new(Config),
                Box::new(Messaging),
                Box::new(Gpio),
                Box::new(Sensors),
                Box::new(Telemetry),
            ],
        }
    }

    /// The providers, in order.
    pub fn iter(&self) -> impl Iterator<Item = &dyn Provider> {
        self.list.iter().map(|p| p.as_ref())
    }

    /// Links every provider into `linker`.
    pub fn add_to_linker(&self, linker: &mut Linker<Host>) -> wasmtime::Result<()> {
        for p in &self.list {
            p.add_to_linker(linker)?;
        }
        Ok(())
    }

    /// Every provider's problems with `spec` on `board`. A spec without grants (nothing
    /// granted yet: the manifest fills them in at load) has none.
    pub fn validate(&self, spec: &ComponentSpec, board: &dyn Board) -> Result<(), Vec<String>> {
        let Some(grants) = &spec.grants else {
            return Ok(());
        };
        let problems: Vec<String> = self
            .list
            .iter()
            .flat_map(|p| p.validate(spec, grants, board))
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

/// WASI 0.2: clocks, random, stdio into the component's log; no environment, no files.
#[derive(Debug)]
struct Wasi;

impl Provider for Wasi {
    fn name(&self) -> &'static str {
        "wasi"
    }
    fn interfaces(&self) -> &'static [&'static str] {
        &[
            "wasi:io",
            "wasi:clocks",
            "wasi:random",
            "wasi:cli",
            "wasi:filesystem",
            "wasi:sockets",
        ]
    }
    fn add_to_linker(&self, linker: &mut Linker<Host>) -> wasmtime::Result<()> {
        wasmtime_wasi::p2::add_to_linker_async(linker)
    }
}

/// `wasi:http` types and the outgoing handler, gated per request by `grants.http`.
#[derive(Debug)]
struct OutgoingHttp;

impl Provider for OutgoingHttp {
    fn name(&self) -> &'static str {
        "http"
    }
    fn interfaces(&self) -> &'static [&'static str] {
        &["wasi:http/types", "wasi:http/outgoing-handler"]
    }
    fn add_to_linker(&self, linker: &mut Linker<Host>) -> wasmtime::Result<()> {
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(linker)
    }
}

/// `wasi:logging` into the component's log ring.
#[derive(Debug)]
struct Logging;

impl Provider for Logging {
    fn name(&self) -> &'static str {
        "logging"
    }
    fn interfaces(&self) -> &'static [&'static str] {
        &["wasi:logging/logging"]
    }
    fn add_to_linker(&self, linker: &mut Linker<Host>) -> wasmtime::Result<()> {
        host::wasi::logging::logging::add_to_linker::<Host, HasSelf<Host>>(linker, |h| h)
    }
}

/// `wasi:keyvalue` on the agent's sled store, one namespace per component.
#[derive(Debug)]
struct KeyValue;

impl Provider for KeyValue {
    fn name(&self) -> &'static str {
        "keyvalue"
    }
    fn interfaces(&self) -> &'static [&'static str] {
        &["wasi:keyvalue/store", "wasi:keyvalue/atomics"]
    }
    fn add_to_linker(&self, linker: &mut Linker<Host>) -> wasmtime::Result<()> {
        host::wasi::keyvalue::store::add_to_linker::<Host, HasSelf<Host>>(linker, |h| h)?;
        host::wasi::keyvalue::atomics::add_to_linker::<Host, HasSelf<Host>>(linker, |h| h)
    }
}

/// `wasi:config` from the manifest's defaults and the deployment's values.
#[derive(Debug)]
struct Config;

impl Provider for Config {
    fn name(&self) -> &'static str {
        "config"
    }
    fn interfaces(&self) -> &'static [&'static str] {
        &["wasi:config/store"]
    }
    fn add_to_linker(&self, linker: &mut Linker<Host>) -> wasmtime::Result<()> {
        host::wasi::config::store::add_to_linker::<Host, HasSelf<Host>>(linker, |h| h)
    }
}

/// Publishing on the local message bus.
#[derive(Debug)]
struct Messaging;

impl Provider for Messaging {
    fn name(&self) -> &'static str {
        "messaging"
    }
    fn interfaces(&self) -> &'static [&'static str] {
        &["perch:device/types", "perch:device/messaging"]
    }
    fn add_to_linker(&self, linker: &mut Linker<Host>) -> wasmtime::Result<()> {
        host::perch::device::types::add_to_linker::<Host, HasSelf<Host>>(linker, |h| h)?;
        host::perch::device::messaging::add_to_linker::<Host, HasSelf<Host>>(linker, |h| h)
    }
}

/// Named GPIO lines: read grants, write grants (output lines only) and edge triggers.
#[derive(Debug)]
struct Gpio;

impl Provider for Gpio {
    fn name(&self) -> &'static str {
        "gpio"
    }
    fn interfaces(&self) -> &'static [&'static str] {
        &["perch:device/gpio"]
    }
    fn add_to_linker(&self, linker: &mut Linker<Host>) -> wasmtime::Result<()> {
        host::perch::device::gpio::add_to_linker::<Host, HasSelf<Host>>(linker, |h| h)
    }
    fn validate(&self, spec: &ComponentSpec, grants: &Grants, board: &dyn Board) -> Vec<String> {
        let mut problems = Vec::new();
        for t in &spec.triggers {
            if let Trigger::Gpio { line, .. } = t
                && !grants.gpio_read(line)
            {
                problems.push(format!(
                    "component `{}` has a gpio trigger on line `{line}` but no grant to read it: add it to `grants.gpio.read`",
                    spec.name
                ));
            }
        }
        let lines = board.gpio_lines();
        for line in grants.gpio.read.iter().chain(&grants.gpio.write) {
            if !lines.contains(line) {
                problems.push(format!(
                    "component `{}` is granted GPIO line `{line}`, which board `{}` does not have (its lines: {})",
                    spec.name,
                    board.name(),
                    list(&lines)
                ));
            }
        }
        for line in &grants.gpio.write {
            if board.gpio_is_output(line) == Some(false) {
                problems.push(format!(
                    "component `{}` is granted `write` on GPIO line `{line}`, which board `{}` configures as an input: grant it under `grants.gpio.read`",
                    spec.name,
                    board.name()
                ));
            }
        }
        problems
    }
}

/// Named sensors.
#[derive(Debug)]
struct Sensors;

impl Provider for Sensors {
    fn name(&self) -> &'static str {
        "sensors"
    }
    fn interfaces(&self) -> &'static [&'static str] {
        &["perch:device/sensors"]
    }
    fn add_to_linker(&self, linker: &mut Linker<Host>) -> wasmtime::Result<()> {
        host::perch::device::sensors::add_to_linker::<Host, HasSelf<Host>>(linker, |h| h)
    }
    fn validate(&self, spec: &ComponentSpec, grants: &Grants, board: &dyn Board) -> Vec<String> {
        let sensors = board.sensors();
        grants
            .sensors
            .iter()
            .filter(|s| !sensors.contains(s))
            .map(|sensor| {
                format!(
                    "component `{}` is granted sensor `{sensor}`, which board `{}` does not have (its sensors: {})",
                    spec.name,
                    board.name(),
                    list(&sensors)
                )
            })
            .collect()
    }
}

/// Durable telemetry into the outbox, by granted stream.
#[derive(Debug)]
struct Telemetry;

impl Provider for Telemetry {
    fn name(&self) -> &'static str {
        "telemetry"
    }
    fn interfaces(&self) -> &'static [&'static str] {
        &["perch:device/telemetry"]
    }
    fn add_to_linker(&self, linker: &mut Linker<Host>) -> wasmtime::Result<()> {
        host::perch::device::telemetry::add_to_linker::<Host, HasSelf<Host>>(linker, |h| h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_import_the_manifest_check_allows_has_a_provider() {
        let providers = Providers::standard();
        let provided: Vec<&str> = providers
            .iter()
            .flat_map(|p| p.interfaces())
            .copied()
            .collect();
        for interface in [
            "wasi:logging/logging",
            "wasi:keyvalue/store",
            "wasi:keyvalue/atomics",
            "wasi:config/store",
            "perch:device/messaging",
            "perch:device/gpio",
            "perch:device/sensors",
            "perch:device/telemetry",
            "wasi:http/outgoing-handler",
        ] {
            assert_ne!(
                perch_core::manifest::import_need(interface),
                perch_core::manifest::ImportNeed::Unknown,
                "{interface}"
            );
            assert!(provided.contains(&interface), "no provider for {interface}");
        }
    }
}
