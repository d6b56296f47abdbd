//! The hardware a component can be granted: named GPIO lines and sensors, behind the
//! [`Board`] trait.
//!
//! The `sim` board simulates a small climate gateway so that components run the same way
//! on a laptop as on a device: a `room-temp` sensor that follows a daily curve and cools
//! down while the `fan` line is driven high, `humidity`, an output `led` and an input
//! `button`. Real backends (Linux GPIO character devices, IIO, hwmon, 1-Wire, I2C) plug in
//! behind the same trait.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use perch_core::board::{Bias, BoardConfig, Direction, Drive, GpioLine, LineSource, SensorSource};
use perch_provider_gpio::{self as gpio, GpioBackend};
use perch_provider_sensors::{DevI2c, I2c, I2cRegister, SensorError, Source, Sysfs};
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
    /// Whether `line` is an output (`None`: the board has no such line).
    fn gpio_is_output(&self, line: &str) -> Option<bool>;
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

/// Builds the board's hardware from its config, composing one backend per kind of source:
/// the sim model for `sim` lines and sensors, Linux GPIO character devices below
/// `dev_root` for `chip` lines (each requested once, here, and watched for edges), sysfs
/// below `sysfs_root` for IIO, hwmon and 1-Wire sensors, and `dev_root/i2c-N` for I2C
/// register sensors.
pub fn from_config(
    config: &BoardConfig,
    sysfs_root: &std::path::Path,
    dev_root: &std::path::Path,
) -> ConfiguredBoard {
    let sim_lines: Vec<(String, bool)> = config
        .gpio
        .iter()
        .filter(|(_, l)| l.source == LineSource::Sim)
        .map(|(n, l)| (n.clone(), l.direction == Direction::Output))
        .collect();
    let sim = SimBoard::with_lines(&sim_lines);
    let chip_lines: BTreeMap<String, gpio::LineConfig> = config
        .gpio
        .iter()
        .filter_map(|(name, l)| match &l.source {
            LineSource::Chip { chip, line } => Some((name.clone(), line_config(chip, *line, l))),
            LineSource::Sim => None,
        })
        .collect();
    let cdev: Option<Arc<dyn GpioBackend>> = if chip_lines.is_empty() {
        None
    } else {
        Some(Arc::new(gpio::CdevBackend::new(dev_root, chip_lines)))
    };
    // Edges of every backend's input lines arrive on one channel.
    let edges = tokio::sync::broadcast::channel(64).0;
    let backends: [Option<&dyn GpioBackend>; 2] = [Some(&sim), cdev.as_deref()];
    for backend in backends.into_iter().flatten() {
        let edges = edges.clone();
        let sink: gpio::EdgeSink = Arc::new(move |line: &str, high: bool| {
            // Nobody listening is fine: no component watches the line.
            let _ = edges.send((line.to_string(), high));
        });
        if let Err(e) = backend.watch(sink) {
            tracing::warn!(board = %config.name, error = %e, "GPIO edges will not be reported");
        }
    }
    let i2c_registers = config
        .sensors
        .iter()
        .filter_map(|(name, source)| match source {
            SensorSource::I2c {
                bus,
                address,
                register,
                scale,
                unit,
            } => Some((
                name.clone(),
                I2cRegister::new(name, *bus, *address, *register, scale, unit),
            )),
            _ => None,
        })
        .collect();
    ConfiguredBoard {
        name: config.name.clone(),
        sim,
        config: config.clone(),
        sysfs: Sysfs::new(sysfs_root),
        cdev,
        edges,
        i2c: I2c::new(Arc::new(DevI2c::new(dev_root))),
        dev_root: dev_root.to_path_buf(),
        i2c_registers,
    }
}

fn line_config(chip: &str, offset: u32, l: &GpioLine) -> gpio::LineConfig {
    gpio::LineConfig {
        chip: chip.to_string(),
        offset,
        direction: match l.direction {
            Direction::Input => gpio::Direction::Input,
            Direction::Output => gpio::Direction::Output,
        },
        active_low: l.active_low,
        bias: l.bias.map(|b| match b {
            Bias::Disabled => gpio::Bias::Disabled,
            Bias::PullUp => gpio::Bias::PullUp,
            Bias::PullDown => gpio::Bias::PullDown,
        }),
        drive: l.drive.map(|d| match d {
            Drive::PushPull => gpio::Drive::PushPull,
            Drive::OpenDrain => gpio::Drive::OpenDrain,
            Drive::OpenSource => gpio::Drive::OpenSource,
        }),
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
    /// The character-device lines, if the board has any.
    cdev: Option<Arc<dyn GpioBackend>>,
    /// Level changes of input lines of every backend.
    edges: tokio::sync::broadcast::Sender<(String, bool)>,
    i2c: I2c,
    dev_root: std::path::PathBuf,
    /// I2C sensors, validated (a bad scale or unit is reported at start and on read).
    i2c_registers: BTreeMap<String, Result<I2cRegister, SensorError>>,
}

impl ConfiguredBoard {
    fn unknown(&self, kind: &'static str, name: &str) -> HwError {
        HwError::Unknown {
            board: self.name.clone(),
            kind,
            name: name.to_string(),
        }
    }

    /// The backend serving `line`: the sim model or the character-device chips.
    fn line_backend(&self, line: &str) -> Result<&dyn GpioBackend, HwError> {
        match self.config.gpio.get(line).map(|l| &l.source) {
            Some(LineSource::Sim) => Ok(&self.sim),
            Some(LineSource::Chip { .. }) => self
                .cdev
                .as_deref()
                .ok_or_else(|| self.unknown("GPIO line", line)),
            None => Err(self.unknown("GPIO line", line)),
        }
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

    fn gpio_is_output(&self, line: &str) -> Option<bool> {
        self.config
            .gpio
            .get(line)
            .map(|l| l.direction == Direction::Output)
    }

    fn gpio_read(&self, line: &str) -> Result<bool, HwError> {
        self.line_backend(line)?.read(line).map_err(hw)
    }

    fn gpio_write(&self, line: &str, value: bool) -> Result<(), HwError> {
        if self.gpio_is_output(line) == Some(false) {
            return Err(HwError::InputOnly(line.into()));
        }
        self.line_backend(line)?.write(line, value).map_err(hw)
    }

    fn sensor_read(&self, sensor: &str) -> Result<Reading, HwError> {
        let source = self
            .config
            .sensors
            .get(sensor)
            .ok_or_else(|| self.unknown("sensor", sensor))?;
        let value = match source {
            SensorSource::Sim(model) => return self.sim.model_read(sensor, model),
            SensorSource::I2c { .. } => match self.i2c_registers.get(sensor) {
                Some(Ok(register)) => self.i2c.read(sensor, register),
                Some(Err(e)) => Err(e.clone()),
                None => return Err(self.unknown("sensor", sensor)),
            },
            other => match sysfs_source(other) {
                Some(source) => self.sysfs.read(sensor, &source),
                None => return Err(self.unknown("sensor", sensor)),
            },
        }
        .map_err(hw)?;
        Ok(Reading {
            value: value.value,
            unit: value.unit,
            timestamp_ms: now_ms(),
        })
    }

    fn edges(&self) -> Option<tokio::sync::broadcast::Receiver<(String, bool)>> {
        Some(self.edges.subscribe())
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
        let mut out = self.cdev.as_ref().map(|c| c.missing()).unwrap_or_default();
        for (name, source) in &self.config.sensors {
            if let SensorSource::I2c { bus, address, .. } = source {
                match self.i2c_registers.get(name) {
                    Some(Err(e)) => out.push(e.to_string()),
                    _ => {
                        let path = self.dev_root.join(format!("i2c-{bus}"));
                        if !path.exists() {
                            out.push(format!(
                                "sensor `{name}` (I2C bus {bus}, address 0x{address:02x}): {} does not exist",
                                path.display()
                            ));
                        }
                    }
                }
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

fn hw(e: impl std::fmt::Display) -> HwError {
    HwError::Device(e.to_string())
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
pub struct SimBoard {
    start: Instant,
    state: Mutex<SimState>,
    /// Level changes of input lines.
    edges: tokio::sync::broadcast::Sender<(String, bool)>,
    /// Watchers added through [`GpioBackend::watch`].
    sinks: Mutex<Vec<gpio::EdgeSink>>,
}

impl std::fmt::Debug for SimBoard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimBoard")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
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
            sinks: Mutex::new(Vec::new()),
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
                    drop(s);
                    // Nobody listening is fine: no component watches the line.
                    let _ = self.edges.send((line.to_string(), value));
                    let sinks = self.sinks.lock().unwrap_or_else(PoisonError::into_inner);
                    for sink in sinks.iter() {
                        sink(line, value);
                    }
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

    fn gpio_is_output(&self, line: &str) -> Option<bool> {
        self.lock().lines.get(line).map(|(_, output)| *output)
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

/// The sim lines behind the same backend trait as the character-device chips.
impl GpioBackend for SimBoard {
    fn read(&self, line: &str) -> Result<bool, gpio::GpioError> {
        Board::gpio_read(self, line).map_err(|_| gpio::GpioError::UnknownLine { line: line.into() })
    }

    fn write(&self, line: &str, value: bool) -> Result<(), gpio::GpioError> {
        Board::gpio_write(self, line, value).map_err(|e| match e {
            HwError::InputOnly(line) => gpio::GpioError::NotOutput { line },
            _ => gpio::GpioError::UnknownLine { line: line.into() },
        })
    }

    /// Simulated lines are always there.
    fn missing(&self) -> Vec<String> {
        Vec::new()
    }

    fn watch(&self, sink: gpio::EdgeSink) -> Result<(), gpio::GpioError> {
        self.sinks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(sink);
        Ok(())
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
