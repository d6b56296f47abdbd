//! A `newc` cpio writer for initramfs archives, deterministic by construction: entries in
//! the order given, owner root, mtime 0, inode numbers counted from 1.

use std::io::Write;

/// One archive entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    Symlink {
        path: String,
        target: String,
    },
    /// A character device node (`/dev/console` before devtmpfs is mounted).
    CharDev {
        path: String,
        mode: u32,
        major: u32,
        minor: u32,
    },
}

impl Entry {
    fn path(&self) -> &str {
        match self {
            Entry::Dir { path, .. }
            | Entry::File { path, .. }
            | Entry::Symlink { path, .. }
            | Entry::CharDev { path, .. } => path,
        }
    }
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Writes `entries` as a newc archive with its trailer.
pub fn write(out: &mut impl Write, entries: &[Entry]) -> std::io::Result<()> {
    let mut offset = 0usize;
    for (i, e) in entries.iter().enumerate() {
        let ino = i as u32 + 1;
        let (mode, data, rmajor, rminor): (u32, &[u8], u32, u32) = match e {
            Entry::Dir { mode, .. } => (S_IFDIR | mode, &[], 0, 0),
            Entry::File { mode, data, .. } => (S_IFREG | mode, data, 0, 0),
            Entry::Symlink { target, .. } => (S_IFLNK | 0o777, target.as_bytes(), 0, 0),
            Entry::CharDev {
                mode, major, minor, ..
            } => (S_IFCHR | mode, &[], *major, *minor),
        };
        let nlink = if matches!(e, Entry::Dir { .. }) { 2 } else { 1 };
        offset += header(out, ino, mode, nlink, data.len(), rmajor, rminor, e.path())?;
        out.write_all(data)?;
        offset += data.len();
        offset += pad(out, offset)?;
    }
    offset += header(out, 0, 0, 1, 0, 0, 0, "TRAILER!!!")?;
    pad(out, offset)?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn header(
    out: &mut impl Write,
    ino: u32,
    mode: u32,
    nlink: u32,
    size: usize,
    rmajor: u32,
    rminor: u32,
    name: &str,
) -> std::io::Result<usize> {
    let name = name.trim_start_matches('/');
    let namesize = name.len() + 1;
    let h = format!(
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{rmajor:08x}{rminor:08x}{namesize:08x}{:08x}",
        0, 0, 0, 0, 0, 0
    );
    out.write_all(h.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    let written = h.len() + namesize;
    Ok(written + pad(out, written)?)
}

/// Pads to a multiple of 4 after `offset` bytes; returns the padding written.
fn pad(out: &mut impl Write, offset: usize) -> std::io::Result<usize> {
    let n = (4 - offset % 4) % 4;
    out.write_all(&[0u8; 3][..n])?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_archive_is_aligned_and_ends_with_the_trailer() {
        let entries = [
            Entry::Dir {
                path: "/bin".into(),
                mode: 0o755,
            },
            Entry::File {
                path: "/init".into(),
                mode: 0o755,
                data: b"#!/bin/sh\n".to_vec(),
            },
            Entry::Symlink {
                path: "/bin/sh".into(),
                target: "busybox".into(),
            },
        ];
        let mut out = Vec::new();
        write(&mut out, &entries).expect("write");
        assert_eq!(out.len() % 4, 0);
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("070701"));
        assert!(text.contains("init\0"));
        assert!(text.contains("TRAILER!!!"));
        // The same input gives the same bytes.
        let mut again = Vec::new();
        write(&mut again, &entries).expect("write");
        assert_eq!(out, again);
    }
}
