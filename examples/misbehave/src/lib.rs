//! `misbehave`: misbehaves on request, so tests can check that the agent contains a bad
//! component without harm to the others.
//!
//! | trigger                            | behaviour                                          |
//! |------------------------------------|----------------------------------------------------|
//! | message, subject ends `.loop`      | spins forever                                      |
//! | message, subject ends `.hog`       | allocates and touches 1 MiB chunks forever         |
//! | message, subject ends `.trap`      | traps (`unreachable`)                              |
//! | message, subject ends `.ok`        | logs `ok` and returns `Ok`                         |
//! | message, any other subject         | returns ``Err("misbehave: no behaviour for subject `…`")`` |
//! | tick                               | always traps, for crash-loop backoff               |
//!
//! The loop must end at the component's timeout, the hog at its memory limit (the
//! allocator aborts with a trap), and the component must stay usable afterwards.

use std::hint::black_box;

use perch_sdk::{App, Error, Message, Result, log};

/// Size of each allocation made by `.hog`.
const CHUNK: usize = 1 << 20;
/// Touch one byte per host page so every chunk is really backed by memory.
const PAGE: usize = 4096;

struct Misbehave;

impl App for Misbehave {
    fn on_tick() -> Result<()> {
        trap()
    }

    fn on_message(message: Message) -> Result<()> {
        let subject = message.subject;
        if subject.ends_with(".loop") {
            spin()
        } else if subject.ends_with(".hog") {
            hog()
        } else if subject.ends_with(".trap") {
            trap()
        } else if subject.ends_with(".ok") {
            log::info("ok");
            Ok(())
        } else {
            Err(Error::msg(format!(
                "misbehave: no behaviour for subject `{subject}`"
            )))
        }
    }
}

fn trap() -> ! {
    #[cfg(target_arch = "wasm32")]
    core::arch::wasm32::unreachable();
    #[cfg(not(target_arch = "wasm32"))]
    std::process::abort();
}

/// Busy-loops forever; `black_box` keeps the optimiser from proving the loop useless.
fn spin() -> ! {
    let mut counter: u64 = 0;
    loop {
        counter = black_box(counter.wrapping_add(1));
    }
}

/// Allocates and touches 1 MiB chunks forever, keeping them all alive.
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

perch_sdk::export!(Misbehave);
