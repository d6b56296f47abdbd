//! Kernel modules for the initramfs, in load order: each module after what it depends on
//! (`depends=` in its `.modinfo`) and its `softdep` `pre:` modules (ext4 wants `crc32c`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// Module name as the kernel compares them (`-` and `_` are the same).
fn norm(name: &str) -> String {
    name.replace('-', "_")
}

/// Every `.ko` under `dir`, by normalized name.
fn index(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let p = e.path();
            if e.file_type()?.is_dir() {
                stack.push(p);
            } else if let Some(name) = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".ko"))
            {
                out.insert(norm(name), p);
            }
        }
    }
    Ok(out)
}

/// `key=value` strings of a module's `.modinfo` (read from the file's bytes: the section
/// is NUL-separated text).
fn modinfo(path: &Path, key: &str) -> Result<Vec<String>> {
    let bytes = std::fs::read(path)?;
    let needle = format!("{key}=");
    let needle = needle.as_bytes();
    // An entry may follow other bytes without a NUL between them (seen in armhf modules,
    // where `.modinfo` is not the start of a NUL-separated run), so the key is searched
    // within each run rather than required at its start.
    Ok(bytes
        .split(|b| *b == 0)
        .filter_map(|s| {
            let at = s.windows(needle.len()).position(|w| w == needle)?;
            std::str::from_utf8(&s[at + needle.len()..]).ok()
        })
        .map(str::to_string)
        .collect())
}

/// The modules `wanted` (names) under `modules_dir` with everything they need, dependencies
/// first. A name with no module file is an error unless the kernel has it built in
/// (`builtin`, the names of `modules.builtin`).
pub fn load_order(
    modules_dir: &Path,
    wanted: &[String],
    builtin: &BTreeSet<String>,
) -> Result<Vec<PathBuf>> {
    let all = index(modules_dir)?;
    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    fn visit(
        name: &str,
        all: &BTreeMap<String, PathBuf>,
        builtin: &BTreeSet<String>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<PathBuf>,
        depth: usize,
    ) -> Result<()> {
        let name = norm(name);
        if done.contains(&name) || builtin.contains(&name) {
            return Ok(());
        }
        if depth > 32 {
            bail!("module dependencies loop at `{name}`");
        }
        let Some(path) = all.get(&name) else {
            bail!("kernel module `{name}` is neither built in nor among the kernel's modules");
        };
        done.insert(name.clone());
        let mut needs: Vec<String> = modinfo(path, "depends")?
            .iter()
            .flat_map(|d| d.split(',').map(str::to_string).collect::<Vec<_>>())
            .filter(|d| !d.is_empty())
            .collect();
        for soft in modinfo(path, "softdep")? {
            if let Some(pre) = soft
                .split("post:")
                .next()
                .and_then(|s| s.split("pre:").nth(1))
            {
                needs.extend(pre.split_whitespace().map(str::to_string));
            }
        }
        for dep in needs {
            // A soft dependency may name an alias (`crypto-crc32c`): take a module of that
            // name, or its generic implementation.
            let base = dep.strip_prefix("crypto-").unwrap_or(&dep).to_string();
            let Some(dep) = [dep.clone(), base.clone(), format!("{base}_generic")]
                .into_iter()
                .find(|c| all.contains_key(&norm(c)) || builtin.contains(&norm(c)))
            else {
                continue;
            };
            visit(&dep, all, builtin, done, order, depth + 1)?;
        }
        order.push(path.clone());
        Ok(())
    }
    for w in wanted {
        visit(w, &all, builtin, &mut done, &mut order, 0)?;
    }
    Ok(order)
}

/// The names in a kernel's `modules.builtin`.
pub fn builtin(modules_root: &Path) -> BTreeSet<String> {
    std::fs::read_to_string(modules_root.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .filter_map(|f| f.strip_suffix(".ko"))
        .map(norm)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modinfo_entries_are_found_after_stray_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ko = dir.path().join("jbd2.ko");
        // As in Debian's armhf modules: an entry glued to the bytes before it.
        std::fs::write(
            &ko,
            b"\x7fELF\0\xb0\xb0\xa8\x80softdep=pre: crypto-crc32c\0depends=\0license=GPL\0",
        )
        .expect("write");
        assert_eq!(
            modinfo(&ko, "softdep").expect("read"),
            ["pre: crypto-crc32c"]
        );
        assert_eq!(modinfo(&ko, "depends").expect("read"), [""]);
        assert!(modinfo(&ko, "alias").expect("read").is_empty());
    }
}
