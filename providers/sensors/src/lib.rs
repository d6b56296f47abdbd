//! `perch-provider-sensors`: reads named sensors from Linux sysfs.
//!
//! Three kernel interfaces, each with its quirks handled here:
//! - **IIO** (`/sys/bus/iio/devices/iio:deviceN`): `<channel>_raw`, optional
//!   `<channel>_offset` and `<channel>_scale` (falling back to the shared `<type>_scale`);
//!   the value is `(raw + offset) * scale` in the IIO ABI's units (milli-°C, kPa, mV, ...),
//!   converted here to the units components see (°C, hPa, V, %).
//! - **hwmon** (`/sys/class/hwmon/hwmonN`): `<input>_input`, in millidegrees, millivolts,
//!   milli-percent or RPM.
//! - **1-Wire** (`/sys/bus/w1/devices/<id>/w1_slave`): two lines, the first ending in
//!   `crc=XX YES` (or `NO` for a failed read), the second ending in `t=<millidegrees>`.
//!
//! Devices are found by their `name` file (IIO, hwmon) or id (1-Wire) on every read, so
//! numbering that changes across boots or a device unplugged and plugged back in needs no
//! restart: a missing device is a typed [`SensorError::Missing`] until it returns.
//!
//! The sysfs root is a parameter, so tests run against temp dirs shaped exactly like the
//! kernel's.
//!
//! A fourth source is read from the device itself rather than from a driver's sysfs files:
//! **I2C register sensors** ([`I2c`], in [`i2c`]), a 16-bit register read from `/dev/i2c-N`
//! with an SMBus transfer and scaled as the board config says. The adapter sits behind the [`I2cBus`] trait, real in [`DevI2c`] and
//! faked in tests.
//!
//! This crate must not depend on the runtime.

// `deny`, not `forbid`: the one unsafe call is the I2C_SLAVE_FORCE fallback in `i2c.rs`,
// which says why it is sound where it is allowed.
#![deny(unsafe_code)]

pub mod i2c;

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use i2c::{BusError, DevI2c, I2C_UNITS, I2c, I2cBus, I2cRegister};

/// Where a sensor's readings come from, as written in a board config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Source {
    /// An IIO channel of the device whose `name` file holds `device`, e.g.
    /// `{ iio = { device = "bmp280", channel = "in_pressure" } }`.
    Iio { device: String, channel: String },
    /// An input of the hwmon device whose `name` file holds `name`, e.g.
    /// `{ hwmon = { name = "cpu_thermal", input = "temp1" } }`.
    Hwmon { name: String, input: String },
    /// A 1-Wire thermometer by id, e.g. `{ w1 = "28-00000abcdef0" }`.
    W1(String),
}

/// A value in the unit components see.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Value {
    /// The number.
    pub value: f64,
    /// Its unit symbol.
    pub unit: &'static str,
}

/// Why a sensor could not be read. Every message names the sensor and the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SensorError {
    /// The device is not there (unplugged, driver not loaded).
    #[error("sensor `{sensor}` is not present: {what}")]
    Missing { sensor: String, what: String },
    /// A file holds something the kernel ABI does not produce.
    #[error("sensor `{sensor}`: {path} holds `{content}`, not {expected}")]
    Malformed {
        sensor: String,
        path: PathBuf,
        content: String,
        expected: &'static str,
    },
    /// A 1-Wire read failed its CRC check (the bus was noisy); the next read may succeed.
    #[error("sensor `{sensor}`: the 1-Wire read failed its CRC check ({path})")]
    Crc { sensor: String, path: PathBuf },
    /// The channel or input is not one this provider knows the unit of.
    #[error("sensor `{sensor}`: `{channel}` is not a supported channel ({supported})")]
    Unsupported {
        sensor: String,
        channel: String,
        supported: &'static str,
    },
    /// Reading the file failed for another reason.
    #[error("sensor `{sensor}`: reading {path}: {message}")]
    Io {
        sensor: String,
        path: PathBuf,
        message: String,
    },
    /// An I2C transfer failed: no device answered (NAK), a bus error or timeout, or the
    /// adapter file is not an adapter. The next read tries again.
    #[error(
        "sensor `{sensor}`: I2C device 0x{address:02x} on bus {bus} ({path}), register 0x{register:02x}: {message}"
    )]
    I2c {
        sensor: String,
        bus: u32,
        address: u16,
        register: u8,
        path: PathBuf,
        message: String,
    },
    /// The board config describes the sensor in a way this provider cannot use (a scale
    /// that is not a number, an unknown unit).
    #[error("sensor `{sensor}`: {message}")]
    Config { sensor: String, message: String },
}

const IIO_TYPES: &str = "in_temp, in_humidityrelative, in_pressure, in_voltage, in_illuminance";
const HWMON_TYPES: &str = "temp, humidity, in, fan";

/// Reads sensors below a sysfs root (`/sys` on a device, a temp dir in tests).
#[derive(Debug, Clone)]
pub struct Sysfs {
    root: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Self::new("/sys")
    }
}

impl Sysfs {
    /// Sensors below `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Takes one reading of `sensor` from `source`.
    pub fn read(&self, sensor: &str, source: &Source) -> Result<Value, SensorError> {
        match source {
            Source::Iio { device, channel } => self.read_iio(sensor, device, channel),
            Source::Hwmon { name, input } => self.read_hwmon(sensor, name, input),
            Source::W1(id) => self.read_w1(sensor, id),
        }
    }

    /// Whether the device behind `source` is present now (for reporting at start).
    pub fn present(&self, source: &Source) -> bool {
        match source {
            Source::Iio { device, .. } => self.find_by_name("bus/iio/devices", device).is_some(),
            Source::Hwmon { name, .. } => self.find_by_name("class/hwmon", name).is_some(),
            Source::W1(id) => self
                .root
                .join("bus/w1/devices")
                .join(id)
                .join("w1_slave")
                .is_file(),
        }
    }

    /// The directory below `root/class_dir` whose `name` file holds `name`.
    fn find_by_name(&self, class_dir: &str, name: &str) -> Option<PathBuf> {
        let dir = self.root.join(class_dir);
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        entries
            .into_iter()
            .find(|p| std::fs::read_to_string(p.join("name")).is_ok_and(|n| n.trim() == name))
    }

    fn read_iio(&self, sensor: &str, device: &str, channel: &str) -> Result<Value, SensorError> {
        let (divisor, unit) = match iio_type(channel) {
            Some("in_temp") => (1000.0, "°C"),
            Some("in_humidityrelative") => (1000.0, "%"),
            // kPa -> hPa
            Some("in_pressure") => (0.1, "hPa"),
            Some("in_voltage") => (1000.0, "V"),
            Some("in_illuminance") => (1.0, "lx"),
            _ => {
                return Err(SensorError::Unsupported {
                    sensor: sensor.into(),
                    channel: channel.into(),
                    supported: IIO_TYPES,
                });
            }
        };
        let dir = self
            .find_by_name("bus/iio/devices", device)
            .ok_or_else(|| SensorError::Missing {
                sensor: sensor.into(),
                what: format!(
                    "no IIO device named `{device}` under {}",
                    self.root.join("bus/iio/devices").display()
                ),
            })?;
        let raw = read_number(sensor, &dir.join(format!("{channel}_raw")))?;
        let offset = read_optional(sensor, &dir.join(format!("{channel}_offset")))?.unwrap_or(0.0);
        // A channel's own scale wins over the scale shared by its type.
        let scale = match read_optional(sensor, &dir.join(format!("{channel}_scale")))? {
            Some(s) => s,
            None => {
                let shared = iio_type(channel).map(|t| dir.join(format!("{t}_scale")));
                match shared {
                    Some(p) => read_optional(sensor, &p)?.unwrap_or(1.0),
                    None => 1.0,
                }
            }
        };
        Ok(Value {
            value: (raw + offset) * scale / divisor,
            unit,
        })
    }

    fn read_hwmon(&self, sensor: &str, name: &str, input: &str) -> Result<Value, SensorError> {
        let kind = input.trim_end_matches(|c: char| c.is_ascii_digit());
        let (divisor, unit) = match kind {
            "temp" => (1000.0, "°C"),
            "humidity" => (1000.0, "%"),
            "in" => (1000.0, "V"),
            "fan" => (1.0, "rpm"),
            _ => {
                return Err(SensorError::Unsupported {
                    sensor: sensor.into(),
                    channel: input.into(),
                    supported: HWMON_TYPES,
                });
            }
        };
        let dir = self
            .find_by_name("class/hwmon", name)
            .ok_or_else(|| SensorError::Missing {
                sensor: sensor.into(),
                what: format!(
                    "no hwmon device named `{name}` under {}",
                    self.root.join("class/hwmon").display()
                ),
            })?;
        let value = read_number(sensor, &dir.join(format!("{input}_input")))?;
        Ok(Value {
            value: value / divisor,
            unit,
        })
    }

    fn read_w1(&self, sensor: &str, id: &str) -> Result<Value, SensorError> {
        let path = self.root.join("bus/w1/devices").join(id).join("w1_slave");
        let text = read_file(sensor, &path)?;
        let malformed = || SensorError::Malformed {
            sensor: sensor.into(),
            path: path.clone(),
            content: text.trim().to_string(),
            expected: "a `crc=.. YES` line and a `t=<millidegrees>` line",
        };
        let mut lines = text.lines();
        let (Some(crc), Some(temp)) = (lines.next(), lines.next()) else {
            return Err(malformed());
        };
        match crc.trim().rsplit(' ').next() {
            Some("YES") => {}
            Some("NO") => {
                return Err(SensorError::Crc {
                    sensor: sensor.into(),
                    path,
                });
            }
            _ => return Err(malformed()),
        }
        let milli: f64 = temp
            .rsplit_once("t=")
            .and_then(|(_, t)| t.trim().parse().ok())
            .ok_or_else(malformed)?;
        Ok(Value {
            value: milli / 1000.0,
            unit: "°C",
        })
    }
}

/// `in_temp` for `in_temp`, `in_temp0`, `in_temp_ambient`; `in_voltage` for `in_voltage3`.
fn iio_type(channel: &str) -> Option<&'static str> {
    [
        "in_temp",
        "in_humidityrelative",
        "in_pressure",
        "in_voltage",
        "in_illuminance",
    ]
    .into_iter()
    .find(|t| {
        channel.strip_prefix(t).is_some_and(|rest| {
            rest.is_empty() || rest.starts_with(|c: char| c.is_ascii_digit() || c == '_')
        })
    })
}

fn read_file(sensor: &str, path: &Path) -> Result<String, SensorError> {
    std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            SensorError::Missing {
                sensor: sensor.into(),
                what: format!("{} does not exist", path.display()),
            }
        } else {
            SensorError::Io {
                sensor: sensor.into(),
                path: path.to_path_buf(),
                message: e.to_string(),
            }
        }
    })
}

fn read_number(sensor: &str, path: &Path) -> Result<f64, SensorError> {
    let text = read_file(sensor, path)?;
    text.trim().parse().map_err(|_| SensorError::Malformed {
        sensor: sensor.into(),
        path: path.to_path_buf(),
        content: text.trim().to_string(),
        expected: "a number",
    })
}

fn read_optional(sensor: &str, path: &Path) -> Result<Option<f64>, SensorError> {
    match read_number(sensor, path) {
        Ok(v) => Ok(Some(v)),
        Err(SensorError::Missing { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}
