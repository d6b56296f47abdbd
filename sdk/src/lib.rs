//! # perch-sdk: Perch components in plain Rust
//!
//! A Perch component is one ordinary crate: a `Cargo.toml` whose
//! `[package.metadata.perch]` table says what the component needs, and a `src/lib.rs` that
//! implements [`App`] and calls [`export!`]. The SDK carries the WIT bindings, so there are
//! no WIT files, no `wit/deps` and no glue code to write.
//!
//! ```no_run
//! use perch_sdk::{App, Result, log, sensors, telemetry};
//!
//! struct Climate;
//!
//! impl App for Climate {
//!     fn on_tick() -> Result<()> {
//!         let t = sensors::read("room-temp")?;
//!         log::info(format!("room at {:.1} {}", t.value, t.unit));
//!         telemetry::publish("climate", format!("{{\"t\":{}}}", t.value))?;
//!         Ok(())
//!     }
//! }
//!
//! perch_sdk::export!(Climate);
//! ```
//!
//! with, in `Cargo.toml`:
//!
//! ```toml
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [package.metadata.perch]
//! triggers = [{ every = "5s" }]
//! grants = { sensors = ["room-temp"], telemetry = ["climate"] }
//! ```
//!
//! Each trigger runs in a fresh instance: keep state in [`kv`], not in statics. Host calls
//! outside the manifest's grants return [`Error::Denied`]; they never crash the component.
//!
//! This crate is for guests (`wasm32-wasip2`); it must not depend on any host crate. It
//! also compiles for the host so that plain logic in a component crate can be unit-tested
//! with `cargo test` (host calls there panic: they need an agent).

use std::fmt;

#[doc(hidden)]
pub mod __private {
    //! Used by [`export!`](crate::export); not part of the API.
    pub use wasip2;

    #[allow(missing_docs, clippy::all, unsafe_code, missing_debug_implementations)]
    pub mod bindings {
        wit_bindgen::generate!({
            path: "../wit",
            world: "perch:device/app",
            pub_export_macro: true,
            export_macro_name: "export_app",
            default_bindings_module: "perch_sdk::__private::bindings",
            // wasi:logging, wasi:keyvalue and wasi:config come from `wit/deps/`.
            generate_all,
        });
    }

    pub use bindings::exports::perch::device::gpio_handler::Guest as GpioGuest;
    pub use bindings::exports::perch::device::lifecycle::Guest as LifecycleGuest;
    pub use bindings::exports::perch::device::message_handler::Guest as MessageGuest;
    pub use bindings::exports::perch::device::timer::Guest as TimerGuest;
    pub use wasip2::exports::http::incoming_handler::Guest as HttpGuest;
    pub use wasip2::http::types::{IncomingRequest, ResponseOutparam};

    /// Turns an app result into what the WIT export returns.
    pub fn outcome(result: crate::Result<()>) -> Result<(), String> {
        result.map_err(|e| e.to_string())
    }

    /// Serves one HTTP request with `A::on_http`.
    pub fn serve_http<A: crate::App>(request: IncomingRequest, out: ResponseOutparam) {
        crate::http::serve::<A>(request, out);
    }
}

use __private::bindings::perch::device as host;
use __private::bindings::wasi::config::store as wasi_config;
use __private::bindings::wasi::keyvalue as wasi_kv;

/// What a host call or an app handler can fail with.
///
/// Handlers return it to the agent, which logs it and counts a failure. Errors from the
/// host keep their kind so a component can tell "not granted" from "device unplugged".
///
/// ```no_run
/// use perch_sdk::{Error, gpio, log};
///
/// match gpio::write("fan", true) {
///     Ok(()) => {}
///     Err(Error::Denied(what)) => log::warn(format!("no fan for us: {what}")),
///     Err(other) => log::error(other.to_string()),
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The manifest does not grant this resource; the text names it.
    Denied(String),
    /// The host rejected an argument (too large, malformed).
    Invalid(String),
    /// The host could not complete the call (storage, a device that does not answer).
    Io(String),
    /// An error raised by the component itself.
    App(String),
}

impl Error {
    /// An error with a message of the component's own.
    ///
    /// ```
    /// let e = perch_sdk::Error::msg("threshold must be positive");
    /// assert_eq!(e.to_string(), "threshold must be positive");
    /// ```
    pub fn msg(message: impl fmt::Display) -> Self {
        Self::App(message.to_string())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Denied(m) => write!(f, "denied: {m}"),
            Self::Invalid(m) => write!(f, "invalid: {m}"),
            Self::Io(m) => write!(f, "io: {m}"),
            Self::App(m) => f.write_str(m),
        }
    }
}

/// Any standard error converts, so `?` works on parsing and formatting results.
///
/// ```
/// fn threshold(text: &str) -> perch_sdk::Result<f64> {
///     Ok(text.parse::<f64>()?)
/// }
/// assert!(threshold("x").is_err());
/// ```
impl<E: std::error::Error> From<E> for Error {
    fn from(e: E) -> Self {
        Self::App(e.to_string())
    }
}

/// Keeps the kind of an error the host returned.
fn from_host(e: host::types::Error) -> Error {
    {
        match e {
            host::types::Error::Denied(m) => Error::Denied(m),
            host::types::Error::Invalid(m) => Error::Invalid(m),
            host::types::Error::Io(m) => Error::Io(m),
        }
    }
}

/// Keeps the kind of a key-value error.
fn from_kv(e: wasi_kv::store::Error) -> Error {
    match e {
        wasi_kv::store::Error::NoSuchStore => Error::Io("no such key-value bucket".into()),
        wasi_kv::store::Error::AccessDenied => Error::Denied("key-value bucket".into()),
        wasi_kv::store::Error::Other(m) => Error::Io(m),
    }
}

/// `Result` with [`Error`].
///
/// ```
/// fn half(n: u32) -> perch_sdk::Result<u32> {
///     if n % 2 == 1 {
///         return Err(perch_sdk::Error::msg(format!("{n} is odd")));
///     }
///     Ok(n / 2)
/// }
/// assert_eq!(half(4).ok(), Some(2));
/// ```
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A message from the local bus (or, when connected, the fleet), as passed to
/// [`App::on_message`].
///
/// ```
/// let m = perch_sdk::Message { subject: "cmd.fan".into(), payload: b"on".to_vec() };
/// assert!(m.subject.starts_with("cmd."));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The subject it was published on.
    pub subject: String,
    /// The payload bytes.
    pub payload: Vec<u8>,
}

impl Message {
    /// The payload as text (lossy for bytes that are not UTF-8).
    ///
    /// ```
    /// let m = perch_sdk::Message { subject: "cmd.fan".into(), payload: b"on".to_vec() };
    /// assert_eq!(m.text(), "on");
    /// ```
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.payload)
    }
}

pub use http::{Request, Response};

/// A component. Implement the handlers for the triggers in your manifest; the others keep
/// their defaults. Every call runs in a fresh instance.
///
/// ```no_run
/// use perch_sdk::{App, Message, Request, Response, Result, log};
///
/// struct Hello;
///
/// impl App for Hello {
///     fn on_start() -> Result<()> {
///         log::info("hello is up");
///         Ok(())
///     }
///     fn on_message(message: Message) -> Result<()> {
///         log::info(format!("{} says {}", message.subject, message.text()));
///         Ok(())
///     }
///     fn on_http(request: Request) -> Response {
///         Response::text(200, format!("hello from {}\n", request.path))
///     }
/// }
///
/// perch_sdk::export!(Hello);
/// ```
pub trait App {
    /// Runs once when the component starts (`{ startup = true }` trigger).
    fn on_start() -> Result<()> {
        Ok(())
    }

    /// Runs on every tick of an `{ every = "..." }` trigger.
    fn on_tick() -> Result<()> {
        Ok(())
    }

    /// Runs for each message on a `{ message = "..." }` subject.
    fn on_message(message: Message) -> Result<()> {
        let _ = message;
        Ok(())
    }

    /// Runs when a watched GPIO line changes level (`{ gpio = "button", edge = "falling" }`
    /// trigger); `high` is the new logical level.
    fn on_gpio(line: String, high: bool) -> Result<()> {
        let _ = (line, high);
        Ok(())
    }

    /// Answers a request under an `{ http = "/..." }` route.
    fn on_http(request: Request) -> Response {
        Response::text(404, format!("no handler for {}\n", request.path))
    }
}

/// Exports an [`App`] as the component's handlers. Call it once, at the crate root.
///
/// ```no_run
/// struct Noop;
/// impl perch_sdk::App for Noop {}
/// perch_sdk::export!(Noop);
/// ```
#[macro_export]
macro_rules! export {
    ($app:ty) => {
        #[doc(hidden)]
        struct __PerchExports;

        impl $crate::__private::LifecycleGuest for __PerchExports {
            fn on_start() -> ::core::result::Result<(), ::std::string::String> {
                $crate::__private::outcome(<$app as $crate::App>::on_start())
            }
        }

        impl $crate::__private::TimerGuest for __PerchExports {
            fn on_tick() -> ::core::result::Result<(), ::std::string::String> {
                $crate::__private::outcome(<$app as $crate::App>::on_tick())
            }
        }

        impl $crate::__private::MessageGuest for __PerchExports {
            fn on_message(
                subject: ::std::string::String,
                payload: ::std::vec::Vec<u8>,
            ) -> ::core::result::Result<(), ::std::string::String> {
                $crate::__private::outcome(<$app as $crate::App>::on_message($crate::Message {
                    subject,
                    payload,
                }))
            }
        }

        impl $crate::__private::GpioGuest for __PerchExports {
            fn on_edge(
                line: ::std::string::String,
                high: bool,
            ) -> ::core::result::Result<(), ::std::string::String> {
                $crate::__private::outcome(<$app as $crate::App>::on_gpio(line, high))
            }
        }

        impl $crate::__private::HttpGuest for __PerchExports {
            fn handle(
                request: $crate::__private::IncomingRequest,
                out: $crate::__private::ResponseOutparam,
            ) {
                $crate::__private::serve_http::<$app>(request, out)
            }
        }

        $crate::__private::bindings::export_app!(__PerchExports with_types_in $crate::__private::bindings);
        $crate::__private::wasip2::http::proxy::export!(__PerchExports);
    };
}

/// Log lines, kept per component by the agent (`perch logs NAME`).
///
/// ```no_run
/// perch_sdk::log::info("started");
/// ```
pub mod log {
    use super::__private::bindings::wasi::logging::logging::Level;

    fn log(level: Level, message: &str) {
        super::__private::bindings::wasi::logging::logging::log(level, "", message);
    }

    /// Logs at trace level.
    ///
    /// ```no_run
    /// perch_sdk::log::trace("entering on_tick");
    /// ```
    pub fn trace(message: impl AsRef<str>) {
        log(Level::Trace, message.as_ref());
    }

    /// Logs at debug level.
    ///
    /// ```no_run
    /// perch_sdk::log::debug(format!("raw value {}", 42));
    /// ```
    pub fn debug(message: impl AsRef<str>) {
        log(Level::Debug, message.as_ref());
    }

    /// Logs at info level.
    ///
    /// ```no_run
    /// perch_sdk::log::info("fan switched on");
    /// ```
    pub fn info(message: impl AsRef<str>) {
        log(Level::Info, message.as_ref());
    }

    /// Logs at warn level.
    ///
    /// ```no_run
    /// perch_sdk::log::warn("sensor reading out of range");
    /// ```
    pub fn warn(message: impl AsRef<str>) {
        log(Level::Warn, message.as_ref());
    }

    /// Logs at error level.
    ///
    /// ```no_run
    /// perch_sdk::log::error("cannot drive the fan");
    /// ```
    pub fn error(message: impl AsRef<str>) {
        log(Level::Error, message.as_ref());
    }
}

/// The component's own durable key-value bucket (`wasi:keyvalue`); it survives restarts
/// and redeploys, and is removed with the component.
///
/// ```no_run
/// perch_sdk::kv::set("mode", "auto")?;
/// assert_eq!(perch_sdk::kv::get_string("mode")?.as_deref(), Some("auto"));
/// # Ok::<(), perch_sdk::Error>(())
/// ```
pub mod kv {
    use super::{Result, from_kv, wasi_kv};

    /// The component's bucket. Opening is a handle lookup in the host, not I/O.
    fn bucket() -> Result<wasi_kv::store::Bucket> {
        wasi_kv::store::open("default").map_err(from_kv)
    }

    /// The value of `key`, if set.
    ///
    /// ```no_run
    /// let raw: Option<Vec<u8>> = perch_sdk::kv::get("count")?;
    /// # Ok::<(), perch_sdk::Error>(())
    /// ```
    pub fn get(key: &str) -> Result<Option<Vec<u8>>> {
        bucket()?.get(key).map_err(from_kv)
    }

    /// The value of `key` as text, if set.
    ///
    /// ```no_run
    /// let mode = perch_sdk::kv::get_string("mode")?.unwrap_or_else(|| "auto".into());
    /// # Ok::<(), perch_sdk::Error>(())
    /// ```
    pub fn get_string(key: &str) -> Result<Option<String>> {
        match get(key)? {
            Some(bytes) => Ok(Some(String::from_utf8(bytes)?)),
            None => Ok(None),
        }
    }

    /// Sets `key`; durable when this returns.
    ///
    /// ```no_run
    /// perch_sdk::kv::set("mode", "auto")?;
    /// # Ok::<(), perch_sdk::Error>(())
    /// ```
    pub fn set(key: &str, value: impl AsRef<[u8]>) -> Result<()> {
        bucket()?.set(key, value.as_ref()).map_err(from_kv)
    }

    /// Deletes `key`; returns whether it existed.
    ///
    /// ```no_run
    /// let existed = perch_sdk::kv::delete("mode")?;
    /// # Ok::<(), perch_sdk::Error>(())
    /// ```
    pub fn delete(key: &str) -> Result<bool> {
        let bucket = bucket()?;
        let existed = bucket.exists(key).map_err(from_kv)?;
        bucket.delete(key).map_err(from_kv)?;
        Ok(existed)
    }

    /// Adds `delta` to the counter at `key` (0 when unset) in one atomic step and returns
    /// the new value. The counter stays readable as text with [`get_string`].
    ///
    /// ```no_run
    /// let boots = perch_sdk::kv::increment("boots", 1)?;
    /// perch_sdk::log::info(format!("boot number {boots}"));
    /// # Ok::<(), perch_sdk::Error>(())
    /// ```
    pub fn increment(key: &str, delta: u64) -> Result<u64> {
        wasi_kv::atomics::increment(&bucket()?, key, delta).map_err(from_kv)
    }

    /// Every key, in byte order.
    ///
    /// ```no_run
    /// for key in perch_sdk::kv::keys()? {
    ///     perch_sdk::log::info(key);
    /// }
    /// # Ok::<(), perch_sdk::Error>(())
    /// ```
    pub fn keys() -> Result<Vec<String>> {
        let bucket = bucket()?;
        let mut keys = Vec::new();
        let mut cursor = None;
        loop {
            let page = bucket.list_keys(cursor).map_err(from_kv)?;
            keys.extend(page.keys);
            match page.cursor {
                Some(next) => cursor = Some(next),
                None => return Ok(keys),
            }
        }
    }
}

/// Config values: the manifest's `config` defaults overlaid with the deployment's.
///
/// ```no_run
/// let threshold: f64 = perch_sdk::config::parse("threshold-c")?;
/// # Ok::<(), perch_sdk::Error>(())
/// ```
pub mod config {
    use super::{Error, Result, wasi_config};

    /// The value of `key`, if set.
    ///
    /// ```no_run
    /// let unit = perch_sdk::config::get("unit").unwrap_or_else(|| "C".into());
    /// ```
    pub fn get(key: &str) -> Option<String> {
        // Perch's config is in memory and never fails; another host's error reads as unset.
        wasi_config::get(key).ok().flatten()
    }

    /// The value of `key` parsed as `T`; an error names the key when it is missing or
    /// does not parse.
    ///
    /// ```no_run
    /// let threshold: f64 = perch_sdk::config::parse("threshold-c")?;
    /// # Ok::<(), perch_sdk::Error>(())
    /// ```
    pub fn parse<T: std::str::FromStr>(key: &str) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        let text = get(key).ok_or_else(|| {
            Error::msg(format!(
                "config `{key}` is not set: add it to `config` in [package.metadata.perch]"
            ))
        })?;
        text.parse()
            .map_err(|e| Error::msg(format!("config `{key}` = `{text}`: {e}")))
    }

    /// Every key and value, sorted by key.
    ///
    /// ```no_run
    /// for (key, value) in perch_sdk::config::all() {
    ///     perch_sdk::log::debug(format!("{key} = {value}"));
    /// }
    /// ```
    pub fn all() -> Vec<(String, String)> {
        let mut all = wasi_config::get_all().unwrap_or_default();
        all.sort();
        all
    }
}

/// GPIO lines named by the board, granted in the manifest
/// (`grants.gpio = { read = [...], write = [...] }`).
///
/// ```no_run
/// let pressed = perch_sdk::gpio::read("button")?;
/// perch_sdk::gpio::write("led", pressed)?;
/// # Ok::<(), perch_sdk::Error>(())
/// ```
pub mod gpio {
    use super::{Result, host};

    /// The line's logical level.
    ///
    /// ```no_run
    /// if perch_sdk::gpio::read("button")? {
    ///     perch_sdk::log::info("pressed");
    /// }
    /// # Ok::<(), perch_sdk::Error>(())
    /// ```
    pub fn read(line: &str) -> Result<bool> {
        host::gpio::read(line).map_err(crate::from_host)
    }

    /// Drives an output line (needs a `write` grant).
    ///
    /// ```no_run
    /// perch_sdk::gpio::write("fan", true)?;
    /// # Ok::<(), perch_sdk::Error>(())
    /// ```
    pub fn write(line: &str, high: bool) -> Result<()> {
        host::gpio::write(line, high).map_err(crate::from_host)
    }
}

/// Sensors named by the board, granted in the manifest (`grants.sensors = [...]`).
///
/// ```no_run
/// let t = perch_sdk::sensors::read("room-temp")?.value;
/// # Ok::<(), perch_sdk::Error>(())
/// ```
pub mod sensors {
    use super::{Result, host};

    /// One measurement.
    ///
    /// ```
    /// let r = perch_sdk::sensors::Reading { value: 21.5, unit: "°C".into(), timestamp_ms: 0 };
    /// assert!(r.value > 20.0);
    /// ```
    #[derive(Debug, Clone, PartialEq)]
    pub struct Reading {
        /// The value in `unit`.
        pub value: f64,
        /// Unit symbol, e.g. `°C`.
        pub unit: String,
        /// Milliseconds since the Unix epoch.
        pub timestamp_ms: u64,
    }

    /// Takes one reading.
    ///
    /// ```no_run
    /// let t = perch_sdk::sensors::read("room-temp")?;
    /// perch_sdk::log::info(format!("{:.1} {}", t.value, t.unit));
    /// # Ok::<(), perch_sdk::Error>(())
    /// ```
    pub fn read(sensor: &str) -> Result<Reading> {
        let r = host::sensors::read(sensor).map_err(crate::from_host)?;
        Ok(Reading {
            value: r.value,
            unit: r.unit,
            timestamp_ms: r.timestamp_ms,
        })
    }
}

/// Durable telemetry, granted per stream (`grants.telemetry = [...]`). A publish returns
/// once the record is on the device's disk; the agent forwards it when connected.
///
/// ```no_run
/// perch_sdk::telemetry::publish("climate", r#"{"t":21.5}"#)?;
/// # Ok::<(), perch_sdk::Error>(())
/// ```
pub mod telemetry {
    use super::{Result, host};

    /// Publishes `payload` to `stream`; returns its sequence number on this device.
    ///
    /// ```no_run
    /// let seq = perch_sdk::telemetry::publish("climate", r#"{"t":21.5}"#)?;
    /// # Ok::<(), perch_sdk::Error>(())
    /// ```
    pub fn publish(stream: &str, payload: impl AsRef<[u8]>) -> Result<u64> {
        host::telemetry::publish(stream, payload.as_ref()).map_err(crate::from_host)
    }
}

/// Messages on the agent's local bus (bridged to the fleet when connected).
///
/// ```no_run
/// perch_sdk::messaging::publish("climate.alarm", "too hot")?;
/// # Ok::<(), perch_sdk::Error>(())
/// ```
pub mod messaging {
    use super::{Result, host};

    /// Publishes `payload` on `subject` (`.`-separated tokens, no wildcards).
    ///
    /// ```no_run
    /// perch_sdk::messaging::publish("climate.alarm", "too hot")?;
    /// # Ok::<(), perch_sdk::Error>(())
    /// ```
    pub fn publish(subject: &str, payload: impl AsRef<[u8]>) -> Result<()> {
        host::messaging::publish(subject, payload.as_ref()).map_err(crate::from_host)
    }
}

/// HTTP requests and responses for [`App::on_http`], and outgoing requests ([`http::fetch`],
/// granted per host with `grants.http`).
///
/// ```
/// use perch_sdk::http::{Request, Response};
///
/// fn handle(request: Request) -> Response {
///     if request.method == "GET" {
///         Response::json(200, r#"{"ok":true}"#)
///     } else {
///         Response::text(405, "GET only\n")
///     }
/// }
/// let r = handle(Request { method: "PUT".into(), path: "/".into(), headers: vec![], body: vec![] });
/// assert_eq!(r.status, 405);
/// ```
pub mod http {
    use wasip2::http::types::{
        Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
    };
    use wasip2::io::streams::StreamError;

    /// Largest request body read into a [`Request`]; a larger body gets `400`.
    ///
    /// ```
    /// assert_eq!(perch_sdk::http::MAX_BODY, 4 << 20);
    /// ```
    pub const MAX_BODY: usize = 4 << 20;

    /// A request, read whole.
    ///
    /// ```
    /// let r = perch_sdk::Request {
    ///     method: "POST".into(),
    ///     path: "/thermostat?verbose=1".into(),
    ///     headers: vec![],
    ///     body: b"25.5".to_vec(),
    /// };
    /// assert_eq!(r.path.split('?').next(), Some("/thermostat"));
    /// ```
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Request {
        /// `GET`, `POST`, ...
        pub method: String,
        /// Path and query, e.g. `/thermostat?verbose=1`.
        pub path: String,
        /// Header names (lowercase) and values.
        pub headers: Vec<(String, Vec<u8>)>,
        /// The body.
        pub body: Vec<u8>,
    }

    impl Request {
        /// The first value of header `name` as text.
        ///
        /// ```
        /// let r = perch_sdk::Request {
        ///     method: "GET".into(),
        ///     path: "/".into(),
        ///     headers: vec![("accept".into(), b"text/plain".to_vec())],
        ///     body: vec![],
        /// };
        /// assert_eq!(r.header("Accept"), Some("text/plain"));
        /// ```
        pub fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .and_then(|(_, v)| std::str::from_utf8(v).ok())
        }
    }

    /// A response.
    ///
    /// ```
    /// let r = perch_sdk::Response { status: 204, headers: vec![], body: vec![] };
    /// assert_eq!(r.status, 204);
    /// ```
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Response {
        /// Status code.
        pub status: u16,
        /// Header names and values.
        pub headers: Vec<(String, Vec<u8>)>,
        /// The body.
        pub body: Vec<u8>,
    }

    impl Response {
        /// A `text/plain` response.
        ///
        /// ```
        /// let r = perch_sdk::Response::text(200, "ok\n");
        /// assert_eq!(r.body, b"ok\n");
        /// ```
        pub fn text(status: u16, body: impl Into<String>) -> Self {
            Self::new(
                status,
                "text/plain; charset=utf-8",
                body.into().into_bytes(),
            )
        }

        /// An `application/json` response; `body` must already be JSON.
        ///
        /// ```
        /// let r = perch_sdk::Response::json(200, r#"{"fan":true}"#);
        /// assert_eq!(r.status, 200);
        /// ```
        pub fn json(status: u16, body: impl Into<String>) -> Self {
            Self::new(status, "application/json", body.into().into_bytes())
        }

        /// A response with this content type and body.
        ///
        /// ```
        /// let r = perch_sdk::Response::new(200, "image/png", vec![0x89, b'P']);
        /// assert_eq!(r.headers[0].0, "content-type");
        /// ```
        pub fn new(status: u16, content_type: &str, body: Vec<u8>) -> Self {
            Self {
                status,
                headers: vec![("content-type".into(), content_type.as_bytes().to_vec())],
                body,
            }
        }

        /// Adds a header.
        ///
        /// ```
        /// let r = perch_sdk::Response::text(200, "ok").with_header("cache-control", "no-store");
        /// assert_eq!(r.headers.len(), 2);
        /// ```
        pub fn with_header(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
            self.headers.push((name.into(), value.as_ref().to_vec()));
            self
        }
    }

    fn read(request: IncomingRequest) -> Result<Request, String> {
        let method = match request.method() {
            Method::Get => "GET".to_string(),
            Method::Head => "HEAD".to_string(),
            Method::Post => "POST".to_string(),
            Method::Put => "PUT".to_string(),
            Method::Delete => "DELETE".to_string(),
            Method::Connect => "CONNECT".to_string(),
            Method::Options => "OPTIONS".to_string(),
            Method::Trace => "TRACE".to_string(),
            Method::Patch => "PATCH".to_string(),
            Method::Other(m) => m,
        };
        let path = request.path_with_query().unwrap_or_else(|| "/".into());
        let headers = request.headers().entries();
        let incoming = request
            .consume()
            .map_err(|()| "the request body was already taken".to_string())?;
        let mut body = Vec::new();
        {
            let stream = incoming
                .stream()
                .map_err(|()| "the request body stream was already taken".to_string())?;
            loop {
                match stream.blocking_read(64 << 10) {
                    Ok(chunk) => {
                        body.extend_from_slice(&chunk);
                        if body.len() > MAX_BODY {
                            return Err(format!("the request body exceeds {MAX_BODY} bytes"));
                        }
                    }
                    Err(StreamError::Closed) => break,
                    Err(StreamError::LastOperationFailed(e)) => {
                        return Err(format!("reading the request body: {}", e.to_debug_string()));
                    }
                }
            }
        }
        Ok(Request {
            method,
            path,
            headers,
            body,
        })
    }

    fn respond(out: ResponseOutparam, response: Response) {
        let headers = Fields::from_list(&response.headers).unwrap_or_else(|_| Fields::new());
        let outgoing = OutgoingResponse::new(headers);
        if outgoing.set_status_code(response.status).is_err() {
            let _ = outgoing.set_status_code(500);
        }
        let Ok(body) = outgoing.body() else { return };
        ResponseOutparam::set(out, Ok(outgoing));
        let Ok(stream) = body.write() else { return };
        for chunk in response.body.chunks(4096) {
            // A failed write means the client went away: nobody is left to answer.
            if stream.blocking_write_and_flush(chunk).is_err() {
                return;
            }
        }
        drop(stream);
        let _ = OutgoingBody::finish(body, None);
    }

    /// Sends a request and reads the whole response. Needs `grants.http` naming the host
    /// (`"api.example.com"` or `"api.example.com:8443"`); any other host is
    /// [`Error::Denied`](crate::Error::Denied).
    ///
    /// ```no_run
    /// let r = perch_sdk::http::fetch("POST", "http://hub.local:8080/readings", &[("content-type", "application/json")], br#"{"t":21.5}"#)?;
    /// assert_eq!(r.status, 200);
    /// # Ok::<(), perch_sdk::Error>(())
    /// ```
    pub fn fetch(
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> crate::Result<Response> {
        use crate::Error;
        use wasip2::http::types::{ErrorCode, OutgoingRequest, Scheme};

        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            Error::Invalid(format!("`{url}` is not a URL: write http://host/path"))
        })?;
        let scheme = match scheme {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            other => return Err(Error::Invalid(format!("unsupported URL scheme `{other}`"))),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let fields: Vec<(String, Vec<u8>)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect();
        let fields = Fields::from_list(&fields)
            .map_err(|e| Error::Invalid(format!("bad request headers: {e:?}")))?;
        let request = OutgoingRequest::new(fields);
        let method = match method {
            "GET" => Method::Get,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "PATCH" => Method::Patch,
            "HEAD" => Method::Head,
            other => Method::Other(other.to_string()),
        };
        let bad = |what: &str| Error::Invalid(format!("the request's {what} was refused"));
        request.set_method(&method).map_err(|()| bad("method"))?;
        request
            .set_scheme(Some(&scheme))
            .map_err(|()| bad("scheme"))?;
        request
            .set_authority(Some(authority))
            .map_err(|()| bad("host"))?;
        request
            .set_path_with_query(Some(path))
            .map_err(|()| bad("path"))?;
        let outgoing = request.body().map_err(|()| bad("body"))?;
        {
            let stream = outgoing.write().map_err(|()| bad("body"))?;
            for chunk in body.chunks(4096) {
                stream
                    .blocking_write_and_flush(chunk)
                    .map_err(|e| Error::Io(format!("sending the request body: {e:?}")))?;
            }
        }
        let future =
            wasip2::http::outgoing_handler::handle(request, None).map_err(|e| match e {
                ErrorCode::HttpRequestDenied => {
                    Error::Denied(format!("outgoing HTTP to `{authority}`"))
                }
                other => Error::Io(format!("HTTP request to `{authority}`: {other:?}")),
            })?;
        OutgoingBody::finish(outgoing, None)
            .map_err(|e| Error::Io(format!("finishing the request body: {e:?}")))?;
        future.subscribe().block();
        let response = match future.get() {
            Some(Ok(Ok(r))) => r,
            Some(Ok(Err(ErrorCode::HttpRequestDenied))) => {
                return Err(Error::Denied(format!("outgoing HTTP to `{authority}`")));
            }
            Some(Ok(Err(e))) => {
                return Err(Error::Io(format!("HTTP request to `{authority}`: {e:?}")));
            }
            _ => {
                return Err(Error::Io(format!(
                    "HTTP request to `{authority}` got no response"
                )));
            }
        };
        let status = response.status();
        let headers = response.headers().entries();
        let incoming = response
            .consume()
            .map_err(|()| Error::Io("the response body was already taken".into()))?;
        let mut body = Vec::new();
        {
            let stream = incoming
                .stream()
                .map_err(|()| Error::Io("the response body stream was already taken".into()))?;
            loop {
                match stream.blocking_read(64 << 10) {
                    Ok(chunk) => {
                        body.extend_from_slice(&chunk);
                        if body.len() > MAX_BODY {
                            return Err(Error::Io(format!(
                                "the response body exceeds {MAX_BODY} bytes"
                            )));
                        }
                    }
                    Err(StreamError::Closed) => break,
                    Err(StreamError::LastOperationFailed(e)) => {
                        return Err(Error::Io(format!(
                            "reading the response body: {}",
                            e.to_debug_string()
                        )));
                    }
                }
            }
        }
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    /// `GET url`, see [`fetch`].
    ///
    /// ```no_run
    /// let r = perch_sdk::http::get("http://hub.local:8080/config")?;
    /// perch_sdk::log::info(String::from_utf8_lossy(&r.body));
    /// # Ok::<(), perch_sdk::Error>(())
    /// ```
    pub fn get(url: &str) -> crate::Result<Response> {
        fetch("GET", url, &[], &[])
    }

    pub(crate) fn serve<A: crate::App>(request: IncomingRequest, out: ResponseOutparam) {
        let response = match read(request) {
            Ok(request) => A::on_http(request),
            Err(e) => Response::text(400, format!("{e}\n")),
        };
        respond(out, response);
    }
}
