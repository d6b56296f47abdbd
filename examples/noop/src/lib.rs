//! `noop`: a `perch:device/ticker` component that does nothing, for measuring the agent's
//! per-call overhead.

wit_bindgen::generate!({ path: "../../wit", world: "perch:device/ticker" });

use exports::perch::device::{lifecycle, timer};

struct Noop;

impl lifecycle::Guest for Noop {
    fn on_start() -> Result<(), String> {
        Ok(())
    }
}

impl timer::Guest for Noop {
    fn on_tick() -> Result<(), String> {
        Ok(())
    }
}

export!(Noop);
