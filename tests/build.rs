//! Builds the guest components of the nested `examples/` and `fixtures/` workspaces for
//! `wasm32-wasip2` and exposes each one to the tests as `PERCH_EXAMPLE_<NAME>` (for
//! `examples/http-hello`: `env!("PERCH_EXAMPLE_HTTP_HELLO")`), the absolute path of its
//! `.wasm` file as cargo built it (no embedded manifest, unsigned: the tests of `perch build`
//! make their own artifacts).
//!
//! Like wasmtime's test-programs, the guests are built by a nested `cargo build`, so
//! `cargo test --workspace` never compiles them for the host. The nested build runs in release
//! mode whatever the outer profile, with its own target dir next to the outer one so it stays
//! cached between runs.

use std::ffi::OsString;
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const TARGET: &str = "wasm32-wasip2";
/// The guest stack the nested builds link with, as `perch build` does by default.
const GUEST_STACK: u64 = 128 * 1024;

/// std only, so the tests crate needs no build-dependencies: an error is a message.
type Result<T, E = String> = std::result::Result<T, E>;

fn main() {
    if let Err(message) = run() {
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}

/// A pocket `anyhow::Context`.
trait Context<T> {
    fn context(self, what: impl Display) -> Result<T>;
}

impl<T, E: Display> Context<T> for Result<T, E> {
    fn context(self, what: impl Display) -> Result<T> {
        self.map_err(|error| format!("{what}: {error}"))
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, what: impl Display) -> Result<T> {
        self.ok_or_else(|| what.to_string())
    }
}

macro_rules! ensure {
    ($cond:expr, $($message:tt)+) => {
        if !$cond {
            return Err(format!($($message)+));
        }
    };
}

fn run() -> Result<()> {
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR")?);
    let repo = manifest_dir.parent().context("tests/ has a parent")?;
    let out_dir = PathBuf::from(env("OUT_DIR")?);
    // OUT_DIR is <target>/[<triple>/]<profile>/build/perch-tests-<hash>/out.
    let target_dir = out_dir
        .ancestors()
        .nth(4)
        .context("OUT_DIR is nested in the target dir")?
        .join("examples-target");
    ensure_target_installed()?;
    println!("cargo:rustc-env=PERCH_GUEST_STACK={GUEST_STACK}");
    println!("cargo:rerun-if-changed={}", repo.join("wit").display());
    println!("cargo:rerun-if-changed={}", repo.join("sdk").display());
    for workspace in ["examples", "fixtures"] {
        build_workspace(&repo.join(workspace), &target_dir)?;
    }
    Ok(())
}

fn build_workspace(dir: &Path, target_dir: &Path) -> Result<()> {
    rerun_if_changed(dir)?;
    let cargo = env("CARGO")?;
    let mut build = Command::new(&cargo);
    build
        .args(["build", "--release", "--target", TARGET])
        .current_dir(dir)
        // Cargo parses this script's stdout; keep the nested build's output on stderr.
        .stdout(Stdio::from(std::io::stderr()));
    clean_env(&mut build);
    // Linked as `perch build` links them: the default guest stack (checked against
    // `perch_core::manifest::DEFAULT_STACK` by a test).
    build.env(
        "CARGO_TARGET_WASM32_WASIP2_RUSTFLAGS",
        format!("-C link-arg=-zstack-size={GUEST_STACK}"),
    );
    build.env("CARGO_TARGET_DIR", target_dir);
    let status = build
        .status()
        .context(format!("running {cargo:?} in {}", dir.display()))?;
    ensure!(
        status.success(),
        "building the guest components in {} failed",
        dir.display()
    );

    for name in guest_names(dir)? {
        let wasm = target_dir
            .join(TARGET)
            .join("release")
            .join(format!("{}.wasm", name.replace('-', "_")));
        check_component(&wasm)?;
        let var = format!("PERCH_EXAMPLE_{}", name.to_uppercase().replace('-', "_"));
        println!("cargo:rustc-env={var}={}", wasm.display());
    }
    Ok(())
}

fn env(name: &str) -> Result<String> {
    std::env::var(name).context(format!("cargo sets {name} for build scripts"))
}

/// Every crate of a nested workspace: a directory holding a `Cargo.toml`.
/// The crate is named after its directory.
fn guest_names(examples: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(examples).context(format!("reading {}", examples.display()))? {
        let path = entry.context("reading examples/")?.path();
        if path.join("Cargo.toml").is_file() {
            let name = path.file_name().context("a directory entry has a name")?;
            names.push(name.to_string_lossy().into_owned());
        }
    }
    names.sort();
    ensure!(
        !names.is_empty(),
        "no guest crates found in {}",
        examples.display()
    );
    Ok(names)
}

/// Watches everything the guests are built from, but not a `target/` that a plain
/// `cargo build` inside `examples/` may have left there.
fn rerun_if_changed(examples: &Path) -> Result<()> {
    for entry in std::fs::read_dir(examples).context(format!("reading {}", examples.display()))? {
        let path = entry.context("reading examples/")?.path();
        if path.file_name().is_some_and(|name| name != "target") {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    Ok(())
}

/// Installs the `wasm32-wasip2` standard library with rustup when it is missing.
fn ensure_target_installed() -> Result<()> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| OsString::from("rustc"));
    let output = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .context(format!("running {rustc:?} --print sysroot"))?;
    ensure!(output.status.success(), "{rustc:?} --print sysroot failed");
    let sysroot = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    if sysroot.join("lib/rustlib").join(TARGET).is_dir() {
        return Ok(());
    }
    println!(
        "cargo:warning=installing the {TARGET} target with rustup to build the guest components"
    );
    let installed = Command::new("rustup")
        .args(["target", "add", TARGET])
        .stdout(Stdio::from(std::io::stderr()))
        .status()
        .is_ok_and(|status| status.success());
    if !installed {
        return Err(format!(
            "the {TARGET} target is not installed; run `rustup target add {TARGET}`"
        ));
    }
    Ok(())
}

/// Removes what cargo set for this build script (or the user for the outer build) that
/// would change or break the nested build: flags, target, profile, jobserver, wrappers.
fn clean_env(command: &mut Command) {
    const KEEP: &[&str] = &[
        "CARGO_HOME",
        "CARGO_BUILD_JOBS",
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
        "CARGO_REGISTRY_",
        "CARGO_TERM_",
    ];
    const DROP: &[&str] = &[
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "DEBUG",
        "OPT_LEVEL",
        "PROFILE",
        "TARGET",
        "HOST",
        "OUT_DIR",
        "NUM_JOBS",
    ];
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        let cargo_var = name == "CARGO"
            || (name.starts_with("CARGO_") && !KEEP.iter().any(|keep| name.starts_with(keep)));
        if cargo_var || name.starts_with("RUSTC") || DROP.contains(&name) {
            command.env_remove(name);
        }
    }
}

/// A component, unlike a core module, has layer 1 in its header: `\0asm` 0d 00 01 00.
fn check_component(wasm: &Path) -> Result<()> {
    let bytes = std::fs::read(wasm).context(format!("reading {}", wasm.display()))?;
    ensure!(
        bytes.starts_with(b"\0asm\x0d\x00\x01\x00"),
        "{} is not a WebAssembly component",
        wasm.display()
    );
    Ok(())
}
