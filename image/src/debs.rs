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
    perch_cache("PERCH_DEB_CACHE", "debs")
}

/// A directory that survives between runs: `$env` if set, else `~/.cache/perch/<name>`.
pub fn perch_cache(env: &str, name: &str) -> PathBuf {
    std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cache/perch")
            .join(name)
    })
}

fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex::encode(sha2::Sha256::digest(&bytes)))
}

/// The cached `.deb` of `pkg`, downloaded first when missing; its sha256 must match the
/// lock (a mismatch is an error naming both, and the bad file is removed).
///
/// Downloads go through a private apt directory per architecture ([`AptDir`]), so packages
/// of any architecture are fetched on any machine without `dpkg --add-architecture` or
/// touching the system's apt state.
pub fn fetch(pkg: &Pinned, cache: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(cache)?;
    let path = cache.join(&pkg.file);
    if !path.is_file() {
        tracing::info!(package = %pkg.name, version = %pkg.version, arch = %pkg.arch, "downloading");
        eprintln!(
            "image: downloading {} {} ({})",
            pkg.name, pkg.version, pkg.arch
        );
        let arch = if pkg.arch == "all" {
            host_arch()?
        } else {
            pkg.arch.clone()
        };
        let apt = AptDir::open(cache, &arch)?;
        let spec = format!("{}:{}={}", pkg.name, arch, pkg.version);
        // Fresh package lists only when there are none yet or the download fails with the
        // ones there are (the mirror moved on).
        if !apt.has_lists() {
            apt.update()?;
        }
        if !apt.download(&spec, cache)? {
            apt.update()?;
            if !apt.download(&spec, cache)? {
                bail!(
                    "apt-get download {spec} failed; is that version still on the mirror? Update image/debian.lock"
                );
            }
        }
        if !path.is_file() {
            bail!(
                "apt-get download {spec} did not give {} (the lock's `file` must be the name apt saves)",
                path.display()
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

/// A private apt directory for one architecture (`<cache>/apt/<arch>`): its own sources
/// (the machine's Debian sources, or `PERCH_APT_SOURCES`), package lists and cache.
#[derive(Debug)]
pub struct AptDir {
    dir: PathBuf,
    arch: String,
}

impl AptDir {
    /// Creates (or reuses) the directory for `arch`, writing its sources list.
    pub fn open(cache: &Path, arch: &str) -> Result<Self> {
        let dir = cache.join("apt").join(arch);
        for sub in [
            "state/lists/partial",
            "cache/archives/partial",
            "sources.list.d",
        ] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let status = dir.join("state/status");
        if !status.exists() {
            std::fs::write(&status, "")?;
        }
        let sources = match std::env::var_os("PERCH_APT_SOURCES") {
            Some(file) => std::fs::read_to_string(&file).with_context(|| {
                format!("reading PERCH_APT_SOURCES ({})", Path::new(&file).display())
            })?,
            None => system_sources(arch),
        };
        std::fs::write(dir.join("sources.list"), sources)?;
        Ok(Self {
            dir,
            arch: arch.to_string(),
        })
    }

    fn options(&self) -> Vec<String> {
        let d = self.dir.display();
        vec![
            format!("-oDir::Etc::SourceList={d}/sources.list"),
            format!("-oDir::Etc::SourceParts={d}/sources.list.d"),
            format!("-oDir::State={d}/state"),
            format!("-oDir::State::status={d}/state/status"),
            format!("-oDir::Cache={d}/cache"),
            format!("-oAPT::Architecture={}", self.arch),
            format!("-oAPT::Architectures::={}", self.arch),
            "-oDebug::NoLocking=1".into(),
            // Downloads land in a root-owned cache; apt's `_apt` sandbox user cannot write there.
            "-oAPT::Sandbox::User=root".into(),
        ]
    }

    fn has_lists(&self) -> bool {
        std::fs::read_dir(self.dir.join("state/lists"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
            })
            .unwrap_or(false)
    }

    /// `apt-get update` of the private lists. A source that fails is a warning (apt keeps
    /// the others); no lists at all is an error.
    pub fn update(&self) -> Result<()> {
        eprintln!("image: updating the {} package lists", self.arch);
        let out = Command::new("apt-get")
            .args(self.options())
            .args(["-q", "update"])
            .output()
            .context("running apt-get update")?;
        if !out.status.success() {
            tracing::warn!(
                arch = %self.arch,
                stderr = %String::from_utf8_lossy(&out.stderr).trim(),
                "apt-get update reported errors"
            );
        }
        if !self.has_lists() {
            bail!(
                "apt-get update for {} gave no package lists: {}",
                self.arch,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// `apt-get download spec` into `into`; false when apt could not.
    fn download(&self, spec: &str, into: &Path) -> Result<bool> {
        let out = Command::new("apt-get")
            .args(self.options())
            .args(["-q", "download", spec])
            .current_dir(into)
            .output()
            .context("running apt-get download")?;
        if !out.status.success() {
            tracing::warn!(%spec, stderr = %String::from_utf8_lossy(&out.stderr).trim(), "apt-get download failed");
        }
        Ok(out.status.success())
    }
}

/// The machine's Debian sources as one-line entries for `arch`: the `deb` entries of
/// `/etc/apt/sources.list` and the deb822 `.sources` files (those limited to other
/// architectures, and disabled ones, left out). A machine without any gets Debian 12's
/// main, updates and security suites from deb.debian.org.
fn system_sources(arch: &str) -> String {
    let mut lines = Vec::new();
    if let Ok(text) = std::fs::read_to_string("/etc/apt/sources.list") {
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("deb ") {
                let rest = rest.trim();
                let (opts, rest) = match rest.strip_prefix('[') {
                    Some(r) => match r.split_once(']') {
                        Some((o, r)) => (o.trim().to_string(), r.trim()),
                        None => continue,
                    },
                    None => (String::new(), rest),
                };
                if opts.contains("arch=") {
                    continue;
                }
                let opts = if opts.is_empty() {
                    String::new()
                } else {
                    format!(" {opts}")
                };
                lines.push(format!("deb [arch={arch}{opts}] {rest}"));
            }
        }
    }
    let mut parts: Vec<PathBuf> = std::fs::read_dir("/etc/apt/sources.list.d")
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    parts.sort();
    for part in parts {
        if part.extension().and_then(|e| e.to_str()) != Some("sources") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&part) else {
            continue;
        };
        lines.extend(deb822_entries(&text, arch));
    }
    if lines.is_empty() {
        for suite in ["bookworm", "bookworm-updates"] {
            lines.push(format!(
                "deb [arch={arch}] http://deb.debian.org/debian {suite} main"
            ));
        }
        lines.push(format!(
            "deb [arch={arch}] http://deb.debian.org/debian-security bookworm-security main"
        ));
    }
    lines.join("\n") + "\n"
}

/// One-line `deb` entries of a deb822 sources file, for `arch`.
fn deb822_entries(text: &str, arch: &str) -> Vec<String> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.trim()
                        .eq_ignore_ascii_case(name)
                        .then(|| v.trim().to_string())
                })
        };
        let (Some(types), Some(uris), Some(suites)) =
            (field("Types"), field("URIs"), field("Suites"))
        else {
            continue;
        };
        if !types.split_whitespace().any(|t| t == "deb")
            || field("Enabled").is_some_and(|e| e == "no")
            || field("Architectures").is_some_and(|a| !a.split_whitespace().any(|x| x == arch))
        {
            continue;
        }
        let components = field("Components").unwrap_or_default();
        let signed = field("Signed-By")
            .filter(|s| !s.contains('\n') && !s.is_empty())
            .map(|s| format!(" signed-by={s}"))
            .unwrap_or_default();
        for uri in uris.split_whitespace() {
            for suite in suites.split_whitespace() {
                out.push(format!(
                    "deb [arch={arch}{signed}] {uri} {suite} {components}"
                ));
            }
        }
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb822_sources_become_one_line_entries_for_the_arch() {
        let text = "Types: deb\n# a comment\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\nComponents: main\nArchitectures: amd64\n\nTypes: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: main\n";
        assert_eq!(
            deb822_entries(text, "arm64"),
            [
                "deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main",
                "deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-updates main",
            ]
        );
        // A source limited to amd64 is kept for amd64 only.
        assert_eq!(deb822_entries(text, "amd64").len(), 3);
    }
}
