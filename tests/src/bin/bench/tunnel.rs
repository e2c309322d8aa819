//! `godwit-bench tunnel`: UDP tunnel GSO transmit against the same traffic
//! without it, without a guest (like `net`: the benchmark thread plays the
//! guest driver on guest memory through godwit's real `MmioTransport` and
//! `VirtioNet`, whose datapath thread writes to a TAP in a namespace the
//! benchmark creates and deletes).
//!
//! The traffic is VXLAN (VNI 42, port 4789) carrying TCP to 192.168.42.1,
//! decapsulated by a vxlan device in the namespace; the inner segments have
//! RST set and go to a port without a socket, so the kernel runs TCP input
//! and drops them without replying.
//!
//! * `tunnel GSO`: the driver acks host_tunnel and sends each 61600-byte
//!   payload as one super-frame with the 24-byte tunnel header (gso_type
//!   TCPV4 | UDP_TUNNEL_IPV4, gso_size 1400): one descriptor chain, one
//!   TAP write per 44 segments.
//! * `segmented`: the driver acks no tunnel feature and sends the same
//!   payload as the guest would have to without it: 44 VXLAN frames of
//!   1400 payload bytes with complete checksums, 12-byte headers.
//!
//! Both run in the same process, one after the other, alternating three
//! windows each; the median window is reported, and the ratio is taken from
//! the same run. Inner payload bytes per second is the figure. Each window
//! checks that the namespace's TCP input (`Tcp: InSegs`) took every packet
//! the guest sent and that the device dropped none. The host delivers a
//! super-frame locally as one packet (decapsulated, TCP input, dropped at
//! the closed port) without segmenting it, so the gain is the guest's 44
//! chains and the TAP's 44 writes and stack passes per round, not a cheaper
//! segmentation; a host that forwards the traffic segments it on the way
//! out (the datapath tests check that).
//!
//! Environment: `GODWIT_BENCH_TUNNEL_SECS` (window, default 3).

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use godwit_devices::net::{Tap, VnetHdr};
use godwit_devices::virtio::mmio::MmioTransport;
use godwit_devices::virtio::net::features::{hdr, VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO};
use godwit_devices::virtio::net::{NetConfig, VirtioNet, TX_QUEUE};
use godwit_devices::virtio::testing::{
    csum_add, csum_fold, guest_memory, net_hdr, tunnel_net_hdr, vxlan_tcp_frame, Buf, GuestDriver,
    NetNs, VxlanAddrs, VXLAN_INNER_IP, VXLAN_INNER_TCP, VXLAN_OUTER_UDP, VXLAN_PAYLOAD,
};
use godwit_devices::virtio::{feature, Features, VirtioDevice, VIRTIO_RING_F_EVENT_IDX};

type Res<T> = Result<T, Box<dyn std::error::Error>>;
/// What a case sends per round: (virtio-net header, frame) per chain.
type Chains = Vec<(Vec<u8>, Vec<u8>)>;

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x42, 0x00, 0x01];
const MSS: usize = 1400;
const SEGMENTS: usize = 44;
const PAYLOAD: usize = MSS * SEGMENTS;
/// Chains in flight.
const INFLIGHT: usize = 128;

fn base_features() -> Features {
    [
        virtio_bindings::virtio_net::VIRTIO_NET_F_MAC,
        virtio_bindings::virtio_net::VIRTIO_NET_F_CSUM,
        virtio_bindings::virtio_net::VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_RING_F_EVENT_IDX,
    ]
    .iter()
    .fold(0, |acc, b| acc | feature(*b))
}

fn addrs(host_mac: [u8; 6]) -> VxlanAddrs {
    VxlanAddrs {
        outer_src_mac: GUEST_MAC,
        outer_dst_mac: host_mac,
        outer_src: Ipv4Addr::new(10, 9, 0, 2),
        outer_dst: Ipv4Addr::new(10, 9, 0, 1),
        vni: 42,
        inner_src_mac: [0x52, 0x54, 0, 0, 0x42, 9],
        inner_dst_mac: [0x52, 0x54, 0, 0, 0x42, 8],
        inner_src: Ipv4Addr::new(192, 168, 42, 2),
        inner_dst: Ipv4Addr::new(192, 168, 42, 1),
        sport: 40000,
        dport: 9,
    }
}

/// RST|ACK (no reply from a closed port).
fn rst(frame: &mut [u8]) {
    frame[VXLAN_INNER_TCP + 13] = 0x14;
}

/// The inner TCP checksum completed (the frame holds the pseudo sum).
fn complete_tcp_csum(frame: &mut [u8]) {
    let t = VXLAN_INNER_TCP;
    let sum = !csum_fold(csum_add(0, &frame[t..]));
    frame[t + 16..t + 18].copy_from_slice(&sum.to_be_bytes());
}

fn tunnel_chains(host_mac: [u8; 6]) -> Chains {
    let payload = vec![0x5a; PAYLOAD];
    let mut frame = vxlan_tcp_frame(&addrs(host_mac), 1, &payload);
    rst(&mut frame);
    let base = net_hdr(
        virtio_bindings::virtio_net::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
        virtio_bindings::virtio_net::VIRTIO_NET_HDR_GSO_TCPV4 as u8 | hdr::GSO_UDP_TUNNEL_IPV4,
        VXLAN_PAYLOAD as u16,
        MSS as u16,
        VXLAN_INNER_TCP as u16,
        16,
    );
    let h = tunnel_net_hdr(base, VXLAN_OUTER_UDP as u16, VXLAN_INNER_IP as u16);
    vec![(h.to_vec(), frame)]
}

fn segmented_chains(host_mac: [u8; 6]) -> Chains {
    (0..SEGMENTS)
        .map(|i| {
            let mut frame = vxlan_tcp_frame(&addrs(host_mac), 1 + (i * MSS) as u32, &[0x5a; MSS]);
            rst(&mut frame);
            complete_tcp_csum(&mut frame);
            (vec![0u8; hdr::V1_LEN], frame)
        })
        .collect()
}

struct Rig {
    ns: NetNs,
    driver: GuestDriver,
    net: Arc<Mutex<VirtioNet>>,
    host_mac: [u8; 6],
}

fn ip(ns: &NetNs, args: &[&str]) -> Res<()> {
    ns.ip(args)?;
    Ok(())
}

fn rig() -> Res<Rig> {
    let ns = NetNs::new("bench-tnl")?;
    ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
    ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
    let tap = ns.enter(|| Tap::open("gwtap0", VnetHdr::On))??;
    ip(&ns, &["addr", "add", "10.9.0.1/24", "dev", "gwtap0"])?;
    ip(&ns, &["link", "set", "gwtap0", "up"])?;
    ip(
        &ns,
        &[
            "link",
            "add",
            "vx0",
            "type",
            "vxlan",
            "id",
            "42",
            "local",
            "10.9.0.1",
            "dstport",
            "4789",
            "dev",
            "gwtap0",
            "nolearning",
        ],
    )?;
    ip(&ns, &["link", "set", "vx0", "address", "52:54:00:00:42:08"])?;
    ip(&ns, &["addr", "add", "192.168.42.1/24", "dev", "vx0"])?;
    ip(&ns, &["link", "set", "vx0", "up"])?;
    let host_mac = tap.host_mac()?;
    let want = base_features() | feature(VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO);
    let net = Arc::new(Mutex::new(VirtioNet::new(
        tap,
        NetConfig::new(GUEST_MAC, want),
    )?));
    let mem = guest_memory(512 << 20);
    let dev: Arc<Mutex<dyn VirtioDevice>> = net.clone();
    let transport = Arc::new(Mutex::new(MmioTransport::new(mem.clone(), dev)?));
    let driver = GuestDriver::new(mem, transport)?;
    Ok(Rig {
        ns,
        driver,
        net,
        host_mac,
    })
}

/// Sends `chains` round after round for `window`, up to [`INFLIGHT`]
/// chains outstanding; returns the rounds completed.
fn window(d: &mut GuestDriver, chains: &[(Vec<u8>, Vec<u8>)], window: Duration) -> Res<u64> {
    // Each chain's two buffers written once, reused.
    let mut bufs: Vec<[Buf; 2]> = Vec::new();
    for (h, f) in chains {
        let ha = d.alloc(h.len() as u64, 8)?;
        d.write_mem(ha, h)?;
        let fa = d.alloc(f.len() as u64, 8)?;
        d.write_mem(fa, f)?;
        bufs.push([Buf::read(ha, h.len() as u32), Buf::read(fa, f.len() as u32)]);
    }
    let until = Instant::now() + window;
    let (mut sent, mut done, mut next) = (0u64, 0u64, 0usize);
    let per_round = chains.len() as u64;
    while Instant::now() < until {
        while sent - done < INFLIGHT as u64 {
            d.add_chain(TX_QUEUE, &bufs[next])?;
            next = (next + 1) % bufs.len();
            sent += 1;
        }
        d.kick(TX_QUEUE)?;
        let used = d.reap(TX_QUEUE)?;
        if used.is_empty() {
            d.wait_irq(Duration::from_millis(5))?;
        }
        done += used.len() as u64;
    }
    // Drain what is in flight.
    let deadline = Instant::now() + Duration::from_secs(5);
    while done < sent && Instant::now() < deadline {
        done += d.reap(TX_QUEUE)?.len() as u64;
        if done < sent {
            d.wait_irq(Duration::from_millis(5))?;
        }
    }
    Ok(done / per_round)
}

/// `Tcp: InSegs` in the namespace: what its TCP input took (a GSO packet
/// counts its segments).
fn in_segs(ns: &NetNs) -> Res<u64> {
    let text = ns.enter(|| std::fs::read_to_string("/proc/thread-self/net/snmp"))??;
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (
        tcp.next().ok_or("no Tcp line")?,
        tcp.next().ok_or("no Tcp values")?,
    );
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "InSegs")
        .and_then(|(_, v)| v.parse().ok())
        .ok_or_else(|| "no Tcp InSegs".into())
}

fn secs() -> Duration {
    std::env::var("GODWIT_BENCH_TUNNEL_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .map_or(Duration::from_secs(3), Duration::from_secs_f64)
}

fn run() -> Res<()> {
    let mut r = rig()?;
    let w = secs();
    let cases: [(&str, Features, Chains); 2] = [
        (
            "tunnel GSO (1 x 61600 B super-frame)",
            base_features() | feature(VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO),
            tunnel_chains(r.host_mac),
        ),
        (
            "segmented (44 x 1400 B frames)",
            base_features(),
            segmented_chains(r.host_mac),
        ),
    ];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for _ in 0..3 {
        for (i, (_, want, chains)) in cases.iter().enumerate() {
            r.driver.init(*want, 256)?;
            let segs_before = in_segs(&r.ns)?;
            let faults_before = r
                .net
                .lock()
                .map_err(|_| "device lock")?
                .stats()
                .tx_faults
                .total();
            let started = Instant::now();
            let rounds = window(&mut r.driver, chains, w)?;
            let elapsed = started.elapsed().as_secs_f64();
            // Every packet the guest sent reached the namespace's TCP input
            // (a tunnel super-frame arrives there as one packet: local
            // delivery does not segment it); nothing was dropped.
            let packets = rounds * chains.len() as u64;
            let segs = in_segs(&r.ns)? - segs_before;
            let faults = r
                .net
                .lock()
                .map_err(|_| "device lock")?
                .stats()
                .tx_faults
                .total()
                - faults_before;
            if faults != 0 || segs < packets {
                return Err(format!(
                    "case {i}: {packets} packets sent, but the namespace's TCP took {segs} \
                     and the device dropped {faults}"
                )
                .into());
            }
            rates[i].push(rounds as f64 * PAYLOAD as f64 / elapsed);
        }
    }
    let medians: Vec<f64> = rates.iter_mut().map(|v| crate::median(v)).collect();
    println!("## UDP tunnel GSO: transmit, guest to TAP\n");
    println!(
        "VXLAN-encapsulated TCP, 61600 payload bytes per round, {:.1} s windows, median of 3 (alternating), namespace {}.\n",
        w.as_secs_f64(),
        r.ns.name()
    );
    println!("| case | inner payload | vs segmented |");
    println!("|---|---:|---:|");
    for (i, (name, _, _)) in cases.iter().enumerate() {
        println!(
            "| {name} | {:.0} MB/s | {:.2}x |",
            medians[i] / 1e6,
            medians[i] / medians[1]
        );
    }
    println!();
    Ok(())
}

pub fn bench_tunnel() {
    if let Err(e) = run() {
        eprintln!("tunnel benchmark failed: {e}");
        std::process::exit(1);
    }
}
