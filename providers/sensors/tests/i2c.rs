//! I2C register sensors: decoding and scaling through a fake adapter (there is no I2C
//! hardware here), config validation, the real `/dev/i2c-N` backend against a temp dir, and a
//! read from a kernel adapter when `PERCH_TEST_I2C` names one.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use perch_provider_sensors::{BusError, DevI2c, I2c, I2cBus, I2cRegister, SensorError};

/// Registers by (bus, address, register); an address without registers does not answer, and
/// the whole adapter can be unplugged.
#[derive(Debug, Default)]
struct FakeAdapter {
    registers: Mutex<HashMap<(u32, u16, u8), u16>>,
    unplugged: AtomicBool,
}

impl FakeAdapter {
    fn set(&self, bus: u32, address: u16, register: u8, word: u16) {
        self.registers
            .lock()
            .expect("lock")
            .insert((bus, address, register), word);
    }
}

impl I2cBus for FakeAdapter {
    fn read_register(&self, bus: u32, address: u16, register: u8) -> Result<u16, BusError> {
        let path = PathBuf::from(format!("/dev/i2c-{bus}"));
        if self.unplugged.load(Ordering::SeqCst) {
            return Err(BusError::Missing { path });
        }
        let registers = self.registers.lock().expect("lock");
        registers
            .get(&(bus, address, register))
            .copied()
            .ok_or_else(|| BusError::Io {
                path,
                message: "reading the register: Remote I/O error (os error 121)".into(),
            })
    }
}

/// A TMP105/LM75 temperature register: 1/256 °C per count.
fn tmp105(bus: u32) -> I2cRegister {
    I2cRegister::new("room-temp", bus, 0x48, 0, "0.00390625", "°C").expect("valid config")
}

#[test]
fn registers_are_signed_big_endian_and_scaled() {
    let adapter = Arc::new(FakeAdapter::default());
    let i2c = I2c::new(adapter.clone());
    let sensor = tmp105(1);

    adapter.set(1, 0x48, 0, 0x1910);
    let v = i2c.read("room-temp", &sensor).expect("read");
    assert_eq!((v.value, v.unit), (25.0625, "°C"));

    // Below zero: two's complement.
    adapter.set(1, 0x48, 0, 0xe700);
    assert_eq!(i2c.read("room-temp", &sensor).expect("read").value, -25.0);
    adapter.set(1, 0x48, 0, 0xfff0);
    assert_eq!(i2c.read("room-temp", &sensor).expect("read").value, -0.0625);
    adapter.set(1, 0x48, 0, 0x7fff);
    assert_eq!(
        i2c.read("room-temp", &sensor).expect("read").value,
        32767.0 / 256.0
    );

    // Another register of another device, with its own scale and unit.
    let humidity = I2cRegister::new("humidity", 3, 0x40, 2, "0.01", "%").expect("valid");
    adapter.set(3, 0x40, 2, 4512);
    let h = i2c.read("humidity", &humidity).expect("read");
    assert!((h.value - 45.12).abs() < 1e-9 && h.unit == "%", "{h:?}");
}

#[test]
fn scale_unit_and_address_are_checked_with_clear_errors() {
    let config = |scale: &str, unit: &str, address: u16| {
        I2cRegister::new("room-temp", 1, address, 0, scale, unit)
    };
    assert_eq!(config(" 0.5 ", "°C", 0x48).expect("trimmed").scale, 0.5);
    assert_eq!(config("1e-3", "V", 0x48).expect("exponent").scale, 0.001);
    assert_eq!(config("-2", "A", 0x48).expect("negative").scale, -2.0);

    for bad in ["1/256", "", "0,5", "NaN", "inf", "0"] {
        let e = config(bad, "°C", 0x48).expect_err(bad);
        assert_eq!(
            e.to_string(),
            format!(
                "sensor `room-temp`: I2C scale `{bad}` is not a non-zero decimal number (like \"0.00390625\")"
            )
        );
    }
    let e = config("1", "degC", 0x48).expect_err("unit");
    assert!(matches!(e, SensorError::Config { .. }), "{e}");
    assert!(
        e.to_string()
            .starts_with("sensor `room-temp`: unit `degC` is not one of °C, K, %, hPa"),
        "{e}"
    );
    assert_eq!(
        config("1", "°C", 0x148).expect_err("10-bit").to_string(),
        "sensor `room-temp`: I2C address 0x148 is not a 7-bit address (0x00 to 0x7f)"
    );
}

#[test]
fn a_device_that_does_not_answer_names_bus_address_and_register() {
    let adapter = Arc::new(FakeAdapter::default());
    let i2c = I2c::new(adapter);
    let e = i2c.read("room-temp", &tmp105(1)).expect_err("nak");
    assert_eq!(
        e,
        SensorError::I2c {
            sensor: "room-temp".into(),
            bus: 1,
            address: 0x48,
            register: 0,
            path: "/dev/i2c-1".into(),
            message: "reading the register: Remote I/O error (os error 121)".into(),
        }
    );
    assert_eq!(
        e.to_string(),
        "sensor `room-temp`: I2C device 0x48 on bus 1 (/dev/i2c-1), register 0x00: \
         reading the register: Remote I/O error (os error 121)"
    );
}

#[test]
fn reads_recover_when_the_adapter_comes_back() {
    let adapter = Arc::new(FakeAdapter::default());
    adapter.set(1, 0x48, 0, 0x1910);
    let i2c = I2c::new(adapter.clone());
    let sensor = tmp105(1);
    assert_eq!(i2c.read("room-temp", &sensor).expect("read").value, 25.0625);

    adapter.unplugged.store(true, Ordering::SeqCst);
    let e = i2c.read("room-temp", &sensor).expect_err("unplugged");
    assert!(matches!(e, SensorError::Missing { .. }), "{e}");
    assert!(
        e.to_string().starts_with(
            "sensor `room-temp` is not present: I2C adapter /dev/i2c-1 does not exist"
        ),
        "{e}"
    );

    adapter.unplugged.store(false, Ordering::SeqCst);
    adapter.set(1, 0x48, 0, 0x1a00);
    assert_eq!(i2c.read("room-temp", &sensor).expect("back").value, 26.0);
}

#[test]
fn a_missing_adapter_file_is_missing_and_a_file_that_is_no_adapter_is_an_io_error() {
    let dev = tempfile::tempdir().expect("tempdir");
    let i2c = I2c::new(Arc::new(DevI2c::new(dev.path())));
    let path = dev.path().join("i2c-7");
    let sensor = tmp105(7);

    let e = i2c.read("room-temp", &sensor).expect_err("no adapter");
    assert_eq!(
        e,
        SensorError::Missing {
            sensor: "room-temp".into(),
            what: format!(
                "I2C adapter {} does not exist (adapter gone, or the i2c-dev module not loaded)",
                path.display()
            ),
        }
    );

    // Something at the path that does not answer I2C ioctls (ENOTTY).
    std::fs::write(&path, "").expect("regular file");
    let e = i2c.read("room-temp", &sensor).expect_err("not an adapter");
    match &e {
        SensorError::I2c {
            bus: 7,
            address: 0x48,
            path: p,
            message,
            ..
        } => {
            assert_eq!(p, &path);
            assert!(message.starts_with("selecting the address: "), "{message}");
        }
        other => panic!("expected an I2C error, got {other:?}"),
    }

    // Gone again: nothing was cached from the failed attempt.
    std::fs::remove_file(&path).expect("rm");
    assert!(matches!(
        i2c.read("room-temp", &sensor),
        Err(SensorError::Missing { .. })
    ));
}

/// Reads a register of a real device: `PERCH_TEST_I2C="bus:address:register"` (numbers
/// decimal or `0x` hex), e.g. `0:0x48:0` for the TMP105 of the `qemu-x86_64` board (the
/// lm75 driver owns it, so this also takes the I2C_SLAVE_FORCE path). The register is taken
/// to be an LM75-style temperature register (1/256 °C per count): the test checks the
/// value is within such a sensor's range (−55 to 150 °C).
#[test]
#[ignore = "needs an I2C adapter with a temperature sensor: set PERCH_TEST_I2C=bus:addr:reg"]
fn a_kernel_adapter_reads_a_temperature_register() {
    let spec = std::env::var("PERCH_TEST_I2C").expect("PERCH_TEST_I2C=bus:address:register");
    let number = |s: &str| -> u32 {
        match s.strip_prefix("0x") {
            Some(hex) => u32::from_str_radix(hex, 16),
            None => s.parse(),
        }
        .unwrap_or_else(|_| panic!("`{s}` in PERCH_TEST_I2C={spec} is not a number"))
    };
    let parts: Vec<u32> = spec.split(':').map(number).collect();
    let [bus, address, register] = parts[..] else {
        panic!("PERCH_TEST_I2C={spec} is not bus:address:register");
    };
    let sensor = I2cRegister::new(
        "i2c-test",
        bus,
        u16::try_from(address).expect("address"),
        u8::try_from(register).expect("register"),
        "0.00390625",
        "°C",
    )
    .expect("valid config");
    let i2c = I2c::default();
    // Twice: the second read goes through the cached device.
    for _ in 0..2 {
        let v = i2c.read("i2c-test", &sensor).expect("read the register");
        eprintln!("i2c-{bus} 0x{address:02x} register {register}: {v:?}");
        assert!((-55.0..=150.0).contains(&v.value), "{v:?}");
    }
}
