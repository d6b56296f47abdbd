//! [`CdevBackend`]: lines requested through the GPIO character device, uAPI v2.

use std::collections::BTreeMap;
use std::io::{PipeReader, PipeWriter};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use gpiocdev::Request;
use gpiocdev::chip::ErrorKind;
use gpiocdev::line::{EdgeDetection, EdgeKind, Value};
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;

use crate::{Bias, Direction, Drive, EdgeSink, GpioBackend, GpioError, LineConfig};

/// The consumer label of every line the agent requests (shown by `gpioinfo`).
pub const CONSUMER: &str = "perchd";

/// How often a watcher retries a line it cannot request (chip missing, line busy).
pub const RETRY_INTERVAL: Duration = Duration::from_secs(2);

/// Named lines on the GPIO character devices below a device root (`/dev` on a device).
///
/// Lines are requested when the backend is created; a line that cannot be requested then is
/// requested again by the next call that uses it. Requests are kept until the backend is
/// dropped (or the kernel reports the chip gone), so outputs keep their level between calls.
#[derive(Debug)]
pub struct CdevBackend {
    lines: BTreeMap<String, Arc<Line>>,
    watchers: Mutex<Option<Watchers>>,
}

/// The running edge watchers: closing `stop` wakes and ends every thread.
#[derive(Debug)]
struct Watchers {
    stop: PipeWriter,
    threads: Vec<JoinHandle<()>>,
}

/// One configured line and, once requested, its request.
#[derive(Debug)]
struct Line {
    name: String,
    config: LineConfig,
    path: PathBuf,
    held: Mutex<Option<Held>>,
}

/// A granted line request, shared by callers and the line's watcher thread.
#[derive(Debug, Clone)]
struct Held {
    request: Arc<Request>,
    /// Whether the kernel reports edges for the line (inputs whose chip has an IRQ for it).
    edges: bool,
}

impl CdevBackend {
    /// The `lines` by name, on chips found as `dev_root/<chip>`. Every line is requested now;
    /// those that fail are listed by [`GpioBackend::missing`] and retried on use.
    pub fn new(dev_root: impl Into<PathBuf>, lines: BTreeMap<String, LineConfig>) -> Self {
        let dev_root = dev_root.into();
        let lines: BTreeMap<String, Arc<Line>> = lines
            .into_iter()
            .map(|(name, config)| {
                let line = Line {
                    path: dev_root.join(&config.chip),
                    name: name.clone(),
                    config,
                    held: Mutex::new(None),
                };
                (name, Arc::new(line))
            })
            .collect();
        for line in lines.values() {
            if let Err(e) = line.held() {
                tracing::debug!(error = %e, "GPIO line not requested at start");
            }
        }
        Self {
            lines,
            watchers: Mutex::new(None),
        }
    }

    fn line(&self, name: &str) -> Result<&Line, GpioError> {
        self.lines
            .get(name)
            .map(|l| &**l)
            .ok_or_else(|| GpioError::UnknownLine { line: name.into() })
    }
}

impl GpioBackend for CdevBackend {
    fn read(&self, line: &str) -> Result<bool, GpioError> {
        let line = self.line(line)?;
        let held = line.held()?;
        held.request
            .value(line.config.offset)
            .map(bool::from)
            .map_err(|e| line.failed(&held, "reading the level", e))
    }

    fn write(&self, line: &str, value: bool) -> Result<(), GpioError> {
        let line = self.line(line)?;
        if line.config.direction == Direction::Input {
            return Err(GpioError::NotOutput {
                line: line.name.clone(),
            });
        }
        let held = line.held()?;
        held.request
            .set_value(line.config.offset, Value::from(value))
            .map(|_| ())
            .map_err(|e| line.failed(&held, "setting the level", e))
    }

    fn missing(&self) -> Vec<String> {
        self.lines
            .values()
            .filter_map(|l| l.held().err())
            .map(|e| e.to_string())
            .collect()
    }

    fn watch(&self, sink: EdgeSink) -> Result<(), GpioError> {
        let mut watchers = lock(&self.watchers);
        if watchers.is_some() {
            return Err(GpioError::AlreadyWatching);
        }
        let failed = |e: std::io::Error| GpioError::Watch {
            message: e.to_string(),
        };
        let (stop_rx, stop) = std::io::pipe().map_err(failed)?;
        let mut started = Watchers {
            stop,
            threads: Vec::new(),
        };
        let inputs = self
            .lines
            .values()
            .filter(|l| l.config.direction == Direction::Input);
        let mut result = Ok(());
        for line in inputs {
            let spawned = stop_rx.try_clone().and_then(|stop_rx| {
                let (line, sink) = (Arc::clone(line), Arc::clone(&sink));
                std::thread::Builder::new()
                    // A NUL in a thread name would make the spawn panic.
                    .name(format!("gpio-{}", line.name.replace('\0', "")))
                    .spawn(move || watch_line(&line, &sink, &stop_rx))
            });
            match spawned {
                Ok(thread) => started.threads.push(thread),
                Err(e) => {
                    result = Err(failed(e));
                    break;
                }
            }
        }
        // Kept even after a failure, so dropping the backend stops what did start.
        *watchers = Some(started);
        result
    }
}

impl Drop for CdevBackend {
    fn drop(&mut self) {
        let Some(Watchers { stop, threads }) = lock(&self.watchers).take() else {
            return;
        };
        // Closing the write end makes the read end readable (end of file) in every watcher.
        drop(stop);
        let me = std::thread::current().id();
        for thread in threads {
            // A sink that drops the last reference to the backend runs on a watcher thread,
            // which cannot join itself; it ends on its own once the sink returns.
            if thread.thread().id() != me && thread.join().is_err() {
                tracing::warn!("a GPIO edge watcher panicked (in the edge sink)");
            }
        }
    }
}

impl Line {
    /// The line's request, requesting the line first if it is not held.
    fn held(&self) -> Result<Held, GpioError> {
        let mut slot = lock(&self.held);
        if let Some(held) = &*slot {
            return Ok(held.clone());
        }
        let held = self.request()?;
        tracing::debug!(
            line = %self.name,
            chip = %self.config.chip,
            offset = self.config.offset,
            edges = held.edges,
            "GPIO line requested"
        );
        *slot = Some(held.clone());
        Ok(held)
    }

    /// Drops `request` (if it is still the held one) so the next use requests the line again.
    fn forget(&self, request: &Arc<Request>) {
        let mut slot = lock(&self.held);
        if slot
            .as_ref()
            .is_some_and(|h| Arc::ptr_eq(&h.request, request))
        {
            *slot = None;
        }
    }

    /// The error of an operation on a held request; forgets the request if the chip is gone.
    fn failed(&self, held: &Held, operation: &str, e: gpiocdev::Error) -> GpioError {
        if errno(&e) == Some(Errno::NODEV) {
            self.forget(&held.request);
        }
        self.error(operation, e)
    }

    fn request(&self) -> Result<Held, GpioError> {
        let config = &self.config;
        let chip =
            gpiocdev::Chip::from_path(&self.path).map_err(|e| self.error("opening the chip", e))?;
        let lines = chip
            .info()
            .map_err(|e| self.error("reading the chip's info", e))?
            .num_lines;
        if config.offset >= lines {
            return Err(GpioError::NoSuchLine {
                line: self.name.clone(),
                chip: config.chip.clone(),
                path: self.path.clone(),
                offset: config.offset,
                lines,
            });
        }
        drop(chip);

        let mut builder = Request::builder();
        builder
            .on_chip(&self.path)
            .with_consumer(CONSUMER)
            .with_line(config.offset);
        match config.direction {
            Direction::Input => {
                builder.as_input();
            }
            Direction::Output => {
                builder.as_output(Value::Inactive);
                if let Some(drive) = config.drive {
                    builder.with_drive(match drive {
                        Drive::PushPull => gpiocdev::line::Drive::PushPull,
                        Drive::OpenDrain => gpiocdev::line::Drive::OpenDrain,
                        Drive::OpenSource => gpiocdev::line::Drive::OpenSource,
                    });
                }
            }
        }
        if config.active_low {
            builder.as_active_low();
        }
        if let Some(bias) = config.bias {
            builder.with_bias(match bias {
                Bias::Disabled => gpiocdev::line::Bias::Disabled,
                Bias::PullUp => gpiocdev::line::Bias::PullUp,
                Bias::PullDown => gpiocdev::line::Bias::PullDown,
            });
        }
        if config.direction == Direction::Input {
            let mut with_edges = builder.clone();
            match with_edges
                .with_edge_detection(EdgeDetection::BothEdges)
                .request()
            {
                Ok(request) => {
                    return Ok(Held {
                        request: Arc::new(request),
                        edges: true,
                    });
                }
                // The chip has no interrupt for the line (an expander without its INT pin
                // wired): the level can still be read, edges cannot be reported.
                Err(e) if errno(&e) == Some(Errno::NXIO) => tracing::warn!(
                    line = %self.name,
                    chip = %config.chip,
                    offset = config.offset,
                    "GPIO chip has no interrupt for this input line: its level can be read but edges are not reported"
                ),
                Err(e) => return Err(self.error("requesting the line", e)),
            }
        }
        let request = builder
            .request()
            .map_err(|e| self.error("requesting the line", e))?;
        Ok(Held {
            request: Arc::new(request),
            edges: false,
        })
    }

    /// `e`, which happened during `operation`, as a [`GpioError`] naming this line.
    fn error(&self, operation: &str, e: gpiocdev::Error) -> GpioError {
        let (line, chip, path) = (
            self.name.clone(),
            self.config.chip.clone(),
            self.path.clone(),
        );
        if let gpiocdev::Error::GpioChip(_, kind) = &e {
            let reason = match kind {
                ErrorKind::NotCharacterDevice => "is not a character device",
                _ => "is a character device but not a GPIO chip",
            };
            return GpioError::NotAChip {
                line,
                chip,
                path,
                reason,
            };
        }
        let offset = self.config.offset;
        match errno(&e) {
            Some(Errno::NOENT) => GpioError::ChipMissing { line, chip, path },
            Some(Errno::BUSY) => GpioError::Busy {
                consumer: self.consumer(),
                line,
                chip,
                path,
                offset,
            },
            Some(n) => GpioError::Io {
                line,
                chip,
                path,
                offset,
                message: format!(
                    "{operation}: {}",
                    std::io::Error::from_raw_os_error(n.raw_os_error())
                ),
            },
            None => GpioError::Io {
                line,
                chip,
                path,
                offset,
                message: format!("{operation}: {e}"),
            },
        }
    }

    /// Who holds the line, as the kernel reports it.
    fn consumer(&self) -> Option<String> {
        let chip = gpiocdev::Chip::from_path(&self.path).ok()?;
        let info = chip.line_info(self.config.offset).ok()?;
        (!info.consumer.is_empty()).then_some(info.consumer)
    }
}

/// The kernel error number inside a gpiocdev error, if there is one.
fn errno(e: &gpiocdev::Error) -> Option<Errno> {
    let n = match e {
        gpiocdev::Error::Os(errno) => errno.0,
        gpiocdev::Error::Uapi(_, gpiocdev_uapi::Error::Os(errno)) => errno.0,
        _ => return None,
    };
    Some(Errno::from_raw_os_error(n))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values stay consistent even if a holder panicked (they are replaced whole).
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What woke a watcher.
enum Woke {
    /// The backend was dropped.
    Stop,
    /// An edge event is ready to read.
    Edge,
    /// The request failed (the chip was removed).
    Failed,
}

/// The body of a line's watcher thread: delivers edges until `stop` is closed, requesting
/// the line again every [`RETRY_INTERVAL`] while it cannot be requested.
fn watch_line(line: &Line, sink: &EdgeSink, stop: &PipeReader) {
    // Whether the line's unavailability has been logged (once per outage).
    let mut unavailable = false;
    loop {
        let held = match line.held() {
            Ok(held) => {
                if unavailable {
                    tracing::info!(line = %line.name, chip = %line.config.chip, "GPIO line is back: watching its edges");
                    unavailable = false;
                }
                held
            }
            Err(e) => {
                if !unavailable {
                    tracing::warn!(error = %e, "cannot watch GPIO line; retrying every {RETRY_INTERVAL:?}");
                    unavailable = true;
                }
                if stopped(stop, Some(RETRY_INTERVAL)) {
                    return;
                }
                continue;
            }
        };
        if !held.edges {
            // Nothing to report for this line; wait for the backend to be dropped.
            stopped(stop, None);
            return;
        }
        let failure = match wait_edge(&held.request, stop) {
            Woke::Stop => return,
            Woke::Edge => match held.request.read_edge_event() {
                Ok(event) => {
                    sink(&line.name, event.kind == EdgeKind::Rising);
                    continue;
                }
                Err(e) => line.error("reading an edge event", e).to_string(),
            },
            Woke::Failed => format!(
                "GPIO line `{}`: chip `{}` ({}) stopped answering (removed?)",
                line.name,
                line.config.chip,
                line.path.display()
            ),
        };
        // Request the line afresh: a removed chip that returns is a new device.
        line.forget(&held.request);
        tracing::warn!(error = %failure, "stopped watching GPIO line; retrying every {RETRY_INTERVAL:?}");
        unavailable = true;
        if stopped(stop, Some(RETRY_INTERVAL)) {
            return;
        }
    }
}

/// Blocks until `request` has an edge event, fails, or `stop` is closed.
fn wait_edge(request: &Request, stop: &PipeReader) -> Woke {
    let mut fds = [
        PollFd::new(request, PollFlags::IN),
        PollFd::new(stop, PollFlags::IN),
    ];
    loop {
        match rustix::event::poll(&mut fds, None) {
            Ok(_) => break,
            Err(Errno::INTR) => continue,
            Err(_) => return Woke::Failed,
        }
    }
    if !fds[1].revents().is_empty() {
        Woke::Stop
    } else if fds[0]
        .revents()
        .intersects(PollFlags::ERR | PollFlags::HUP | PollFlags::NVAL)
    {
        Woke::Failed
    } else {
        Woke::Edge
    }
}

/// Waits up to `timeout` (forever if `None`) for `stop` to be closed; whether it was.
fn stopped(stop: &PipeReader, timeout: Option<Duration>) -> bool {
    // A duration too long for a timespec (centuries) is as good as forever.
    let timeout = timeout.and_then(|t| Timespec::try_from(t).ok());
    let mut fds = [PollFd::new(stop, PollFlags::IN)];
    loop {
        match rustix::event::poll(&mut fds, timeout.as_ref()) {
            Ok(_) => return !fds[0].revents().is_empty(),
            Err(Errno::INTR) => continue,
            // Polling one valid pipe does not fail; if it did, stop rather than spin.
            Err(_) => return true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_is_found_in_os_and_uapi_errors() {
        let busy = gpiocdev::Error::Uapi(
            gpiocdev::UapiCall::GetLine,
            gpiocdev_uapi::Error::Os(gpiocdev_uapi::Errno(16)),
        );
        assert_eq!(errno(&busy), Some(Errno::BUSY));
        let missing = gpiocdev::Error::from(std::io::Error::from_raw_os_error(2));
        assert_eq!(errno(&missing), Some(Errno::NOENT));
        assert_eq!(errno(&gpiocdev::Error::NoGpioChips()), None);
    }

    #[test]
    fn stopped_times_out_while_open_and_returns_when_closed() {
        let (rx, tx) = std::io::pipe().expect("pipe");
        let started = std::time::Instant::now();
        assert!(!stopped(&rx, Some(Duration::from_millis(50))));
        assert!(started.elapsed() >= Duration::from_millis(50));
        drop(tx);
        assert!(stopped(&rx, None));
    }
}
