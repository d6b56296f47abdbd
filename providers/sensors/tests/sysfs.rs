//! The sysfs backends against temp dirs shaped exactly like the kernel's trees, quirks
//! included: IIO raw/offset/scale (own and shared), hwmon millidegrees, the 1-Wire CRC line,
//! devices renumbered or unplugged and plugged back in.

use std::path::Path;

use perch_provider_sensors::{SensorError, Source, Sysfs};

fn write(root: &Path, rel: &str, content: &str) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, content).expect("write");
}

fn iio(device: &str, channel: &str) -> Source {
    Source::Iio {
        device: device.into(),
        channel: channel.into(),
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-6
}

#[test]
fn iio_applies_offset_and_scale_and_converts_units() {
    let sys = tempfile::tempdir().expect("tempdir");
    let root = sys.path();
    // A BMP280: temperature scale 10 (milli-°C per LSB), pressure in kPa with a tiny scale.
    write(root, "bus/iio/devices/iio:device0/name", "ads1015\n");
    write(
        root,
        "bus/iio/devices/iio:device0/in_voltage0_raw",
        "1000\n",
    );
    // Shared by every voltage channel of the device.
    write(
        root,
        "bus/iio/devices/iio:device0/in_voltage_scale",
        "0.805664062\n",
    );
    write(root, "bus/iio/devices/iio:device1/name", "bmp280\n");
    write(root, "bus/iio/devices/iio:device1/in_temp_raw", "2350\n");
    write(root, "bus/iio/devices/iio:device1/in_temp_scale", "10\n");
    write(
        root,
        "bus/iio/devices/iio:device1/in_pressure_raw",
        "25281\n",
    );
    write(
        root,
        "bus/iio/devices/iio:device1/in_pressure_scale",
        "0.004\n",
    );
    write(root, "bus/iio/devices/iio:device2/name", "sht4x\n");
    write(root, "bus/iio/devices/iio:device2/in_temp_raw", "100\n");
    write(root, "bus/iio/devices/iio:device2/in_temp_offset", "-50\n");
    write(root, "bus/iio/devices/iio:device2/in_temp_scale", "500\n");
    let s = Sysfs::new(root);

    let t = s
        .read("room-temp", &iio("bmp280", "in_temp"))
        .expect("temp");
    assert!(close(t.value, 23.5) && t.unit == "°C", "{t:?}");
    let p = s
        .read("pressure", &iio("bmp280", "in_pressure"))
        .expect("pressure");
    assert!(close(p.value, 1011.24) && p.unit == "hPa", "{p:?}");
    let o = s.read("probe", &iio("sht4x", "in_temp")).expect("offset");
    assert!(close(o.value, 25.0), "{o:?}");
    let v = s
        .read("battery", &iio("ads1015", "in_voltage0"))
        .expect("voltage");
    assert!(close(v.value, 0.805664062) && v.unit == "V", "{v:?}");

    let e = s
        .read("x", &iio("bmp280", "in_accel_x"))
        .expect_err("unsupported");
    assert!(matches!(e, SensorError::Unsupported { .. }), "{e}");
}

#[test]
fn hwmon_is_found_by_name_whatever_its_number() {
    let sys = tempfile::tempdir().expect("tempdir");
    let root = sys.path();
    write(root, "class/hwmon/hwmon0/name", "acpitz\n");
    write(root, "class/hwmon/hwmon0/temp1_input", "27800\n");
    write(root, "class/hwmon/hwmon3/name", "cpu_thermal\n");
    write(root, "class/hwmon/hwmon3/temp1_input", "48312\n");
    let s = Sysfs::new(root);
    let src = Source::Hwmon {
        name: "cpu_thermal".into(),
        input: "temp1".into(),
    };
    let t = s.read("cpu", &src).expect("read");
    assert!(close(t.value, 48.312) && t.unit == "°C", "{t:?}");

    // After a reboot the same chip is hwmon5.
    std::fs::rename(
        root.join("class/hwmon/hwmon3"),
        root.join("class/hwmon/hwmon5"),
    )
    .expect("rename");
    assert!(close(s.read("cpu", &src).expect("read").value, 48.312));

    write(root, "class/hwmon/hwmon5/temp1_input", "garbage\n");
    let e = s.read("cpu", &src).expect_err("malformed");
    assert_eq!(
        e.to_string(),
        format!(
            "sensor `cpu`: {} holds `garbage`, not a number",
            root.join("class/hwmon/hwmon5/temp1_input").display()
        )
    );
}

#[test]
fn one_wire_checks_the_crc_line_and_recovers_after_unplugging() {
    let sys = tempfile::tempdir().expect("tempdir");
    let root = sys.path();
    let id = "28-00000abcdef0";
    let slave = format!("bus/w1/devices/{id}/w1_slave");
    let good = "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57 t=23125\n";
    write(root, &slave, good);
    let s = Sysfs::new(root);
    let src = Source::W1(id.into());
    assert!(s.present(&src));
    let t = s.read("room-temp", &src).expect("read");
    assert!(close(t.value, 23.125) && t.unit == "°C", "{t:?}");

    // A noisy bus: the kernel says NO on the CRC line.
    write(
        root,
        &slave,
        "72 01 4b 46 7f ff 0e 10 58 : crc=12 NO\n72 01 4b 46 7f ff 0e 10 58 t=23125\n",
    );
    assert!(matches!(
        s.read("room-temp", &src),
        Err(SensorError::Crc { .. })
    ));

    // Unplugged: the device directory disappears.
    std::fs::remove_dir_all(root.join("bus/w1/devices").join(id)).expect("unplug");
    assert!(!s.present(&src));
    let e = s.read("room-temp", &src).expect_err("missing");
    assert!(matches!(e, SensorError::Missing { .. }), "{e}");
    assert!(
        e.to_string()
            .starts_with("sensor `room-temp` is not present"),
        "{e}"
    );

    // Plugged back in: reads work again without any restart.
    write(root, &slave, good);
    assert!(close(
        s.read("room-temp", &src).expect("back").value,
        23.125
    ));

    write(root, &slave, "nonsense\n");
    assert!(matches!(
        s.read("room-temp", &src),
        Err(SensorError::Malformed { .. })
    ));
}

#[test]
fn sources_parse_from_board_config_entries() {
    #[derive(serde::Deserialize)]
    struct Entry {
        source: Source,
    }
    let parse = |text: &str| toml::from_str::<Entry>(text).map(|e| e.source);
    assert_eq!(
        parse(r#"source = { w1 = "28-0000" }"#).expect("w1"),
        Source::W1("28-0000".into())
    );
    assert_eq!(
        parse(r#"source = { iio = { device = "bmp280", channel = "in_temp" } }"#).expect("iio"),
        iio("bmp280", "in_temp")
    );
    assert!(parse(r#"source = { hwmon = { name = "x" } }"#).is_err());
    assert!(parse(r#"source = { gpio = "x" }"#).is_err());
}
