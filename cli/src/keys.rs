//! The developer's signing key, kept in the user's config dir.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};

use perch_artifact::SecretKey;

use crate::shell::Shell;

/// File name of the signing key inside the config dir.
pub const KEY_FILE: &str = "signing-key";

/// `$PERCH_CONFIG_DIR`, else `$XDG_CONFIG_HOME/perch`, else `~/.config/perch`.
pub fn config_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PERCH_CONFIG_DIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(xdg) = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(xdg).join("perch"));
    }
    let home = std::env::var_os("HOME")
        .context("cannot find the config dir: set HOME, XDG_CONFIG_HOME or PERCH_CONFIG_DIR")?;
    Ok(PathBuf::from(home).join(".config").join("perch"))
}

/// The key file's path.
pub fn key_path() -> Result<PathBuf> {
    Ok(config_dir()?.join(KEY_FILE))
}

/// Reads the signing key, if one exists.
pub fn load() -> Result<Option<SecretKey>> {
    let path = key_path()?;
    match std::fs::read_to_string(&path) {
        Ok(text) => SecretKey::from_file_text(&text)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Creates a new key; refuses to overwrite one unless `force`.
pub fn create(force: bool) -> Result<SecretKey> {
    let path = key_path()?;
    if path.exists() && !force {
        bail!(
            "a signing key already exists at {}; `perch key show` prints its public key, `--force` replaces it (components signed with it will no longer match)",
            path.display()
        );
    }
    let key = SecretKey::generate().map_err(anyhow::Error::msg)?;
    let dir = path.parent().context("the key path has a parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_private(&path, key.to_file_text().as_bytes())?;
    Ok(key)
}

/// The key, created on first use with a note saying where it went.
pub fn load_or_create(shell: &Shell) -> Result<SecretKey> {
    if let Some(key) = load()? {
        return Ok(key);
    }
    let key = create(false)?;
    shell.note(format!(
        "created a signing key at {} (public key {}); agents accept your components once that key is in their `trusted-keys`",
        key_path()?.display(),
        key.public()
    ));
    Ok(key)
}

/// Writes a file readable by its owner only.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}
