//! Saved VM state: snapshots written to and restored from a directory.
//!
//! A snapshot directory is input godwit did not write itself until it has
//! checked it: no cast may silently truncate a value read from it.
#![cfg_attr(not(test), deny(clippy::cast_possible_truncation))]

pub mod snapshot;
pub mod staging;

/// The snapshot directory's state container (`migration::format`).
pub const STATE_FILE: &str = "state.gws";
/// The snapshot directory's sparse guest memory file (`migration::memory_file`).
pub const MEMORY_FILE: &str = "memory.gwm";
