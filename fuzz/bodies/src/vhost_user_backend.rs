//! godwit's vhost-user backend (`godwit net-backend`) driven by a hostile
//! frontend: what the vhost-user-backend crate hands it from the frontend's
//! messages (features, the interface window, memory tables, ring addresses,
//! kicks), and frames from the TAP (a socketpair here).

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use godwit_devices::net::Tap;
use godwit_devices::vhost_user::backend::{tap_event, BackendCounters, NetBackend};
use godwit_devices::vhost_user::interface::{self, PROTOCOL_F_GODWIT_INTERFACE, WINDOW_OFFSET};
use godwit_devices::vhost_user::relay::Negotiated;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::input::Input;

type Mem = GuestMemoryMmap<BitmapMmapRegion>;

/// Operations before the body stops, whatever the input's length.
const MAX_OPS: usize = 256;

/// A memory table: `count u8` (up to 3) regions of `gpa u16` (in pages)
/// and `size u8` (in pages, up to 256).
fn memory_table(input: &mut Input<'_>) -> Option<Mem> {
    let count = usize::from(input.u8() % 4);
    let ranges: Vec<(GuestAddress, usize)> = (0..count)
        .map(|_| {
            let gpa = u64::from(input.u16()) << 12;
            let pages = usize::from(input.u8()) + 1;
            (GuestAddress(gpa), pages << 12)
        })
        .collect();
    Mem::from_ranges(&ranges).ok()
}

/// `flags u8` (bit 0: the TAP has a vnet header; bit 2: two queue pairs,
/// each on its own TAP queue), then operations, each an
/// `op u8` and its arguments: set or get the interface window, ack
/// features, event index, a new memory table, a ring's size and addresses,
/// an event (a kick, or the TAP readable), bytes written to guest memory,
/// a frame from the TAP.
pub fn vhost_user_backend(data: &[u8]) {
    let mut input = Input::new(data);
    let first = input.u8();
    let vnet_hdr = first & 1 == 1;
    // Bit 1: a frontend that asked for godwit's extension, so that its
    // window is served.
    let protocol = if first & 2 != 0 {
        PROTOCOL_F_GODWIT_INTERFACE
    } else {
        0
    };
    let pairs = if first & 4 != 0 { 2 } else { 1 };
    let mut taps = Vec::new();
    let mut peers = Vec::new();
    for _ in 0..pairs {
        let Ok((ours, peer)) = UnixDatagram::pair() else {
            return;
        };
        let _ = peer.set_nonblocking(true);
        let Ok(tap) = Tap::from_socket_for_fuzzing(OwnedFd::from(ours), vnet_hdr) else {
            return;
        };
        taps.push(Arc::new(tap));
        peers.push(peer);
    }
    let mut backend = NetBackend::new(
        taps,
        interface::latest(),
        Arc::new(BackendCounters::default()),
        Arc::new(Negotiated::with_protocol(protocol)),
    );
    let mem = GuestMemoryAtomic::new(Mem::new());
    let max = u16::try_from(backend.max_queue_size()).unwrap_or(u16::MAX);
    let vrings: Vec<VringRwLock<GuestMemoryAtomic<Mem>>> = (0..backend.num_queues())
        .filter_map(|_| VringRwLock::new(mem.clone(), max).ok())
        .collect();
    let mut sink = [0u8; 70 * 1024];
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 10 {
            0 => {
                let offset = if input.u8() & 1 == 0 {
                    WINDOW_OFFSET
                } else {
                    u32::from(input.u16())
                };
                let len = usize::from(input.u8());
                let _ = backend.set_config(offset, input.bytes(len));
            }
            1 => {
                let offset = if input.u8() & 1 == 0 {
                    WINDOW_OFFSET
                } else {
                    u32::from(input.u16())
                };
                let size = u32::from(input.u16());
                let _ = backend.get_config(offset, size);
            }
            2 => backend.acked_features(input.u64() & backend.features()),
            3 => backend.set_event_idx(input.u8() & 1 == 1),
            4 => {
                if let Some(table) = memory_table(&mut input) {
                    if let Ok(guard) = mem.lock() {
                        guard.replace(table);
                    }
                    let _ = backend.update_memory(mem.clone());
                }
            }
            5 => {
                let index = usize::from(input.u8()) % vrings.len().max(1);
                let size = input.u16();
                let (desc, avail, used) = (input.u32(), input.u32(), input.u32());
                let flags = input.u8();
                if let Some(vring) = vrings.get(index) {
                    vring.set_queue_size(size);
                    let _ =
                        vring.set_queue_info(u64::from(desc), u64::from(avail), u64::from(used));
                    vring.set_queue_event_idx(flags & 1 != 0);
                    vring.set_queue_ready(flags & 2 != 0);
                    vring.set_enabled(flags & 4 != 0);
                }
            }
            6 | 7 => {
                let which = input.u8();
                // Bit 4: the second pair (its rings, or its TAP queue).
                let pair = usize::from(which >> 4 & 1) % pairs;
                let event = if which & 4 != 0 {
                    tap_event(pairs, pair)
                } else {
                    u16::from(which & 1) + 2 * u16::from(pair == 1) + u16::from(which & 2)
                };
                let set = if which & 8 != 0 {
                    EventSet::HANG_UP
                } else {
                    EventSet::IN
                };
                let _ = backend.handle_event(event, set, &vrings, 0);
                for peer in &peers {
                    while peer.recv(&mut sink).is_ok() {}
                }
            }
            8 => {
                let addr = u64::from(input.u32());
                let len = usize::from(input.u8());
                let _ = mem
                    .memory()
                    .write_slice(input.bytes(len), GuestAddress(addr));
            }
            _ => {
                let len = usize::from(input.u16());
                let peer = &peers[(len >> 15) % pairs];
                let _ = peer.send(input.bytes(len % 2048));
            }
        }
    }
}
