//! Support for Perch's end-to-end tests and benchmarks: paths of the example components
//! (built from source by `build.rs`), and [`Perchd`], a real `perchd` process on a free
//! port with its own data directory, driven over its HTTP API and killed on drop.

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

pub mod files;
pub mod mqtt;
pub mod nats;
pub mod proxy;

/// The example components (`examples/`, written on perch-sdk) and test fixtures
/// (`fixtures/`), built by plain cargo for wasm32-wasip2 by this crate's build script: no
/// embedded manifest, unsigned.
pub mod examples {
    /// Timer: counts ticks in its key-value store and logs them.
    pub const TIMER: &str = env!("PERCH_EXAMPLE_TIMER");
    /// HTTP hello: answers every request with `hello from perch`.
    pub const HTTP_HELLO: &str = env!("PERCH_EXAMPLE_HTTP_HELLO");
    /// Misbehaving component: loops, hogs memory or traps on request.
    pub const MISBEHAVE: &str = env!("PERCH_EXAMPLE_MISBEHAVE");
    /// Thermostat: sensor, fan GPIO, telemetry and HTTP.
    pub const THERMOSTAT: &str = env!("PERCH_EXAMPLE_THERMOSTAT");
    /// Fixture: does nothing and imports nothing, for benchmarks.
    pub const NOOP: &str = env!("PERCH_EXAMPLE_NOOP");
    /// Fixture: imports an interface no agent provides.
    pub const UNKNOWN_IMPORT: &str = env!("PERCH_EXAMPLE_UNKNOWN_IMPORT");
    /// Fixture: a bare `wasi:http/proxy` hello (no std, exports only the HTTP handler), the
    /// same file under Perch and `wasmtime serve`.
    pub const BENCH_HELLO: &str = env!("PERCH_EXAMPLE_BENCH_HELLO");
    /// Fixture: `GET`s its `url` config value on every tick.
    pub const FETCHER: &str = env!("PERCH_EXAMPLE_FETCHER");
    /// Fixture: calls sensors or GPIO N times in one invocation (boundary benchmark).
    pub const HWLOOP: &str = env!("PERCH_EXAMPLE_HWLOOP");
    /// Fixture: counts debounced falling edges of the `button` line.
    pub const BUTTON: &str = env!("PERCH_EXAMPLE_BUTTON");
    /// Fixture: drives the `fan` GPIO line without a GPIO grant.
    pub const UNGRANTED: &str = env!("PERCH_EXAMPLE_UNGRANTED");
    /// Fixture: publishes 1..=`total` to the `burst` telemetry stream, resuming after a
    /// crash.
    pub const BURST: &str = env!("PERCH_EXAMPLE_BURST");
    /// Fixture: drives GPIO lines and reads sensors on request, publishing what it saw.
    pub const HW_ECHO: &str = env!("PERCH_EXAMPLE_HW_ECHO");
    /// Fixture: republishes `work.<rest>` as `done.<rest>` (a `calls` payload: its
    /// instance's call count).
    pub const RELAY: &str = env!("PERCH_EXAMPLE_RELAY");

    /// Reads an example's bytes.
    pub fn bytes(path: &str) -> Vec<u8> {
        std::fs::read(path).unwrap_or_else(|e| panic!("cannot read example {path}: {e}"))
    }
}

/// The `perchd` binary: `$PERCHD_BIN`, or `perchd` in the same cargo profile directory.
pub fn perchd_bin() -> PathBuf {
    workspace_bin("perchd", "PERCHD_BIN")
}

/// The `perch` CLI: `$PERCH_BIN`, or `perch` in the same cargo profile directory.
pub fn perch_bin() -> PathBuf {
    workspace_bin("perch", "PERCH_BIN")
}

fn workspace_bin(name: &str, var: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return PathBuf::from(p);
    }
    // Tests run from `<profile>/deps/`, bench binaries from `<profile>/`.
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    let dir = if dir.ends_with("deps") {
        dir.parent().expect("profile dir")
    } else {
        dir
    };
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} does not exist: build it first with `cargo build --release --workspace --bins` (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// What `perch build` makes of an example: the component cargo built, with the manifest
/// from `examples/<crate_dir>/Cargo.toml` (adjusted by `edit`) embedded and signed by `key`.
pub fn artifact(
    wasm: &str,
    cargo_toml: &Path,
    key: Option<&perch_artifact::SecretKey>,
    edit: impl FnOnce(&mut perch_core::Manifest),
) -> Result<Vec<u8>> {
    let text = std::fs::read_to_string(cargo_toml)?;
    let mut manifest =
        perch_core::Manifest::from_cargo_toml(&text, &cargo_toml.display().to_string())?;
    edit(&mut manifest);
    let mut bytes = perch_artifact::embed_manifest(&examples::bytes(wasm), &manifest)?;
    if let Some(key) = key {
        bytes = perch_artifact::sign(&bytes, key)?;
    }
    Ok(bytes)
}

/// A desired-state document as the fleet sends it: `revision` and `components`.
pub fn desired_doc(revision: u64, components: serde_json::Value) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(&serde_json::json!({ "revision": revision, "components": components }))
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("addr").port()
}

/// How to launch perchd.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// Extra TOML appended to the generated config (sections like `[limits]`). Unless it
    /// has its own `[signing]` section, the agent accepts unsigned components: most tests
    /// deploy the examples as plain components built by cargo.
    pub extra_config: String,
    /// Run in a fresh network namespace with only loopback (requires root).
    pub offline: bool,
    /// `ulimit -v` in KiB.
    pub ulimit_v_kib: Option<u64>,
    /// The binary to run instead of [`perchd_bin`].
    pub bin: Option<PathBuf>,
}

/// A running perchd with its own data directory.
#[derive(Debug)]
pub struct Perchd {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    pub launch: Launch,
    http: reqwest::blocking::Client,
}

/// A response: status and parsed JSON (or the text as a JSON string).
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub body: Value,
}

impl Perchd {
    /// Starts perchd with data in `dir` (created if needed) and waits until it is healthy.
    pub fn start(dir: &Path, launch: Launch) -> Result<Self> {
        let mut p = Self::spawn(dir, launch)?;
        p.wait_healthy(Duration::from_secs(60))?;
        Ok(p)
    }

    /// Starts perchd without waiting.
    pub fn spawn(dir: &Path, launch: Launch) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let config = dir.join("perchd.toml");
        std::fs::write(
            &config,
            format!(
                "data-dir = \"{}\"\nlisten = \"{addr}\"\n{}\n{}",
                dir.join("data").display(),
                launch.extra_config,
                if launch.extra_config.contains("[signing]") {
                    ""
                } else {
                    "[signing]\nallow-unsigned = true\n"
                },
            ),
        )?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("perchd.log"))?;
        let bin = launch.bin.clone().unwrap_or_else(perchd_bin);
        let mut script = String::new();
        if let Some(kib) = launch.ulimit_v_kib {
            script.push_str(&format!("ulimit -v {kib}; "));
        }
        if launch.offline {
            script.push_str("ip link set lo up; ");
        }
        script.push_str("exec \"$0\" --config \"$1\"");
        let mut cmd = if launch.offline {
            let mut c = Command::new("unshare");
            c.args(["--net", "--", "sh", "-c", &script]);
            c
        } else {
            let mut c = Command::new("sh");
            c.args(["-c", &script]);
            c
        };
        cmd.arg(&bin)
            .arg(&config)
            .env("PERCH_LOG", "info,perch::guest=debug")
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?;
        Ok(Self {
            child: Some(child),
            addr,
            dir: dir.to_path_buf(),
            launch,
            http,
        })
    }

    /// The process id (of perchd itself: the launch shell `exec`s it).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("perchd.log")).unwrap_or_default()
    }

    /// `curl` arguments to run inside perchd's network namespace when offline.
    fn curl(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Resp> {
        let url = format!("http://{}{path}", self.addr);
        let mut cmd = Command::new("nsenter");
        cmd.args([
            "-t",
            &self.pid().to_string(),
            "-n",
            "--",
            "curl",
            "-s",
            "-X",
            method,
            "-w",
            "\n%{http_code}",
            &url,
        ]);
        if let Some(b) = body {
            let f = self.dir.join("curl-body");
            std::fs::write(&f, b)?;
            cmd.arg("--data-binary").arg(format!("@{}", f.display()));
        }
        let out = cmd.output().context("run nsenter curl")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        Ok(Resp {
            status: code.trim().parse().unwrap_or(0),
            body: parse_body(body.as_bytes()),
        })
    }

    /// Sends a request to the agent (through its namespace when offline).
    pub fn request(&self, method: &str, path: &str, body: Option<Vec<u8>>) -> Result<Resp> {
        if self.launch.offline {
            return self.curl(method, path, body.as_deref());
        }
        let url = format!("http://{}{path}", self.addr);
        let m = reqwest::Method::from_bytes(method.as_bytes())?;
        let mut req = self.http.request(m, &url);
        if let Some(b) = body {
            req = req.body(b);
        }
        let resp = req.send().with_context(|| format!("{method} {url}"))?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes()?;
        Ok(Resp {
            status,
            body: parse_body(&bytes),
        })
    }

    /// GET returning JSON, failing on a non-2xx status.
    pub fn get(&self, path: &str) -> Result<Value> {
        let r = self.request("GET", path, None)?;
        if !(200..300).contains(&r.status) {
            bail!("GET {path}: {} {}", r.status, r.body);
        }
        Ok(r.body)
    }

    /// Deploys an artifact named by its embedded manifest (`POST /v1/components`).
    pub fn deploy_artifact(&self, artifact: &[u8]) -> Result<Resp> {
        self.request("POST", "/v1/components", Some(artifact.to_vec()))
    }

    /// Deploys a component file with a query string of triggers and limits.
    /// Uploads a blob to the agent's cache (`PUT /v1/blobs`) and returns its digest.
    pub fn upload_blob(&self, bytes: &[u8]) -> Result<String> {
        let r = self.request("PUT", "/v1/blobs", Some(bytes.to_vec()))?;
        if r.status != 201 {
            bail!("PUT /v1/blobs answered {}: {}", r.status, r.body);
        }
        r.body["digest"]
            .as_str()
            .map(String::from)
            .context("PUT /v1/blobs answered without a digest")
    }

    /// Deploys `wasm` as component `name` with the triggers in `query`.
    pub fn deploy(&self, name: &str, wasm: &[u8], query: &str) -> Result<Resp> {
        self.request(
            "PUT",
            &format!("/v1/components/{name}?{query}"),
            Some(wasm.to_vec()),
        )
    }

    /// Publishes a message on the agent's bus.
    pub fn publish(&self, subject: &str, payload: &[u8]) -> Result<Resp> {
        self.request(
            "POST",
            &format!("/v1/messages/{subject}"),
            Some(payload.to_vec()),
        )
    }

    /// The status document of one component.
    pub fn component(&self, name: &str) -> Result<Value> {
        self.get(&format!("/v1/components/{name}"))
    }

    /// Waits until `/v1/health` answers or the process exits.
    pub fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                bail!(
                    "perchd exited with {status} before becoming healthy; log:\n{}",
                    self.log()
                );
            }
            if let Ok(r) = self.request("GET", "/v1/health", None)
                && r.status == 200
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("perchd not healthy after {timeout:?}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls `f` until it returns `Some` or `timeout` passes.
    pub fn wait_for<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut f: impl FnMut(&Self) -> Result<Option<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        let mut last_err = None;
        loop {
            match f(self) {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => {}
                Err(e) => last_err = Some(e),
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out waiting for {what} (last error: {last_err:?}); log tail:\n{}",
                    tail(&self.log(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the process to exit on its own (a refused config, say).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "perchd still running after {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exit status if it has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => bail!("already stopped"),
        }
    }

    /// SIGKILL, like a power cut for the process, and waits for it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and waits up to 10 s for a clean exit.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let mut c = self.child.take().context("already stopped")?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = c.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                bail!("perchd ignored SIGTERM for 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Perchd {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn parse_body(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs a command, returning its exit status and combined output.
pub fn run_capture(cmd: &mut Command) -> Result<(ExitStatus, String)> {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let mut out = String::new();
    if let Some(mut s) = child.stdout.take() {
        s.read_to_string(&mut out)?;
    }
    if let Some(mut s) = child.stderr.take() {
        s.read_to_string(&mut out)?;
    }
    Ok((child.wait()?, out))
}

#[cfg(test)]
mod tests {
    /// The guests the tests run are linked as `perch build` links them.
    #[test]
    fn guests_are_linked_with_the_default_stack_of_perch_build() {
        assert_eq!(
            env!("PERCH_GUEST_STACK").parse::<u64>().ok(),
            Some(perch_core::manifest::DEFAULT_STACK.bytes())
        );
    }
}
