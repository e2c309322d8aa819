//! The vhost-net model against a fake `/dev/vhost-net` (it records the
//! ioctls godwit makes and answers them), on a real TAP in a namespace the
//! test creates (needs root). Covers the rules the model shares with the
//! other virtio-net models (it once had its own copies that had drifted)
//! and the kernel's dirty log.

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use vhost::{VhostUserDirtyLogRegion, VhostUserMemoryRegionBase};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS,
};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::net::VnetHdr;
use crate::virtio::net::{FrontendError, CTRL_QUEUE, VIRTIO_ID_NET};
use crate::virtio::testing::{guest_memory, NetNs};
use crate::virtio::{InterruptKind, VirtioInterrupt, VIRTIO_F_VERSION_1};

const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

/// What the fake kernel was asked.
#[derive(Default)]
struct Calls {
    features: Vec<u64>,
    /// VHOST_SET_FEATURES_ARRAY.
    features_array: Vec<Features>,
    log_base: Vec<u64>,
    vring_flags: Vec<(usize, u32)>,
    bases_set: Vec<(usize, u16)>,
}

/// A `/dev/vhost-net` that records every ioctl and reports the rings
/// stopped at `stopped_at`.
#[derive(Clone, Default)]
struct FakeKernel {
    calls: Arc<Mutex<Calls>>,
    stopped_at: u32,
    /// VHOST_GET_FEATURES (bits below 64).
    low: u64,
    /// What VHOST_GET_FEATURES_ARRAY answers; None: a kernel without it.
    array: Option<Features>,
}

impl FakeKernel {
    fn calls(&self) -> std::sync::MutexGuard<'_, Calls> {
        self.calls.lock().unwrap()
    }
}

impl VhostBackend for FakeKernel {
    fn get_features(&self) -> vhost::Result<u64> {
        Ok(self.low)
    }
    fn set_features(&self, features: u64) -> vhost::Result<()> {
        self.calls().features.push(features);
        Ok(())
    }
    fn set_owner(&self) -> vhost::Result<()> {
        Ok(())
    }
    fn reset_owner(&self) -> vhost::Result<()> {
        Ok(())
    }
    fn set_mem_table(
        &self,
        _regions: &[VhostUserMemoryRegionInfo],
    ) -> vhost::Result<Option<Vec<VhostUserMemoryRegionBase>>> {
        Ok(None)
    }
    fn set_log_base(&self, base: u64, _: Option<VhostUserDirtyLogRegion>) -> vhost::Result<()> {
        self.calls().log_base.push(base);
        Ok(())
    }
    fn set_log_fd(&self, _fd: RawFd) -> vhost::Result<()> {
        Ok(())
    }
    fn set_vring_num(&self, _: usize, _: u16) -> vhost::Result<()> {
        Ok(())
    }
    fn set_vring_addr(&self, index: usize, config: &VringConfigData) -> vhost::Result<()> {
        self.calls().vring_flags.push((index, config.flags));
        Ok(())
    }
    fn set_vring_base(&self, index: usize, base: u16) -> vhost::Result<()> {
        self.calls().bases_set.push((index, base));
        Ok(())
    }
    fn get_vring_base(&self, _: usize) -> vhost::Result<u32> {
        Ok(self.stopped_at)
    }
    fn set_vring_call(&self, _: usize, _: &EventFd) -> vhost::Result<()> {
        Ok(())
    }
    fn set_vring_kick(&self, _: usize, _: &EventFd) -> vhost::Result<()> {
        Ok(())
    }
    fn set_vring_err(&self, _: usize, _: &EventFd) -> vhost::Result<()> {
        Ok(())
    }
}

impl VhostNet for FakeKernel {
    fn set_backend(&self, _: usize, _: Option<&File>) -> vhost::Result<()> {
        Ok(())
    }
}

impl FeatureArray for FakeKernel {
    fn get_features_array(&self) -> std::io::Result<Option<Features>> {
        Ok(self.array)
    }
    fn set_features_array(&self, features: Features) -> std::io::Result<()> {
        self.calls().features_array.push(features);
        Ok(())
    }
}

struct Irq(EventFd);

impl VirtioInterrupt for Irq {
    fn trigger(&self, _: InterruptKind) -> std::io::Result<()> {
        self.0.write(1)
    }
    fn signal_needs_reset(&self) {}
    fn irqfd(&self) -> Option<&EventFd> {
        Some(&self.0)
    }
}

struct Rig {
    _ns: NetNs,
    kernel: FakeKernel,
    dev: VhostKernelNet<FakeKernel>,
}

/// A device on TAP `gwvn0` in a fresh namespace and a fake kernel that
/// offers `kernel_features`.
fn rig(tag: &str, mac: [u8; 6], kernel_features: Features) -> Result<Rig, VhostNetError> {
    let ns = NetNs::new(tag).expect("create namespace");
    let tap = ns
        .enter(|| Tap::open("gwvn0", VnetHdr::On))
        .unwrap()
        .expect("open TAP");
    let kernel = FakeKernel {
        stopped_at: 7,
        ..FakeKernel::default()
    };
    let peer = VhostNetPeer {
        net: kernel.clone(),
        tap: Arc::new(tap),
        features: kernel_features,
    };
    let features = feature(VIRTIO_F_VERSION_1)
        | feature(VIRTIO_NET_F_CSUM)
        | feature(VIRTIO_NET_F_GUEST_CSUM)
        | feature(VIRTIO_NET_F_MAC)
        | feature(VIRTIO_NET_F_STATUS)
        | feature(VIRTIO_NET_F_CTRL_VQ);
    let config = VhostNetConfig {
        mac,
        features,
        mtu: 1500,
        queue_size: 256,
        queue_pairs: 1,
    };
    let dev = VhostKernelNet::new(peer, config)?;
    Ok(Rig {
        _ns: ns,
        kernel,
        dev,
    })
}

fn queue(size: u16, base: u64) -> (Queue, EventFd) {
    let mut q = Queue::new(size).unwrap();
    q.set_size(size);
    q.set_desc_table_address(Some(base as u32), Some(0));
    q.set_avail_ring_address(Some((base + 0x1000) as u32), Some(0));
    q.set_used_ring_address(Some((base + 0x2000) as u32), Some(0));
    q.set_ready(true);
    (q, EventFd::new(EFD_NONBLOCK).unwrap())
}

fn activate(dev: &mut VhostKernelNet<FakeKernel>) {
    dev.ack_features(dev.device_features());
    let params = ActivateParams {
        mem: guest_memory(1 << 20),
        interrupt: Arc::new(Irq(EventFd::new(EFD_NONBLOCK).unwrap())),
        queues: vec![
            queue(256, 0x10000),
            queue(256, 0x20000),
            queue(CTRL_QUEUE_SIZE_FOR_TEST, 0x30000),
        ],
    };
    dev.activate(params).expect("activate");
}

const CTRL_QUEUE_SIZE_FOR_TEST: u16 = crate::virtio::net::CTRL_QUEUE_SIZE;

#[test]
fn a_multicast_mac_is_refused() {
    let mut mac = MAC;
    mac[0] |= 1;
    match rig("vn-mc", mac, F_LOG_ALL) {
        Err(VhostNetError::Frontend(FrontendError::MulticastMac(m))) => assert_eq!(m, mac),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a multicast MAC was accepted"),
    }
}

#[test]
fn it_is_a_network_device() {
    let r = rig("vn-type", MAC, F_LOG_ALL).unwrap();
    assert_eq!(r.dev.device_type(), VIRTIO_ID_NET);
}

#[test]
fn reset_clears_guest_offloads_and_ring_positions() {
    let mut r = rig("vn-reset", MAC, F_LOG_ALL).unwrap();
    activate(&mut r.dev);
    assert_ne!(
        r.dev.device_state().guest_offloads,
        0,
        "GUEST_CSUM was acked"
    );
    // The control queue's server has published a position.
    let shared = r.dev.front.shared().clone();
    shared.positions[CTRL_QUEUE].store(5 | (5 << 16), Ordering::SeqCst);
    r.dev.reset();
    assert_eq!(r.dev.device_state().guest_offloads, 0);
    assert_eq!(r.dev.device_state().acked, 0);
    for p in &shared.positions {
        assert_eq!(p.load(Ordering::SeqCst), 0, "ring positions start over");
    }
    assert!(r.dev.queue_positions().is_none());
    // The next activation starts the rings where the transport says (0),
    // not where the kernel stopped them before the reset.
    r.kernel.calls().bases_set.clear();
    activate(&mut r.dev);
    assert_eq!(r.kernel.calls().bases_set, vec![(0, 0), (1, 0)]);
}

#[test]
fn the_kernel_logs_its_writes_while_migrating() {
    let mut r = rig("vn-log", MAC, F_LOG_ALL).unwrap();
    activate(&mut r.dev);
    r.dev.start_dirty_log(1 << 20).unwrap();
    {
        let c = r.kernel.calls();
        assert_eq!(c.log_base.len(), 1, "VHOST_SET_LOG_BASE");
        assert_ne!(
            Features::from(*c.features.last().unwrap()) & F_LOG_ALL,
            0,
            "LOG_ALL on"
        );
        assert!(c
            .vring_flags
            .ends_with(&[(0, VRING_F_LOG), (1, VRING_F_LOG)]));
    }
    r.dev.stop_dirty_log().unwrap();
    let c = r.kernel.calls();
    assert_eq!(
        Features::from(*c.features.last().unwrap()) & F_LOG_ALL,
        0,
        "LOG_ALL off"
    );
    assert!(c.vring_flags.ends_with(&[(0, 0), (1, 0)]));
}

#[test]
fn a_kernel_without_log_all_blocks_migration_naming_the_device() {
    let mut r = rig("vn-nolog", MAC, 0).unwrap();
    activate(&mut r.dev);
    match r.dev.start_dirty_log(1 << 20) {
        Err(DirtyLogError::Unsupported { device, reason }) => {
            assert_eq!(device, "vhost-net on TAP gwvn0");
            assert!(reason.contains("LOG_ALL"), "{reason}");
        }
        other => panic!("logging started without LOG_ALL: {other:?}"),
    }
    let blockers = r.dev.blockers();
    assert_eq!(blockers.len(), 1);
    assert!(
        blockers[0].starts_with("vhost-net on TAP gwvn0: "),
        "{blockers:?}"
    );
}

/// Bits above 63 come from VHOST_GET_FEATURES_ARRAY where the kernel has it
/// (else the kernel offers none), and go back with VHOST_SET_FEATURES_ARRAY
/// when a tunnel feature is acked: the kernel then moves the 24-byte tunnel
/// header, and the TAP is sized for it.
#[test]
fn bits_above_63_travel_through_the_features_array() {
    use crate::virtio::net::features::{
        VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO, VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO,
    };
    let tunnel =
        feature(VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO) | feature(VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO);
    let old = FakeKernel {
        low: 1 << 32,
        ..FakeKernel::default()
    };
    assert_eq!(kernel_features(&old).unwrap(), 1 << 32);
    let new = FakeKernel {
        low: 1 << 32,
        array: Some((1 << 32) | tunnel),
        ..FakeKernel::default()
    };
    assert_eq!(kernel_features(&new).unwrap(), (1 << 32) | tunnel);

    let ns = NetNs::new("vn-arr").expect("create namespace");
    let tap = ns
        .enter(|| Tap::open("gwvn0", VnetHdr::On))
        .unwrap()
        .expect("open TAP");
    let kernel = FakeKernel {
        stopped_at: 7,
        ..new
    };
    let peer = VhostNetPeer {
        net: kernel.clone(),
        tap: Arc::new(tap),
        features: kernel_features(&kernel).unwrap() | F_LOG_ALL,
    };
    let features = feature(VIRTIO_F_VERSION_1)
        | feature(VIRTIO_NET_F_CSUM)
        | feature(VIRTIO_NET_F_GUEST_CSUM)
        | feature(VIRTIO_NET_F_HOST_TSO4)
        | feature(VIRTIO_NET_F_GUEST_TSO4)
        | feature(VIRTIO_NET_F_MAC)
        | feature(VIRTIO_NET_F_STATUS)
        | feature(VIRTIO_NET_F_CTRL_VQ)
        | tunnel;
    let config = VhostNetConfig {
        mac: MAC,
        features,
        mtu: 1500,
        queue_size: 256,
        queue_pairs: 1,
    };
    let mut dev = VhostKernelNet::new(peer, config).unwrap();
    activate(&mut dev);
    let c = kernel.calls();
    let set = *c.features_array.last().expect("VHOST_SET_FEATURES_ARRAY");
    assert_eq!(set & tunnel, tunnel, "{set:#x}");
    assert_ne!(set & feature(VIRTIO_F_VERSION_1), 0, "{set:#x}");
    assert!(
        c.features.is_empty(),
        "not VHOST_SET_FEATURES: {:?}",
        c.features
    );
    drop(c);
    assert_eq!(
        dev.tap.offload() & crate::net::tap::TUN_F_UDP_TUNNEL_GSO,
        crate::net::tap::TUN_F_UDP_TUNNEL_GSO
    );
}
