//! I2C register sensors: a 16-bit register read from a device on an I2C adapter and scaled,
//! as in `i2c = { bus = 1, address = 0x48, register = 0, scale = "0.00390625", unit = "°C" }`.
//!
//! The register is read as the device holds it, most significant byte first, and taken as a
//! signed two's-complement number: `value = (register as i16) * scale`. An LM75/TMP105
//! temperature register holding `0x1910` is 25.0625 °C with `scale = 1/256`, `0xE700` is
//! −25 °C.
//!
//! The adapter is reached through the [`I2cBus`] trait: [`DevI2c`] is the real one
//! (`/dev/i2c-N`, SMBus transfers), tests put a fake behind it.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use i2cdev::core::I2CDevice;
use i2cdev::linux::{LinuxI2CDevice, LinuxI2CError};

use crate::{SensorError, Value};

/// The units an I2C sensor's config may name; components see them as written.
pub const I2C_UNITS: &[&str] = &[
    "°C", "K", "%", "hPa", "kPa", "Pa", "V", "mV", "A", "mA", "W", "lx", "rpm", "ppm", "Hz",
];

/// An I2C adapter: reads 16-bit registers of the devices on it.
pub trait I2cBus: Send + Sync + std::fmt::Debug {
    /// The 16-bit `register` of the device at 7-bit `address` on adapter number `bus`, as the
    /// device holds it (most significant byte first, i.e. `0x1910` for bytes `19 10`).
    fn read_register(&self, bus: u32, address: u16, register: u8) -> Result<u16, BusError>;
}

/// Why an [`I2cBus`] read failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The adapter's device file does not exist: adapter gone, or `i2c-dev` not loaded.
    #[error("I2C adapter {path} does not exist (adapter gone, or the i2c-dev module not loaded)")]
    Missing { path: PathBuf },
    /// The adapter is there but the transfer failed: no device answered (NAK), bus error,
    /// timeout, no permission. `message` says which step failed and how.
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
}

/// One I2C register sensor, validated from a board config entry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct I2cRegister {
    /// Adapter number: `/dev/i2c-<bus>`.
    pub bus: u32,
    /// 7-bit device address.
    pub address: u16,
    /// Register number.
    pub register: u8,
    /// Units per count of the signed register value.
    pub scale: f64,
    /// Unit symbol, one of [`I2C_UNITS`].
    pub unit: &'static str,
}

impl I2cRegister {
    /// Validates the config of `sensor`: `scale` is a decimal string (`"0.00390625"`), `unit`
    /// one of [`I2C_UNITS`], `address` a 7-bit address.
    pub fn new(
        sensor: &str,
        bus: u32,
        address: u16,
        register: u8,
        scale: &str,
        unit: &str,
    ) -> Result<Self, SensorError> {
        let invalid = |message: String| SensorError::Config {
            sensor: sensor.into(),
            message,
        };
        if address > 0x7f {
            return Err(invalid(format!(
                "I2C address 0x{address:x} is not a 7-bit address (0x00 to 0x7f)"
            )));
        }
        let scale = match scale.trim().parse::<f64>() {
            Ok(s) if s.is_finite() && s != 0.0 => s,
            _ => {
                return Err(invalid(format!(
                    "I2C scale `{scale}` is not a non-zero decimal number (like \"0.00390625\")"
                )));
            }
        };
        let unit = I2C_UNITS
            .iter()
            .find(|u| **u == unit)
            .copied()
            .ok_or_else(|| {
                invalid(format!(
                    "unit `{unit}` is not one of {}",
                    I2C_UNITS.join(", ")
                ))
            })?;
        Ok(Self {
            bus,
            address,
            register,
            scale,
            unit,
        })
    }

    /// The value of a register holding `word` (most significant byte first).
    pub fn decode(&self, word: u16) -> Value {
        let signed = i16::from_be_bytes(word.to_be_bytes());
        Value {
            value: f64::from(signed) * self.scale,
            unit: self.unit,
        }
    }
}

/// Reads I2C register sensors through an [`I2cBus`].
#[derive(Debug, Clone)]
pub struct I2c {
    bus: Arc<dyn I2cBus>,
}

impl Default for I2c {
    /// The adapters below `/dev`.
    fn default() -> Self {
        Self::new(Arc::new(DevI2c::default()))
    }
}

impl I2c {
    /// Sensors on `bus`.
    pub fn new(bus: Arc<dyn I2cBus>) -> Self {
        Self { bus }
    }

    /// Takes one reading of `sensor` from its `register`.
    pub fn read(&self, sensor: &str, register: &I2cRegister) -> Result<Value, SensorError> {
        let I2cRegister {
            bus,
            address,
            register: reg,
            ..
        } = *register;
        match self.bus.read_register(bus, address, reg) {
            Ok(word) => Ok(register.decode(word)),
            Err(BusError::Missing { path }) => Err(SensorError::Missing {
                sensor: sensor.into(),
                what: BusError::Missing { path }.to_string(),
            }),
            Err(BusError::Io { path, message }) => Err(SensorError::I2c {
                sensor: sensor.into(),
                bus,
                address,
                register: reg,
                path,
                message,
            }),
        }
    }
}

/// The Linux I2C adapters `dev_root/i2c-<bus>` (`/dev` on a device), read with SMBus
/// "read word data" transfers, which every adapter that can read a register supports (x86
/// SMBus controllers such as q35's i801 do not support plain I2C transfers).
///
/// A device is opened once and kept, per adapter and address; a failed transfer closes it, so
/// an adapter that is unplugged and plugged back in (a USB-I2C bridge) is opened afresh.
#[derive(Debug)]
pub struct DevI2c {
    dev_root: PathBuf,
    devices: Mutex<HashMap<(u32, u16), LinuxI2CDevice>>,
}

impl Default for DevI2c {
    fn default() -> Self {
        Self::new("/dev")
    }
}

impl DevI2c {
    /// Adapters below `dev_root`.
    pub fn new(dev_root: impl Into<PathBuf>) -> Self {
        Self {
            dev_root: dev_root.into(),
            devices: Mutex::new(HashMap::new()),
        }
    }

    /// The device file of adapter `bus`.
    pub fn adapter_path(&self, bus: u32) -> PathBuf {
        self.dev_root.join(format!("i2c-{bus}"))
    }
}

impl I2cBus for DevI2c {
    fn read_register(&self, bus: u32, address: u16, register: u8) -> Result<u16, BusError> {
        let path = self.adapter_path(bus);
        // One transfer at a time per agent: they share the adapters, and are short.
        let mut devices = self.devices.lock().unwrap_or_else(PoisonError::into_inner);
        let device = match devices.entry((bus, address)) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(open(&path, address)?),
        };
        match device.smbus_read_word_data(register) {
            Ok(word) => Ok(smbus_word_to_register(word)),
            Err(e) => {
                devices.remove(&(bus, address));
                Err(BusError::Io {
                    message: describe("reading the register", &e),
                    path,
                })
            }
        }
    }
}

/// SMBus sends a word's low byte first, and `smbus_read_word_data` returns it decoded that
/// way; register sensors send their most significant byte first.
fn smbus_word_to_register(word: u16) -> u16 {
    word.swap_bytes()
}

/// Opens `address` on the adapter at `path`, sharing it with its kernel driver if one owns it.
fn open(path: &Path, address: u16) -> Result<LinuxI2CDevice, BusError> {
    let failed = |step: &str, e: &LinuxI2CError| {
        // Opening fails with ENOENT without the file, ENODEV/ENXIO for a node left behind
        // by an adapter that is gone.
        let gone = |io: &std::io::Error| {
            io.kind() == std::io::ErrorKind::NotFound
                || matches!(io.raw_os_error(), Some(libc::ENODEV | libc::ENXIO))
        };
        if matches!(e, LinuxI2CError::Io(io) if gone(io)) {
            BusError::Missing {
                path: path.to_path_buf(),
            }
        } else {
            BusError::Io {
                path: path.to_path_buf(),
                message: describe(step, e),
            }
        }
    };
    match LinuxI2CDevice::new(path, address) {
        Ok(device) => Ok(device),
        // A kernel driver is bound to the address (lm75 for a TMP105, say): EBUSY.
        Err(LinuxI2CError::Errno(libc::EBUSY)) => {
            tracing::info!(
                adapter = %path.display(),
                address = %format!("0x{address:02x}"),
                "I2C address is bound to a kernel driver: reading it with I2C_SLAVE_FORCE"
            );
            // SAFETY: `force_new` is unsafe because transfers to an address owned by a kernel
            // driver can confuse that driver, not for memory safety. We only issue SMBus
            // "read word data", which selects the register before reading; drivers of
            // register sensors (lm75, tmp102, ...) select the register on each of their own
            // accesses too, so a read of ours does not change what they read next.
            #[allow(unsafe_code)]
            let forced = unsafe { LinuxI2CDevice::force_new(path, address) };
            forced.map_err(|e| failed("selecting the address (forced)", &e))
        }
        Err(e) => Err(failed("selecting the address", &e)),
    }
}

/// `step: <the error>`, with what the usual error numbers mean on an I2C bus.
fn describe(step: &str, e: &LinuxI2CError) -> String {
    let errno = match e {
        LinuxI2CError::Errno(n) => Some(*n),
        LinuxI2CError::Io(io) => io.raw_os_error(),
    };
    let hint = match errno {
        Some(libc::ENXIO | libc::EREMOTEIO) => ": no device acknowledged the address (NAK)",
        Some(libc::ETIMEDOUT) => ": the bus timed out",
        Some(libc::EOPNOTSUPP) => ": the adapter does not support SMBus word reads",
        Some(libc::EACCES) => ": no permission to open the adapter",
        _ => "",
    };
    let error = match errno {
        Some(n) => std::io::Error::from_raw_os_error(n).to_string(),
        None => e.to_string(),
    };
    format!("{step}: {error}{hint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smbus_words_are_swapped_into_register_order() {
        // The bytes 19 10 arrive low byte first, so smbus_read_word_data returns 0x1019.
        assert_eq!(smbus_word_to_register(0x1019), 0x1910);
        assert_eq!(smbus_word_to_register(0x00e7), 0xe700);
    }

    #[test]
    fn nak_and_other_errors_say_what_they_mean() {
        let nak = describe("reading the register", &LinuxI2CError::Errno(libc::ENXIO));
        assert!(
            nak.starts_with("reading the register: ")
                && nak.ends_with("no device acknowledged the address (NAK)"),
            "{nak}"
        );
        let plain = describe("x", &LinuxI2CError::Errno(libc::EIO));
        assert_eq!(
            plain,
            format!("x: {}", std::io::Error::from_raw_os_error(libc::EIO))
        );
    }
}
