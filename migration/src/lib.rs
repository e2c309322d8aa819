//! State formats, the live-migration wire protocol, and the rules that decide
//! whether a VM's state fits a host.

#![deny(clippy::cast_possible_truncation)]
// Tests build inputs from small known values; the deny guards the readers.
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

pub mod atomic;
pub mod cpu_compat;
pub mod format;
pub mod guest_ram;
mod le;
pub mod memory_file;
pub mod persist;
pub mod protocol;
