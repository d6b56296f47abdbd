//! The hardware a component can be granted: named GPIO lines and sensors, behind the
//! [`Board`] trait.
//!
//! The `sim` board simulates a small climate gateway so that components run the same way
//! on a laptop as on a device: a `room-temp` sensor that follows a daily curve and cools
//! down while the `fan` line is driven high, `humidity`, an output `led` and an input
//! `button`. Real backends (Linux GPIO character devices, IIO, hwmon, 1-Wire, I2C) plug in
//! behind the same trait.

use std::collections::BTreeMap;
use std::sync::Mutex;

use perch_core::board::{BoardConfig, Direction, LineSource, SensorSource};
use perch_provider_sensors::{Source, Sysfs};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Why a hardware call failed. Shown to the component as an `io` error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HwError {
    /// The board has no such line or sensor.
    #[error("board `{board}` has no {kind} named `{name}`")]
    Unknown {
        board: String,
        kind: &'static str,
        name: String,
    },
    /// The line cannot be driven.
    #[error("GPIO line `{0}` is an input and cannot be driven")]
    InputOnly(String),
    /// The device did not answer.
    #[error("{0}")]
    Device(String),
}

/// One sensor measurement.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// The value in `unit`.
    pub value: f64,
    /// Unit symbol.
    pub unit: &'static str,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
}

/// A board: the named hardware a component may be granted.
pub trait Board: Send + Sync + std::fmt::Debug {
    /// The board's name (`sim`, `raspberry-pi-4`, ...).
    fn name(&self) -> &str;
    /// Names of the GPIO lines.
    fn gpio_lines(&self) -> Vec<String>;
    /// Names of the sensors.
    fn sensors(&self) -> Vec<String>;
    /// Reads a line's logical level.
    fn gpio_read(&self, line: &str) -> Result<bool, HwError>;
    /// Drives an output line.
    fn gpio_write(&self, line: &str, value: bool) -> Result<(), HwError>;
    /// Takes one reading.
    fn sensor_read(&self, sensor: &str) -> Result<Reading, HwError>;
    /// Hardware the board names that is not there now, one line each (reported at start).
    fn missing(&self) -> Vec<String> {
        Vec::new()
    }
    /// Level changes of input lines, as `(line, new logical level)`, if the board reports
    /// them.
    fn edges(&self) -> Option<tokio::sync::broadcast::Receiver<(String, bool)>> {
        None
    }
    /// Sets a simulated input line (a test or a developer pressing the sim button).
    fn set_input(&self, line: &str, high: bool) -> Result<(), HwError> {
        let _ = high;
        Err(HwError::Device(format!(
            "GPIO line `{line}` is not simulated: only sim lines can be set"
        )))
    }
}

/// The built-in `sim` board config, used when no `sim.toml` is found in the boards dirs.
pub const BUILTIN_SIM: &str = include_str!("../../../board-configs/sim.toml");

/// The board the agent config names: a board file found in `boards-dir` (or given as a
/// path), else the built-in `sim` board for `sim`.
pub fn load(config: &perch_core::AgentConfig) -> Result<BoardConfig, String> {
    match BoardConfig::find(&config.board, &config.boards_dir) {
        Ok(path) => BoardConfig::load(&path).map_err(|e| e.to_string()),
        Err(_) if config.board == "sim" => {
            let table: toml::Table = BUILTIN_SIM
                .parse()
                .map_err(|e| format!("the built-in sim board: {e}"))?;
            BoardConfig::from_toml_table(table, "sim").map_err(|e| e.to_string())
        }
        Err(e) => Err(e),
    }
}

/// Builds the board's hardware from its config: simulated lines and sensors from the sim
/// model, sysfs sensors from the sensors provider.
pub fn from_config(config: &BoardConfig) -> ConfiguredBoard {
    let sim_lines: Vec<(String, bool)> = config
        .gpio
        .iter()
        .filter(|(_, l)| l.source == LineSource::Sim)
        .map(|(n, l)| (n.clone(), l.direction == Direction::Output))
        .collect();
    ConfiguredBoard {
        name: config.name.clone(),
        sim: SimBoard::with_lines(&sim_lines),
        config: config.clone(),
        sysfs: Sysfs::default(),
    }
}

/// The sysfs source of a sensor read through the sensors provider (`None` for the
/// simulated model and I2C).
fn sysfs_source(source: &SensorSource) -> Option<Source> {
    match source {
        SensorSource::Iio { device, channel } => Some(Source::Iio {
            device: device.clone(),
            channel: channel.clone(),
        }),
        SensorSource::Hwmon { name, input } => Some(Source::Hwmon {
            name: name.clone(),
            input: input.clone(),
        }),
        SensorSource::W1(id) => Some(Source::W1(id.clone())),
        SensorSource::I2c { .. } | SensorSource::Sim(_) => None,
    }
}

/// A board assembled from a [`BoardConfig`].
#[derive(Debug)]
pub struct ConfiguredBoard {
    name: String,
    config: BoardConfig,
    sim: SimBoard,
    sysfs: Sysfs,
}

impl ConfiguredBoard {
    /// Reads sysfs sensors below `root` instead of `/sys` (tests).
    pub fn with_sysfs_root(mut self, root: impl Into<std::path::PathBuf>) -> Self {
        self.sysfs = Sysfs::new(root);
        self
    }

    fn unknown(&self, kind: &'static str, name: &str) -> HwError {
        HwError::Unknown {
            board: self.name.clone(),
            kind,
            name: name.to_string(),
        }
    }

    fn chip_line_unavailable(&self, line: &str) -> HwError {
        HwError::Device(format!(
            "GPIO line `{line}` is on a character-device chip, which this build of the agent cannot drive yet"
        ))
    }
}

impl Board for ConfiguredBoard {
    fn name(&self) -> &str {
        &self.name
    }

    fn gpio_lines(&self) -> Vec<String> {
        self.config.gpio.keys().cloned().collect()
    }

    fn sensors(&self) -> Vec<String> {
        self.config.sensors.keys().cloned().collect()
    }

    fn gpio_read(&self, line: &str) -> Result<bool, HwError> {
        match self.config.gpio.get(line).map(|l| &l.source) {
            Some(LineSource::Sim) => self.sim.gpio_read(line),
            Some(LineSource::Chip { .. }) => Err(self.chip_line_unavailable(line)),
            None => Err(self.unknown("GPIO line", line)),
        }
    }

    fn gpio_write(&self, line: &str, value: bool) -> Result<(), HwError> {
        match self.config.gpio.get(line) {
            Some(l) if l.direction == Direction::Input => Err(HwError::InputOnly(line.into())),
            Some(l) if l.source == LineSource::Sim => self.sim.gpio_write(line, value),
            Some(_) => Err(self.chip_line_unavailable(line)),
            None => Err(self.unknown("GPIO line", line)),
        }
    }

    fn sensor_read(&self, sensor: &str) -> Result<Reading, HwError> {
        let source = self
            .config
            .sensors
            .get(sensor)
            .ok_or_else(|| self.unknown("sensor", sensor))?;
        if let SensorSource::Sim(model) = source {
            return self.sim.model_read(sensor, model);
        }
        let Some(sysfs_source) = sysfs_source(source) else {
            return Err(HwError::Device(format!(
                "sensor `{sensor}` is an I2C register, which this build of the agent cannot read yet"
            )));
        };
        let v = self
            .sysfs
            .read(sensor, &sysfs_source)
            .map_err(|e| HwError::Device(e.to_string()))?;
        Ok(Reading {
            value: v.value,
            unit: v.unit,
            timestamp_ms: now_ms(),
        })
    }

    fn edges(&self) -> Option<tokio::sync::broadcast::Receiver<(String, bool)>> {
        Some(self.sim.edges.subscribe())
    }

    fn set_input(&self, line: &str, high: bool) -> Result<(), HwError> {
        match self.config.gpio.get(line) {
            Some(l) if l.source == LineSource::Sim => self.sim.set_input(line, high),
            Some(_) => Err(HwError::Device(format!(
                "GPIO line `{line}` is not simulated: only sim lines can be set"
            ))),
            None => Err(self.unknown("GPIO line", line)),
        }
    }

    fn missing(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (name, line) in &self.config.gpio {
            if let LineSource::Chip { chip, line: offset } = &line.source {
                out.push(format!(
                    "gpio `{name}` ({chip} line {offset}): character-device GPIO is not supported by this build yet"
                ));
            }
        }
        for (name, source) in &self.config.sensors {
            if let SensorSource::I2c { bus, address, .. } = source {
                out.push(format!(
                    "sensor `{name}` (i2c-{bus} 0x{address:02x}): I2C sensors are not supported by this build yet"
                ));
                continue;
            }
            let Some(sysfs) = sysfs_source(source) else {
                continue;
            };
            if !self.sysfs.present(&sysfs) {
                out.push(format!("sensor `{name}`: {sysfs:?} is not present"));
            }
        }
        out
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Outdoor-following room temperature: mean and swing of the daily curve, in °C.
const SIM_MEAN_C: f64 = 24.0;
const SIM_SWING_C: f64 = 5.0;
/// How much the fan pulls the room below the curve, in °C.
const SIM_FAN_COOLING_C: f64 = 7.0;
/// Time constant of the room's response, in seconds.
const SIM_TAU_S: f64 = 30.0;
/// Seconds per simulated day: a day passes in ten minutes so that changes show quickly.
const SIM_DAY_S: f64 = 600.0;

#[derive(Debug)]
struct SimState {
    /// name -> (level, is output)
    lines: BTreeMap<String, (bool, bool)>,
    temp_c: f64,
    updated: Instant,
}

/// The simulated board.
#[derive(Debug)]
pub struct SimBoard {
    start: Instant,
    state: Mutex<SimState>,
    /// Level changes of input lines.
    edges: tokio::sync::broadcast::Sender<(String, bool)>,
}

impl Default for SimBoard {
    fn default() -> Self {
        Self::new()
    }
}

impl SimBoard {
    /// A fresh simulated board with the lines of `board-configs/sim.toml`: fan and led
    /// (outputs, off) and button (input, released); the room at the curve's value.
    pub fn new() -> Self {
        Self::with_lines(&[
            ("fan".into(), true),
            ("led".into(), true),
            ("button".into(), false),
        ])
    }

    /// A simulated board with these lines (`(name, is output)`), all low. A line named
    /// `fan` cools the simulated room while high.
    pub fn with_lines(lines: &[(String, bool)]) -> Self {
        let start = Instant::now();
        let lines = lines
            .iter()
            .map(|(name, output)| (name.clone(), (false, *output)))
            .collect();
        Self {
            start,
            edges: tokio::sync::broadcast::channel(64).0,
            state: Mutex::new(SimState {
                lines,
                temp_c: curve(0.0),
                updated: start,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SimState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sets the simulated input level of an input line (a test pressing the button).
    pub fn set_input(&self, line: &str, value: bool) -> Result<(), HwError> {
        let mut s = self.lock();
        match s.lines.get_mut(line) {
            Some((level, false)) => {
                if *level != value {
                    *level = value;
                    // Nobody listening is fine: no component watches the line.
                    let _ = self.edges.send((line.to_string(), value));
                }
                Ok(())
            }
            Some(_) => Err(HwError::Device(format!("`{line}` is an output"))),
            None => Err(self.unknown("GPIO line", line)),
        }
    }

    fn unknown(&self, kind: &'static str, name: &str) -> HwError {
        HwError::Unknown {
            board: "sim".into(),
            kind,
            name: name.to_string(),
        }
    }

    /// Advances the room temperature to now: first-order lag towards the curve, or below
    /// it while the fan runs.
    fn advance(&self, s: &mut SimState) {
        let now = Instant::now();
        let dt = now.duration_since(s.updated).as_secs_f64();
        s.updated = now;
        let t = now.duration_since(self.start).as_secs_f64();
        let fan = s.lines.get("fan").is_some_and(|(on, _)| *on);
        let target = curve(t) - if fan { SIM_FAN_COOLING_C } else { 0.0 };
        s.temp_c = target + (s.temp_c - target) * (-dt / SIM_TAU_S).exp();
    }
}

fn curve(t: f64) -> f64 {
    SIM_MEAN_C + SIM_SWING_C * (std::f64::consts::TAU * t / SIM_DAY_S).sin()
}

impl Board for SimBoard {
    fn name(&self) -> &str {
        "sim"
    }

    fn gpio_lines(&self) -> Vec<String> {
        self.lock().lines.keys().map(|k| k.to_string()).collect()
    }

    fn sensors(&self) -> Vec<String> {
        vec!["humidity".into(), "room-temp".into()]
    }

    fn gpio_read(&self, line: &str) -> Result<bool, HwError> {
        self.lock()
            .lines
            .get(line)
            .map(|(level, _)| *level)
            .ok_or_else(|| self.unknown("GPIO line", line))
    }

    fn gpio_write(&self, line: &str, value: bool) -> Result<(), HwError> {
        let mut s = self.lock();
        // Settle the temperature under the old fan state before changing it.
        self.advance(&mut s);
        match s.lines.get_mut(line) {
            Some((level, true)) => {
                *level = value;
                Ok(())
            }
            Some((_, false)) => Err(HwError::InputOnly(line.to_string())),
            None => Err(self.unknown("GPIO line", line)),
        }
    }

    fn sensor_read(&self, sensor: &str) -> Result<Reading, HwError> {
        self.model_read(sensor, sensor)
    }
}

impl SimBoard {
    /// Reads simulated model `model` (`room-temp` or `humidity`) for sensor `sensor`.
    pub fn model_read(&self, sensor: &str, model: &str) -> Result<Reading, HwError> {
        let mut s = self.lock();
        self.advance(&mut s);
        let (value, unit) = match model {
            // Rounded like a real 0.01 °C-resolution sensor.
            "room-temp" => ((s.temp_c * 100.0).round() / 100.0, "°C"),
            "humidity" => {
                let t = self.start.elapsed().as_secs_f64();
                let rh = 45.0 - 8.0 * (std::f64::consts::TAU * t / SIM_DAY_S).sin();
                ((rh * 10.0).round() / 10.0, "%")
            }
            _ => return Err(self.unknown("sensor", sensor)),
        };
        Ok(Reading {
            value,
            unit,
            timestamp_ms: now_ms(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fan_cools_the_simulated_room() {
        let board = SimBoard::new();
        {
            // Pretend a minute has passed with the fan on.
            board.gpio_write("fan", true).expect("fan is an output");
            let mut s = board.lock();
            s.updated -= std::time::Duration::from_secs(60);
        }
        let cooled = board.sensor_read("room-temp").expect("sensor").value;
        assert!(
            cooled < curve(0.0) - 4.0,
            "a minute of fan should pull the room well below the curve, got {cooled}"
        );
        assert_eq!(board.sensor_read("room-temp").expect("sensor").unit, "°C");
    }

    #[test]
    fn lines_know_their_direction() {
        let board = SimBoard::new();
        assert_eq!(
            board.gpio_write("button", true),
            Err(HwError::InputOnly("button".into()))
        );
        board.set_input("button", true).expect("input");
        assert_eq!(board.gpio_read("button"), Ok(true));
        assert!(matches!(
            board.gpio_read("relay"),
            Err(HwError::Unknown { .. })
        ));
        assert!(matches!(
            board.sensor_read("pressure"),
            Err(HwError::Unknown { .. })
        ));
    }
}
