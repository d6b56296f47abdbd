//! The character-device backend against a temp dir as device root: what happens without a
//! chip, with something at the chip's path that is not a chip, and when the chip comes and
//! goes; the edge watchers' retry and shutdown. The last test drives a kernel GPIO chip and
//! runs only when one is named by `PERCH_TEST_GPIOCHIP`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use perch_provider_gpio::{
    CdevBackend, Direction, EdgeSink, GpioBackend, GpioError, LineConfig, RETRY_INTERVAL,
};

fn line(chip: &str, offset: u32, direction: Direction) -> LineConfig {
    LineConfig {
        chip: chip.into(),
        offset,
        direction,
        active_low: false,
        bias: None,
        drive: None,
    }
}

/// A `fan` output on line 17 and a `button` input on line 4, both on `gpiochip0`.
fn fan_and_button() -> BTreeMap<String, LineConfig> {
    BTreeMap::from([
        ("fan".into(), line("gpiochip0", 17, Direction::Output)),
        ("button".into(), line("gpiochip0", 4, Direction::Input)),
    ])
}

#[test]
fn a_missing_chip_is_a_typed_error_naming_line_chip_and_path() {
    let dev = tempfile::tempdir().expect("tempdir");
    let gpio = CdevBackend::new(dev.path(), fan_and_button());
    let path = dev.path().join("gpiochip0");

    let e = gpio.read("fan").expect_err("no chip");
    assert_eq!(
        e,
        GpioError::ChipMissing {
            line: "fan".into(),
            chip: "gpiochip0".into(),
            path: path.clone(),
        }
    );
    assert_eq!(
        e.to_string(),
        format!(
            "GPIO line `fan`: chip `gpiochip0` is not present ({} does not exist)",
            path.display()
        )
    );
    assert!(matches!(
        gpio.write("fan", true),
        Err(GpioError::ChipMissing { .. })
    ));

    // One line each, in name order.
    assert_eq!(
        gpio.missing(),
        vec![
            format!(
                "GPIO line `button`: chip `gpiochip0` is not present ({} does not exist)",
                path.display()
            ),
            e.to_string(),
        ]
    );
}

#[test]
fn writing_an_input_or_an_unknown_line_is_refused() {
    let dev = tempfile::tempdir().expect("tempdir");
    let gpio = CdevBackend::new(dev.path(), fan_and_button());
    // Refused from the config alone, before the (missing) chip is involved.
    let e = gpio.write("button", true).expect_err("input");
    assert_eq!(
        e,
        GpioError::NotOutput {
            line: "button".into()
        }
    );
    assert_eq!(
        e.to_string(),
        "GPIO line `button` is an input and cannot be driven"
    );
    assert_eq!(
        gpio.read("relay"),
        Err(GpioError::UnknownLine {
            line: "relay".into()
        })
    );
    assert_eq!(
        gpio.write("relay", false).expect_err("unknown").to_string(),
        "no GPIO line named `relay` is configured"
    );
}

#[test]
fn something_at_the_chip_path_that_is_not_a_chip_is_named() {
    let dev = tempfile::tempdir().expect("tempdir");
    let path = dev.path().join("gpiochip0");
    std::fs::write(&path, "").expect("regular file");
    let gpio = CdevBackend::new(dev.path(), fan_and_button());
    let e = gpio.read("fan").expect_err("regular file");
    assert_eq!(
        e.to_string(),
        format!(
            "GPIO line `fan`: {} (chip `gpiochip0`) is not a character device",
            path.display()
        )
    );

    // A character device that is not a GPIO chip (the kernel's null device).
    std::fs::remove_file(&path).expect("rm");
    std::os::unix::fs::symlink("/dev/null", &path).expect("symlink");
    let e = gpio.read("button").expect_err("/dev/null");
    assert!(
        matches!(
            &e,
            GpioError::NotAChip {
                line,
                reason: "is a character device but not a GPIO chip",
                ..
            } if line == "button"
        ),
        "{e}"
    );
}

#[test]
fn every_call_requests_again_after_a_failure() {
    let dev = tempfile::tempdir().expect("tempdir");
    let path = dev.path().join("gpiochip0");
    let gpio = CdevBackend::new(dev.path(), fan_and_button());
    assert!(matches!(
        gpio.read("fan"),
        Err(GpioError::ChipMissing { .. })
    ));

    // Something appears at the path: the next call looks at it instead of repeating the
    // first failure.
    std::fs::write(&path, "").expect("regular file");
    assert!(matches!(gpio.read("fan"), Err(GpioError::NotAChip { .. })));
    assert_eq!(gpio.missing().len(), 2);

    // And it goes away again.
    std::fs::remove_file(&path).expect("rm");
    assert!(matches!(
        gpio.read("fan"),
        Err(GpioError::ChipMissing { .. })
    ));
}

#[test]
fn watchers_retry_a_missing_chip_and_end_when_the_backend_is_dropped() {
    let dev = tempfile::tempdir().expect("tempdir");
    let mut lines = fan_and_button();
    lines.insert("door".into(), line("gpiochip1", 0, Direction::Input));
    let gpio = CdevBackend::new(dev.path(), lines);
    let (tx, rx) = mpsc::channel();
    let sink: EdgeSink = Arc::new(move |line, level| {
        let _ = tx.send((line.to_string(), level));
    });
    gpio.watch(Arc::clone(&sink)).expect("watch");
    // One watcher per input line, each holding the sink.
    assert_eq!(Arc::strong_count(&sink), 3);
    assert_eq!(
        gpio.watch(Arc::clone(&sink)),
        Err(GpioError::AlreadyWatching)
    );
    assert!(rx.try_recv().is_err(), "no chip, no edges");

    // Dropping the backend wakes the watchers in their retry wait and joins them, well
    // before the next retry would be due.
    let started = Instant::now();
    drop(gpio);
    assert!(
        started.elapsed() < RETRY_INTERVAL,
        "{:?}",
        started.elapsed()
    );
    assert_eq!(Arc::strong_count(&sink), 1);
}

/// Reads, writes and edges on a kernel GPIO chip (a PL061 in QEMU, gpio-sim, a Raspberry
/// Pi). `PERCH_TEST_GPIOCHIP=/dev/gpiochipN` names the chip; `PERCH_TEST_GPIO_OUTPUT`
/// (default 0) a free line to drive and `PERCH_TEST_GPIO_INPUT` (default 1) a free line to
/// watch. Edges come either from the output itself, when `PERCH_TEST_GPIO_LOOPBACK=1` says
/// the two lines are wired together, or from outside within `PERCH_TEST_GPIO_EDGE_WAIT`
/// seconds (default 30): in QEMU's `virt` machine, line 3 of the PL061 is the power button,
/// pressed by `system_powerdown` on the monitor.
#[test]
#[ignore = "needs a kernel GPIO chip: set PERCH_TEST_GPIOCHIP"]
fn a_kernel_chip_is_read_written_and_watched() {
    let chip_path = PathBuf::from(
        std::env::var("PERCH_TEST_GPIOCHIP").expect("PERCH_TEST_GPIOCHIP=/dev/gpiochipN"),
    );
    let number = |var: &str, default: u32| -> u32 {
        std::env::var(var)
            .map(|v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{var}={v} is not a number"))
            })
            .unwrap_or(default)
    };
    let (out, input) = (
        number("PERCH_TEST_GPIO_OUTPUT", 0),
        number("PERCH_TEST_GPIO_INPUT", 1),
    );
    let loopback = std::env::var("PERCH_TEST_GPIO_LOOPBACK").is_ok_and(|v| v == "1");
    let wait = Duration::from_secs(number("PERCH_TEST_GPIO_EDGE_WAIT", 30).into());
    let dev_root = chip_path.parent().unwrap_or(Path::new("/dev"));
    let chip = chip_path
        .file_name()
        .and_then(|n| n.to_str())
        .expect("a chip file name");
    let lines = BTreeMap::from([
        ("out".to_string(), line(chip, out, Direction::Output)),
        ("in".to_string(), line(chip, input, Direction::Input)),
    ]);
    let gpio = CdevBackend::new(dev_root, lines);
    assert_eq!(gpio.missing(), Vec::<String>::new());

    // Outputs start inactive and read back what was driven.
    assert_eq!(gpio.read("out"), Ok(false));
    gpio.write("out", true).expect("drive high");
    assert_eq!(gpio.read("out"), Ok(true));
    gpio.write("out", false).expect("drive low");
    assert_eq!(gpio.read("out"), Ok(false));
    assert!(matches!(
        gpio.write("in", true),
        Err(GpioError::NotOutput { .. })
    ));

    // The agent holds its lines: a second request of one is refused, naming the holder.
    let other = CdevBackend::new(
        dev_root,
        BTreeMap::from([("again".to_string(), line(chip, out, Direction::Output))]),
    );
    match other.read("again") {
        Err(GpioError::Busy { consumer, .. }) => assert_eq!(consumer.as_deref(), Some("perchd")),
        r => panic!("expected Busy, got {r:?}"),
    }

    let level = gpio.read("in").expect("read the input");
    let (tx, rx) = mpsc::channel();
    gpio.watch(Arc::new(move |line, level| {
        let _ = tx.send((line.to_string(), level));
    }))
    .expect("watch");
    if loopback {
        gpio.write("out", !level).expect("toggle");
        let edge = rx.recv_timeout(Duration::from_secs(2)).expect("an edge");
        assert_eq!(edge, ("in".to_string(), !level));
        gpio.write("out", level).expect("toggle back");
        let edge = rx.recv_timeout(Duration::from_secs(2)).expect("an edge");
        assert_eq!(edge, ("in".to_string(), level));
    } else {
        eprintln!("waiting {wait:?} for an edge on line {input} of {chip}");
        let (name, mut last) = rx.recv_timeout(wait).expect("an edge from outside");
        assert_eq!(name, "in");
        // A button press is a pulse: once the edges stop, the line is where the last one
        // left it.
        while let Ok((_, level)) = rx.recv_timeout(Duration::from_secs(1)) {
            last = level;
        }
        assert_eq!(gpio.read("in"), Ok(last), "the level after the last edge");
    }
}
