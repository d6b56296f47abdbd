//! Keeping the agent's resident memory small on glibc.
//!
//! glibc gives each thread that allocates its own malloc arena (up to 8 per core), and freed
//! memory stays in the arena. Compiling and loading components happens on tokio's blocking
//! threads, so every such thread would keep megabytes it no longer uses. Two arenas are
//! plenty for an agent whose hot paths are a few invocations at a time, and trimming after
//! startup returns what compiling left behind.
//!
//! Most of an idle agent's resident memory is not heap but clean pages of its own binary:
//! startup, deserializing and linking touch code (wasmtime, Cranelift, sled recovery) that an
//! idle agent never runs again. [`page_out_code`] asks the kernel to reclaim those pages now
//! instead of under memory pressure; what the idle loop needs faults back in.

/// Caps glibc's malloc arenas. Call before starting any thread.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `mallopt` only sets a glibc malloc parameter; it is called from `main` before
        // any other thread exists, so nothing is allocating concurrently.
        #[allow(unsafe_code)]
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// Returns freed heap memory to the kernel (after startup and after deploys).
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `malloc_trim` is thread-safe in glibc and only releases free pages.
        #[allow(unsafe_code)]
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// Asks the kernel to reclaim the clean, read-only pages of the agent's own binary
/// (`MADV_PAGEOUT`, Linux 5.4+). Pages still in use fault back in from the page cache. Call
/// after startup and after deploys, when the code that ran is unlikely to run again soon.
/// Returns the bytes of address space advised; failures (an old kernel, a binary the agent
/// may not page out) leave everything as it was.
pub fn page_out_code() -> u64 {
    #[cfg(target_os = "linux")]
    {
        let Ok(exe) = std::fs::read_link("/proc/self/exe") else {
            return 0;
        };
        let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
            return 0;
        };
        let mut advised = 0u64;
        for line in maps.lines() {
            // start-end perms offset dev inode path
            let mut fields = line.split_whitespace();
            let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
                continue;
            };
            let path = fields.nth(3);
            if path != exe.to_str() || perms.contains('w') {
                continue;
            }
            let Some((start, end)) = range.split_once('-') else {
                continue;
            };
            let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            ) else {
                continue;
            };
            // SAFETY: the range is a whole, read-only, file-backed mapping of this process's
            // own executable, taken from /proc/self/maps; MADV_PAGEOUT only drops clean pages
            // that the kernel re-reads from the file on the next access, so no memory the
            // program relies on changes.
            #[allow(unsafe_code)]
            let rc = unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_PAGEOUT)
            };
            if rc == 0 {
                advised += (end - start) as u64;
            }
        }
        advised
    }
    #[cfg(not(target_os = "linux"))]
    {
        0
    }
}

/// How long after startup or a deploy the agent waits before [`settle_later`] trims: long
/// enough for start-up triggers and first ticks to have run.
pub const SETTLE_DELAY: std::time::Duration = std::time::Duration::from_secs(2);

/// After [`SETTLE_DELAY`], returns freed heap to the kernel and pages out code that ran
/// only while starting or deploying. Needs a tokio runtime.
pub fn settle_later() {
    tokio::spawn(async {
        tokio::time::sleep(SETTLE_DELAY).await;
        trim();
        let advised = page_out_code();
        tracing::debug!(advised, "memory settled");
    });
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// Resident bytes of this process's own executable mappings.
    fn exe_rss() -> u64 {
        let exe = std::fs::read_link("/proc/self/exe").expect("exe");
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let mut ours = false;
        let mut total = 0;
        for line in smaps.lines() {
            if line.contains('-') && line.split_whitespace().count() >= 5 {
                ours = line.split_whitespace().nth(5) == exe.to_str();
            } else if ours && let Some(kb) = line.strip_prefix("Rss:") {
                total += kb
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0)
                    * 1024;
            }
        }
        total
    }

    #[test]
    fn paging_out_drops_resident_code_and_the_code_still_runs() {
        let before = exe_rss();
        let advised = page_out_code();
        let after = exe_rss();
        assert!(advised > 0, "nothing advised");
        assert!(
            after < before,
            "resident code did not shrink: {before} -> {after} bytes"
        );
        // Everything still works: the pages fault back in.
        trim();
        assert!(exe_rss() > 0);
    }
}
