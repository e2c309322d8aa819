//! Host-side network peers of godwit's network devices.

pub mod tap;

pub use tap::{Tap, TapError, TapOffloads, VnetHdr};
