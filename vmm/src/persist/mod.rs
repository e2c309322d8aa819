//! Saved VM state: snapshots written to and restored from a directory.

pub mod snapshot;
pub mod staging;

/// The snapshot directory's state container (`migration::format`).
pub const STATE_FILE: &str = "state.gws";
/// The snapshot directory's sparse guest memory file (`migration::memory_file`).
pub const MEMORY_FILE: &str = "memory.gwm";
