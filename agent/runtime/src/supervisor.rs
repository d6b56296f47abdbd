//! Per-component bookkeeping that outlives invocations: counters, the last error, crash-loop
//! backoff and a ring buffer of recent log lines.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use perch_core::command::{ComponentState, ErrorRecord, LogLevel, LogLine};

/// Consecutive crashes after which a component backs off and shows as `crash-looping`.
pub const CRASH_LOOP_THRESHOLD: u32 = 3;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain counters behind; they stay usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Recent log lines of one component, newest last, bounded.
#[derive(Debug)]
pub struct ComponentLog {
    component: String,
    capacity: usize,
    lines: Mutex<VecDeque<LogLine>>,
}

impl ComponentLog {
    /// An empty log keeping at most `capacity` lines.
    pub fn new(component: &str, capacity: usize) -> Self {
        Self {
            component: component.to_string(),
            capacity: capacity.max(1),
            lines: Mutex::new(VecDeque::new()),
        }
    }

    /// Appends a line and mirrors it to `tracing` with the component's name.
    pub fn push(&self, level: LogLevel, source: &str, message: String) {
        let component = self.component.as_str();
        match level {
            LogLevel::Trace => {
                tracing::trace!(target: "perch::guest", component, source, "{message}")
            }
            LogLevel::Debug => {
                tracing::debug!(target: "perch::guest", component, source, "{message}")
            }
            LogLevel::Info => {
                tracing::info!(target: "perch::guest", component, source, "{message}")
            }
            LogLevel::Warn => {
                tracing::warn!(target: "perch::guest", component, source, "{message}")
            }
            LogLevel::Error => {
                tracing::error!(target: "perch::guest", component, source, "{message}")
            }
        }
        let mut lines = lock(&self.lines);
        if lines.len() == self.capacity {
            lines.pop_front();
        }
        lines.push_back(LogLine {
            at_ms: now_ms(),
            level,
            source: source.to_string(),
            message,
        });
    }

    /// The newest `limit` lines, oldest first.
    pub fn recent(&self, limit: usize) -> Vec<LogLine> {
        let lines = lock(&self.lines);
        let skip = lines.len().saturating_sub(limit);
        lines.iter().skip(skip).cloned().collect()
    }
}

/// How an invocation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Returned `ok`.
    Ok,
    /// Returned `err(message)`: an application error, not a crash.
    GuestError(String),
    /// Trapped, ran out of memory, or exceeded its timeout: the instance was killed.
    Crash(String),
    /// Not run: backing off after crashes, or at the instance limit.
    Skipped(&'static str),
}

#[derive(Debug, Default)]
struct Counters {
    invocations: u64,
    failures: u64,
    consecutive_crashes: u32,
    skipped: u64,
    last_error: Option<ErrorRecord>,
    backoff_until: Option<Instant>,
    memory_peak: u64,
    live: u32,
}

/// Counters, backoff and state of one running component.
#[derive(Debug)]
pub struct Supervisor {
    backoff_base: Duration,
    backoff_max: Duration,
    counters: Mutex<Counters>,
}

/// A snapshot of a supervisor, for status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisorSnapshot {
    pub state: ComponentState,
    pub invocations: u64,
    pub failures: u64,
    pub consecutive_failures: u32,
    pub skipped: u64,
    pub last_error: Option<ErrorRecord>,
    pub memory_peak_bytes: u64,
    pub live_instances: u32,
}

impl Supervisor {
    /// A fresh supervisor with the given backoff bounds.
    pub fn new(backoff_base: Duration, backoff_max: Duration) -> Self {
        Self {
            backoff_base,
            backoff_max,
            counters: Mutex::new(Counters::default()),
        }
    }

    /// Whether an invocation may start now; counts a skip if not.
    pub fn admit(&self) -> Result<(), Duration> {
        let mut c = lock(&self.counters);
        if let Some(until) = c.backoff_until {
            let now = Instant::now();
            if now < until {
                c.skipped += 1;
                return Err(until - now);
            }
        }
        Ok(())
    }

    /// Counts an invocation skipped for lack of a free instance.
    pub fn skipped(&self) {
        lock(&self.counters).skipped += 1;
    }

    /// Marks an instance alive or gone.
    pub fn instance_started(&self) {
        lock(&self.counters).live += 1;
    }

    /// See [`Self::instance_started`].
    pub fn instance_ended(&self, memory_peak: u64) {
        let mut c = lock(&self.counters);
        c.live = c.live.saturating_sub(1);
        c.memory_peak = c.memory_peak.max(memory_peak);
    }

    /// Records the outcome of an invocation and returns the backoff it started, if any.
    pub fn record(&self, outcome: &Outcome) -> Option<Duration> {
        let mut c = lock(&self.counters);
        match outcome {
            Outcome::Skipped(_) => None,
            Outcome::Ok => {
                c.invocations += 1;
                c.consecutive_crashes = 0;
                c.backoff_until = None;
                None
            }
            Outcome::GuestError(msg) => {
                c.invocations += 1;
                c.failures += 1;
                c.last_error = Some(ErrorRecord {
                    at_ms: now_ms(),
                    message: format!("returned an error: {msg}"),
                });
                None
            }
            Outcome::Crash(msg) => {
                c.invocations += 1;
                c.failures += 1;
                c.consecutive_crashes += 1;
                c.last_error = Some(ErrorRecord {
                    at_ms: now_ms(),
                    message: msg.clone(),
                });
                if c.consecutive_crashes >= CRASH_LOOP_THRESHOLD {
                    let exp = (c.consecutive_crashes - CRASH_LOOP_THRESHOLD).min(20);
                    let delay = self
                        .backoff_base
                        .saturating_mul(1 << exp)
                        .min(self.backoff_max);
                    c.backoff_until = Some(Instant::now() + delay);
                    Some(delay)
                } else {
                    None
                }
            }
        }
    }

    /// Current counters and the state they imply.
    pub fn snapshot(&self) -> SupervisorSnapshot {
        let c = lock(&self.counters);
        let state = if c.consecutive_crashes >= CRASH_LOOP_THRESHOLD {
            ComponentState::CrashLooping
        } else {
            ComponentState::Running
        };
        SupervisorSnapshot {
            state,
            invocations: c.invocations,
            failures: c.failures,
            consecutive_failures: c.consecutive_crashes,
            skipped: c.skipped,
            last_error: c.last_error.clone(),
            memory_peak_bytes: c.memory_peak,
            live_instances: c.live,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crashes_back_off_exponentially_and_success_resets() {
        let s = Supervisor::new(Duration::from_millis(100), Duration::from_millis(350));
        let crash = Outcome::Crash("trap".into());
        assert_eq!(s.record(&crash), None);
        assert_eq!(s.record(&crash), None);
        assert_eq!(s.snapshot().state, ComponentState::Running);
        assert_eq!(s.record(&crash), Some(Duration::from_millis(100)));
        assert_eq!(s.snapshot().state, ComponentState::CrashLooping);
        assert!(s.admit().is_err(), "backing off");
        assert_eq!(s.record(&crash), Some(Duration::from_millis(200)));
        assert_eq!(s.record(&crash), Some(Duration::from_millis(350)), "capped");
        let snap = s.snapshot();
        assert_eq!((snap.invocations, snap.failures, snap.skipped), (5, 5, 1));
        assert_eq!(s.record(&Outcome::Ok), None);
        assert_eq!(s.snapshot().state, ComponentState::Running);
        assert!(s.admit().is_ok());
    }

    #[test]
    fn guest_errors_are_failures_but_not_crashes() {
        let s = Supervisor::new(Duration::from_millis(1), Duration::from_millis(1));
        for _ in 0..5 {
            assert_eq!(s.record(&Outcome::GuestError("nope".into())), None);
        }
        let snap = s.snapshot();
        assert_eq!(
            (snap.state, snap.failures, snap.consecutive_failures),
            (ComponentState::Running, 5, 0)
        );
        assert!(snap.last_error.expect("recorded").message.contains("nope"));
    }

    #[test]
    fn log_ring_keeps_the_newest_lines() {
        let log = ComponentLog::new("t", 3);
        for i in 0..5 {
            log.push(LogLevel::Info, "guest", format!("line {i}"));
        }
        let lines: Vec<String> = log.recent(10).into_iter().map(|l| l.message).collect();
        assert_eq!(lines, ["line 2", "line 3", "line 4"]);
        assert_eq!(log.recent(1)[0].message, "line 4");
    }
}
