//! `timer`: a `perch:device/ticker` component that counts its ticks in the kv store.
//!
//! The counter is stored under the key `count` as decimal text, so it reads well in the
//! agent's API and survives restarts of the component.

wit_bindgen::generate!({ path: "../../wit", world: "perch:device/ticker" });

use exports::perch::device::{lifecycle, timer};
use perch::device::kv;
use perch::device::log::{Level, log};
use perch::device::types::Error;

const KEY: &str = "count";

struct Timer;

impl lifecycle::Guest for Timer {
    fn on_start() -> Result<(), String> {
        let count = read_count()?;
        log(Level::Info, &format!("timer started, count={count}"));
        Ok(())
    }
}

impl timer::Guest for Timer {
    fn on_tick() -> Result<(), String> {
        let count = read_count()? + 1;
        kv::set(KEY, count.to_string().as_bytes()).map_err(describe)?;
        log(Level::Info, &format!("tick {count}"));
        Ok(())
    }
}

/// The stored count, 0 when the key is absent. A value that is not decimal text is an
/// error rather than a silent reset.
fn read_count() -> Result<u64, String> {
    match kv::get(KEY).map_err(describe)? {
        None => Ok(0),
        Some(bytes) => std::str::from_utf8(&bytes)
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .ok_or_else(|| format!("kv key `{KEY}` does not hold a decimal count")),
    }
}

fn describe(error: Error) -> String {
    match error {
        Error::Denied(what) => format!("kv denied: {what}"),
        Error::Invalid(why) => format!("kv invalid: {why}"),
        Error::Io(why) => format!("kv io: {why}"),
    }
}

export!(Timer);
