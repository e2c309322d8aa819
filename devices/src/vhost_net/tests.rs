//! The vhost-net model against a fake `/dev/vhost-net` (it records the
//! ioctls godwit makes and answers them), on a real TAP in a namespace the
//! test creates (needs root). Covers the rules the model shares with the
//! other virtio-net models (it once had its own copies that had drifted),
//! the kernel's dirty log, and queue pairs (one fake handle per pair, each
//! with its own record, on a multi-queue TAP).

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost::{VhostUserDirtyLogRegion, VhostUserMemoryRegionBase};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ, VIRTIO_NET_F_STATUS, VIRTIO_NET_OK,
};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::net::VnetHdr;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::net::{ctrl_queue_index, FrontendError, CTRL_QUEUE, VIRTIO_ID_NET};
use crate::virtio::testing::{guest_memory, GuestDriver, NetNs};
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
    /// VHOST_NET_SET_BACKEND: the ring, and whether it got a TAP.
    backends: Vec<(usize, bool)>,
}

/// A `/dev/vhost-net` handle that records every ioctl and reports ring `i`
/// stopped at `stopped_at + i`.
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
    fn get_vring_base(&self, index: usize) -> vhost::Result<u32> {
        Ok(self.stopped_at + index as u32)
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
    fn set_backend(&self, index: usize, tap: Option<&File>) -> vhost::Result<()> {
        self.calls().backends.push((index, tap.is_some()));
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
    /// One handle per pair; pair p's rings stop at 7 + 10p (+ the ring).
    kernels: Vec<FakeKernel>,
    dev: VhostKernelNet<FakeKernel>,
}

impl Rig {
    /// The first pair's handle.
    fn kernel(&self) -> &FakeKernel {
        &self.kernels[0]
    }
}

/// The features of the one-pair devices.
fn one_pair_features() -> Features {
    feature(VIRTIO_F_VERSION_1)
        | feature(VIRTIO_NET_F_CSUM)
        | feature(VIRTIO_NET_F_GUEST_CSUM)
        | feature(VIRTIO_NET_F_MAC)
        | feature(VIRTIO_NET_F_STATUS)
        | feature(VIRTIO_NET_F_CTRL_VQ)
}

fn config(mac: [u8; 6], features: Features, pairs: u16) -> VhostNetConfig {
    VhostNetConfig {
        mac,
        features,
        mtu: 1500,
        queue_size: 256,
        queue_pairs: pairs,
    }
}

/// A peer of one fake handle per queue of `taps` (each with its own
/// record), built from `kernel`, offering `kernel_features`.
fn peer(
    taps: Vec<Tap>,
    kernel: &FakeKernel,
    kernel_features: Features,
) -> (VhostNetPeer<FakeKernel>, Vec<FakeKernel>) {
    let kernels: Vec<FakeKernel> = (0..taps.len())
        .map(|p| FakeKernel {
            calls: Arc::default(),
            stopped_at: 7 + 10 * p as u32,
            ..kernel.clone()
        })
        .collect();
    let pairs = taps
        .into_iter()
        .zip(&kernels)
        .map(|(tap, net)| VhostNetPair {
            net: net.clone(),
            tap: Arc::new(tap),
        })
        .collect();
    let peer = VhostNetPeer {
        pairs,
        features: kernel_features,
    };
    (peer, kernels)
}

/// A device of `pairs` queue pairs offering `features` on TAP `gwvn0`
/// (with `pairs` queues) in a fresh namespace, and a fake kernel that
/// offers `kernel_features`.
fn rig_pairs(
    tag: &str,
    mac: [u8; 6],
    kernel_features: Features,
    features: Features,
    pairs: u16,
) -> Result<Rig, VhostNetError> {
    let ns = NetNs::new(tag).expect("create namespace");
    let taps = ns
        .enter(|| Tap::open_queues("gwvn0", VnetHdr::On, pairs))
        .unwrap()
        .expect("open TAP");
    let (peer, kernels) = peer(taps, &FakeKernel::default(), kernel_features);
    let dev = VhostKernelNet::new(peer, config(mac, features, pairs))?;
    Ok(Rig {
        _ns: ns,
        kernels,
        dev,
    })
}

/// A one-pair device on TAP `gwvn0` in a fresh namespace and a fake kernel
/// that offers `kernel_features`.
fn rig(tag: &str, mac: [u8; 6], kernel_features: Features) -> Result<Rig, VhostNetError> {
    rig_pairs(tag, mac, kernel_features, one_pair_features(), 1)
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

/// Acks every offered feature and activates the device with the rings of
/// its first `ready` pairs ready (the driver left the others
/// unconfigured), and the control queue.
fn activate_ready(dev: &mut VhostKernelNet<FakeKernel>, ready: usize) {
    dev.ack_features(dev.device_features());
    let rings = 2 * usize::from(dev.front.max_pairs());
    let at = |i: usize| 0x10000 * (i as u64 + 1);
    let mut queues: Vec<_> = (0..rings)
        .map(|i| {
            let (mut q, kick) = queue(256, at(i));
            q.set_ready(i / 2 < ready);
            (q, kick)
        })
        .collect();
    queues.push(queue(CTRL_QUEUE_SIZE_FOR_TEST, at(rings)));
    let params = ActivateParams {
        mem: guest_memory(1 << 20),
        interrupt: Arc::new(Irq(EventFd::new(EFD_NONBLOCK).unwrap())),
        queues,
    };
    dev.activate(params).expect("activate");
}

fn activate(dev: &mut VhostKernelNet<FakeKernel>) {
    activate_ready(dev, usize::MAX);
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
    r.kernel().calls().bases_set.clear();
    activate(&mut r.dev);
    assert_eq!(r.kernel().calls().bases_set, vec![(0, 0), (1, 0)]);
}

#[test]
fn the_kernel_logs_its_writes_while_migrating() {
    let mut r = rig("vn-log", MAC, F_LOG_ALL).unwrap();
    activate(&mut r.dev);
    r.dev.start_dirty_log(1 << 20).unwrap();
    {
        let c = r.kernel().calls();
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
    let c = r.kernel().calls();
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
    let offered = kernel_features(&new).unwrap() | F_LOG_ALL;
    let (peer, kernels) = peer(vec![tap], &new, offered);
    let kernel = &kernels[0];
    let features = one_pair_features()
        | feature(VIRTIO_NET_F_HOST_TSO4)
        | feature(VIRTIO_NET_F_GUEST_TSO4)
        | tunnel;
    let mut dev = VhostKernelNet::new(peer, config(MAC, features, 1)).unwrap();
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
        dev.tap().offload() & crate::net::tap::TUN_F_UDP_TUNNEL_GSO,
        crate::net::tap::TUN_F_UDP_TUNNEL_GSO
    );
}

fn two_pair_features() -> Features {
    one_pair_features() | feature(VIRTIO_NET_F_MQ)
}

/// Whether each of the device's TAP queues is attached.
fn attached(dev: &VhostKernelNet<FakeKernel>) -> Vec<bool> {
    dev.tap_queues().iter().map(|t| t.queue_enabled()).collect()
}

/// Two queue pairs on a two-queue TAP, driven as a guest does: each pair
/// has its own handle, which gets the pair's rings as its rings 0 and 1
/// (with the pair's bases) and a TAP queue as backend; only the first TAP
/// queue is attached until VQ_PAIRS_SET asks for two (and detached again
/// at one); the dirty log reaches every handle and ring; a stop returns
/// the four rings' bases in the device's order.
#[test]
fn two_pairs_have_a_handle_and_a_tap_queue_each() {
    let r = rig_pairs("vn-mq", MAC, F_LOG_ALL, two_pair_features(), 2).unwrap();
    let (_ns, kernels) = (r._ns, r.kernels);
    let dev = Arc::new(Mutex::new(r.dev));
    let mem = guest_memory(4 << 20);
    let as_virtio: Arc<Mutex<dyn VirtioDevice>> = dev.clone();
    let transport = Arc::new(Mutex::new(
        MmioTransport::new(mem.clone(), as_virtio).unwrap(),
    ));
    let mut d = GuestDriver::new(mem, transport).unwrap();
    let acked = d.init(two_pair_features(), 256).unwrap();
    assert_ne!(acked & feature(VIRTIO_NET_F_MQ), 0);
    for (p, k) in kernels.iter().enumerate() {
        let c = k.calls();
        assert_eq!(c.features.len(), 1, "pair {p}: VHOST_SET_FEATURES");
        assert_eq!(c.bases_set, vec![(0, 0), (1, 0)], "pair {p}");
        assert_eq!(c.backends, vec![(0, true), (1, true)], "pair {p}");
    }
    assert_eq!(attached(&dev.lock().unwrap()), vec![true, false]);

    let ctrl = ctrl_queue_index(2, true);
    let (mq, set) = (
        VIRTIO_NET_CTRL_MQ as u8,
        VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
    );
    let timeout = Duration::from_secs(5);
    let pairs_set = |d: &mut GuestDriver, pairs: u16| {
        d.ctrl_command(ctrl, mq, set, &pairs.to_le_bytes(), timeout)
            .unwrap()
    };
    assert_eq!(pairs_set(&mut d, 2), VIRTIO_NET_OK as u8);
    assert_eq!(dev.lock().unwrap().front.shared().active_pairs(), 2);
    assert_eq!(attached(&dev.lock().unwrap()), vec![true, true]);

    dev.lock().unwrap().start_dirty_log(4 << 20).unwrap();
    for (p, k) in kernels.iter().enumerate() {
        let c = k.calls();
        assert_eq!(c.log_base.len(), 1, "pair {p}: VHOST_SET_LOG_BASE");
        assert_ne!(
            Features::from(*c.features.last().unwrap()) & F_LOG_ALL,
            0,
            "pair {p}: LOG_ALL on"
        );
        assert!(
            c.vring_flags
                .ends_with(&[(0, VRING_F_LOG), (1, VRING_F_LOG)]),
            "pair {p}"
        );
    }
    dev.lock().unwrap().stop_dirty_log().unwrap();

    // Paused, the rings stand where the kernel stopped them; resumed, each
    // handle restarts its two rings there.
    dev.lock().unwrap().pause_datapath().unwrap();
    let positions: Vec<u16> = dev
        .lock()
        .unwrap()
        .queue_positions()
        .unwrap()
        .iter()
        .map(|p| p.next_avail)
        .collect();
    assert_eq!(positions[..4], [7, 8, 17, 18]);
    dev.lock().unwrap().resume_datapath();
    assert!(kernels[0].calls().bases_set.ends_with(&[(0, 7), (1, 8)]));
    assert!(kernels[1].calls().bases_set.ends_with(&[(0, 17), (1, 18)]));

    assert_eq!(pairs_set(&mut d, 1), VIRTIO_NET_OK as u8);
    assert_eq!(attached(&dev.lock().unwrap()), vec![true, false]);
    // The kernel keeps serving the second pair's rings: a stop takes them
    // back too.
    let bases = dev.lock().unwrap().inner().stop().unwrap();
    assert_eq!(bases, vec![7, 8, 17, 18]);
    for (p, k) in kernels.iter().enumerate() {
        let c = k.calls();
        assert!(
            c.backends.ends_with(&[(0, false), (1, false)]),
            "pair {p}: {:?}",
            c.backends
        );
    }
}

/// A pair the driver did not make ready is not handed to the kernel: its
/// handle stays untouched, and the stop returns the first pair's bases.
#[test]
fn an_unready_pair_stays_off_its_handle() {
    let mut r = rig_pairs("vn-mq1", MAC, F_LOG_ALL, two_pair_features(), 2).unwrap();
    activate_ready(&mut r.dev, 1);
    assert_eq!(r.kernels[0].calls().bases_set, vec![(0, 0), (1, 0)]);
    {
        let c = r.kernels[1].calls();
        assert!(c.bases_set.is_empty() && c.backends.is_empty() && c.features.is_empty());
    }
    assert_eq!(attached(&r.dev), vec![true, false]);
    assert_eq!(r.dev.inner().stop().unwrap(), vec![7, 8]);
    let positions = r.dev.queue_positions().unwrap();
    assert_eq!(positions.len(), 5, "four data rings and the control queue");
    assert_eq!(positions[0].next_avail, 7);
    assert_eq!(
        positions[2].next_avail, 0,
        "the unready pair's receive ring"
    );
}

/// A restored device that had both pairs in use gets both TAP queues
/// attached when it is activated again.
#[test]
fn a_restored_device_attaches_the_tap_queues_of_its_pairs_in_use() {
    let mut r = rig_pairs("vn-mq2", MAC, F_LOG_ALL, two_pair_features(), 2).unwrap();
    let mut state = r.dev.device_state();
    state.queue_pairs = 2;
    r.dev.front.restore_device_state(&state);
    activate(&mut r.dev);
    assert_eq!(attached(&r.dev), vec![true, true]);
}

/// A device of more pairs than the TAP has queues is refused, naming the
/// counts.
#[test]
fn more_pairs_than_tap_queues_are_refused() {
    let ns = NetNs::new("vn-few").expect("create namespace");
    let tap = ns
        .enter(|| Tap::open("gwvn0", VnetHdr::On))
        .unwrap()
        .expect("open TAP");
    let (peer, _) = peer(vec![tap], &FakeKernel::default(), F_LOG_ALL);
    match VhostKernelNet::new(peer, config(MAC, two_pair_features(), 2)) {
        Err(e @ VhostNetError::TooFewQueues { .. }) => assert!(
            e.to_string()
                .starts_with("TAP gwvn0 was opened with 1 queue(s) for 2 queue pairs"),
            "{e}"
        ),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("two pairs on one TAP queue were accepted"),
    }
}
