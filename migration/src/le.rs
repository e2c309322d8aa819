//! Little-endian field readers and the checksum that both of godwit's file
//! formats (the state container and the memory file) lay out the same way.

/// CRC-32C, the checksum of every header, section and message.
pub(crate) fn crc(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// The `u32` at byte `at`; the caller has checked `b` holds it.
pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

/// The `u64` at byte `at`; the caller has checked `b` holds it.
pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

// godwit runs on x86_64 only: every u64 length or offset fits a usize, so
// converting one cannot truncate. This stops the build on a target where
// that stops being true, instead of letting `as` truncate there.
const _: () = assert!(usize::BITS >= u64::BITS);

/// `v` as an index or length; lossless (see the assertion above).
#[allow(clippy::cast_possible_truncation)]
pub(crate) const fn usize_of(v: u64) -> usize {
    v as usize
}

/// A length the writer has bounded already (by `MAX_SECTIONS`,
/// `MAX_REGIONS`, `MAX_PAYLOAD`...) as a `u32` field. Saturates rather than
/// wraps, so that a bound that ever failed gives a file or message the
/// reader refuses instead of one it misreads.
pub(crate) fn bounded_u32(n: impl TryInto<u32>) -> u32 {
    n.try_into().unwrap_or(u32::MAX)
}
