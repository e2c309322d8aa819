//! Saved VM state: snapshots written to and restored from a directory.

pub mod snapshot;
pub mod staging;
