//! `perch-hil`: boots a board's Perch image under QEMU (TCG: the machine's KVM cannot run
//! stock kernels) on free loopback ports, drives the agent through its forwarded API, and
//! can cut the power (kill QEMU without warning). The guest console is kept in a file; a
//! failing wait prints its tail.

pub mod image;
pub mod qemu;

pub use qemu::{Boot, Machine, MachineSpec};
