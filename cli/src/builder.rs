//! `perch build`: compile a component crate for `wasm32-wasip2`, check its imports against
//! its manifest, embed the manifest and sign it.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

use perch_artifact::SecretKey;
use perch_core::Manifest;
use perch_core::manifest::check_imports;

use crate::shell::{Shell, human_bytes};

/// The target every component is built for.
pub const TARGET: &str = "wasm32-wasip2";

/// Finds the crate's `Cargo.toml` from a directory or a manifest path.
pub fn crate_manifest(path: &Path) -> Result<PathBuf> {
    let manifest = if path.is_dir() {
        path.join("Cargo.toml")
    } else {
        path.to_path_buf()
    };
    if !manifest.is_file() {
        bail!(
            "no Cargo.toml at {}: give the path of a component crate (a directory with Cargo.toml and src/lib.rs)",
            path.display()
        );
    }
    Ok(manifest)
}

/// Reads and checks the manifest of a crate.
pub fn read_manifest(cargo_toml: &Path) -> Result<Manifest> {
    let text = std::fs::read_to_string(cargo_toml)
        .with_context(|| format!("reading {}", cargo_toml.display()))?;
    Manifest::from_cargo_toml(&text, &cargo_toml.display().to_string()).map_err(Into::into)
}

/// Installs the wasm target with rustup when it is missing.
pub fn ensure_target(shell: &Shell, dir: &Path) -> Result<()> {
    let list = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .current_dir(dir)
        .output();
    let installed = match list {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.trim() == TARGET),
        // Without rustup (a distribution toolchain) let cargo report a missing target.
        _ => return Ok(()),
    };
    if installed {
        return Ok(());
    }
    shell.note(format!(
        "the `{TARGET}` Rust target is missing; installing it with `rustup target add {TARGET}` (once)"
    ));
    let status = Command::new("rustup")
        .args(["target", "add", TARGET])
        .current_dir(dir)
        .status()
        .context("running rustup")?;
    if !status.success() {
        bail!(
            "`rustup target add {TARGET}` failed; install the target and run `perch build` again"
        );
    }
    Ok(())
}

/// The rustflags that link a guest with a `stack`-byte shadow stack, after any the user
/// set for the target in the environment.
pub fn stack_rustflags(stack: u64) -> String {
    let mut flags = std::env::var(TARGET_RUSTFLAGS).unwrap_or_default();
    if !flags.is_empty() {
        flags.push(' ');
    }
    flags.push_str(&format!("-C link-arg=-zstack-size={stack}"));
    flags
}

/// Cargo's per-target rustflags variable for [`TARGET`].
const TARGET_RUSTFLAGS: &str = "CARGO_TARGET_WASM32_WASIP2_RUSTFLAGS";

/// Runs `cargo build` for the component, its guest stack `stack` bytes, and returns the
/// `.wasm` cargo produced.
pub fn cargo_build(shell: &Shell, cargo_toml: &Path, stack: u64) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "--target", TARGET, "--lib"])
        .arg("--manifest-path")
        .arg(cargo_toml)
        .args(["--message-format", "json-render-diagnostics"])
        .args(if shell.verbosity == crate::shell::Verbosity::Verbose {
            &["--verbose"][..]
        } else {
            &[]
        })
        .stdout(Stdio::piped())
        .stderr(if shell.verbosity == crate::shell::Verbosity::Quiet {
            Stdio::null()
        } else {
            Stdio::inherit()
        });
    // A host build's flags would break a wasm build.
    cmd.env_remove("RUSTFLAGS").env_remove("CARGO_BUILD_TARGET");
    // Rust links wasm guests with a 1 MiB stack at the start of linear memory; a smaller one
    // keeps a fresh instance's memory small (`stack` in the manifest).
    cmd.env(TARGET_RUSTFLAGS, stack_rustflags(stack));
    let mut child = cmd.spawn().context("running cargo (is Rust installed?)")?;
    let stdout = child.stdout.take().context("cargo's stdout")?;
    let mut wasm = None;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.context("reading cargo's output")?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact"
            && msg["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "cdylib"))
        {
            for f in msg["filenames"].as_array().into_iter().flatten() {
                if let Some(f) = f.as_str().filter(|f| f.ends_with(".wasm")) {
                    wasm = Some(PathBuf::from(f));
                }
            }
        }
    }
    let status = child.wait().context("waiting for cargo")?;
    if !status.success() {
        bail!("cargo could not build {}", cargo_toml.display());
    }
    wasm.context(
        "cargo built no .wasm: a component crate needs `[lib] crate-type = [\"cdylib\"]` in its Cargo.toml",
    )
}

/// Builds, checks, embeds the manifest and signs; writes `<target>/perch/<name>.wasm`
/// unless `out` says otherwise, and returns the artifact's bytes.
pub fn build(
    shell: &Shell,
    path: &Path,
    key: Option<&SecretKey>,
    out: Option<&Path>,
) -> Result<Vec<u8>> {
    let cargo_toml = crate_manifest(path)?;
    let manifest = read_manifest(&cargo_toml)?;
    let dir = cargo_toml.parent().unwrap_or(Path::new("."));
    ensure_target(shell, dir)?;
    shell.status(
        "Building",
        format!("{} v{} ({TARGET})", manifest.name, manifest.version),
    );
    let wasm = cargo_build(shell, &cargo_toml, manifest.stack_bytes())?;
    let bytes = std::fs::read(&wasm).with_context(|| format!("reading {}", wasm.display()))?;
    let bytes = crate::compose::compose(shell, dir, bytes, &manifest)?;
    let (imports, _) = perch_artifact::interface_names(&bytes)
        .with_context(|| format!("{} is not a component", wasm.display()))?;
    let problems = check_imports(imports.iter().map(String::as_str), &manifest.grants);
    if !problems.is_empty() {
        return Err(crate::Failure {
            message: format!(
                "`{}` uses interfaces its manifest does not grant ({})",
                manifest.name,
                cargo_toml.display()
            ),
            details: problems.iter().map(ToString::to_string).collect(),
        }
        .into());
    }
    let mut bytes = perch_artifact::embed_manifest(&bytes, &manifest)?;
    if let Some(key) = key {
        bytes = perch_artifact::sign(&bytes, key)?;
    }
    let out = match out {
        Some(o) => o.to_path_buf(),
        None => {
            // <target>/wasm32-wasip2/release/x.wasm -> <target>/perch/<name>.wasm
            let target = wasm
                .ancestors()
                .nth(3)
                .map_or_else(|| dir.join("target"), Path::to_path_buf);
            target.join("perch").join(format!("{}.wasm", manifest.name))
        }
    };
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(&out, &bytes).with_context(|| format!("writing {}", out.display()))?;
    let digest = perch_core::Digest::of(&bytes);
    shell.status(
        "Finished",
        format!(
            "{} ({}, {}, {})",
            out.display(),
            human_bytes(bytes.len() as u64),
            digest.short(),
            match key {
                Some(k) => format!("signed by {}", k.public().id()),
                None => "unsigned".to_string(),
            }
        ),
    );
    Ok(bytes)
}
