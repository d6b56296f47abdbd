//! `misbehave`: a `perch:device/app` component that misbehaves on request, so tests can check
//! that the agent contains it (fuel/epoch deadlines, memory limits, traps, crash-loop backoff).
//!
//! The behaviour is picked by the suffix of the message subject; see README.md.

wit_bindgen::generate!({ path: "../../wit", world: "perch:device/app" });

use std::hint::black_box;

use exports::perch::device::{lifecycle, message_handler, timer};
use perch::device::log::{Level, log};

/// Size of each allocation made by `.hog`.
const CHUNK: usize = 1 << 20;
/// Touch one byte per host page so every chunk is really backed by memory.
const PAGE: usize = 4096;

struct Misbehave;

impl lifecycle::Guest for Misbehave {
    fn on_start() -> Result<(), String> {
        Ok(())
    }
}

impl timer::Guest for Misbehave {
    fn on_tick() -> Result<(), String> {
        // Every tick traps: a component that crashes on each trigger, for crash-loop backoff.
        core::arch::wasm32::unreachable()
    }
}

impl message_handler::Guest for Misbehave {
    fn on_message(subject: String, _payload: Vec<u8>) -> Result<(), String> {
        if subject.ends_with(".loop") {
            spin()
        } else if subject.ends_with(".hog") {
            hog()
        } else if subject.ends_with(".trap") {
            core::arch::wasm32::unreachable()
        } else if subject.ends_with(".ok") {
            log(Level::Info, "ok");
            Ok(())
        } else {
            Err(format!("misbehave: no behaviour for subject `{subject}`"))
        }
    }
}

/// Busy-loops forever; `black_box` keeps the optimiser from proving the loop useless.
fn spin() -> ! {
    let mut counter: u64 = 0;
    loop {
        counter = black_box(counter.wrapping_add(1));
    }
}

/// Allocates and touches 1 MiB chunks forever, keeping them all alive, until the host's
/// memory limit makes `memory.grow` fail (the allocator then aborts with a trap).
fn hog() -> ! {
    let mut held: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut chunk = vec![0u8; CHUNK];
        for byte in chunk.iter_mut().step_by(PAGE) {
            *byte = 1;
        }
        held.push(black_box(chunk));
    }
}

export!(Misbehave);
