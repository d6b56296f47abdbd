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
    /// The serial port's input: a Unix socket QEMU listens on (its output is also logged to
    /// `console`).
    console_in: PathBuf,
    /// Commands run on the console so far (numbers their end markers).
    console_runs: u32,
    /// The connection to `console_in`, once a command was sent.
    console_tx: Option<std::os::unix::net::UnixStream>,
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
        let console_in = dir.path().join("console.sock");
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
            // The serial console: written to a log file the tests read, and a socket that
            // takes input (`Machine::console`). Unconnected, QEMU logs and drops output.
            .args([
                "-chardev",
                &format!(
                    "socket,id=serial0,path={},server=on,wait=off,logfile={}",
                    console_in.display(),
                    console.display()
                ),
            ])
            .args(["-serial", "chardev:serial0"])
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
            console_in,
            console_runs: 0,
            console_tx: None,
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
            console_in: dir.path().join("console.sock"),
            console_runs: 0,
            console_tx: None,
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

    /// Runs `command` in the root shell on the guest's serial console (boards with
    /// `console-shell = true`) and returns what it printed; fails with the console tail if
    /// it exits non-zero or does not finish within `timeout`.
    pub fn console(&mut self, command: &str, timeout: Duration) -> Result<String> {
        use std::io::Write;
        if !self.emulated() {
            bail!("a real board's console cannot be reached from here (`{command}`)");
        }
        self.console_runs += 1;
        let marker = format!("@@perch-done-{}:", self.console_runs);
        let start = std::fs::metadata(&self.console).map_or(0, |m| m.len() as usize);
        if self.console_tx.is_none() {
            let s =
                std::os::unix::net::UnixStream::connect(&self.console_in).with_context(|| {
                    format!("connecting to the console at {}", self.console_in.display())
                })?;
            // Kept open (QEMU drops input still queued when the client goes) and drained,
            // so the guest never waits on it: what is read is the log.
            let mut drain = s.try_clone()?;
            std::thread::spawn(move || std::io::copy(&mut drain, &mut std::io::sink()));
            self.console_tx = Some(s);
        }
        if let Some(s) = &mut self.console_tx {
            // The marker's echo (the shell echoes input) shows `$?`, its output the status.
            writeln!(s, "{command}; echo {marker}$?@@")?;
            s.flush()?;
        }
        let deadline = Instant::now() + timeout;
        loop {
            let log = std::fs::read(&self.console).unwrap_or_default();
            let text = String::from_utf8_lossy(log.get(start..).unwrap_or_default()).into_owned();
            if let Some((status, output)) = console_result(&text, &marker) {
                if status != 0 {
                    return Err(self.failed(&format!(
                        "`{command}` on the console exited with {status}:\n{output}"
                    )));
                }
                return Ok(output);
            }
            if Instant::now() > deadline {
                return Err(self.failed(&format!(
                    "`{command}` on the console did not finish within {timeout:?} (is `console-shell` on?)"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
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

/// The exit status and output of a console command, from the console text after it was
/// sent: the lines between the command's echo and the line `<marker><status>@@`.
fn console_result(text: &str, marker: &str) -> Option<(i32, String)> {
    let lines: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).collect();
    let end = lines.iter().position(|l| {
        l.strip_prefix(marker)
            .and_then(|r| r.strip_suffix("@@"))
            .is_some_and(|n| n.parse::<i32>().is_ok())
    })?;
    let status = lines[end][marker.len()..lines[end].len() - 2]
        .parse()
        .ok()?;
    let echo = lines[..end]
        .iter()
        .rposition(|l| l.contains(&format!("{marker}$?@@")))
        .map_or(0, |i| i + 1);
    Some((status, lines[echo..end].join("\n")))
}

/// Whether `path` exists (for skipping messages).
pub fn exists(path: &Path) -> bool {
    path.exists()
}

#[cfg(test)]
mod tests {
    use super::console_result;

    #[test]
    fn a_console_command_is_read_between_its_echo_and_its_marker() {
        let text = "[  5.1] kernel line\r\n/ # i2cget -y 1 0x48 0 w; echo @@perch-done-3:$?@@\r\n0x8017\r\n@@perch-done-3:0@@\r\n/ # ";
        assert_eq!(
            console_result(text, "@@perch-done-3:"),
            Some((0, "0x8017".to_string()))
        );
        let failed = "/ # false; echo @@perch-done-4:$?@@\r\n@@perch-done-4:1@@\r\n";
        assert_eq!(
            console_result(failed, "@@perch-done-4:"),
            Some((1, String::new()))
        );
        // Only the echo so far (or another command's marker): not finished.
        assert_eq!(
            console_result("/ # true; echo @@perch-done-5:$?@@\r\n", "@@perch-done-5:"),
            None
        );
        assert_eq!(
            console_result("@@perch-done-15:0@@\n", "@@perch-done-1:"),
            None
        );
    }
}
