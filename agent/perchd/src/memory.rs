//! Keeping the agent's resident memory small on glibc.
//!
//! glibc gives each thread that allocates its own malloc arena (up to 8 per core), and freed
//! memory stays in the arena. Compiling and loading components happens on tokio's blocking
//! threads, so every such thread would keep megabytes it no longer uses. Two arenas are
//! plenty for an agent whose hot paths are a few invocations at a time, and trimming after
//! startup returns what compiling left behind.

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
