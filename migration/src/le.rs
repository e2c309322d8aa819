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
