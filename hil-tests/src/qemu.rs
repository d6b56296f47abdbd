//! QEMU machines for HIL tests.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Debian packages holding QEMU (pinned in `image/debian.lock`), unpacked into the cache
/// rather than installed, because Debian 12's `qemu-system-*` 7.2 conflicts with a newer
/// `qemu-utils` a machine may have. Their shared libraries are installed by
/// `scripts/setup.sh`.
pub const QEMU_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-system-arm",
    "qemu-system-common",
    "qemu-system-data",
    "seabios",
    "ipxe-qemu",
    "u-boot-qemu",
];

/// Where QEMU is unpacked: `PERCH_QEMU_DIR`, else `~/.cache/perch/qemu`.
pub fn qemu_dir() -> PathBuf {
    perch_image::debs::perch_cache("PERCH_QEMU_DIR", "qemu")
}

/// The QEMU system emulator for `arch` (`x86_64`, `aarch64`, `arm`): on `PATH`, else in
/// [`qemu_dir`], unpacked there from Debian's packages first if needed.
pub fn qemu_binary(arch: &str) -> Result<(PathBuf, Vec<PathBuf>)> {
    let name = format!("qemu-system-{arch}");
    if let Ok(out) = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        && out.status.success()
    {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        return Ok((p, Vec::new()));
    }
    let dir = qemu_dir();
    let root = dir.join("root");
    let bin = root.join("usr/bin").join(&name);
    if !bin.is_file() {
        eprintln!(
            "hil: unpacking QEMU from Debian packages into {}",
            dir.display()
        );
        let lock =
            perch_image::debs::read_lock(&perch_tests::repo_root().join("image/debian.lock"))?;
        let cache = perch_image::debs::cache_dir();
        for name in QEMU_PACKAGES {
            let pkg = lock
                .iter()
                .find(|p| p.name == *name)
                .with_context(|| format!("image/debian.lock pins no `{name}`"))?;
            let deb = perch_image::debs::fetch(pkg, &cache)?;
            perch_image::debs::unpack(&deb, &root)?;
        }
    }
    if !bin.is_file() {
        bail!("{} is not in the QEMU packages", bin.display());
    }
    let firmware = vec![
        root.join("usr/share/seabios"),
        root.join("usr/share/qemu"),
        root.join("usr/lib/ipxe/qemu"),
    ];
    Ok((bin, firmware))
}

/// The emulated CPU for `arch`, where the machine's default does not suit: `virt` boards
/// have no default 64-bit CPU, and the Cortex-A57 (ARMv8.0) is the cheapest to emulate
/// (`max` adds pointer authentication, which TCG emulates slowly).
fn cpu_model(arch: &str) -> Option<&'static str> {
    match arch {
        "aarch64" => Some("cortex-a57"),
        "arm" => Some("cortex-a15"),
        _ => None,
    }
}

/// How the machine starts the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// QEMU loads slot A's kernel and initramfs itself (`-kernel`, `-initrd`); a guest
    /// reboot ends QEMU.
    Direct { kernel: PathBuf, initrd: PathBuf },
    /// U-Boot (Debian's `u-boot-qemu`, `-bios`) runs the image's A/B boot script from the
    /// disk; a guest reboot goes through U-Boot again, as on the board.
    UBoot,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct MachineSpec {
    /// `x86_64`, `aarch64` or `arm`.
    pub arch: String,
    /// `q35`, `virt`, ...
    pub machine: String,
    pub boot: Boot,
    /// The whole disk (a raw image; writes reach it only when the guest flushes).
    pub disk: PathBuf,
    pub memory_mib: u32,
    /// Emulated devices (`-device` arguments) for the board's hardware.
    pub devices: Vec<String>,
}

/// U-Boot for QEMU's `arch` from the unpacked `u-boot-qemu`.
fn uboot_binary(arch: &str) -> Result<PathBuf> {
    let (_, _) = qemu_binary(arch)?;
    let board = match arch {
        "aarch64" => "qemu_arm64",
        "arm" => "qemu_arm",
        other => bail!("no U-Boot for QEMU's {other}"),
    };
    let bin = qemu_dir()
        .join("root/usr/lib/u-boot")
        .join(board)
        .join("u-boot.bin");
    if !bin.is_file() {
        bail!(
            "{} is missing: remove {} to unpack the QEMU packages again",
            bin.display(),
            qemu_dir().display()
        );
    }
    Ok(bin)
}

/// A running QEMU, killed when dropped; or a real board the tests reach over the network
/// ([`Machine::attach`]).
#[derive(Debug)]
pub struct Machine {
    child: Option<Child>,
    /// What QEMU booted; `None` for a real board.
    spec: Option<MachineSpec>,
    /// The agent's API base URL.
    base: String,
    console: PathBuf,
    qmp: PathBuf,
    _dir: tempfile::TempDir,
    http: reqwest::blocking::Client,
    booted: Instant,
}

impl Machine {
    /// Boots `spec` with the agent's port forwarded to a free loopback port.
    pub fn boot(spec: &MachineSpec) -> Result<Self> {
        let (qemu, firmware) = qemu_binary(&spec.arch)?;
        let dir = tempfile::tempdir()?;
        let console = dir.path().join("console.log");
        let qmp = dir.path().join("qmp.sock");
        let port = perch_tests::free_port();
        let mut cmd = Command::new(&qemu);
        for f in &firmware {
            if f.is_dir() {
                cmd.arg("-L").arg(f);
            }
        }
        let serial = match spec.arch.as_str() {
            "x86_64" => "ttyS0",
            _ => "ttyAMA0",
        };
        cmd.args(["-M", &spec.machine, "-m", &spec.memory_mib.to_string()])
            .args(["-accel", "tcg", "-smp", "1"]);
        if let Some(cpu) = cpu_model(&spec.arch) {
            cmd.args(["-cpu", cpu]);
        }
        cmd.arg("-nographic");
        match &spec.boot {
            Boot::Direct { kernel, initrd } => {
                cmd.arg("-no-reboot")
                    .arg("-kernel")
                    .arg(kernel)
                    .arg("-initrd")
                    .arg(initrd)
                    .args(["-append", &format!("console={serial} panic=-1 loglevel=6")]);
            }
            Boot::UBoot => {
                cmd.arg("-bios").arg(uboot_binary(&spec.arch)?);
            }
        }
        for d in &spec.devices {
            cmd.args(["-device", d]);
        }
        cmd.arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=raw,cache=writeback",
                spec.disk.display()
            ))
            .args([
                "-netdev",
                &format!(
                    "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:{}",
                    perch_image::AGENT_PORT
                ),
            ])
            .args(["-device", "virtio-net-pci,netdev=net0,romfile="])
            .args(["-serial", &format!("file:{}", console.display())])
            .args(["-monitor", "none"])
            .args([
                "-qmp",
                &format!("unix:{},server=on,wait=off", qmp.display()),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", qemu.display()))?;
        Ok(Self {
            child: Some(child),
            spec: Some(spec.clone()),
            base: format!("http://127.0.0.1:{port}"),
            console,
            qmp,
            _dir: dir,
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
            booted: Instant::now(),
        })
    }

    /// A real board running a Perch image, its agent's API at `target` (`host:port`): the
    /// same API helpers, but no console, QMP or power control.
    pub fn attach(target: &str) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        Ok(Self {
            child: None,
            spec: None,
            base: format!("http://{target}"),
            console: dir.path().join("console.log"),
            qmp: dir.path().join("qmp.sock"),
            _dir: dir,
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
            booted: Instant::now(),
        })
    }

    /// The real board `PERCH_HIL_TARGET` (`host:port`) names, if any: scenarios then run
    /// against it instead of QEMU, and those that need power control or a fresh disk say
    /// they cannot.
    pub fn target() -> Option<String> {
        std::env::var("PERCH_HIL_TARGET")
            .ok()
            .filter(|t| !t.is_empty())
    }

    /// Whether this is QEMU (console, QMP and power control available).
    pub fn emulated(&self) -> bool {
        self.spec.is_some()
    }

    /// The agent's API base URL on the host.
    pub fn api(&self) -> String {
        self.base.clone()
    }

    /// The last `lines` lines the guest printed.
    pub fn console_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.console).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn failed(&mut self, what: &str) -> anyhow::Error {
        let mut stderr = String::new();
        if let Some(c) = &mut self.child
            && let Ok(Some(_)) = c.try_wait()
            && let Some(e) = c.stderr.as_mut()
        {
            let _ = e.read_to_string(&mut stderr);
        }
        anyhow::anyhow!(
            "{what}\n--- QEMU stderr ---\n{stderr}\n--- guest console (last 40 lines) ---\n{}",
            self.console_tail(40)
        )
    }

    /// Waits until `GET /v1/health` answers; returns the time since power-on (polled
    /// every 100 ms).
    pub fn wait_healthy(&mut self, timeout: Duration) -> Result<Duration> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(r) = self.http.get(format!("{}/v1/health", self.api())).send()
                && r.status().is_success()
            {
                return Ok(self.booted.elapsed());
            }
            if let Some(c) = &mut self.child
                && let Ok(Some(status)) = c.try_wait()
            {
                return Err(self.failed(&format!(
                    "QEMU exited ({status}) before the agent was healthy"
                )));
            }
            if Instant::now() > deadline {
                return Err(self.failed(&format!("the agent was not healthy within {timeout:?}")));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the guest console shows `text`; returns the time since power-on (the
    /// console file is polled every 20 ms).
    pub fn wait_console(&mut self, text: &str, timeout: Duration) -> Result<Duration> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = std::fs::read(&self.console)
                .map(|b| String::from_utf8_lossy(&b).contains(text))
                .unwrap_or(false);
            if seen {
                return Ok(self.booted.elapsed());
            }
            if Instant::now() > deadline {
                return Err(self.failed(&format!(
                    "the console did not show `{text}` within {timeout:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The console line that marks the kernel taking over: U-Boot's `Starting kernel`, or
    /// the kernel's own first line for direct boots.
    pub fn kernel_start_marker(&self) -> &'static str {
        match self.spec.as_ref().map(|s| &s.boot) {
            Some(Boot::UBoot) => "Starting kernel",
            _ => "Linux version",
        }
    }

    /// `GET path` as JSON.
    pub fn get(&self, path: &str) -> Result<Value> {
        let r = self
            .http
            .get(format!("{}{path}", self.api()))
            .send()
            .with_context(|| format!("GET {path}"))?;
        Ok(r.json()?)
    }

    /// A request with a body; returns the status and JSON body.
    pub fn send(&self, method: &str, path: &str, body: Vec<u8>) -> Result<(u16, Value)> {
        let r = self
            .http
            .request(method.parse()?, format!("{}{path}", self.api()))
            .timeout(Duration::from_secs(120))
            .body(body)
            .send()
            .with_context(|| format!("{method} {path}"))?;
        let status = r.status().as_u16();
        Ok((status, r.json().unwrap_or(Value::Null)))
    }

    /// Polls `f` until it gives a value; on timeout the error has the console tail.
    pub fn wait_for<T>(
        &mut self,
        timeout: Duration,
        what: &str,
        mut f: impl FnMut(&Self) -> Result<Option<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            match f(self) {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => {}
                Err(e) => last = Some(e.to_string()),
            }
            if Instant::now() > deadline {
                return Err(self.failed(&format!(
                    "timed out after {timeout:?} waiting for {what} (last error: {last:?})"
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs a QMP command (QEMU's machine protocol) and returns its `return` value: how a
    /// test sets emulated hardware, e.g. `qom-set` of a sensor's temperature.
    pub fn qmp(&self, execute: &str, arguments: Value) -> Result<Value> {
        use std::io::{BufRead, BufReader, Write};
        let stream = std::os::unix::net::UnixStream::connect(&self.qmp)
            .with_context(|| format!("connecting to QMP at {}", self.qmp.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut writer = stream;
        // Replies are JSON lines; events may come in between and are skipped.
        let reply = |reader: &mut BufReader<std::os::unix::net::UnixStream>| -> Result<Value> {
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line)? == 0 {
                    bail!("QMP closed the connection");
                }
                let v: Value = serde_json::from_str(&line)
                    .with_context(|| format!("QMP sent `{}`", line.trim()))?;
                if v.get("event").is_none() {
                    return Ok(v);
                }
            }
        };
        reply(&mut reader)?; // the greeting
        writeln!(
            writer,
            "{}",
            serde_json::json!({"execute": "qmp_capabilities"})
        )?;
        reply(&mut reader)?;
        writeln!(
            writer,
            "{}",
            serde_json::json!({"execute": execute, "arguments": arguments})
        )?;
        let v = reply(&mut reader)?;
        if let Some(e) = v.get("error") {
            bail!("QMP {execute} failed: {e}");
        }
        Ok(v["return"].clone())
    }

    /// Waits until component `name` is `running`.
    pub fn wait_running(&mut self, name: &str, timeout: Duration) -> Result<()> {
        let path = format!("/v1/components/{name}");
        self.wait_for(timeout, &format!("component `{name}` running"), |m| {
            Ok((m.get(&path)?["state"] == "running").then_some(()))
        })
    }

    /// Cuts the power: QEMU is killed with SIGKILL, so whatever the guest had not flushed
    /// to its disk is gone, as on a real power loss.
    pub fn power_cut(mut self) -> Result<MachineSpec> {
        let spec = self
            .spec
            .clone()
            .context("a real board's power cannot be cut from here")?;
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(spec)
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Whether `path` exists (for skipping messages).
pub fn exists(path: &Path) -> bool {
    path.exists()
}
