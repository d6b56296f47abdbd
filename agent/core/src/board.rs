//! Board configs (`board-configs/<board>.toml`): a file is a board. It names the hardware
//! components may be granted (GPIO lines, sensors) and says how to build and boot an image
//! for it. A variant `inherit`s a base file and overrides what differs.
//!
//! Parsed key by key like the agent config, so every problem is reported at once with its
//! key path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::ConfigProblem;
use crate::walk::Walker;

/// Most `inherit` levels followed before giving up (a cycle, most likely).
pub const MAX_INHERIT_DEPTH: usize = 8;

/// Direction of a GPIO line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    Input,
    Output,
}

/// Bias of an input line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Bias {
    Disabled,
    PullUp,
    PullDown,
}

/// Drive of an output line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Drive {
    PushPull,
    OpenDrain,
    OpenSource,
}

/// Where a GPIO line lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LineSource {
    /// A line of a character-device chip (`/dev/<chip>`), by offset.
    Chip { chip: String, line: u32 },
    /// A line of the simulated board.
    Sim,
}

/// One named GPIO line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct GpioLine {
    pub source: LineSource,
    pub direction: Direction,
    /// The logical level is the inverse of the electrical one.
    pub active_low: bool,
    pub bias: Option<Bias>,
    pub drive: Option<Drive>,
}

/// Where a sensor's readings come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SensorSource {
    /// An IIO channel of the device with this `name`.
    Iio { device: String, channel: String },
    /// An input of the hwmon device with this `name`.
    Hwmon { name: String, input: String },
    /// A 1-Wire thermometer by id.
    W1(String),
    /// A register of an I2C device: bus number, 7-bit address, register, and how to scale
    /// the 16-bit big-endian value.
    I2c {
        bus: u32,
        address: u16,
        register: u8,
        scale: String,
        unit: String,
    },
    /// A model of the simulated board (`room-temp`, `humidity`).
    Sim(String),
}

/// How to build and boot an image for the board (used by the image builder and HIL).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageSpec {
    /// CPU architecture: `x86_64`, `aarch64` or `armv7`.
    pub arch: Option<String>,
    /// Rust target triple of the agent.
    pub rust_target: Option<String>,
    /// Debian kernel package.
    pub kernel: Option<String>,
    /// QEMU machine for emulation (`virt`, `q35`).
    pub qemu_machine: Option<String>,
    /// Emulated devices QEMU adds for the board's hardware (`-device` arguments, e.g. a
    /// `tmp105` on the SMBus).
    pub qemu_devices: Vec<String>,
    /// Kernel modules to load at boot, by name, in this order (after what they need).
    pub modules: Vec<String>,
    /// Parameters of modules in `modules`, as written after the name (`"i2c_stub
    /// chip_addr=0x48"` gives `i2c_stub` -> `["chip_addr=0x48"]`).
    pub module_params: BTreeMap<String, Vec<String>>,
    /// I2C devices the kernel cannot discover (no device tree or ACPI entry), instantiated at
    /// boot on the adapter with the given name.
    pub i2c_devices: Vec<I2cDevice>,
    /// A root shell on the serial console, for hardware-in-the-loop tests that set up the
    /// guest from outside. Off unless the board says so; production boards leave it off.
    pub console_shell: bool,
    /// The block device the image is flashed to (`/dev/vda`, `/dev/mmcblk0`); its
    /// partitions are `<disk>1`..`<disk>4` (`p1`.. when the name ends in a digit).
    pub disk: Option<String>,
    /// How the board boots the image's A/B slots: `u-boot` (a boot script in the boot
    /// partition) or `direct` (the loader is given the slot's kernel, as QEMU's `-kernel`).
    pub bootloader: Option<String>,
}

/// An I2C device the image's `/init` instantiates (`echo <driver> <address> >
/// /sys/bus/i2c/devices/i2c-N/new_device` on the adapter whose `name` is `adapter`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct I2cDevice {
    /// The adapter's `name` in sysfs (`SMBus I801 adapter at f000`, `SMBus stub driver`):
    /// stable across boots where adapter numbers are not.
    pub adapter: String,
    /// The kernel driver's device name (`tmp105`, `lm75`, `bme280`).
    pub driver: String,
    /// 7-bit address.
    pub address: u16,
}

/// The device of partition `n` of `disk`: `/dev/vda` 2 -> `/dev/vda2`, `/dev/mmcblk0` 2 ->
/// `/dev/mmcblk0p2` (a `p` when the disk's name ends in a digit). Shared by the image's
/// `/init` and the agent's A/B updates, which must agree on it.
pub fn partition(disk: &str, n: u8) -> String {
    if disk.ends_with(|c: char| c.is_ascii_digit()) {
        format!("{disk}p{n}")
    } else {
        format!("{disk}{n}")
    }
}

/// The bootloaders the image builder knows.
pub const BOOTLOADERS: &[&str] = &["u-boot", "direct"];

/// A validated board.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BoardConfig {
    /// The board's name (the file name without `.toml`).
    pub name: String,
    /// One line for humans.
    pub description: String,
    /// Named GPIO lines.
    pub gpio: BTreeMap<String, GpioLine>,
    /// Named sensors.
    pub sensors: BTreeMap<String, SensorSource>,
    /// Image and emulation settings.
    pub image: ImageSpec,
}

/// Every problem found in a board file (and the files it inherits).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct BoardError {
    pub source_name: String,
    pub problems: Vec<ConfigProblem>,
}

impl std::fmt::Display for BoardError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        crate::config::write_problems(f, &self.source_name, " in the board config", &self.problems)
    }
}

const TOP_KEYS: &[&str] = &[
    "name",
    "description",
    "inherit",
    "arch",
    "rust-target",
    "kernel",
    "qemu-machine",
    "qemu-devices",
    "modules",
    "i2c-devices",
    "console-shell",
    "disk",
    "bootloader",
    "gpio",
    "sensors",
];
const LINE_KEYS: &[&str] = &[
    "chip",
    "line",
    "sim",
    "direction",
    "active-low",
    "bias",
    "drive",
];
const SENSOR_KINDS: &[&str] = &["iio", "hwmon", "w1", "i2c", "sim"];

fn problem(key: &str, text: impl Into<String>) -> ConfigProblem {
    ConfigProblem {
        key: key.to_string(),
        problem: text.into(),
    }
}

/// Reads the TOML table of `path`, following `inherit` (relative to the file) and merging:
/// tables merge key by key, anything else in the child replaces the parent's.
fn load_merged(path: &Path, depth: usize) -> Result<toml::Table, BoardError> {
    let fail = |problems| BoardError {
        source_name: path.display().to_string(),
        problems,
    };
    if depth > MAX_INHERIT_DEPTH {
        return Err(fail(vec![problem(
            "inherit",
            format!("more than {MAX_INHERIT_DEPTH} levels of `inherit`: is there a cycle?"),
        )]));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| fail(vec![problem("", format!("cannot read the file: {e}"))]))?;
    let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        fail(vec![problem(
            "",
            format!("not valid TOML: {}", e.to_string().trim()),
        )])
    })?;
    let Some(parent) = table.remove("inherit") else {
        return Ok(table);
    };
    let Some(parent) = parent.as_str() else {
        return Err(fail(vec![problem(
            "inherit",
            "expected the file name of the base board, e.g. `inherit = \"raspberry-pi-4.toml\"`",
        )]));
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut base = load_merged(&dir.join(parent), depth + 1)?;
    // The child's name and description are its own, never inherited defaults.
    base.remove("name");
    merge(&mut base, table);
    Ok(base)
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

impl BoardConfig {
    /// Loads and validates a board file (following `inherit`). The name defaults to the
    /// file name without `.toml`.
    pub fn load(path: &Path) -> Result<Self, BoardError> {
        let table = load_merged(path, 0)?;
        let default_name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self::from_table(table, &default_name).map_err(|problems| BoardError {
            source_name: path.display().to_string(),
            problems,
        })
    }

    /// The board file at `path` with its `inherit` chain merged in: one self-contained TOML
    /// document (what a firmware image ships in `/etc/perch/boards/`).
    pub fn flattened(path: &Path) -> Result<String, BoardError> {
        let table = load_merged(path, 0)?;
        toml::to_string(&table).map_err(|e| BoardError {
            source_name: path.display().to_string(),
            problems: vec![problem("", format!("cannot write the merged board: {e}"))],
        })
    }

    /// Finds board `name_or_path`: a path to a `.toml` file, or a name looked up as
    /// `<dir>/<name>.toml` in `dirs`, in order.
    pub fn find(name_or_path: &str, dirs: &[PathBuf]) -> Result<PathBuf, String> {
        let p = Path::new(name_or_path);
        if name_or_path.ends_with(".toml") || name_or_path.contains('/') {
            return if p.is_file() {
                Ok(p.to_path_buf())
            } else {
                Err(format!("board file {} does not exist", p.display()))
            };
        }
        for dir in dirs {
            let candidate = dir.join(format!("{name_or_path}.toml"));
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
        let mut known: Vec<String> = dirs
            .iter()
            .filter_map(|d| std::fs::read_dir(d).ok())
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".toml").map(str::to_string)
            })
            .collect();
        known.sort();
        known.dedup();
        Err(format!(
            "no board named `{name_or_path}` in {} (known boards: {})",
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        ))
    }

    /// Validates an already parsed board table (no `inherit`), named `name` unless it says
    /// otherwise.
    pub fn from_toml_table(table: toml::Table, name: &str) -> Result<Self, BoardError> {
        Self::from_table(table, name).map_err(|problems| BoardError {
            source_name: format!("board `{name}`"),
            problems,
        })
    }

    fn from_table(table: toml::Table, default_name: &str) -> Result<Self, Vec<ConfigProblem>> {
        let mut problems = Vec::new();
        let mut board = BoardConfig {
            name: default_name.to_string(),
            description: String::new(),
            gpio: BTreeMap::new(),
            sensors: BTreeMap::new(),
            image: ImageSpec::default(),
        };
        let mut root = Walker::new("", table, &mut problems);
        if let Some(n) = root.take::<String>("name") {
            board.name = n;
        }
        if let Some(d) = root.take::<String>("description") {
            board.description = d;
        }
        board.image.arch = root.take::<String>("arch");
        if let Some(a) = &board.image.arch
            && !["x86_64", "aarch64", "armv7"].contains(&a.as_str())
        {
            root.problem(
                "arch",
                format!("`{a}` is not an architecture: use x86_64, aarch64 or armv7"),
            );
        }
        board.image.rust_target = root.take::<String>("rust-target");
        board.image.kernel = root.take::<String>("kernel");
        board.image.qemu_machine = root.take::<String>("qemu-machine");
        board.image.qemu_devices = root.take::<Vec<String>>("qemu-devices").unwrap_or_default();
        for (i, entry) in root
            .take::<Vec<String>>("modules")
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            match parse_module(&entry) {
                Ok((name, params)) => {
                    if !params.is_empty() {
                        board.image.module_params.insert(name.clone(), params);
                    }
                    board.image.modules.push(name);
                }
                Err(e) => root.problem(&format!("modules[{i}]"), e),
            }
        }
        if let Some(devices) = root.take::<Vec<toml::Table>>("i2c-devices") {
            for (i, table) in devices.into_iter().enumerate() {
                let key = format!("i2c-devices[{i}]");
                match parse_i2c_device(table) {
                    Ok(d) => board.image.i2c_devices.push(d),
                    Err(e) => root.problem(&key, e),
                }
            }
        }
        board.image.console_shell = root.take::<bool>("console-shell").unwrap_or(false);
        board.image.disk = root.take::<String>("disk");
        if let Some(d) = &board.image.disk
            && !d.starts_with("/dev/")
        {
            root.problem(
                "disk",
                format!("`{d}` is not a block device: expected a path like `/dev/mmcblk0`"),
            );
        }
        board.image.bootloader = root.take::<String>("bootloader");
        if let Some(b) = &board.image.bootloader
            && !BOOTLOADERS.contains(&b.as_str())
        {
            root.problem(
                "bootloader",
                format!(
                    "`{b}` is not a bootloader: use {}",
                    BOOTLOADERS.join(" or ")
                ),
            );
        }
        if let Some(mut gpio) = root.section("gpio") {
            let names: Vec<String> = gpio.table.keys().cloned().collect();
            for name in names {
                if let Some(line) = gpio.section(&name).and_then(parse_line) {
                    board.gpio.insert(name, line);
                }
            }
        }
        if let Some(mut sensors) = root.section("sensors") {
            let names: Vec<String> = sensors.table.keys().cloned().collect();
            for name in names {
                if let Some(source) = sensors.section(&name).and_then(parse_sensor) {
                    board.sensors.insert(name, source);
                }
            }
        }
        root.finish(TOP_KEYS);
        if problems.is_empty() {
            Ok(board)
        } else {
            Err(problems)
        }
    }
}

/// A `modules` entry: a module name, then its parameters (`key=value`), as in
/// `/etc/modules`. Both end up in the image's `/init`, so only characters that need no
/// quoting in a shell are accepted.
fn parse_module(entry: &str) -> Result<(String, Vec<String>), String> {
    let mut words = entry.split_whitespace();
    let name = words
        .next()
        .ok_or_else(|| "empty: write a module name, e.g. `\"i2c_dev\"`".to_string())?;
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(format!(
            "`{name}` is not a module name (letters, digits, `_` and `-`)"
        ));
    }
    let mut params = Vec::new();
    for p in words {
        let ok = p.split_once('=').is_some_and(|(k, v)| {
            !k.is_empty()
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.,:/+-".contains(c))
        });
        if !ok {
            return Err(format!(
                "`{p}` is not a module parameter: write `name=value` (value of letters, digits and `_.,:/+-`), e.g. `\"{name} chip_addr=0x48\"`"
            ));
        }
        params.push(p.to_string());
    }
    Ok((name.to_string(), params))
}

/// An `i2c-devices` entry: `{ adapter = "SMBus stub driver", driver = "tmp105", address =
/// 0x48 }`.
fn parse_i2c_device(mut t: toml::Table) -> Result<I2cDevice, String> {
    const EXAMPLE: &str =
        "write `{ adapter = \"SMBus stub driver\", driver = \"tmp105\", address = 0x48 }`";
    let adapter = t
        .remove("adapter")
        .and_then(|v| v.as_str().map(String::from));
    let driver = t
        .remove("driver")
        .and_then(|v| v.as_str().map(String::from));
    let address = t.remove("address").and_then(|v| v.as_integer());
    if let Some(k) = t.keys().next() {
        return Err(format!("unknown key `{k}`: {EXAMPLE}"));
    }
    let (Some(adapter), Some(driver), Some(address)) = (adapter, driver, address) else {
        return Err(format!(
            "needs `adapter`, `driver` and `address`: {EXAMPLE}"
        ));
    };
    // `/init` compares the adapter's name in single quotes and writes the driver unquoted.
    if adapter.is_empty() || adapter.contains(['\'', '\\', '\n']) {
        return Err(format!(
            "adapter `{adapter}` is not an adapter name (as in /sys/bus/i2c/devices/i2c-N/name)"
        ));
    }
    if driver.is_empty()
        || !driver
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-,".contains(c))
    {
        return Err(format!("`{driver}` is not a driver name, e.g. `tmp105`"));
    }
    if !(0x03..=0x77).contains(&address) {
        return Err(format!(
            "address {address:#x} is not a 7-bit device address (0x03 to 0x77)"
        ));
    }
    Ok(I2cDevice {
        adapter,
        driver,
        address: address as u16,
    })
}

fn parse_line(mut w: Walker<'_>) -> Option<GpioLine> {
    let chip = w.take::<String>("chip");
    let line = w.take::<u32>("line");
    let sim = w.take::<bool>("sim").unwrap_or(false);
    let source = match (chip, line, sim) {
        (Some(chip), Some(line), false) => Some(LineSource::Chip { chip, line }),
        (None, None, true) => Some(LineSource::Sim),
        _ => {
            w.problem(
                "",
                "a line is either `chip = \"gpiochip0\"` with `line = 17`, or `sim = true`",
            );
            None
        }
    };
    let direction = match w.take::<String>("direction").as_deref() {
        Some("input") => Some(Direction::Input),
        Some("output") => Some(Direction::Output),
        Some(other) => {
            w.problem(
                "direction",
                format!("`{other}` is not a direction: use `input` or `output`"),
            );
            None
        }
        None => {
            w.problem(
                "direction",
                "missing: write `direction = \"input\"` or `\"output\"`",
            );
            None
        }
    };
    let active_low = w.take::<bool>("active-low").unwrap_or(false);
    let bias = match w.take::<String>("bias").as_deref() {
        None => None,
        Some("disabled") => Some(Bias::Disabled),
        Some("pull-up") => Some(Bias::PullUp),
        Some("pull-down") => Some(Bias::PullDown),
        Some(other) => {
            w.problem(
                "bias",
                format!("`{other}` is not a bias: use disabled, pull-up or pull-down"),
            );
            None
        }
    };
    let drive = match w.take::<String>("drive").as_deref() {
        None => None,
        Some("push-pull") => Some(Drive::PushPull),
        Some("open-drain") => Some(Drive::OpenDrain),
        Some("open-source") => Some(Drive::OpenSource),
        Some(other) => {
            w.problem(
                "drive",
                format!("`{other}` is not a drive: use push-pull, open-drain or open-source"),
            );
            None
        }
    };
    if direction == Some(Direction::Input) && drive.is_some() {
        w.problem("drive", "only output lines have a drive");
    }
    w.finish(LINE_KEYS);
    Some(GpioLine {
        source: source?,
        direction: direction?,
        active_low,
        bias,
        drive,
    })
}

fn parse_sensor(mut w: Walker<'_>) -> Option<SensorSource> {
    let kinds: Vec<String> = w
        .table
        .keys()
        .filter(|k| SENSOR_KINDS.contains(&k.as_str()))
        .cloned()
        .collect();
    if kinds.len() != 1 {
        let found = if kinds.is_empty() {
            "none".into()
        } else {
            kinds.join(", ")
        };
        w.problem(
            "",
            format!(
                "a sensor has exactly one source of {}, found {found}",
                SENSOR_KINDS.join(", ")
            ),
        );
        w.table.retain(|k, _| !SENSOR_KINDS.contains(&k));
        w.finish(SENSOR_KINDS);
        return None;
    }
    let source = match kinds[0].as_str() {
        "w1" => w.take::<String>("w1").map(SensorSource::W1),
        "sim" => w.take::<String>("sim").map(SensorSource::Sim),
        "iio" => w.section("iio").and_then(|mut s| {
            let device = s.take::<String>("device");
            let channel = s.take::<String>("channel");
            if device.is_none() || channel.is_none() {
                s.problem("", "write `{ device = \"bmp280\", channel = \"in_temp\" }`");
            }
            s.finish(&["device", "channel"]);
            Some(SensorSource::Iio {
                device: device?,
                channel: channel?,
            })
        }),
        "hwmon" => w.section("hwmon").and_then(|mut s| {
            let name = s.take::<String>("name");
            let input = s.take::<String>("input");
            if name.is_none() || input.is_none() {
                s.problem("", "write `{ name = \"cpu_thermal\", input = \"temp1\" }`");
            }
            s.finish(&["name", "input"]);
            Some(SensorSource::Hwmon {
                name: name?,
                input: input?,
            })
        }),
        _ => w.section("i2c").and_then(|mut s| {
            let bus = s.take::<u32>("bus");
            let address = s.take::<u16>("address");
            let register = s.take::<u8>("register");
            let scale = s.take::<String>("scale").unwrap_or_else(|| "1".into());
            let unit = s.take::<String>("unit").unwrap_or_default();
            if bus.is_none() || address.is_none() || register.is_none() {
                s.problem(
                    "",
                    "write `{ bus = 1, address = 0x48, register = 0, scale = \"0.00390625\", unit = \"°C\" }`",
                );
            }
            s.finish(&["bus", "address", "register", "scale", "unit"]);
            Some(SensorSource::I2c {
                bus: bus?,
                address: address?,
                register: register?,
                scale,
                unit,
            })
        }),
    };
    w.finish(SENSOR_KINDS);
    source
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    #[test]
    fn a_variant_inherits_and_overrides() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            dir.path(),
            "base.toml",
            r#"
description = "base"
arch = "aarch64"
[gpio.fan]
chip = "gpiochip0"
line = 17
direction = "output"
[sensors.cpu-temp]
hwmon = { name = "cpu_thermal", input = "temp1" }
"#,
        );
        let variant = write(
            dir.path(),
            "variant.toml",
            r#"
inherit = "base.toml"
description = "variant"
[gpio.fan]
line = 18
[sensors.room-temp]
w1 = "28-0000"
"#,
        );
        let b = BoardConfig::load(&variant).expect("valid");
        assert_eq!(b.name, "variant");
        assert_eq!(b.description, "variant");
        assert_eq!(b.image.arch.as_deref(), Some("aarch64"));
        assert_eq!(
            b.gpio["fan"].source,
            LineSource::Chip {
                chip: "gpiochip0".into(),
                line: 18
            }
        );
        assert_eq!(b.sensors.len(), 2);

        // Flattened, the variant stands alone: the same board without its base file.
        let flat = BoardConfig::flattened(&variant).expect("flattened");
        assert!(!flat.contains("inherit"), "{flat}");
        let alone = tempfile::tempdir().expect("tempdir");
        let f = BoardConfig::load(&write(alone.path(), "variant.toml", &flat)).expect("valid");
        assert_eq!((f.gpio, f.sensors, f.image), (b.gpio, b.sensors, b.image));
    }

    #[test]
    fn every_problem_is_listed_with_its_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = write(
            dir.path(),
            "bad.toml",
            r#"
arch = "riscv"
[gpio.fan]
chip = "gpiochip0"
direction = "sideways"
[gpio.button]
sim = true
direction = "input"
drive = "push-pull"
[sensors.room-temp]
w1 = "28-0000"
hwmon = { name = "x", input = "temp1" }
[sensors.cpu]
hwmon = { name = "cpu_thermal" }
"#,
        );
        let e = BoardConfig::load(&p).expect_err("invalid");
        let text: Vec<String> = e.problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "arch: `riscv` is not an architecture: use x86_64, aarch64 or armv7",
                "gpio.button.drive: only output lines have a drive",
                "gpio.fan: a line is either `chip = \"gpiochip0\"` with `line = 17`, or `sim = true`",
                "gpio.fan.direction: `sideways` is not a direction: use `input` or `output`",
                "sensors.cpu.hwmon: write `{ name = \"cpu_thermal\", input = \"temp1\" }`",
                "sensors.room-temp: a sensor has exactly one source of iio, hwmon, w1, i2c, sim, found hwmon, w1",
            ]
        );
    }

    #[test]
    fn module_parameters_and_i2c_devices_are_parsed_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = write(
            dir.path(),
            "good.toml",
            r#"
modules = ["i2c_dev", "i2c_stub chip_addr=0x48,0x49", "lm75"]
i2c-devices = [{ adapter = "SMBus stub driver", driver = "tmp105", address = 0x48 }]
console-shell = true
"#,
        );
        let b = BoardConfig::load(&good).expect("valid");
        assert_eq!(b.image.modules, ["i2c_dev", "i2c_stub", "lm75"]);
        assert_eq!(
            b.image.module_params,
            BTreeMap::from([(
                "i2c_stub".to_string(),
                vec!["chip_addr=0x48,0x49".to_string()]
            )])
        );
        assert_eq!(
            b.image.i2c_devices,
            [I2cDevice {
                adapter: "SMBus stub driver".into(),
                driver: "tmp105".into(),
                address: 0x48
            }]
        );
        assert!(b.image.console_shell);

        let bad = write(
            dir.path(),
            "bad.toml",
            r#"
modules = ["i2c_stub chip_addr=$(reboot)", "lm 75", ""]
i2c-devices = [
  { adapter = "x'; reboot; '", driver = "tmp105", address = 0x48 },
  { adapter = "SMBus stub driver", driver = "tmp105", address = 0x80 },
  { adapter = "SMBus stub driver", driver = "tmp105" },
]
"#,
        );
        let e = BoardConfig::load(&bad).expect_err("invalid");
        let text: Vec<String> = e.problems.iter().map(ToString::to_string).collect();
        assert_eq!(text.len(), 6, "{text:#?}");
        for (key, says) in [
            (
                "modules[0]",
                "`chip_addr=$(reboot)` is not a module parameter",
            ),
            ("modules[1]", "`75` is not a module parameter"),
            ("modules[2]", "empty"),
            ("i2c-devices[0]", "is not an adapter name"),
            ("i2c-devices[1]", "0x80 is not a 7-bit device address"),
            ("i2c-devices[2]", "needs `adapter`, `driver` and `address`"),
        ] {
            assert!(
                text.iter()
                    .any(|t| t.starts_with(&format!("{key}: ")) && t.contains(says)),
                "no `{key}: ...{says}...` in {text:#?}"
            );
        }
    }

    #[test]
    fn boards_are_found_by_name_or_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "sim.toml", "");
        let dirs = [dir.path().to_path_buf()];
        assert!(BoardConfig::find("sim", &dirs).is_ok());
        let e = BoardConfig::find("rpi9", &dirs).expect_err("unknown");
        assert!(
            e.contains("no board named `rpi9`") && e.contains("known boards: sim"),
            "{e}"
        );
        assert!(BoardConfig::find("/nonexistent/x.toml", &dirs).is_err());
    }

    #[test]
    fn every_shipped_board_config_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../board-configs");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("board-configs/") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                let b = BoardConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
                assert!(
                    !b.description.is_empty(),
                    "{} has no description",
                    path.display()
                );
                n += 1;
            }
        }
        assert!(n >= 6, "only {n} boards");
        let pi3 = BoardConfig::load(&dir.join("raspberry-pi-3-armv7.toml")).expect("pi3");
        assert_eq!(pi3.image.arch.as_deref(), Some("armv7"));
        assert!(
            pi3.sensors.contains_key("room-temp"),
            "inherited from the Pi 4"
        );
    }

    #[test]
    fn an_inherit_cycle_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = write(dir.path(), "a.toml", "inherit = \"b.toml\"\n");
        write(dir.path(), "b.toml", "inherit = \"a.toml\"\n");
        let e = BoardConfig::load(&a).expect_err("cycle");
        assert!(e.to_string().contains("is there a cycle?"), "{e}");
    }
}
