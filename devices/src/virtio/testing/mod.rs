//! Test support, usable by unit tests, the tests crate and benchmarks:
//!
//! * [`GuestDriver`] plays a virtio driver directly on a [`GuestMemory`]
//!   through an [`MmioTransport`]'s registers (no KVM): the status sequence,
//!   feature negotiation, split rings at addresses it allocates, buffers,
//!   crafted (malformed) descriptor chains, kicks through the queue
//!   eventfds, interrupts through the interrupt eventfd, used-ring reaping.
//! * [`NetNs`] creates a network namespace and deletes it when dropped.
//! * Frame builders and parsers for Ethernet/IPv4/UDP.
//!
//! Everything here reports failures as errors rather than panicking, so that
//! a benchmark can say what went wrong.

mod driver;
mod frames;
mod netns;

pub use driver::*;
pub use frames::*;
pub use netns::*;

use std::hash::{BuildHasher, Hasher};

use vm_memory::GuestAddress;

use crate::GuestMemory;

/// Guest memory of `size` bytes at guest address 0, with a dirty bitmap.
pub fn guest_memory(size: usize) -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), size)])
        .unwrap_or_else(|e| panic!("cannot map {size} bytes of test guest memory: {e}"))
}

/// A random 64-bit value (for unique names).
pub fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn udp_frames_round_trip() {
        let a = Ipv4Addr::new(10, 0, 0, 2);
        let b = Ipv4Addr::new(10, 0, 0, 1);
        for payload in [&b"hello"[..], &b"odd-length!"[..], &[][..]] {
            let f = udp_frame([2; 6], [4; 6], a, b, 1000, 2000, payload, UdpCsum::Full);
            let v = parse_udp(&f).unwrap();
            assert!(v.ip_csum_ok && v.udp_csum_ok);
            assert_eq!((v.src, v.dst, v.sport, v.dport), (a, b, 1000, 2000));
            assert_eq!(v.payload, payload);
            let p = udp_frame([2; 6], [4; 6], a, b, 1000, 2000, payload, UdpCsum::Partial);
            assert_eq!(parse_udp(&p).unwrap().payload, payload);
        }
        assert!(parse_udp(&[0u8; 20]).is_none());
    }
}
