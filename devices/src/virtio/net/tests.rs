//! virtio-net over real TAP devices, each test in its own network namespace
//! (needs root). The "guest" is [`GuestDriver`] on plain guest memory; the
//! "host" side is the namespace's kernel stack.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::GuestAddress;

use super::features::hdr;
use super::*;
use crate::net::tap::{TUN_F_CSUM, TUN_F_TSO4};
use crate::net::{Tap, TapError, VnetHdr};
use crate::virtio::mmio::MmioTransport;
use crate::virtio::testing::*;
use crate::virtio::{
    feature, status, ActivateError, ActivateParams, QueuePosition, VirtioDevice,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const TIMEOUT: Duration = Duration::from_secs(3);
const MEM_SIZE: usize = 64 << 20;
const TAP: &str = "gwtap0";

fn f(bit: u32) -> Features {
    feature(bit)
}

struct Rig {
    ns: NetNs,
    net: Arc<Mutex<VirtioNet>>,
    transport: Arc<Mutex<MmioTransport>>,
    driver: GuestDriver,
    host_mac: [u8; 6],
}

/// A namespace with TAP `gwtap0` (10.0.0.1/24, up, static neighbour entry
/// for the guest), a virtio-net device on it offering `features`, an mmio
/// transport and a driver (not yet initialised).
fn rig(tag: &str, vnet: VnetHdr, features: Features) -> Rig {
    rig_queues(tag, vnet, features, 1)
}

/// As [`rig`], with `pairs` queue pairs on a multi-queue TAP.
fn rig_queues(tag: &str, vnet: VnetHdr, features: Features, pairs: u16) -> Rig {
    let ns = NetNs::new(tag).expect("create namespace");
    // No IPv6 chatter (router solicitations, MLD) on the TAP.
    ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1").unwrap();
    ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")
        .unwrap();
    let taps = ns
        .enter(|| Tap::open_queues(TAP, vnet, pairs))
        .unwrap()
        .expect("open TAP");
    ns.ip(&["addr", "add", "10.0.0.1/24", "dev", TAP]).unwrap();
    ns.ip(&["link", "set", TAP, "up"]).unwrap();
    ns.ip(&[
        "neigh",
        "add",
        "10.0.0.2",
        "lladdr",
        &format_mac(&GUEST_MAC),
        "dev",
        TAP,
    ])
    .unwrap();
    let host_mac = taps[0].host_mac().unwrap();
    let net =
        VirtioNet::with_queues(taps, NetConfig::new(GUEST_MAC, features)).expect("create device");
    let net = Arc::new(Mutex::new(net));
    let mem = guest_memory(MEM_SIZE);
    let dev: Arc<Mutex<dyn VirtioDevice>> = net.clone();
    let transport = Arc::new(Mutex::new(MmioTransport::new(mem.clone(), dev).unwrap()));
    let driver = GuestDriver::new(mem, transport.clone()).unwrap();
    Rig {
        ns,
        net,
        transport,
        driver,
        host_mac,
    }
}

impl Rig {
    fn udp_socket(&self, port: u16) -> UdpSocket {
        let s = self
            .ns
            .enter(|| UdpSocket::bind(SocketAddrV4::new(HOST_IP, port)))
            .unwrap()
            .unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s
    }

    /// A frame from the guest to the namespace's UDP port.
    fn to_host(&self, dport: u16, payload: &[u8], csum: UdpCsum) -> Vec<u8> {
        udp_frame(
            GUEST_MAC,
            self.host_mac,
            GUEST_IP,
            HOST_IP,
            4000,
            dport,
            payload,
            csum,
        )
    }

    fn stats(&self) -> NetStats {
        self.net.lock().unwrap().stats()
    }

    /// Sends a good frame from the guest and checks the namespace gets it.
    fn tx_roundtrip(&mut self, sock: &UdpSocket, payload: &[u8]) {
        let frame = self.to_host(sock.local_addr().unwrap().port(), payload, UdpCsum::Full);
        self.driver.send(&[0; NET_HDR_LEN], &frame, true).unwrap();
        let mut buf = [0u8; 2048];
        let (n, from) = sock
            .recv_from(&mut buf)
            .expect("namespace receives the frame");
        assert_eq!(&buf[..n], payload);
        assert_eq!(from.ip(), std::net::IpAddr::V4(GUEST_IP));
    }

    /// Sends a datagram from the namespace to the guest.
    fn host_sends(&self, sock: &UdpSocket, dport: u16, payload: &[u8]) {
        sock.send_to(payload, SocketAddrV4::new(GUEST_IP, dport))
            .unwrap();
    }
}

/// Received frames that are UDP to `dport`, as (header, view).
fn udp_to(frames: &[RxFrame], dport: u16) -> Vec<(RxFrame, UdpView)> {
    frames
        .iter()
        .filter_map(|f| parse_udp(&f.frame).map(|v| (f.clone(), v)))
        .filter(|(_, v)| v.dport == dport)
        .collect()
}

fn basic_traffic(vnet: VnetHdr, features: Features, tag: &str) {
    let mut r = rig(tag, vnet, features);
    let acked = r.driver.init(features, 256).unwrap();
    assert_eq!(r.net.lock().unwrap().acked_features(), acked);
    let sock = r.udp_socket(5000);

    // TX, gathered from two descriptors, one descriptor, and indirect.
    for i in 0..20u32 {
        let payload = format!("guest datagram {i}").into_bytes();
        r.tx_roundtrip(&sock, &payload);
    }
    let frame = r.to_host(5000, b"indirect", UdpCsum::Full);
    let buf = r
        .driver
        .alloc((NET_HDR_LEN + frame.len()) as u64, 8)
        .unwrap();
    r.driver.write_mem(buf, &[0; NET_HDR_LEN]).unwrap();
    let data = GuestAddress(buf.0 + NET_HDR_LEN as u64);
    r.driver.write_mem(data, &frame).unwrap();
    r.driver
        .add_indirect(
            TX_QUEUE,
            &[
                Buf::read(buf, NET_HDR_LEN as u32),
                Buf::read(data, frame.len() as u32),
            ],
        )
        .unwrap();
    r.driver.kick(TX_QUEUE).unwrap();
    let mut b = [0u8; 64];
    let (n, _) = sock.recv_from(&mut b).unwrap();
    assert_eq!(&b[..n], b"indirect");
    let used = r.driver.wait_used(TX_QUEUE, 21, TIMEOUT).unwrap();
    assert!(used.iter().all(|u| u.len == 0));

    // RX.
    r.driver.fill_rx(32, 2048).unwrap();
    for i in 0..20u32 {
        r.host_sends(&sock, 6000, format!("host datagram {i}").as_bytes());
    }
    let mut got = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    while got.len() < 20 && Instant::now() < deadline {
        let frames = r.driver.recv_frames(1, TIMEOUT).unwrap();
        got.extend(udp_to(&frames, 6000));
    }
    assert_eq!(got.len(), 20);
    for (i, (hdr, v)) in got.iter().enumerate() {
        assert_eq!(v.payload, format!("host datagram {i}").into_bytes());
        assert_eq!(v.dst_mac, GUEST_MAC);
        assert_eq!(hdr.num_buffers(), 1);
        if vnet == VnetHdr::Off {
            assert_eq!(hdr.hdr[..10], [0; 10], "godwit writes an empty header");
        }
        assert!(v.ip_csum_ok);
    }
    let s = r.stats();
    assert_eq!(s.tx_packets, 21);
    assert!(s.rx_packets >= 20);
    assert_eq!(s.tx_faults.total() + s.rx_faults.total(), 0, "{s:?}");
    // Positions are published for snapshots.
    let pos = paused_positions(&r);
    assert_eq!(pos[TX_QUEUE].next_avail, 21);
    assert_eq!(pos[TX_QUEUE].next_used, 21);
}

#[test]
fn traffic_with_vnet_hdr() {
    let features = f(VIRTIO_NET_F_MAC)
        | f(VIRTIO_NET_F_CSUM)
        | f(VIRTIO_NET_F_GUEST_CSUM)
        | f(VIRTIO_RING_F_EVENT_IDX)
        | f(VIRTIO_RING_F_INDIRECT_DESC);
    basic_traffic(VnetHdr::On, features, "vnet");
}

#[test]
fn traffic_without_vnet_hdr() {
    let features = f(VIRTIO_NET_F_MAC) | f(VIRTIO_NET_F_MRG_RXBUF) | f(VIRTIO_RING_F_INDIRECT_DESC);
    basic_traffic(VnetHdr::Off, features, "plain");
}

#[test]
fn partial_checksum_from_the_guest_arrives_valid() {
    let features = f(VIRTIO_NET_F_MAC) | f(VIRTIO_NET_F_CSUM) | f(VIRTIO_RING_F_EVENT_IDX);
    let mut r = rig("csum", VnetHdr::On, features);
    // A second, header-less TAP that the namespace forwards to: the kernel
    // must finish the checksum before handing the frame to it.
    let out =
        r.ns.enter(|| Tap::open("gwout0", VnetHdr::Off))
            .unwrap()
            .unwrap();
    r.ns.ip(&["addr", "add", "10.0.1.1/24", "dev", "gwout0"])
        .unwrap();
    r.ns.ip(&["link", "set", "gwout0", "up"]).unwrap();
    r.ns.ip(&[
        "neigh",
        "add",
        "10.0.1.2",
        "lladdr",
        "02:00:00:00:00:02",
        "dev",
        "gwout0",
    ])
    .unwrap();
    r.ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
    r.ns.sysctl("net.ipv4.conf.all.rp_filter", "0").unwrap();
    r.ns.sysctl(&format!("net.ipv4.conf.{TAP}.rp_filter"), "0")
        .unwrap();
    r.driver.init(features, 256).unwrap();

    let dst = Ipv4Addr::new(10, 0, 1, 2);
    let send = |r: &mut Rig, dport: u16, flags: u8| {
        let payload: Vec<u8> = (0..333u32).map(|i| (i * 7) as u8).collect();
        let frame = udp_frame(
            GUEST_MAC,
            r.host_mac,
            GUEST_IP,
            dst,
            4000,
            dport,
            &payload,
            UdpCsum::Partial,
        );
        let hdr = net_hdr(flags, 0, 0, 0, UDP_OFFSET as u16, 6);
        r.driver.send(&hdr, &frame, false).unwrap();
    };
    let recv = |dport: u16| -> UdpView {
        let deadline = Instant::now() + TIMEOUT;
        let mut buf = vec![0u8; 4096];
        while Instant::now() < deadline {
            match out.read(&mut buf) {
                Ok(n) => {
                    if let Some(v) = parse_udp(&buf[..n]).filter(|v| v.dport == dport) {
                        return v;
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        panic!("no forwarded frame to port {dport}");
    };
    send(&mut r, 7001, VIRTIO_NET_HDR_F_NEEDS_CSUM as u8);
    let v = recv(7001);
    assert!(
        v.udp_csum_ok && v.csum != 0,
        "checksum completed by the host: {v:?}"
    );
    assert_eq!(v.payload.len(), 333);
    // Control: the same frame without NEEDS_CSUM keeps its (wrong) partial sum.
    send(&mut r, 7002, 0);
    let v = recv(7002);
    assert!(
        !v.udp_csum_ok,
        "without NEEDS_CSUM the partial sum is forwarded as is"
    );
}

/// Sends `len` bytes as one UDP_SEGMENT (USO) send of `seg`-byte segments.
fn send_uso(sock: &UdpSocket, len: usize, seg: u16, dport: u16) -> Vec<u8> {
    let seg = libc::c_int::from(seg);
    // SAFETY: setsockopt with a live int and its size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            (&seg as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "UDP_SEGMENT: {}", std::io::Error::last_os_error());
    let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    sock.send_to(&payload, SocketAddrV4::new(GUEST_IP, dport))
        .unwrap();
    payload
}

#[test]
fn large_udp_send_arrives_through_mergeable_buffers() {
    let want = f(VIRTIO_NET_F_MAC)
        | f(VIRTIO_NET_F_GUEST_CSUM)
        | f(VIRTIO_NET_F_GUEST_TSO4)
        | f(VIRTIO_NET_F_GUEST_USO4)
        | f(VIRTIO_NET_F_GUEST_USO6)
        | f(VIRTIO_NET_F_MRG_RXBUF)
        | f(VIRTIO_RING_F_EVENT_IDX);
    let mut r = rig("uso", VnetHdr::On, want);
    r.driver.init(want, 256).unwrap();
    let offload = r.net.lock().unwrap().tap().offload();
    assert_eq!(offload & (TUN_F_CSUM | TUN_F_TSO4), TUN_F_CSUM | TUN_F_TSO4);
    let sock = r.udp_socket(5000);
    // 1526-byte buffers, like a Linux guest's at MTU 1500.
    r.driver.fill_rx(64, 1526).unwrap();
    let payload = send_uso(&sock, 4000, 1400, 6000);
    let frames = r.driver.recv_frames(1, TIMEOUT).unwrap();
    let got = udp_to(&frames, 6000);
    assert_eq!(got.len(), 1, "one USO super-frame, not segments");
    let (hdr, v) = &got[0];
    assert_eq!(u32::from(hdr.gso_type()), VIRTIO_NET_HDR_GSO_UDP_L4);
    assert_eq!(hdr.gso_size(), 1400);
    assert_eq!(hdr.num_buffers(), hdr.buffers);
    assert!(hdr.buffers >= 3, "spread over {} buffers", hdr.buffers);
    assert_eq!(v.payload, payload);
}

#[test]
fn large_frame_goes_straight_into_a_big_buffer() {
    let want = f(VIRTIO_NET_F_MAC)
        | f(VIRTIO_NET_F_GUEST_CSUM)
        | f(VIRTIO_NET_F_GUEST_USO4)
        | f(VIRTIO_NET_F_GUEST_USO6);
    let mut r = rig("big", VnetHdr::On, want);
    r.driver.init(want, 256).unwrap();
    let sock = r.udp_socket(5000);
    // "Big packets" mode without MRG_RXBUF: one chain holds a 64 KiB frame
    // (here 18 pages, like Linux).
    for _ in 0..4 {
        let mut bufs = Vec::new();
        for _ in 0..18 {
            bufs.push(Buf::write(r.driver.alloc(4096, 4096).unwrap(), 4096));
        }
        r.driver.add_chain(RX_QUEUE, &bufs).unwrap();
    }
    r.driver.kick(RX_QUEUE).unwrap();
    let payload = send_uso(&sock, 20000, 1200, 6000);
    let frames = r.driver.recv_frames(1, TIMEOUT).unwrap();
    let got = udp_to(&frames, 6000);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.num_buffers(), 1);
    assert_eq!(u32::from(got[0].0.gso_type()), VIRTIO_NET_HDR_GSO_UDP_L4);
    assert_eq!(got[0].1.payload, payload);
    // Without USO acked (only csum), the host segments the same send.
    let want = f(VIRTIO_NET_F_MAC) | f(VIRTIO_NET_F_GUEST_CSUM) | f(VIRTIO_NET_F_MRG_RXBUF);
    r.driver.init(want, 256).unwrap();
    r.driver.fill_rx(32, 1526).unwrap();
    let payload = send_uso(&sock, 4000, 1400, 6001);
    let frames = r.driver.recv_frames(3, TIMEOUT).unwrap();
    let got = udp_to(&frames, 6001);
    assert_eq!(got.len(), 3);
    let joined: Vec<u8> = got.iter().flat_map(|(_, v)| v.payload.clone()).collect();
    assert_eq!(joined, payload);
}

#[test]
fn full_rx_ring_holds_frames_back_instead_of_dropping() {
    let want = f(VIRTIO_NET_F_MAC) | f(VIRTIO_RING_F_EVENT_IDX);
    let mut r = rig("bp", VnetHdr::On, want);
    r.driver.init(want, 256).unwrap();
    let sock = r.udp_socket(5000);
    const N: usize = 64;
    for i in 0..N {
        r.host_sends(&sock, 6000, format!("held {i:03}").as_bytes());
    }
    std::thread::sleep(Duration::from_millis(200));
    let s = r.stats();
    assert_eq!(s.rx_packets, 0);
    assert_eq!(s.rx_faults.total(), 0);
    r.driver.fill_rx(N + 16, 2048).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    while got.len() < N && Instant::now() < deadline {
        let frames = r.driver.recv_frames(1, TIMEOUT).unwrap();
        got.extend(udp_to(&frames, 6000));
    }
    let payloads: Vec<String> = got
        .iter()
        .map(|(_, v)| String::from_utf8_lossy(&v.payload).into_owned())
        .collect();
    let expected: Vec<String> = (0..N).map(|i| format!("held {i:03}")).collect();
    assert_eq!(payloads, expected, "every frame, in order");
    assert_eq!(r.stats().rx_faults.total(), 0);
}

#[test]
fn mergeable_frames_wait_for_enough_buffers() {
    // 1000-byte datagrams need 3 buffers of 512 bytes; the guest posts one
    // buffer at a time, so every frame waits (pending) at least twice.
    let want = f(VIRTIO_NET_F_MAC) | f(VIRTIO_NET_F_MRG_RXBUF) | f(VIRTIO_RING_F_EVENT_IDX);
    for (tag, vnet) in [("mrgv", VnetHdr::On), ("mrgp", VnetHdr::Off)] {
        let mut r = rig(tag, vnet, want);
        r.driver.init(want, 256).unwrap();
        let sock = r.udp_socket(5000);
        const N: usize = 16;
        for i in 0..N {
            let mut p = vec![b'x'; 1000];
            p[..4].copy_from_slice(&(i as u32).to_le_bytes());
            r.host_sends(&sock, 6000, &p);
        }
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() < N && Instant::now() < deadline {
            r.driver.fill_rx(1, 512).unwrap();
            if let Ok(frames) = r.driver.recv_frames(1, Duration::from_millis(30)) {
                got.extend(udp_to(&frames, 6000));
            }
        }
        assert_eq!(got.len(), N, "{tag}");
        for (i, (hdr, v)) in got.iter().enumerate() {
            assert_eq!(v.payload[..4], (i as u32).to_le_bytes());
            assert_eq!(v.payload.len(), 1000);
            assert_eq!(hdr.buffers, 3);
        }
        assert_eq!(r.stats().rx_faults.total(), 0, "{tag}");
    }
}

#[test]
fn malformed_chains_are_dropped_and_the_device_keeps_serving() {
    let want = f(VIRTIO_NET_F_MAC) | f(VIRTIO_RING_F_INDIRECT_DESC) | f(VIRTIO_RING_F_EVENT_IDX);
    let mut r = rig("bad", VnetHdr::On, want);
    r.driver.init(want, 16).unwrap();
    let sock = r.udp_socket(5000);
    let good = r.to_host(5000, b"x", UdpCsum::Full);
    let buf = r.driver.alloc(256, 16).unwrap();
    r.driver.write_mem(buf, &[0; NET_HDR_LEN]).unwrap();
    r.driver
        .write_mem(GuestAddress(buf.0 + NET_HDR_LEN as u64), &good)
        .unwrap();
    let len = (NET_HDR_LEN + good.len()) as u32;
    let next = VRING_DESC_F_NEXT as u16;
    let d = |addr: u64, len: u32, flags: u16, next: u16| RawDesc {
        addr,
        len,
        flags,
        next,
    };
    let table = r.driver.alloc(64, 16).unwrap();
    type Case = (&'static str, Fault, Vec<(u16, RawDesc)>);
    let cases: Vec<Case> = vec![
        (
            "loop",
            Fault::BrokenChain,
            vec![(10, d(buf.0, 6, next, 11)), (11, d(buf.0 + 6, 6, next, 10))],
        ),
        (
            "next out of range",
            Fault::BrokenChain,
            vec![(10, d(buf.0, len, next, 99))],
        ),
        (
            "out of guest memory",
            Fault::OutOfBounds,
            vec![(10, d(MEM_SIZE as u64 + 0x1000, len, 0, 0))],
        ),
        (
            "wrapping address",
            Fault::OutOfBounds,
            vec![(10, d(u64::MAX - 4, len, 0, 0))],
        ),
        (
            "shorter than the header",
            Fault::TooShort,
            vec![(10, d(buf.0, 8, 0, 0))],
        ),
        (
            "device-writable",
            Fault::WrongDirection,
            vec![(10, d(buf.0, len, VRING_DESC_F_WRITE as u16, 0))],
        ),
        (
            "bad indirect table",
            Fault::BrokenChain,
            vec![(10, d(table.0, 17, VRING_DESC_F_INDIRECT as u16, 0))],
        ),
    ];
    // An indirect table whose entries loop: 0 -> 1 -> 0.
    r.driver
        .write_mem(table, &d(buf.0, 6, next, 1).to_bytes())
        .unwrap();
    r.driver
        .write_mem(
            GuestAddress(table.0 + 16),
            &d(buf.0 + 6, 6, next, 0).to_bytes(),
        )
        .unwrap();
    let mut cases = cases;
    cases.push((
        "indirect loop",
        Fault::BrokenChain,
        vec![(10, d(table.0, 32, VRING_DESC_F_INDIRECT as u16, 0))],
    ));
    let mut expected = FaultCounts::default();
    for (i, (name, fault, descs)) in cases.iter().enumerate() {
        r.driver.add_raw(TX_QUEUE, descs, 10).unwrap();
        r.driver.kick(TX_QUEUE).unwrap();
        r.tx_roundtrip(&sock, format!("after {name}").as_bytes());
        let used = r.driver.wait_used(TX_QUEUE, 2, TIMEOUT).unwrap();
        assert!(
            used.iter().any(|u| u.head == 10 && u.len == 0),
            "{name}: {used:?}"
        );
        match fault {
            Fault::BrokenChain => expected.broken_chain += 1,
            Fault::OutOfBounds => expected.out_of_bounds += 1,
            Fault::TooShort => expected.too_short += 1,
            Fault::WrongDirection => expected.wrong_direction += 1,
            _ => {}
        }
        assert_eq!(r.stats().tx_faults, expected, "after case {i} ({name})");
    }
    assert_eq!(r.driver.status() & status::DEVICE_NEEDS_RESET, 0);

    // Receive side: bad buffers are returned unused, the frame goes to the
    // next good one.
    let rbuf = r.driver.alloc(4096, 16).unwrap();
    let bad_rx: Vec<Vec<(u16, RawDesc)>> = vec![
        vec![(12, d(rbuf.0, 2048, 0, 0))], // read-only
        vec![(12, d(MEM_SIZE as u64, 2048, VRING_DESC_F_WRITE as u16, 0))], // outside memory
        vec![(12, d(rbuf.0, 8, VRING_DESC_F_WRITE as u16, 0))], // too short
    ];
    for descs in &bad_rx {
        r.driver.add_raw(RX_QUEUE, descs, 12).unwrap();
        r.driver.kick(RX_QUEUE).unwrap();
        // The device only looks at rx buffers when a frame arrives.
        r.driver.fill_rx(1, 2048).unwrap();
        r.host_sends(&sock, 6000, b"rx after a bad buffer");
        let frames = r.driver.recv_frames(1, TIMEOUT).unwrap();
        assert_eq!(udp_to(&frames, 6000)[0].1.payload, b"rx after a bad buffer");
    }
    assert_eq!(r.driver.rx_rejected, 3);
    let s = r.stats();
    assert_eq!(
        (
            s.rx_faults.wrong_direction,
            s.rx_faults.out_of_bounds,
            s.rx_faults.too_short
        ),
        (1, 1, 1)
    );
}

#[test]
fn corrupt_ring_needs_reset_and_reset_recovers() {
    let want = f(VIRTIO_NET_F_MAC) | f(VIRTIO_RING_F_EVENT_IDX);
    let mut r = rig("ring", VnetHdr::On, want);
    r.driver.init(want, 16).unwrap();
    let sock = r.udp_socket(5000);
    r.tx_roundtrip(&sock, b"before");
    // The available index jumps by more than the queue size.
    r.driver.set_avail_idx(TX_QUEUE, 1 + 16 + 5).unwrap();
    r.driver.kick(TX_QUEUE).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    let mut irq = 0;
    while irq & 2 == 0 && Instant::now() < deadline {
        irq |= r.driver.wait_irq(Duration::from_millis(50)).unwrap();
    }
    assert_ne!(irq & 2, 0, "configuration interrupt");
    assert_ne!(r.driver.status() & status::DEVICE_NEEDS_RESET, 0);
    // Reset and initialise again: same TAP, traffic flows.
    r.driver.init(want, 16).unwrap();
    assert_eq!(r.driver.status() & status::DEVICE_NEEDS_RESET, 0);
    r.tx_roundtrip(&sock, b"after reset");
    r.driver.fill_rx(4, 2048).unwrap();
    r.host_sends(&sock, 6000, b"rx after reset");
    let frames = r.driver.recv_frames(1, TIMEOUT).unwrap();
    assert_eq!(udp_to(&frames, 6000)[0].1.payload, b"rx after reset");
    // A head index beyond the queue is corrupt too.
    r.driver.publish(TX_QUEUE, 40).unwrap();
    r.driver.kick(TX_QUEUE).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while r.driver.status() & status::DEVICE_NEEDS_RESET == 0 && Instant::now() < deadline {
        r.driver.wait_irq(Duration::from_millis(50)).unwrap();
    }
    assert_ne!(r.driver.status() & status::DEVICE_NEEDS_RESET, 0);
}

/// Sends one control command on control queue `q`; returns the device's ack.
fn ctrl_cmd(r: &mut Rig, q: usize, class: u32, command: u32, data: &[u8]) -> u8 {
    r.driver
        .ctrl_command(q, class as u8, command as u8, data, TIMEOUT)
        .unwrap()
}

/// Two queue pairs on a multi-queue TAP: the config space says 2, the
/// control queue follows both pairs, one pair is in use until
/// VQ_PAIRS_SET, bad counts are refused, and with both in use each pair
/// carries traffic both ways (the kernel spreads flows over the TAP's
/// queues); back to one pair, the second TAP queue is detached.
#[test]
fn two_queue_pairs_carry_traffic_after_vq_pairs_set() {
    let want = f(VIRTIO_NET_F_MAC)
        | f(VIRTIO_NET_F_STATUS)
        | f(VIRTIO_NET_F_CTRL_VQ)
        | f(VIRTIO_NET_F_MQ)
        | f(VIRTIO_NET_F_MRG_RXBUF);
    let mut r = rig_queues("mq", VnetHdr::On, want, 2);
    assert_eq!(r.driver.device_features() & want, want);
    let acked = r.driver.init(want, 128).unwrap();
    assert_ne!(acked & f(VIRTIO_NET_F_MQ), 0);
    assert_eq!(
        r.driver.config(8, 2),
        2u16.to_le_bytes(),
        "max_virtqueue_pairs"
    );
    let ctrl = ctrl_queue_index(2, true);
    assert_eq!(ctrl, 4);
    let info = r.net.lock().unwrap().info();
    assert_eq!((info.queue_pairs, info.active_queue_pairs), (2, 1));
    {
        let net = r.net.lock().unwrap();
        let taps = net.tap_queues();
        assert_eq!(taps.len(), 2);
        assert!(taps[0].queue_enabled() && !taps[1].queue_enabled());
    }
    let (ok, err) = (VIRTIO_NET_OK as u8, VIRTIO_NET_ERR as u8);
    let (mq, set) = (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET);
    // A hostile driver: more pairs than the device has, none, a short or a
    // long argument.
    for bad in [
        &3u16.to_le_bytes()[..],
        &0u16.to_le_bytes(),
        &[2],
        &[2, 0, 0],
    ] {
        assert_eq!(ctrl_cmd(&mut r, ctrl, mq, set, bad), err, "{bad:?}");
    }
    assert_eq!(r.net.lock().unwrap().info().active_queue_pairs, 1);
    assert_eq!(ctrl_cmd(&mut r, ctrl, mq, set, &2u16.to_le_bytes()), ok);
    assert_eq!(r.net.lock().unwrap().info().active_queue_pairs, 2);
    assert!(r.net.lock().unwrap().tap_queues()[1].queue_enabled());

    // Guest to host on each transmit ring.
    let sock = r.udp_socket(5000);
    for pair in 0..2usize {
        let payload = format!("from pair {pair}").into_bytes();
        let frame = r.to_host(5000, &payload, UdpCsum::Full);
        r.driver
            .send_on(2 * pair + 1, &[0; NET_HDR_LEN], &frame, false)
            .unwrap();
        let mut buf = [0u8; 2048];
        let (n, _) = sock
            .recv_from(&mut buf)
            .expect("namespace receives the frame");
        assert_eq!(&buf[..n], payload.as_slice());
    }
    // Host to guest: flows from many source ports, spread by the kernel.
    for q in [0, 2] {
        r.driver.fill_rx_on(q, 64, 2048).unwrap();
    }
    let senders: Vec<UdpSocket> = (0..32).map(|i| r.udp_socket(7000 + i)).collect();
    let deadline = Instant::now() + TIMEOUT * 3;
    let mut per_ring = [0usize; 2];
    while per_ring.contains(&0) && Instant::now() < deadline {
        for s in &senders {
            r.host_sends(s, 6000, b"to the guest");
        }
        for (i, q) in [0usize, 2].into_iter().enumerate() {
            let used = r.driver.reap(q).unwrap();
            per_ring[i] += used.iter().filter(|u| u.len > 0).count();
            r.driver.refill_rx_on(q, &used).unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let info = r.net.lock().unwrap().info();
    assert!(
        per_ring.iter().all(|n| *n > 0),
        "frames per receive ring: {per_ring:?}"
    );
    for (pair, p) in info.pair_stats.iter().enumerate() {
        assert!(p.rx_packets > 0 && p.tx_packets > 0, "pair {pair}: {p:?}");
    }
    assert_eq!(
        info.stats.rx_faults.total() + info.stats.tx_faults.total(),
        0
    );

    // Back to one pair: the second TAP queue gets nothing.
    assert_eq!(ctrl_cmd(&mut r, ctrl, mq, set, &1u16.to_le_bytes()), ok);
    assert!(!r.net.lock().unwrap().tap_queues()[1].queue_enabled());
    let before = r.net.lock().unwrap().info().pair_stats[1].rx_packets;
    for s in &senders {
        r.host_sends(s, 6000, b"one pair again");
    }
    let got = r.driver.recv_frames(senders.len(), TIMEOUT).unwrap();
    assert!(got.len() >= senders.len());
    assert_eq!(
        r.net.lock().unwrap().info().pair_stats[1].rx_packets,
        before
    );

    // A reset goes back to one pair in use.
    r.driver.init(want, 128).unwrap();
    assert_eq!(r.net.lock().unwrap().info().active_queue_pairs, 1);
}

/// With EVENT_IDX the control queue asks for the next kick (avail_event)
/// once it has served what was posted: a driver that honours avail_event
/// (Linux, the test guest) kicks only then, so a device that left it where
/// it was never heard of the second command (after a VQ_PAIRS_SET, an
/// announce ack went unanswered and the guest never announced again).
#[test]
fn control_queue_asks_for_each_next_kick_with_event_idx() {
    let want = f(VIRTIO_NET_F_MAC)
        | f(VIRTIO_NET_F_CTRL_VQ)
        | f(VIRTIO_NET_F_MQ)
        | f(VIRTIO_RING_F_EVENT_IDX);
    let mut r = rig_queues("ctrlev", VnetHdr::On, want, 2);
    r.driver.init(want, 64).unwrap();
    let ctrl = ctrl_queue_index(2, true);
    let q = r.driver.queue(ctrl).unwrap();
    let avail_event = GuestAddress(q.used.0 + 4 + 8 * u64::from(q.size));
    let (mq, set) = (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET);
    for (i, pairs) in [2u16, 1, 2].into_iter().enumerate() {
        let ok = ctrl_cmd(&mut r, ctrl, mq, set, &pairs.to_le_bytes());
        assert_eq!(ok, VIRTIO_NET_OK as u8);
        let event = r.driver.read_mem(avail_event, 2).unwrap();
        assert_eq!(
            u16::from_le_bytes([event[0], event[1]]),
            i as u16 + 1,
            "after command {i} the device waits for a kick at the next entry"
        );
    }
}

/// A driver that does not ack MQ on a device of two pairs: one pair, the
/// control queue is queue 2, VQ_PAIRS_SET is not there.
#[test]
fn two_pair_device_without_mq_acked_uses_one_pair() {
    let offer = f(VIRTIO_NET_F_MAC) | f(VIRTIO_NET_F_CTRL_VQ) | f(VIRTIO_NET_F_MQ);
    let mut r = rig_queues("mqoff", VnetHdr::On, offer, 2);
    let acked = r.driver.init(offer & !f(VIRTIO_NET_F_MQ), 64).unwrap();
    assert_eq!(acked & f(VIRTIO_NET_F_MQ), 0);
    let sock = r.udp_socket(5000);
    r.tx_roundtrip(&sock, b"one pair");
    let err = VIRTIO_NET_ERR as u8;
    let (mq, set) = (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET);
    assert_eq!(
        ctrl_cmd(&mut r, CTRL_QUEUE, mq, set, &1u16.to_le_bytes()),
        err
    );
    let info = r.net.lock().unwrap().info();
    assert_eq!((info.queue_pairs, info.active_queue_pairs), (2, 1));
}

#[test]
fn control_queue_commands() {
    let want = f(VIRTIO_NET_F_MAC)
        | f(VIRTIO_NET_F_STATUS)
        | f(VIRTIO_NET_F_CTRL_VQ)
        | f(VIRTIO_NET_F_CTRL_RX)
        | f(VIRTIO_NET_F_CTRL_MAC_ADDR)
        | f(VIRTIO_NET_F_GUEST_ANNOUNCE)
        | f(VIRTIO_NET_F_MQ);
    let mut r = rig("ctrl", VnetHdr::On, want);
    r.driver.init(want, 64).unwrap();
    assert_eq!(
        r.driver.config(8, 2),
        1u16.to_le_bytes(),
        "max_virtqueue_pairs"
    );
    let cmd = |r: &mut Rig, class: u32, command: u32, data: &[u8]| -> u8 {
        ctrl_cmd(r, CTRL_QUEUE, class, command, data)
    };
    let ok = VIRTIO_NET_OK as u8;
    let err = VIRTIO_NET_ERR as u8;
    assert_eq!(
        cmd(&mut r, VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, &[0]),
        ok
    );
    assert_eq!(
        cmd(
            &mut r,
            VIRTIO_NET_CTRL_RX,
            VIRTIO_NET_CTRL_RX_ALLMULTI,
            &[1]
        ),
        ok
    );
    assert_eq!(
        cmd(&mut r, VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_NOBCAST, &[1]),
        err
    );
    let mut table = Vec::new();
    table.extend_from_slice(&0u32.to_le_bytes());
    table.extend_from_slice(&1u32.to_le_bytes());
    table.extend_from_slice(&[0x01, 0x00, 0x5e, 0, 0, 1]);
    assert_eq!(
        cmd(
            &mut r,
            VIRTIO_NET_CTRL_MAC,
            VIRTIO_NET_CTRL_MAC_TABLE_SET,
            &table
        ),
        ok
    );
    assert_eq!(
        cmd(
            &mut r,
            VIRTIO_NET_CTRL_MAC,
            VIRTIO_NET_CTRL_MAC_TABLE_SET,
            &table[..5]
        ),
        err
    );
    let new_mac = [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc];
    assert_eq!(
        cmd(
            &mut r,
            VIRTIO_NET_CTRL_MAC,
            VIRTIO_NET_CTRL_MAC_ADDR_SET,
            &new_mac
        ),
        ok
    );
    assert_eq!(r.driver.config(0, 6), new_mac);
    let info = r.net.lock().unwrap().info();
    assert!(!info.rx_filter.promiscuous && info.rx_filter.all_multicast);
    assert_eq!(info.rx_filter.multicast.len(), 1);
    assert_eq!(
        cmd(
            &mut r,
            VIRTIO_NET_CTRL_MQ,
            VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
            &2u16.to_le_bytes()
        ),
        err
    );
    assert_eq!(
        cmd(
            &mut r,
            VIRTIO_NET_CTRL_MQ,
            VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
            &1u16.to_le_bytes()
        ),
        ok
    );
    assert_eq!(
        cmd(
            &mut r,
            VIRTIO_NET_CTRL_VLAN,
            VIRTIO_NET_CTRL_VLAN_ADD,
            &[0, 1]
        ),
        err
    );
    assert_eq!(cmd(&mut r, 0x7f, 0, &[]), err);
    // Not negotiated: CTRL_GUEST_OFFLOADS was not offered.
    assert_eq!(
        cmd(
            &mut r,
            VIRTIO_NET_CTRL_GUEST_OFFLOADS,
            0,
            &0u64.to_le_bytes()
        ),
        err
    );

    // Announce: status bit + config interrupt, cleared by ANNOUNCE_ACK.
    let _ = r.driver.wait_irq(Duration::from_millis(1));
    assert!(r.net.lock().unwrap().announce());
    assert_ne!(r.driver.wait_irq(TIMEOUT).unwrap() & 2, 0);
    let st = u16::from_le_bytes(r.driver.config(6, 2).try_into().unwrap());
    assert_eq!(u32::from(st), VIRTIO_NET_S_LINK_UP | VIRTIO_NET_S_ANNOUNCE);
    assert_eq!(
        cmd(
            &mut r,
            VIRTIO_NET_CTRL_ANNOUNCE,
            VIRTIO_NET_CTRL_ANNOUNCE_ACK,
            &[]
        ),
        ok
    );
    let st = u16::from_le_bytes(r.driver.config(6, 2).try_into().unwrap());
    assert_eq!(u32::from(st), VIRTIO_NET_S_LINK_UP);

    // Link changes raise a configuration interrupt.
    r.net.lock().unwrap().set_link(false);
    assert_ne!(r.driver.wait_irq(TIMEOUT).unwrap() & 2, 0);
    assert_eq!(r.driver.config(6, 2), [0, 0]);
    r.net.lock().unwrap().set_link(true);
    assert_ne!(r.driver.wait_irq(TIMEOUT).unwrap() & 2, 0);
    assert_eq!(r.driver.config(6, 2), [1, 0]);

    // A malformed control chain (no writable ack byte) is returned unanswered.
    let out = r.driver.alloc(2, 2).unwrap();
    r.driver
        .add_chain(CTRL_QUEUE, &[Buf::read(out, 2)])
        .unwrap();
    r.driver.kick(CTRL_QUEUE).unwrap();
    let used = r.driver.wait_used(CTRL_QUEUE, 1, TIMEOUT).unwrap();
    assert_eq!(used[0].len, 0);
    assert_eq!(r.stats().ctrl_faults, 1);

    // Reset restores the configured MAC.
    r.driver.reset();
    assert_eq!(r.driver.config(0, 6), GUEST_MAC);
}

#[test]
fn guest_offloads_can_be_switched_through_the_control_queue() {
    let want = f(VIRTIO_NET_F_MAC)
        | f(VIRTIO_NET_F_GUEST_CSUM)
        | f(VIRTIO_NET_F_GUEST_TSO4)
        | f(VIRTIO_NET_F_CTRL_VQ)
        | f(VIRTIO_NET_F_CTRL_GUEST_OFFLOADS);
    let mut r = rig("goff", VnetHdr::On, want);
    r.driver.init(want, 64).unwrap();
    let tap = r.net.lock().unwrap().tap().clone();
    assert_eq!(tap.offload(), TUN_F_CSUM | TUN_F_TSO4);
    let send = |r: &mut Rig, v: Features| -> u8 {
        let mut bytes = vec![
            VIRTIO_NET_CTRL_GUEST_OFFLOADS as u8,
            VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET as u8,
        ];
        bytes.extend_from_slice(&crate::virtio::low64(v).to_le_bytes());
        let out = r.driver.alloc(10, 8).unwrap();
        r.driver.write_mem(out, &bytes).unwrap();
        let ack = r.driver.alloc(1, 1).unwrap();
        r.driver
            .add_chain(CTRL_QUEUE, &[Buf::read(out, 10), Buf::write(ack, 1)])
            .unwrap();
        r.driver.kick(CTRL_QUEUE).unwrap();
        r.driver.wait_used(CTRL_QUEUE, 1, TIMEOUT).unwrap();
        r.driver.read_mem(ack, 1).unwrap()[0]
    };
    assert_eq!(
        send(&mut r, f(VIRTIO_NET_F_GUEST_CSUM)),
        VIRTIO_NET_OK as u8
    );
    assert_eq!(tap.offload(), TUN_F_CSUM);
    assert_eq!(send(&mut r, 0), VIRTIO_NET_OK as u8);
    assert_eq!(tap.offload(), 0);
    // Offloads that were not acked are refused.
    assert_eq!(
        send(&mut r, f(VIRTIO_NET_F_GUEST_UFO)),
        VIRTIO_NET_ERR as u8
    );
    assert_eq!(tap.offload(), 0);
}

#[test]
fn probe_offloads_on_vnet_and_plain_taps() {
    let ns = NetNs::new("probe").unwrap();
    let vnet = ns
        .enter(|| Tap::open("gwv0", VnetHdr::On))
        .unwrap()
        .unwrap();
    let plain = ns
        .enter(|| Tap::open("gwp0", VnetHdr::Off))
        .unwrap()
        .unwrap();
    vnet.set_offload(TUN_F_CSUM | TUN_F_TSO4).unwrap();
    let caps = vnet.probe_offloads();
    // What this kernel (6.18) accepts, per platform.md.
    assert!(
        caps.vnet_hdr && caps.csum && caps.tso4 && caps.tso6 && caps.tso_ecn,
        "{caps:?}"
    );
    assert!(caps.ufo && caps.uso, "{caps:?}");
    assert_eq!(
        vnet.offload(),
        TUN_F_CSUM | TUN_F_TSO4,
        "restored after probing"
    );
    assert_eq!(plain.probe_offloads(), TapOffloads::default());
    assert!(!plain.has_vnet_hdr());
    let e = plain.set_offload(TUN_F_CSUM).unwrap_err();
    assert!(e.to_string().contains("vnet_hdr=on"), "{e}");
    // The kernel's rules: flags without CSUM, lone USO4 are refused.
    assert!(matches!(
        vnet.set_offload(TUN_F_TSO4),
        Err(TapError::SetOffload { .. })
    ));
    assert!(vnet.set_offload(TUN_F_CSUM | libc::TUN_F_USO4).is_err());
    // MTU and link helpers reach the TAP's namespace from here.
    vnet.set_mtu(1400).unwrap();
    assert_eq!(vnet.mtu().unwrap(), 1400);
    assert!(!vnet.is_up().unwrap());
    vnet.set_up(true).unwrap();
    assert!(vnet.is_up().unwrap());

    // Devices refuse features the TAP cannot do, naming them.
    let e = VirtioNet::new(
        plain,
        NetConfig::new(GUEST_MAC, f(VIRTIO_NET_F_CSUM) | f(VIRTIO_NET_F_GUEST_CSUM)),
    )
    .err()
    .unwrap();
    let msg = e.to_string();
    assert!(
        msg.contains("csum")
            && msg.contains("guest_csum")
            && msg.contains("gwp0")
            && msg.contains("vnet_hdr=on"),
        "{msg}"
    );
    let e = VirtioNet::new(vnet, NetConfig::new(GUEST_MAC, f(VIRTIO_NET_F_GUEST_TSO4)))
        .err()
        .unwrap();
    assert!(e.to_string().contains("guest_tso4 needs guest_csum"), "{e}");
}

fn dup(fd: i32) -> OwnedFd {
    // SAFETY: dup of a live fd returns a new fd we own (checked below).
    let n = unsafe { libc::dup(fd) };
    assert!(n >= 0);
    // SAFETY: n is a fresh fd.
    unsafe { OwnedFd::from_raw_fd(n) }
}

#[test]
fn adopting_fds() {
    let ns = NetNs::new("fd").unwrap();
    let vnet = ns
        .enter(|| Tap::open("gwa0", VnetHdr::On))
        .unwrap()
        .unwrap();
    let adopted = Tap::from_fd(dup(vnet.as_raw_fd()), VnetHdr::Auto).unwrap();
    assert_eq!(adopted.name(), "gwa0");
    assert!(adopted.has_vnet_hdr());
    let e = Tap::from_fd(dup(vnet.as_raw_fd()), VnetHdr::Off).unwrap_err();
    assert!(matches!(e, TapError::UnexpectedVnetHdr { .. }), "{e}");
    drop(adopted);

    let plain = ns
        .enter(|| Tap::open("gwa1", VnetHdr::Off))
        .unwrap()
        .unwrap();
    let e = Tap::from_fd(dup(plain.as_raw_fd()), VnetHdr::On).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("gwa1") && msg.contains("without IFF_VNET_HDR") && msg.contains("vnet_hdr"),
        "{msg}"
    );
    let adopted = Tap::from_fd(dup(plain.as_raw_fd()), VnetHdr::Off).unwrap();
    assert!(!adopted.has_vnet_hdr());

    // Not TAPs.
    let evt = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    let raw = dup(evt.as_raw_fd());
    let n = raw.as_raw_fd();
    let e = Tap::from_fd(raw, VnetHdr::Auto).unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("fd {n} is not a TAP device")),
        "{e}"
    );
    let unattached = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap();
    let e = Tap::from_fd(unattached.into(), VnetHdr::Auto).unwrap_err();
    assert!(e.to_string().contains("not attached"), "{e}");

    // Opening errors.
    assert!(matches!(
        Tap::open("bad/name", VnetHdr::On),
        Err(TapError::InvalidName { .. })
    ));
    let e = ns
        .enter(|| Tap::open("lo", VnetHdr::On))
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, TapError::NameTaken { .. }), "{e}");
    let e = ns
        .enter(|| Tap::open("gwa0", VnetHdr::On))
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, TapError::Busy { .. }), "{e}");
    assert!(e.to_string().contains("another process"), "{e}");
}

/// Queues of one TAP: several make a multi-queue TAP, one queue of it
/// opens as such, a single-queue TAP refuses more with the remedy, and
/// descriptors handed in must be queues of one multi-queue TAP.
#[test]
fn multi_queue_taps_by_name_and_by_descriptors() {
    let ns = NetNs::new("mqtap").unwrap();
    let queues = ns
        .enter(|| Tap::open_queues("gwm0", VnetHdr::On, 3))
        .unwrap()
        .unwrap();
    assert_eq!(queues.len(), 3);
    assert!(queues
        .iter()
        .all(|q| q.is_multi_queue() && q.name() == "gwm0"));
    // Detach and attach again; a queue already in that state is left alone.
    queues[2].set_queue_enabled(false).unwrap();
    queues[2].set_queue_enabled(false).unwrap();
    assert!(!queues[2].queue_enabled());
    queues[2].set_queue_enabled(true).unwrap();
    let one = ns
        .enter(|| Tap::open("gwm0", VnetHdr::On))
        .unwrap()
        .unwrap();
    assert!(one.is_multi_queue());
    // Descriptors: the queues of one multi-queue TAP, or any one TAP.
    let fds = queues.iter().map(|q| dup(q.as_raw_fd())).collect();
    let adopted = Tap::from_fds(fds, VnetHdr::On).unwrap();
    assert_eq!(adopted.len(), 3);
    let single = ns
        .enter(|| Tap::open("gws0", VnetHdr::On))
        .unwrap()
        .unwrap();
    assert!(!single.is_multi_queue());
    let e = Tap::from_fds(
        vec![dup(queues[0].as_raw_fd()), dup(single.as_raw_fd())],
        VnetHdr::Auto,
    )
    .unwrap_err();
    assert!(matches!(e, TapError::NotOneMultiQueueTap { .. }), "{e}");
    drop(single);
    let e = ns
        .enter(|| Tap::open_queues("gws0", VnetHdr::On, 2))
        .unwrap();
    // gws0 was not persistent: closing its only queue deleted it, so this
    // created a new multi-queue TAP.
    assert_eq!(e.unwrap().len(), 2);
    ns.ip(&["tuntap", "add", "dev", "gwp0", "mode", "tap", "vnet_hdr"])
        .unwrap();
    let e = ns
        .enter(|| Tap::open_queues("gwp0", VnetHdr::On, 2))
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, TapError::SingleQueue { wanted: 2, .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("single-queue TAP") && msg.contains("queues=1") && msg.contains("multi_queue"),
        "{msg}"
    );
    // One queue of it still opens.
    ns.enter(|| Tap::open_queues("gwp0", VnetHdr::On, 1))
        .unwrap()
        .unwrap();
}

#[test]
fn transport_state_round_trips_with_a_live_net_device() {
    let want = f(VIRTIO_NET_F_MAC) | f(VIRTIO_RING_F_EVENT_IDX);
    let mut r = rig("snap", VnetHdr::On, want);
    r.driver.init(want, 64).unwrap();
    let sock = r.udp_socket(5000);
    for i in 0..5u8 {
        r.tx_roundtrip(&sock, &[i; 10]);
    }
    r.driver.wait_used(TX_QUEUE, 5, TIMEOUT).unwrap();
    let state = {
        use godwit_migration::persist::Persist;
        r.transport.lock().unwrap().save()
    };
    assert_eq!(state.queues[TX_QUEUE].next_avail, 5);
    assert_eq!(state.queues[TX_QUEUE].next_used, 5);
    assert_eq!(state.queues[RX_QUEUE].next_avail, 0);
    assert!(state.queues.iter().all(|q| q.ready));
    assert_eq!(state.driver_features, r.driver.features());
}

#[test]
fn interrupts_follow_event_idx_including_mergeable_batches() {
    let want = f(VIRTIO_NET_F_MAC) | f(VIRTIO_NET_F_MRG_RXBUF) | f(VIRTIO_RING_F_EVENT_IDX);
    let mut r = rig("evidx", VnetHdr::On, want);
    r.driver.init(want, 64).unwrap();
    let sock = r.udp_socket(5000);
    let quiet = Duration::from_millis(100);

    // The first used buffer interrupts (used_event starts at 0).
    r.tx_roundtrip(&sock, b"first");
    r.driver.wait_used_idx(TX_QUEUE, 1, TIMEOUT).unwrap();
    assert_ne!(r.driver.wait_irq(TIMEOUT).unwrap() & 1, 0);
    r.driver.reap(TX_QUEUE).unwrap();

    // used_event = 4: entries 1..=3 stay quiet, entry 4 interrupts.
    r.driver.set_used_event(TX_QUEUE, 4).unwrap();
    for i in 0..3u16 {
        r.tx_roundtrip(&sock, b"quiet");
        r.driver.wait_used_idx(TX_QUEUE, 2 + i, TIMEOUT).unwrap();
        assert_eq!(
            r.driver.wait_irq(Duration::ZERO).unwrap(),
            0,
            "entry {}",
            1 + i
        );
    }
    r.tx_roundtrip(&sock, b"loud");
    r.driver.wait_used_idx(TX_QUEUE, 5, TIMEOUT).unwrap();
    assert_ne!(r.driver.wait_irq(TIMEOUT).unwrap() & 1, 0);

    // Receive: a 1000-byte datagram in 512-byte buffers is one batch of 3
    // used entries published at once; an interrupt requested for the middle
    // entry must still come.
    r.driver.fill_rx(3, 512).unwrap();
    std::thread::sleep(quiet);
    r.driver.set_used_event(RX_QUEUE, 1).unwrap();
    let _ = r.driver.take_irq_signal();
    r.host_sends(&sock, 6000, &[7u8; 1000]);
    r.driver.wait_used_idx(RX_QUEUE, 3, TIMEOUT).unwrap();
    assert_ne!(
        r.driver.wait_irq(TIMEOUT).unwrap() & 1,
        0,
        "interrupt for the batch"
    );
    let frames = r.driver.recv_frames(1, TIMEOUT).unwrap();
    assert_eq!(frames[0].buffers, 3);
    // Event beyond the batch: quiet.
    r.driver.fill_rx(3, 512).unwrap();
    std::thread::sleep(quiet);
    r.driver.set_used_event(RX_QUEUE, 10).unwrap();
    let _ = r.driver.take_irq_signal();
    r.host_sends(&sock, 6000, &[8u8; 1000]);
    r.driver.wait_used_idx(RX_QUEUE, 6, TIMEOUT).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert!(
        !r.driver.take_irq_signal(),
        "no interrupt before used_event"
    );
}

#[test]
fn no_interrupt_flag_is_honoured_without_event_idx() {
    let want = f(VIRTIO_NET_F_MAC);
    let mut r = rig("noint", VnetHdr::On, want);
    r.driver.init(want, 64).unwrap();
    let sock = r.udp_socket(5000);
    r.driver
        .set_avail_flags(
            TX_QUEUE,
            virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT as u16,
        )
        .unwrap();
    let _ = r.driver.take_irq_signal();
    r.tx_roundtrip(&sock, b"silent");
    r.driver.wait_used_idx(TX_QUEUE, 1, TIMEOUT).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert!(!r.driver.take_irq_signal());
    r.driver.set_avail_flags(TX_QUEUE, 0).unwrap();
    r.tx_roundtrip(&sock, b"heard");
    r.driver.wait_used_idx(TX_QUEUE, 2, TIMEOUT).unwrap();
    assert_ne!(r.driver.wait_irq(TIMEOUT).unwrap() & 1, 0);
}

#[test]
fn plain_tap_reads_straight_into_big_buffers() {
    let want = f(VIRTIO_NET_F_MAC);
    let mut r = rig("plainbig", VnetHdr::Off, want);
    r.ns.ip(&["link", "set", TAP, "mtu", "9000"]).unwrap();
    r.driver.init(want, 64).unwrap();
    let sock = r.udp_socket(5000);
    // A migration logs dirty pages: the datapath marks what it writes only
    // while the log is on.
    crate::dirty_log::DirtyTracking::start_dirty_log(&*r.net.lock().unwrap(), 1 << 30).unwrap();
    let big = r.driver.alloc(80 * 1024, 4096).unwrap();
    r.driver.write_mem(big, &[0xaa; NET_HDR_LEN]).unwrap();
    r.driver
        .add_chain(RX_QUEUE, &[Buf::write(big, 80 * 1024)])
        .unwrap();
    r.driver.kick(RX_QUEUE).unwrap();
    let payload: Vec<u8> = (0..8000u32).map(|i| i as u8).collect();
    r.host_sends(&sock, 6000, &payload);
    let frames = r.driver.recv_frames(1, TIMEOUT).unwrap();
    let got = udp_to(&frames, 6000);
    assert_eq!(got[0].1.payload, payload);
    let mut hdr = [0u8; NET_HDR_LEN];
    hdr[10] = 1;
    assert_eq!(got[0].0.hdr, hdr, "godwit wrote the header itself");
    // The second page was only written by readv through raw pointers: with
    // the log on, the dirty bitmap must still have seen it.
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let reg = r.driver.mem().find_region(big).unwrap();
    let off = (big.0 - reg.start_addr().0) as usize + 4096;
    assert!(reg.bitmap().dirty_at(off));
    assert!(
        !reg.bitmap().dirty_at(off + 8192),
        "pages not written stay clean"
    );
}

/// xorshift64*: deterministic randomness from a printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len() as u64) as usize]
    }
}

/// Counts panics on godwit's datapath threads (the default hook still runs).
fn datapath_panics() -> &'static std::sync::atomic::AtomicUsize {
    static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("gw-net-"))
            {
                COUNT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            previous(info);
        }));
    });
    &COUNT
}

const SCRATCH: u64 = 32 << 20;

fn random_desc(rng: &mut Rng, table: u64) -> RawDesc {
    let mem = MEM_SIZE as u64;
    let addr = match rng.below(8) {
        0 => SCRATCH + rng.below(mem - SCRATCH),
        1 => mem - rng.below(100),
        2 => mem + rng.below(1 << 20),
        3 => u64::MAX - rng.below(64),
        4 => table,
        5 => rng.next(),
        _ => SCRATCH + 4096 * rng.below(16),
    };
    let len = match rng.below(10) {
        0 => 0,
        1 => rng.pick(&[1, 11, 12, 13]),
        2 => 60,
        3 => 1500,
        4 => 4096,
        5 => 65536,
        6 => 70000,
        7 => u32::MAX,
        8 => 16 * rng.below(20) as u32,
        _ => rng.next() as u32,
    };
    RawDesc {
        addr,
        len,
        flags: rng.below(8) as u16,
        next: rng.below(20) as u16,
    }
}

#[test]
fn random_descriptors_never_stop_the_device() {
    let panics = datapath_panics();
    let seed = random_u64() | 1;
    eprintln!("random_descriptors_never_stop_the_device: seed {seed:#x}");
    let mut rng = Rng(seed);
    for mrg in [false, true] {
        let mut want =
            f(VIRTIO_NET_F_MAC) | f(VIRTIO_RING_F_INDIRECT_DESC) | f(VIRTIO_RING_F_EVENT_IDX);
        if mrg {
            want |= f(VIRTIO_NET_F_MRG_RXBUF);
        }
        let mut r = rig(if mrg { "fuzzm" } else { "fuzz" }, VnetHdr::On, want);
        r.driver.init(want, 16).unwrap();
        let sock = r.udp_socket(5000);
        let table = SCRATCH + (1 << 20);
        let good = r.to_host(5000, b"good", UdpCsum::Full);
        let good_buf = SCRATCH + (2 << 20);
        r.driver
            .write_mem(GuestAddress(good_buf), &[0; NET_HDR_LEN])
            .unwrap();
        r.driver
            .write_mem(GuestAddress(good_buf + NET_HDR_LEN as u64), &good)
            .unwrap();
        let rx_buf = SCRATCH + (3 << 20);
        let (mut tx_published, mut rx_published) = (0u16, 0u16);
        for i in 0..150 {
            // A fresh random indirect table every round.
            for e in 0..16 {
                let d = random_desc(&mut rng, table);
                r.driver
                    .write_mem(GuestAddress(table + 16 * e), &d.to_bytes())
                    .unwrap();
            }
            // TX: 1-4 random descriptors at indexes 0..8, random head.
            for _ in 0..=rng.below(4) {
                let d = random_desc(&mut rng, table);
                r.driver
                    .write_desc(TX_QUEUE, rng.below(8) as u16, d)
                    .unwrap();
            }
            r.driver.publish(TX_QUEUE, rng.below(8) as u16).unwrap();
            tx_published = tx_published.wrapping_add(1);
            // And a good frame at index 15.
            r.driver
                .write_desc(
                    TX_QUEUE,
                    15,
                    RawDesc {
                        addr: good_buf,
                        len: (NET_HDR_LEN + good.len()) as u32,
                        flags: 0,
                        next: 0,
                    },
                )
                .unwrap();
            r.driver.publish(TX_QUEUE, 15).unwrap();
            tx_published = tx_published.wrapping_add(1);
            r.driver.kick(TX_QUEUE).unwrap();
            r.driver
                .wait_used_idx(TX_QUEUE, tx_published, TIMEOUT)
                .unwrap_or_else(|e| panic!("seed {seed:#x} round {i} tx: {e}"));
            let mut b = [0u8; 16];
            let (n, _) = sock
                .recv_from(&mut b)
                .expect("the good frame after random ones");
            assert_eq!(&b[..n], b"good");

            // RX: a random chain, then a good one, then two frames.
            for _ in 0..=rng.below(3) {
                let d = random_desc(&mut rng, table);
                r.driver
                    .write_desc(RX_QUEUE, rng.below(8) as u16, d)
                    .unwrap();
            }
            r.driver.publish(RX_QUEUE, rng.below(8) as u16).unwrap();
            let slot = 8 + (i % 8) as u16;
            r.driver
                .write_desc(
                    RX_QUEUE,
                    slot,
                    RawDesc {
                        addr: rx_buf + 4096 * u64::from(slot),
                        len: 2048,
                        flags: VRING_DESC_F_WRITE as u16,
                        next: 0,
                    },
                )
                .unwrap();
            r.driver.publish(RX_QUEUE, slot).unwrap();
            rx_published = rx_published.wrapping_add(2);
            r.driver.kick(RX_QUEUE).unwrap();
            r.host_sends(&sock, 6000, b"one");
            r.host_sends(&sock, 6000, b"two");
            r.driver
                .wait_used_idx(RX_QUEUE, rx_published, TIMEOUT)
                .unwrap_or_else(|e| panic!("seed {seed:#x} round {i} rx: {e}"));
            let st = r.driver.status();
            assert_eq!(
                st & status::DEVICE_NEEDS_RESET,
                0,
                "seed {seed:#x} round {i}"
            );
        }
        let s = r.stats();
        eprintln!("mrg={mrg}: {s:?}");
        assert!(s.tx_packets >= 150);
        assert!(s.tx_faults.total() > 0 && s.rx_faults.total() > 0);
        // Still fully functional after a reset.
        // (A fresh socket: random chains may have linked to the good
        // descriptor and sent extra copies to the first one.)
        r.driver.init(want, 64).unwrap();
        let fresh = r.udp_socket(5001);
        r.tx_roundtrip(&fresh, b"after fuzzing");
    }
    assert_eq!(panics.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[test]
fn restored_transport_continues_on_a_new_tap() {
    use godwit_migration::persist::Persist;
    let want = f(VIRTIO_NET_F_MAC) | f(VIRTIO_NET_F_MRG_RXBUF) | f(VIRTIO_RING_F_EVENT_IDX);
    let mut r = rig("restore", VnetHdr::On, want);
    r.driver.init(want, 64).unwrap();
    let sock = r.udp_socket(5000);
    for i in 0..7u8 {
        r.tx_roundtrip(&sock, &[i; 8]);
    }
    r.driver.wait_used(TX_QUEUE, 7, TIMEOUT).unwrap();
    r.driver.fill_rx(8, 2048).unwrap();
    r.host_sends(&sock, 6000, b"before");
    r.driver.recv_frames(1, TIMEOUT).unwrap();
    // Quiesce, save, tear down the source device (its TAP goes away).
    std::thread::sleep(Duration::from_millis(50));
    let state = r.transport.lock().unwrap().save();
    assert_eq!(state.queues[TX_QUEUE].next_avail, 7);
    assert_eq!(state.queues[RX_QUEUE].next_used, 1);
    let old_transport = std::mem::replace(
        &mut r.transport,
        Arc::new(Mutex::new(
            MmioTransport::new(guest_memory(4096), Arc::new(Mutex::new(NullDevice))).unwrap(),
        )),
    );
    drop(old_transport);
    let old = std::mem::replace(&mut r.net, Arc::new(Mutex::new(placeholder_net(&r.ns))));
    drop(old);

    // Destination: a new TAP with the same address, a fresh device,
    // restored transport on the same guest memory.
    let tap =
        r.ns.enter(|| Tap::open("gwtap9", VnetHdr::On))
            .unwrap()
            .unwrap();
    r.ns.ip(&["addr", "add", "10.0.0.1/24", "dev", "gwtap9"])
        .unwrap();
    r.ns.ip(&["link", "set", "gwtap9", "up"]).unwrap();
    r.ns.ip(&[
        "neigh",
        "replace",
        "10.0.0.2",
        "lladdr",
        &format_mac(&GUEST_MAC),
        "dev",
        "gwtap9",
    ])
    .unwrap();
    r.host_mac = tap.host_mac().unwrap();
    let net = Arc::new(Mutex::new(
        VirtioNet::new(tap, NetConfig::new(GUEST_MAC, want)).unwrap(),
    ));
    let dev: Arc<Mutex<dyn VirtioDevice>> = net.clone();
    let restored = MmioTransport::restore((r.driver.mem().clone(), dev), &state).unwrap();
    let restored = Arc::new(Mutex::new(restored));
    r.driver.rebind(restored.clone()).unwrap();
    r.net = net;
    r.transport = restored;
    assert_eq!(r.net.lock().unwrap().acked_features(), r.driver.features());
    assert_eq!(r.driver.status() & status::DRIVER_OK, status::DRIVER_OK);
    // Traffic continues where the rings stood.
    let sock = r.udp_socket(5002);
    r.tx_roundtrip(&sock, b"after restore");
    let used = r.driver.wait_used(TX_QUEUE, 1, TIMEOUT).unwrap();
    assert_eq!(used.len(), 1);
    r.host_sends(&sock, 6000, b"rx after restore");
    let frames = r.driver.recv_frames(1, TIMEOUT).unwrap();
    assert_eq!(udp_to(&frames, 6000)[0].1.payload, b"rx after restore");
    let pos = paused_positions(&r);
    assert_eq!(pos[TX_QUEUE].next_avail, 8);
}

/// The queue positions a snapshot would save: read with the datapath
/// paused, since the worker writes the used ring before it publishes them.
fn paused_positions(r: &Rig) -> Vec<crate::virtio::QueuePosition> {
    let net = r.net.lock().unwrap();
    net.pause_datapath().unwrap();
    let pos = net.queue_positions().unwrap();
    net.resume_datapath();
    pos
}

/// A device with no queues, to park a rig's transport slot.
struct NullDevice;

impl VirtioDevice for NullDevice {
    fn device_type(&self) -> u32 {
        0
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[]
    }
    fn device_features(&self) -> crate::virtio::Features {
        0
    }
    fn ack_features(&mut self, _: crate::virtio::Features) {}
    fn read_config(&self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&mut self, _: u64, _: &[u8]) {}
    fn activate(&mut self, _: ActivateParams) -> Result<(), ActivateError> {
        Ok(())
    }
    fn reset(&mut self) {}
    fn is_active(&self) -> bool {
        false
    }
    fn queue_positions(&self) -> Option<Vec<QueuePosition>> {
        None
    }
}

fn placeholder_net(ns: &NetNs) -> VirtioNet {
    let tap = ns
        .enter(|| Tap::open("gwpark0", VnetHdr::Off))
        .unwrap()
        .unwrap();
    VirtioNet::new(tap, NetConfig::new(GUEST_MAC, 0)).unwrap()
}

// ------------------------------------------------------ UDP tunnel GSO --

/// Where the namespace forwards the guest's VXLAN frames: back out of the
/// TAP to the guest (a neighbour entry with the guest's MAC), so that what
/// the kernel made of a tunnel super-frame comes back to the driver.
const LOOP_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
const TUNNEL_PAYLOAD: usize = 4000;
const TUNNEL_MSS: u16 = 1400;

fn tunnel_addrs(host_mac: [u8; 6]) -> VxlanAddrs {
    VxlanAddrs {
        outer_src_mac: GUEST_MAC,
        outer_dst_mac: host_mac,
        outer_src: GUEST_IP,
        outer_dst: LOOP_IP,
        vni: 42,
        inner_src_mac: [0x52, 0x54, 0, 0, 0x42, 1],
        inner_dst_mac: [0x52, 0x54, 0, 0, 0x42, 2],
        inner_src: Ipv4Addr::new(192, 168, 42, 1),
        inner_dst: Ipv4Addr::new(192, 168, 42, 2),
        sport: 40000,
        dport: 5201,
    }
}

/// A rig whose namespace routes `LOOP_IP` back to the guest (forwarding on,
/// no redirects), the driver initialised with `want`.
fn tunnel_rig(tag: &str, want: Features) -> Rig {
    let mut r = rig(tag, VnetHdr::On, want);
    for (k, v) in [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv4.conf.all.send_redirects", "0"),
        ("net.ipv4.conf.gwtap0.send_redirects", "0"),
    ] {
        r.ns.sysctl(k, v).unwrap();
    }
    r.ns.ip(&[
        "neigh",
        "add",
        &LOOP_IP.to_string(),
        "lladdr",
        &format_mac(&GUEST_MAC),
        "dev",
        TAP,
    ])
    .unwrap();
    let got = r.driver.init(want, 256).unwrap();
    assert_eq!(got & want, want, "the device offers what the test needs");
    assert_eq!(r.driver.net_hdr_len(), hdr::TUNNEL_LEN);
    r.driver.fill_rx(128, 1526).unwrap();
    r
}

/// Sends one VXLAN-encapsulated TCP super-frame of `TUNNEL_PAYLOAD` bytes
/// with the tunnel GSO header (TCPV4 | UDP_TUNNEL_IPV4, gso_size 1400).
fn send_tunnel_superframe(r: &mut Rig, seq: u32) -> Vec<u8> {
    let payload: Vec<u8> = (0..TUNNEL_PAYLOAD).map(|i| (i % 253) as u8).collect();
    let frame = vxlan_tcp_frame(&tunnel_addrs(r.host_mac), seq, &payload);
    let base = net_hdr(
        VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
        VIRTIO_NET_HDR_GSO_TCPV4 as u8 | hdr::GSO_UDP_TUNNEL_IPV4,
        VXLAN_PAYLOAD as u16,
        TUNNEL_MSS,
        VXLAN_INNER_TCP as u16,
        16,
    );
    let h = tunnel_net_hdr(base, VXLAN_OUTER_UDP as u16, VXLAN_INNER_IP as u16);
    r.driver.send(&h, &frame, true).unwrap();
    payload
}

fn tunnel_frames(frames: &[RxFrame]) -> Vec<(RxFrame, VxlanTcpView)> {
    frames
        .iter()
        .filter_map(|f| parse_vxlan_tcp(&f.frame).map(|v| (f.clone(), v)))
        .filter(|(_, v)| v.outer_dst == LOOP_IP && v.vni == 42)
        .collect()
}

const TUNNEL_TX: Features = feature(VIRTIO_NET_F_MAC)
    | feature(VIRTIO_NET_F_CSUM)
    | feature(VIRTIO_NET_F_HOST_TSO4)
    | feature(features::VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO)
    | feature(VIRTIO_NET_F_MRG_RXBUF)
    | feature(VIRTIO_RING_F_EVENT_IDX);

/// The guest sends a VXLAN-encapsulated TCP super-frame with tunnel GSO:
/// godwit hands the 24-byte tunnel header to the TAP, the kernel takes it
/// as one UDP-tunnel GSO packet, and the namespace, forwarding it back out
/// of the TAP to a guest that took no receive offload, segments it: three
/// frames of 1400, 1400 and 1200 bytes, inner TCP sequence numbers in
/// order, every length and checksum (outer IP, inner IP, inner TCP) right.
#[test]
fn a_tunnel_gso_superframe_from_the_guest_is_segmented_by_the_host() {
    let mut r = tunnel_rig("tnl-tx", TUNNEL_TX);
    assert_eq!(
        r.net.lock().unwrap().tap().offload(),
        0,
        "no receive offloads"
    );
    let payload = send_tunnel_superframe(&mut r, 1000);
    let frames = r.driver.recv_frames(3, TIMEOUT).unwrap();
    let got = tunnel_frames(&frames);
    assert_eq!(got.len(), 3, "three segments: {frames:?}");
    let mut seq = 1000u32;
    let mut joined = Vec::new();
    for (i, (hdr, v)) in got.iter().enumerate() {
        assert_eq!(hdr.gso_type(), 0, "segment {i} is no GSO frame");
        assert_eq!(v.seq, seq, "segment {i}");
        assert!(v.checksums_ok && v.lengths_ok, "segment {i}: {v:?}");
        assert_eq!(v.inner_dst, Ipv4Addr::new(192, 168, 42, 2));
        let want = (TUNNEL_PAYLOAD - joined.len()).min(usize::from(TUNNEL_MSS));
        assert_eq!(v.payload.len(), want, "segment {i}");
        seq += v.payload.len() as u32;
        joined.extend_from_slice(&v.payload);
    }
    assert_eq!(joined, payload);
    let s = r.stats();
    assert_eq!(s.tx_faults.total(), 0, "{s:?}");
}

/// The guest takes tunnel GSO frames (guest_tunnel acked: TUNSETOFFLOAD
/// with TUN_F_UDP_TUNNEL_GSO, a 24-byte header): the same super-frame,
/// forwarded back by the namespace, reaches it whole, through mergeable
/// buffers, with the tunnel header the kernel wrote (gso_type TCPV4 |
/// UDP_TUNNEL_IPV4, gso_size, outer_th_offset, inner_nh_offset).
#[test]
fn the_guest_receives_a_tunnel_gso_frame_from_the_tap() {
    let want = TUNNEL_TX
        | feature(VIRTIO_NET_F_GUEST_CSUM)
        | feature(VIRTIO_NET_F_GUEST_TSO4)
        | feature(features::VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO);
    let mut r = tunnel_rig("tnl-rx", want);
    let offload = r.net.lock().unwrap().tap().offload();
    assert_eq!(
        offload,
        TUN_F_CSUM | TUN_F_TSO4 | crate::net::tap::TUN_F_UDP_TUNNEL_GSO
    );
    let payload = send_tunnel_superframe(&mut r, 7000);
    let frames = r.driver.recv_frames(1, TIMEOUT).unwrap();
    let got = tunnel_frames(&frames);
    assert_eq!(got.len(), 1, "one super-frame: {frames:?}");
    let (hdr, v) = &got[0];
    assert_eq!(
        hdr.gso_type() & !(VIRTIO_NET_HDR_GSO_ECN as u8),
        VIRTIO_NET_HDR_GSO_TCPV4 as u8 | hdr::GSO_UDP_TUNNEL_IPV4,
        "{hdr:?}"
    );
    assert_eq!(hdr.gso_size(), TUNNEL_MSS);
    assert_eq!(usize::from(hdr.outer_th_offset()), VXLAN_OUTER_UDP);
    assert_eq!(usize::from(hdr.inner_nh_offset()), VXLAN_INNER_IP);
    assert_eq!(hdr.num_buffers(), hdr.buffers);
    assert!(hdr.buffers >= 3, "spread over {} buffers", hdr.buffers);
    assert_eq!(v.seq, 7000);
    assert_eq!(v.payload, payload);
    assert!(v.lengths_ok, "{v:?}");
}

/// Hostile tunnel headers (offsets beyond the frame or out of order, a
/// tunnel the driver did not negotiate, both outer families, a tunnel
/// checksum without host_tunnel_csum) are dropped and counted, never sent
/// and never a panic; the datapath goes on.
#[test]
fn hostile_tunnel_headers_are_dropped_and_counted() {
    let mut r = tunnel_rig("tnl-bad", TUNNEL_TX);
    let frame = vxlan_tcp_frame(&tunnel_addrs(r.host_mac), 1, &[7u8; 3000]);
    let tcp_tunnel = VIRTIO_NET_HDR_GSO_TCPV4 as u8 | hdr::GSO_UDP_TUNNEL_IPV4;
    let base = |flags: u8, gso: u8| {
        net_hdr(
            flags,
            gso,
            VXLAN_PAYLOAD as u16,
            TUNNEL_MSS,
            VXLAN_INNER_TCP as u16,
            16,
        )
    };
    let csum = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    let outer = VXLAN_OUTER_UDP as u16;
    let inner = VXLAN_INNER_IP as u16;
    let bad = [
        tunnel_net_hdr(base(csum, tcp_tunnel), outer, 60_000),
        tunnel_net_hdr(base(csum, tcp_tunnel), 60_000, inner),
        tunnel_net_hdr(base(csum, tcp_tunnel), inner, outer),
        tunnel_net_hdr(base(csum, tcp_tunnel), 0, 0),
        tunnel_net_hdr(
            base(csum, tcp_tunnel | hdr::GSO_UDP_TUNNEL_IPV6),
            outer,
            inner,
        ),
        tunnel_net_hdr(
            base(csum | hdr::F_UDP_TUNNEL_CSUM, tcp_tunnel),
            outer,
            inner,
        ),
        tunnel_net_hdr(base(csum, hdr::GSO_UDP_TUNNEL_IPV4), outer, inner),
        tunnel_net_hdr(base(csum | hdr::F_UDP_TUNNEL_CSUM, 0), outer, inner),
    ];
    for h in &bad {
        r.driver.send(h, &frame, true).unwrap();
    }
    r.driver.wait_used(TX_QUEUE, bad.len(), TIMEOUT).unwrap();
    let s = r.stats();
    assert_eq!(s.tx_faults.bad_header, bad.len() as u64, "{s:?}");
    assert_eq!(s.tx_packets, 0, "{s:?}");
    // A good one still goes through.
    send_tunnel_superframe(&mut r, 1);
    let got = tunnel_frames(&r.driver.recv_frames(3, TIMEOUT).unwrap());
    assert_eq!(got.len(), 3);
}

/// The header checks on their own, for the fuzz-like corners.
#[test]
fn tunnel_header_checks() {
    use super::worker::check_tunnel_header;
    let frame = 4000 + VXLAN_PAYLOAD;
    let tcp_tunnel = VIRTIO_NET_HDR_GSO_TCPV4 as u8 | hdr::GSO_UDP_TUNNEL_IPV4;
    let h = |gso: u8, flags: u8, outer: u16, inner: u16| {
        tunnel_net_hdr(net_hdr(flags, gso, 0, 0, 0, 0), outer, inner)
    };
    let good = h(tcp_tunnel, 1, 34, 64);
    assert!(check_tunnel_header(&good, frame, true, false));
    assert!(
        !check_tunnel_header(&good, frame, false, false),
        "not negotiated"
    );
    assert!(
        check_tunnel_header(&h(0, 1, 0, 0), frame, true, false),
        "no tunnel"
    );
    assert!(!check_tunnel_header(
        &h(tcp_tunnel, 1, 34, 64),
        64,
        true,
        false
    ));
    assert!(!check_tunnel_header(
        &h(tcp_tunnel, 1, 34, 40),
        frame,
        true,
        false
    ));
    assert!(!check_tunnel_header(
        &h(tcp_tunnel, 1, 33, 64),
        frame,
        true,
        false
    ));
    assert!(!check_tunnel_header(
        &h(tcp_tunnel, 1, u16::MAX, u16::MAX),
        frame,
        true,
        false
    ));
    let with_csum = h(tcp_tunnel, 1 | hdr::F_UDP_TUNNEL_CSUM, 34, 64);
    assert!(!check_tunnel_header(&with_csum, frame, true, false));
    assert!(check_tunnel_header(&with_csum, frame, true, true));
    let udp = h(
        VIRTIO_NET_HDR_GSO_UDP_L4 as u8 | hdr::GSO_UDP_TUNNEL_IPV6,
        1,
        54,
        84,
    );
    assert!(check_tunnel_header(&udp, frame, true, false));
    let ufo = h(
        VIRTIO_NET_HDR_GSO_UDP as u8 | hdr::GSO_UDP_TUNNEL_IPV4,
        1,
        34,
        64,
    );
    assert!(
        !check_tunnel_header(&ufo, frame, true, false),
        "no UFO in tunnels"
    );
}
