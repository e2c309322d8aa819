//! The vhost-user frontend device against godwit's own backend, in one
//! process: a driver (the test harness) on memfd guest memory, the device
//! behind a real virtio-mmio transport, the backend on a TAP in a namespace
//! the test creates. Covers what migration needs: dirty logging of the
//! backend's writes (LOG_SHMFD, LOG_ALL), stopping the rings with their
//! positions (GET_VRING_BASE) and restarting them (SET_VRING_BASE).

use std::fs::File;
use std::net::UdpSocket;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_memory::{FileOffset, GuestAddress};

use super::backend::{serve, BackendCounters, BackendOptions};
use super::interface::by_interface_name;
use super::*;
use crate::dirty_log::DirtyTracking;
use crate::net::{Tap, VnetHdr};
use crate::virtio::mmio::MmioTransport;
use crate::virtio::net::{FrontendConfig, NetModel, RX_QUEUE};
use crate::virtio::testing::{GuestDriver, NetNs};
use crate::virtio::{feature, low64, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::GuestMemory;

const MEM: usize = 16 << 20;
const PAGE: u64 = 4096;

fn memfd(name: &std::ffi::CStr, size: u64) -> File {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked
    // and owned below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd that nothing else owns.
    let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.set_len(size).unwrap();
    f
}

/// Guest RAM of [`MEM`] bytes on a memfd named `name` (a vhost-user
/// backend maps it).
fn shared_ram(name: &std::ffi::CStr) -> GuestMemory {
    let ram = memfd(name, MEM as u64);
    GuestMemory::from_ranges_with_files([(GuestAddress(0), MEM, Some(FileOffset::new(ram, 0)))])
        .unwrap()
}

/// A vhost-user device on `session` (`frontend` its guest-visible side,
/// `pin` its interface) behind a virtio-mmio transport on `mem`, with a
/// driver that acked `frontend.features` for rings of `queue_size`.
fn device_with_driver(
    session: Session,
    socket: &std::path::Path,
    frontend: FrontendConfig,
    pin: Option<&str>,
    mem: &GuestMemory,
    queue_size: u16,
) -> (Arc<Mutex<VhostUserNet>>, GuestDriver) {
    let features = frontend.features;
    let dev = VhostUserNet::new(
        session,
        Endpoint::client(socket),
        VhostUserNetConfig {
            frontend,
            pin: pin.map(str::to_string),
            timeout: Duration::from_secs(5),
        },
        Box::new(|_, _| Recheck::Accept),
    )
    .unwrap();
    let device = Arc::new(Mutex::new(dev));
    let as_virtio: Arc<Mutex<dyn VirtioDevice>> = device.clone();
    let transport = Arc::new(Mutex::new(
        MmioTransport::new(mem.clone(), as_virtio).unwrap(),
    ));
    let mut d = GuestDriver::new(mem.clone(), transport).unwrap();
    let acked = d.init(features, queue_size).unwrap();
    assert_eq!(acked & features, features);
    (device, d)
}

/// `serve` on a TAP in a namespace the test creates (host 10.<subnet>.0.1,
/// guest 10.<subnet>.0.2), stopped on drop.
struct TestBackend {
    ns: NetNs,
    /// The TAP's MAC in the namespace.
    host_mac: [u8; 6],
    socket: std::path::PathBuf,
    dir: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<(), super::backend::BackendError>>>,
}

impl TestBackend {
    fn start(tag: &str, tap_name: &str, subnet: u8) -> TestBackend {
        Self::start_with_queues(tag, tap_name, subnet, 1)
    }

    /// The backend with `queues` queue pairs (a multi-queue TAP when more
    /// than one), presenting the newest interface of that many pairs.
    fn start_with_queues(tag: &str, tap_name: &str, subnet: u8, queues: u16) -> TestBackend {
        let ns = NetNs::new(tag).unwrap();
        let taps = ns
            .enter(|| Tap::open_queues(tap_name, VnetHdr::On, queues))
            .unwrap()
            .unwrap();
        let host_mac = taps[0].host_mac().unwrap();
        ns.sysctl(&format!("net.ipv6.conf.{tap_name}.disable_ipv6"), "1")
            .unwrap();
        ns.ip(&[
            "addr",
            "add",
            &format!("10.{subnet}.0.1/24"),
            "dev",
            tap_name,
        ])
        .unwrap();
        ns.ip(&["link", "set", tap_name, "up"]).unwrap();
        ns.ip(&[
            "neigh",
            "replace",
            &format!("10.{subnet}.0.2"),
            "lladdr",
            "52:54:00:12:34:56",
            "dev",
            tap_name,
        ])
        .unwrap();
        let dir = std::env::temp_dir().join(format!("gw-vu-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("backend.sock");
        let stop = Arc::new(AtomicBool::new(false));
        let opts = BackendOptions {
            socket: socket.clone(),
            taps: taps.into_iter().map(Arc::new).collect(),
            default_interface: super::backend::default_interface(None, usize::from(queues))
                .unwrap(),
            client: false,
        };
        let backend_stop = stop.clone();
        let thread = std::thread::spawn(move || {
            serve(&opts, Arc::new(BackendCounters::default()), backend_stop)
        });
        while !socket.exists() {
            std::thread::sleep(Duration::from_millis(10));
        }
        TestBackend {
            ns,
            host_mac,
            socket,
            dir,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // The backend waits for its next frontend; connect once so it sees
        // the flag.
        let _ = std::os::unix::net::UnixStream::connect(&self.socket);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn backend_writes_are_logged_and_rings_stop_and_restart_where_they_were() {
    let backend = TestBackend::start("vu", "gwvu0", 131);
    let (ns, socket) = (&backend.ns, backend.socket.clone());

    let mem = shared_ram(c"gw-vu-ram");
    let conn = Connection::connect(socket.to_str().unwrap(), Duration::from_secs(5)).unwrap();
    let session = handshake(conn, Some("org.godwit.net.v1")).unwrap();
    let v1 = by_interface_name("org.godwit.net.v1").unwrap();
    assert_eq!(
        session.offer.features,
        low64(v1.feature_bits()) | (1 << 30) | (1 << 26),
        "the pinned backend presents exactly v1"
    );
    assert!(session.offer.logging().is_ok());
    let features = feature(VIRTIO_F_VERSION_1)
        | feature(virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF)
        | feature(virtio_bindings::virtio_net::VIRTIO_NET_F_MAC);
    let frontend = FrontendConfig {
        mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        features,
        mtu: 1500,
        queue_size: 256,
        queue_pairs: 1,
    };
    let (device, mut d) = device_with_driver(
        session,
        &socket,
        frontend,
        Some("org.godwit.net.v1"),
        &mem,
        64,
    );
    d.fill_rx(32, 2048).unwrap();

    // Dirty logging: the backend marks the pages it writes in the device's log.
    device.lock().unwrap().start_dirty_log(MEM as u64).unwrap();
    assert!(device.lock().unwrap().backend_status().logging);

    let sender = {
        let ns_name = ns.name().to_string();
        move |count: usize| {
            let path = format!("/run/netns/{ns_name}");
            std::thread::spawn(move || {
                let f = File::open(path).unwrap();
                use std::os::fd::AsRawFd;
                // SAFETY: setns changes only this short-lived thread.
                assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
                let s = UdpSocket::bind("10.131.0.1:0").unwrap();
                for i in 0..count {
                    s.send_to(&[i as u8; 100], "10.131.0.2:9").unwrap();
                }
            })
            .join()
            .unwrap();
        }
    };
    sender(4);
    let frames = d.recv_frames(4, Duration::from_secs(10)).unwrap();
    assert_eq!(frames.len(), 4);
    assert_eq!(frames[0].frame.len(), 14 + 20 + 8 + 100);
    // The pages the backend wrote (buffers and the used ring) are marked.
    let used_ring = d.queue(RX_QUEUE).unwrap().used.0;
    let mut pages = Vec::new();
    device.lock().unwrap().dirty_log(&mut pages);
    assert!(
        pages.contains(&(used_ring / PAGE * PAGE)),
        "used ring page logged"
    );
    let marked = pages.len();
    assert!(marked >= 2, "{marked} pages marked");
    pages.clear();
    device.lock().unwrap().dirty_log(&mut pages);
    assert!(pages.is_empty(), "taken pages are cleared: {pages:?}");

    // Stop the rings: the backend returns where it stopped.
    let bases = device.lock().unwrap().stop_rings().unwrap();
    let used_idx: u16 = vm_memory::Bytes::read_obj(&mem, GuestAddress(used_ring + 2)).unwrap();
    assert!(used_idx >= 4);
    assert_eq!(bases, vec![used_idx, 0], "where the backend stopped");
    sender(3);
    std::thread::sleep(Duration::from_millis(300));
    let seen: u16 = vm_memory::Bytes::read_obj(&mem, GuestAddress(used_ring + 2)).unwrap();
    assert_eq!(seen, used_idx, "stopped rings move nothing");
    // Restart where they stopped: the frames waiting in the TAP arrive.
    device.lock().unwrap().resume_datapath();
    let frames = d.recv_frames(3, Duration::from_secs(10)).unwrap();
    assert_eq!(frames.len(), 3);
    device.lock().unwrap().stop_dirty_log().unwrap();
    assert!(!device.lock().unwrap().backend_status().logging);

    drop(d);
    drop(device);
}

/// A standard frontend's conversation, in QEMU 7.2's order (its
/// virtio-net enables the rings when the guest writes its features, before
/// the SET_FEATURES of the device start), without godwit's extension: the
/// session goes on, and the extension's window is not there for it.
#[test]
fn a_standard_frontend_enables_rings_before_set_features_and_never_sees_the_extension() {
    use vhost::vhost_user::VhostUserProtocolFeatures as P;
    let backend = TestBackend::start("vuq", "gwvuq0", 132);
    let mut conn =
        Connection::connect(backend.socket.to_str().unwrap(), Duration::from_secs(5)).unwrap();
    let offered = conn.get_features().unwrap();
    assert_ne!(offered & conn::F_PROTOCOL_FEATURES, 0);
    let protocol = conn.get_protocol_features().unwrap();
    // What QEMU 7.2 sets of that offer for virtio-net: its known bits, less
    // CONFIG (it does not serve the configuration space from a backend).
    let standard = P::MQ.bits() | P::LOG_SHMFD.bits() | P::REPLY_ACK.bits();
    assert_eq!(protocol & standard, standard, "offered {protocol:#x}");
    conn.set_protocol_features(standard).unwrap();
    conn.set_reply_ack(true);
    assert_eq!(
        conn.get_queue_num().unwrap(),
        1,
        "queue pairs, as QEMU reads it (the crate counts 2 rings)"
    );
    conn.set_owner().unwrap();
    // Acknowledged (REPLY_ACK status 0), not the end of the session.
    conn.set_vring_enable(0, true).unwrap();
    conn.set_vring_enable(1, true).unwrap();
    conn.set_features(offered & (low64(feature(VIRTIO_F_VERSION_1)) | conn::F_PROTOCOL_FEATURES))
        .unwrap();
    conn.set_vring_enable(0, true).unwrap();
    assert_eq!(conn.get_features().unwrap(), offered, "the session goes on");
    drop(conn);

    // CONFIG without bit 60: the window answers with the empty reply that
    // means failure, and the session goes on.
    let mut conn =
        Connection::connect(backend.socket.to_str().unwrap(), Duration::from_secs(5)).unwrap();
    let offered = conn.get_features().unwrap();
    conn.get_protocol_features().unwrap();
    conn.set_protocol_features(standard | P::CONFIG.bits())
        .unwrap();
    conn.set_reply_ack(true);
    let err = conn
        .get_config(interface::WINDOW_OFFSET, interface::WINDOW_SIZE)
        .unwrap_err();
    assert!(
        matches!(err, VhostUserError::Refused { .. }),
        "the window is not there without bit 60: {err}"
    );
    assert_eq!(conn.get_features().unwrap(), offered, "the session goes on");
    // A pin is refused (which ends the session: the crate's request loop
    // stops at a refused request).
    assert!(conn
        .set_config(interface::WINDOW_OFFSET, b"org.godwit.net.v1")
        .is_err());
}

/// Two queue pairs end to end: godwit's frontend (protocol MQ, GET_QUEUE_NUM
/// read as pairs) on godwit's backend with a two-queue TAP, interface
/// org.godwit.net.v3. One pair runs until VQ_PAIRS_SET; with both in use
/// each pair carries frames both ways (the kernel spreads the namespace's
/// flows over the TAP's queues, the backend serves each queue on its
/// pair); back to one pair, the second receive ring gets nothing.
#[test]
fn two_queue_pairs_through_godwits_backend_after_vq_pairs_set() {
    use crate::virtio::net::ctrl_queue_index;
    use crate::virtio::testing::{udp_frame, UdpCsum};
    use std::net::{Ipv4Addr, SocketAddrV4};
    use virtio_bindings::virtio_net::{
        VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_F_CTRL_VQ,
        VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_OK,
    };
    const TIMEOUT: Duration = Duration::from_secs(10);
    const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    let (host_ip, guest_ip) = (Ipv4Addr::new(10, 133, 0, 1), Ipv4Addr::new(10, 133, 0, 2));
    let backend = TestBackend::start_with_queues("vumq", "gwvumq0", 133, 2);
    let (ns, socket) = (&backend.ns, backend.socket.clone());

    let mem = shared_ram(c"gw-vumq-ram");
    let conn = Connection::connect(socket.to_str().unwrap(), TIMEOUT).unwrap();
    let session = handshake(conn, None).unwrap();
    assert_eq!(session.offer.queue_num, Some(2), "GET_QUEUE_NUM in pairs");
    let record = session.offer.record.clone().unwrap();
    assert_eq!(
        (record.active.as_str(), record.values.queue_pairs),
        ("org.godwit.net.v3", 2)
    );
    let features = feature(VIRTIO_F_VERSION_1)
        | feature(VIRTIO_NET_F_MRG_RXBUF)
        | feature(VIRTIO_NET_F_MAC)
        | feature(VIRTIO_NET_F_CTRL_VQ)
        | feature(VIRTIO_NET_F_MQ);
    let frontend = FrontendConfig {
        mac: GUEST_MAC,
        features,
        mtu: 1500,
        queue_size: 256,
        queue_pairs: 2,
    };
    let (device, mut d) = device_with_driver(session, &socket, frontend, None, &mem, 128);
    assert_eq!(d.config(8, 2), 2u16.to_le_bytes(), "max_virtqueue_pairs");
    let ctrl = ctrl_queue_index(2, true);
    for rx in [0, 2] {
        d.fill_rx_on(rx, 64, 2048).unwrap();
    }

    let host_mac = backend.host_mac;
    let host_socket = |port: u16| {
        let s = ns
            .enter(|| UdpSocket::bind(SocketAddrV4::new(host_ip, port)))
            .unwrap()
            .unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s
    };
    let senders: Vec<UdpSocket> = (0..32).map(|i| host_socket(7100 + i)).collect();
    // Host to guest on each receive ring in use, as (ring 0, ring 2).
    let receive = |d: &mut GuestDriver, rounds: usize| {
        let mut per_ring = [0usize; 2];
        for _ in 0..rounds {
            for s in &senders {
                s.send_to(b"to the guest", SocketAddrV4::new(guest_ip, 6000))
                    .unwrap();
            }
            std::thread::sleep(Duration::from_millis(50));
            for (i, q) in [0usize, 2].into_iter().enumerate() {
                let used = d.reap(q).unwrap();
                per_ring[i] += used.iter().filter(|u| u.len > 0).count();
                d.refill_rx_on(q, &used).unwrap();
            }
        }
        per_ring
    };

    // One pair until VQ_PAIRS_SET: the second TAP queue is detached.
    let per_ring = receive(&mut d, 5);
    assert!(
        per_ring[0] > 0 && per_ring[1] == 0,
        "one pair in use: {per_ring:?}"
    );

    let (mq, set) = (
        VIRTIO_NET_CTRL_MQ as u8,
        VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
    );
    let ok = VIRTIO_NET_OK as u8;
    assert_eq!(
        d.ctrl_command(ctrl, mq, set, &2u16.to_le_bytes(), TIMEOUT)
            .unwrap(),
        ok
    );
    assert_eq!(device.lock().unwrap().info().active_queue_pairs, 2);

    // Guest to host on each transmit ring.
    let sink = host_socket(5000);
    for pair in 0..2usize {
        let payload = format!("from pair {pair}").into_bytes();
        let frame = udp_frame(
            GUEST_MAC,
            host_mac,
            guest_ip,
            host_ip,
            4000,
            5000,
            &payload,
            UdpCsum::Full,
        );
        d.send_on(
            2 * pair + 1,
            &[0; crate::virtio::net::NET_HDR_LEN],
            &frame,
            false,
        )
        .unwrap();
        let mut buf = [0u8; 2048];
        let (n, _) = sink.recv_from(&mut buf).expect("the namespace receives it");
        assert_eq!(&buf[..n], payload.as_slice());
        d.wait_used(2 * pair + 1, 1, TIMEOUT).unwrap();
    }
    // Host to guest: both receive rings get frames.
    let per_ring = receive(&mut d, 20);
    assert!(
        per_ring.iter().all(|n| *n > 0),
        "frames per receive ring: {per_ring:?}"
    );

    // Back to one pair: the second ring gets nothing more.
    assert_eq!(
        d.ctrl_command(ctrl, mq, set, &1u16.to_le_bytes(), TIMEOUT)
            .unwrap(),
        ok
    );
    let per_ring = receive(&mut d, 5);
    assert!(
        per_ring[0] > 0 && per_ring[1] == 0,
        "back to one pair: {per_ring:?}"
    );

    // Stopping and restarting the rings keeps every started ring's place.
    let bases = device.lock().unwrap().stop_rings().unwrap();
    assert_eq!(bases.len(), 4, "both pairs' rings: {bases:?}");
    device.lock().unwrap().resume_datapath();
    let per_ring = receive(&mut d, 3);
    assert!(per_ring[0] > 0, "traffic after the restart: {per_ring:?}");
    drop(d);
    drop(device);
}
