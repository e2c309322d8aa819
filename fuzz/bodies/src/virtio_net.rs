//! virtio-net's TAP datapath fed hostile rings: a guest's transmit,
//! receive and control queues, and frames from the peer (one end of a
//! socketpair standing in for the TAP).

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use godwit_devices::net::Tap;
use godwit_devices::virtio::net::features::{
    VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO, VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO_CSUM,
    VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO, VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO_CSUM,
};
use godwit_devices::virtio::net::fuzzing::Datapath;
use godwit_devices::virtio::testing::guest_memory;
use godwit_devices::virtio::{
    feature, ActivateParams, InterruptKind, VirtioInterrupt, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use godwit_devices::GuestMemory;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_USO4, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_USO, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::input::Input;

const MEM_SIZE: usize = 0x10000;
const QUEUE_SIZE: u16 = 16;
/// Where buffers' contents start; descriptors may point anywhere.
const DATA: u64 = 0x4000;

struct NoInterrupt;

impl VirtioInterrupt for NoInterrupt {
    fn trigger(&self, _kind: InterruptKind) -> std::io::Result<()> {
        Ok(())
    }
    fn signal_needs_reset(&self) {}
}

/// Queue `q`'s rings: descriptors, available ring, used ring.
fn ring_addresses(q: u64) -> (u64, u64, u64) {
    let base = 0x1000 * (q + 1);
    (base, base + 0x400, base + 0x800)
}

fn queue(q: u64, event_idx: bool) -> Option<Queue> {
    let (desc, avail, used) = ring_addresses(q);
    let mut queue = Queue::new(QUEUE_SIZE).ok()?;
    queue.set_size(QUEUE_SIZE);
    queue.set_desc_table_address(Some(desc as u32), Some(0));
    queue.set_avail_ring_address(Some(avail as u32), Some(0));
    queue.set_used_ring_address(Some(used as u32), Some(0));
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    Some(queue)
}

/// One queue's descriptors and available ring: `count u8`, then per
/// descriptor `addr u16, len u16, flags u8, next u8` (flags bit 3 moves the
/// address above 4 GiB, outside guest memory), then `avail_idx u8` and as
/// many head indices (`u8`).
fn write_queue(mem: &GuestMemory, q: u64, input: &mut Input<'_>) {
    let (desc, avail, _) = ring_addresses(q);
    let count = usize::from(input.u8()) % (usize::from(QUEUE_SIZE) + 1);
    for i in 0..count {
        let mut addr = u64::from(input.u16());
        let len = u32::from(input.u16());
        let flags = input.u8();
        let next = u16::from(input.u8());
        if flags & 8 != 0 {
            addr |= 1 << 32;
        }
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&u16::from(flags & 7).to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        let _ = mem.write_slice(&raw, GuestAddress(desc + 16 * i as u64));
    }
    let idx = u16::from(input.u8());
    for i in 0..idx.min(QUEUE_SIZE * 2) {
        let head = u16::from(input.u8());
        let slot = u64::from(i % QUEUE_SIZE);
        let _ = mem.write_obj(head, GuestAddress(avail + 4 + 2 * slot));
    }
    let _ = mem.write_obj(idx, GuestAddress(avail + 2));
}

/// `features u8` (bits: MRG_RXBUF, CTRL_VQ, EVENT_IDX, INDIRECT_DESC,
/// GUEST_CSUM, CSUM, vnet header on the TAP, CTRL_RX), `offloads u8` (bits:
/// HOST_TSO4, HOST_USO, GUEST_TSO4, GUEST_USO4, MQ, HOST_UDP_TUNNEL_GSO,
/// GUEST_UDP_TUNNEL_GSO, both tunnel _CSUM bits), the three queues
/// (see [`write_queue`]), buffer contents (`len u16`, bytes at 0x4000),
/// then frames from the peer (`len u16`, bytes), served twice.
pub fn virtio_net(data: &[u8]) {
    let mut input = Input::new(data);
    let select = input.u8();
    let bits = [
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CTRL_VQ,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_CSUM,
    ];
    let mut acked = feature(VIRTIO_F_VERSION_1);
    for (i, bit) in bits.iter().enumerate() {
        if select & (1 << i) != 0 {
            acked |= feature(*bit);
        }
    }
    if select & 0x80 != 0 {
        acked |= feature(VIRTIO_NET_F_CTRL_RX);
    }
    let offloads = input.u8();
    let offload_bits = [
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_USO,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_USO4,
        VIRTIO_NET_F_MQ,
    ];
    for (i, bit) in offload_bits.iter().enumerate() {
        if offloads & (1 << i) != 0 {
            acked |= feature(*bit);
        }
    }
    let tunnel = [
        (0x20, VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO),
        (0x40, VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO),
    ];
    for (mask, bit) in tunnel {
        if offloads & mask != 0 {
            acked |= feature(bit);
        }
    }
    if offloads & 0x80 != 0 {
        acked |= feature(VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO_CSUM)
            | feature(VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO_CSUM);
    }
    let vnet_hdr = select & 0x40 != 0;
    let event_idx = acked & feature(VIRTIO_RING_F_EVENT_IDX) != 0;

    let mem = guest_memory(MEM_SIZE);
    let mut queues = Vec::new();
    for q in 0..3 {
        write_queue(&mem, q, &mut input);
        let (Some(queue), Ok(evt)) = (queue(q, event_idx), EventFd::new(EFD_NONBLOCK)) else {
            return;
        };
        queues.push((queue, evt));
    }
    let len = usize::from(input.u16());
    let _ = mem.write_slice(input.bytes(len), GuestAddress(DATA));

    let Ok((ours, peer)) = UnixDatagram::pair() else {
        return;
    };
    let Ok(tap) = Tap::from_socket_for_fuzzing(OwnedFd::from(ours), vnet_hdr) else {
        return;
    };
    let _ = peer.set_nonblocking(true);
    let params = ActivateParams {
        mem,
        interrupt: Arc::new(NoInterrupt),
        queues,
    };
    let Ok(mut datapath) = Datapath::new(params, tap, acked, [0x52, 0x54, 0, 0x12, 0x34, 0x56])
    else {
        return;
    };
    while !input.is_empty() {
        let len = usize::from(input.u16()) % 2048;
        let _ = peer.send(input.bytes(len));
    }
    let mut sink = [0u8; 70 * 1024];
    for _ in 0..2 {
        if !datapath.serve_once() {
            break;
        }
        while peer.recv(&mut sink).is_ok() {}
    }
}
