//! The test guest, built from resources/guest by build.rs and embedded so
//! that `godwit run` without `--kernel` boots something.

pub const TEST_GUEST_ELF: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/godwit-test-guest.elf"));
pub const TEST_GUEST_NAME: &str = "<built-in test guest>";
