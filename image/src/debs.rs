//! Pinned Debian packages: fetched once into a cache that survives between runs, verified
//! by sha256 on every use, unpacked with `dpkg-deb`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use sha2::Digest as _;

/// One pinned package of `image/debian.lock`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pinned {
    pub name: String,
    pub version: String,
    pub arch: String,
    pub file: String,
    pub sha256: String,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LockFile {
    package: Vec<Pinned>,
}

/// The lock file's packages.
pub fn read_lock(path: &Path) -> Result<Vec<Pinned>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let lock: LockFile = toml::from_str(&text)
        .with_context(|| format!("{} is not a valid lock file", path.display()))?;
    Ok(lock.package)
}

/// The package cache: `PERCH_DEB_CACHE`, else `~/.cache/perch/debs`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("PERCH_DEB_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/perch/debs")
        })
}

fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex::encode(sha2::Sha256::digest(&bytes)))
}

/// The cached `.deb` of `pkg`, downloaded first when missing; its sha256 must match the
/// lock (a mismatch is an error naming both, and the bad file is removed).
pub fn fetch(pkg: &Pinned, cache: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(cache)?;
    let path = cache.join(&pkg.file);
    if !path.is_file() {
        tracing::info!(package = %pkg.name, version = %pkg.version, "downloading");
        eprintln!(
            "image: downloading {} {} ({})",
            pkg.name, pkg.version, pkg.arch
        );
        let host = host_arch()?;
        if pkg.arch != host && pkg.arch != "all" {
            bail!(
                "{} is for {}, and this machine is {host}: fetch it into {} (apt-get download {}:{}={} on a machine of that architecture, or a private apt directory)",
                pkg.name,
                pkg.arch,
                cache.display(),
                pkg.name,
                pkg.arch,
                pkg.version
            );
        }
        let status = Command::new("apt-get")
            .args(["download", &format!("{}={}", pkg.name, pkg.version)])
            .current_dir(cache)
            .status()
            .context("running apt-get download")?;
        if !status.success() || !path.is_file() {
            bail!(
                "apt-get download {}={} failed ({status}); is the version still on the mirror? Update image/debian.lock",
                pkg.name,
                pkg.version
            );
        }
    }
    let got = sha256_file(&path)?;
    if got != pkg.sha256 {
        let _ = std::fs::remove_file(&path);
        bail!(
            "{}: sha256 {got} does not match the lock's {} (the file was removed; fetch again or update image/debian.lock)",
            path.display(),
            pkg.sha256
        );
    }
    Ok(path)
}

/// Unpacks a `.deb`'s files into `dir`.
pub fn unpack(deb: &Path, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(deb)
        .arg(dir)
        .status()
        .context("running dpkg-deb")?;
    if !status.success() {
        bail!("dpkg-deb -x {} failed ({status})", deb.display());
    }
    Ok(())
}

/// This machine's Debian architecture (`amd64`, `arm64`, ...).
pub fn host_arch() -> Result<String> {
    let out = Command::new("dpkg")
        .arg("--print-architecture")
        .output()
        .context("running dpkg --print-architecture")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
