//! `timer`: counts its ticks in its kv namespace, so the count survives restarts.
//!
//! - start: logs `timer started, count=N`.
//! - every tick: adds one to `count` in one atomic step (`kv::increment`: 0 when absent,
//!   kept as decimal text) and logs `tick N`.
//!
//! A `count` that is not decimal text is an error, not a silent reset. Tests preset it with
//! `kv::set("count", "41")` and read it back through the agent's log.

use perch_sdk::{App, Error, Result, kv, log};

const KEY: &str = "count";

struct Timer;

impl App for Timer {
    fn on_start() -> Result<()> {
        log::info(format!("timer started, count={}", count()?));
        Ok(())
    }

    fn on_tick() -> Result<()> {
        let next = kv::increment(KEY, 1)?;
        log::info(format!("tick {next}"));
        Ok(())
    }
}

/// The stored count, 0 when the key is absent.
fn count() -> Result<u64> {
    match kv::get_string(KEY)? {
        None => Ok(0),
        Some(text) => text
            .trim()
            .parse()
            .map_err(|_| Error::msg(format!("kv key `{KEY}` does not hold a decimal count"))),
    }
}

perch_sdk::export!(Timer);
