//! `godwit-bench mq`: multi-queue scaling on a TAP, 1 against 2 queue pairs.
//!
//! As in `godwit-bench net`, the benchmark thread plays the guest driver on
//! guest memory ([`GuestDriver`]) through godwit's real `MmioTransport` and
//! `VirtioNet`, here on a multi-queue TAP in a namespace the benchmark
//! creates and deletes. With two pairs the driver acks MQ and turns both on
//! with VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, so that the device runs one
//! datapath thread per pair, each writing to its own TAP queue.
//!
//! The case is TX of 64-byte UDP frames (checksum offloaded), one flow per
//! pair (source ports 4000 and 4001), to a socket bound in the namespace and
//! not read: the kernel runs IP and UDP input for every frame. The harness
//! keeps every transmit ring full (reaps used entries, posts them again,
//! kicks when the device asks, EVENT_IDX), visiting the rings in turn.
//!
//! Reported per pair count: packets/s (frames the device completed), the
//! datapath threads' CPU time per packet (the sum over the `gw-net*`
//! threads, read through their per-thread CPU clocks) and the whole
//! process's CPU time per packet (harness included). After a 0.5 s warm-up
//! each count is measured in three windows (default 3 s,
//! `GODWIT_BENCH_NET_SECS`) and the median window is reported; the ratio
//! compares the medians of the same run.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use godwit_devices::net::{Tap, VnetHdr};
use godwit_devices::virtio::mmio::MmioTransport;
use godwit_devices::virtio::net::{ctrl_queue_index, NetConfig, VirtioNet, NET_HDR_LEN};
use godwit_devices::virtio::testing::{guest_memory, Buf, GuestDriver, NetNs, RawDesc};
use godwit_devices::virtio::{feature, VirtioDevice, VIRTIO_RING_F_EVENT_IDX};
use virtio_bindings::virtio_net::*;
use vm_memory::GuestAddress;

use super::net::{ip, mac_str, thread_cpu_ns, tx_frame, Kind, Ring};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const TAP: &str = "gwmq0";
const QUEUE_SIZE: u16 = 256;
const SLOT: u64 = 2048;
const MEM_SIZE: usize = 64 << 20;
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const UDP_PORT: u16 = 9000;
const WARMUP: Duration = Duration::from_millis(500);
const WINDOWS: usize = 3;
const POLL: Duration = Duration::from_micros(5);
const STALL: Duration = Duration::from_secs(2);

/// One measured window.
#[derive(Clone, Copy, Debug)]
struct Window {
    pps: f64,
    datapath_ns_per_pkt: f64,
    process_ns_per_pkt: f64,
}

fn features() -> godwit_devices::virtio::Features {
    feature(VIRTIO_NET_F_CSUM)
        | feature(VIRTIO_NET_F_MAC)
        | feature(VIRTIO_NET_F_CTRL_VQ)
        | feature(VIRTIO_NET_F_MQ)
        | feature(VIRTIO_RING_F_EVENT_IDX)
}

/// The `gw-net*` datapath threads of this process.
fn datapath_tids(want: usize) -> Res<Vec<i32>> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let mut found = Vec::new();
        for e in std::fs::read_dir("/proc/self/task")? {
            let e = e?;
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            if comm.starts_with("gw-net") {
                found.push(e.file_name().to_string_lossy().parse::<i32>()?);
            }
        }
        if found.len() == want {
            return Ok(found);
        }
        if Instant::now() > deadline {
            return Err(format!("expected {want} datapath thread(s), found {found:?}").into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn process_cpu_ns() -> Res<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to the pointer, a live local.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// Sends VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET and checks the device's ack.
fn set_pairs(d: &mut GuestDriver, pairs: u16) -> Res<()> {
    let q = ctrl_queue_index(pairs, true);
    let mut cmd = vec![
        VIRTIO_NET_CTRL_MQ as u8,
        VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
    ];
    cmd.extend_from_slice(&pairs.to_le_bytes());
    let out = d.alloc(cmd.len() as u64, 8)?;
    d.write_mem(out, &cmd)?;
    let ack = d.alloc(1, 1)?;
    d.write_mem(ack, &[0xff])?;
    d.add_chain(q, &[Buf::read(out, cmd.len() as u32), Buf::write(ack, 1)])?;
    d.kick(q)?;
    d.wait_used(q, 1, Duration::from_secs(2))?;
    match d.read_mem(ack, 1)?[0] {
        a if a == VIRTIO_NET_OK as u8 => Ok(()),
        a => Err(format!("VQ_PAIRS_SET {pairs} answered {a}").into()),
    }
}

/// Keeps every transmit ring full until `until`; returns frames completed.
fn tx_rings(d: &GuestDriver, rings: &mut [(Ring, Vec<u16>)], until: Instant) -> Res<u64> {
    let mut done = 0u64;
    let mut progress = Instant::now();
    loop {
        for (r, free) in rings.iter_mut() {
            let idx = r.used_idx();
            let reaped = idx.wrapping_sub(r.last_used);
            while r.last_used != idx {
                let (id, _) = r.used_elem(r.last_used)?;
                free.push(id);
                r.last_used = r.last_used.wrapping_add(1);
            }
            if reaped > 0 {
                done += u64::from(reaped);
                progress = Instant::now();
            }
            let old = r.avail_idx;
            while let Some(h) = free.pop() {
                r.post(h);
            }
            r.kick_if_needed(d, old)?;
        }
        let now = Instant::now();
        if now >= until {
            return Ok(done);
        }
        if now.duration_since(progress) > STALL {
            return Err(format!("transmit: nothing moved for {STALL:?}").into());
        }
        while now.elapsed() < POLL {
            std::hint::spin_loop();
        }
    }
}

/// Sets up a device of `pairs` queue pairs and measures its windows.
fn run(pairs: u16, window: Duration) -> Res<Vec<Window>> {
    let ns = NetNs::new("benchmq")?;
    ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
    ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
    let taps = ns.enter(|| Tap::open_queues(TAP, VnetHdr::On, pairs))??;
    ip(&ns, &["addr", "add", "10.0.0.1/24", "dev", TAP])?;
    ip(&ns, &["link", "set", TAP, "up"])?;
    let guest = GUEST.to_string();
    ip(
        &ns,
        &[
            "neigh",
            "add",
            &guest,
            "lladdr",
            &mac_str(&GUEST_MAC),
            "dev",
            TAP,
        ],
    )?;
    let host_mac = taps[0].host_mac()?;
    let _sink =
        ns.enter(|| UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, UDP_PORT)))??;
    let net = VirtioNet::with_queues(taps, NetConfig::new(GUEST_MAC, features()))?;
    let net = Arc::new(Mutex::new(net));
    let mem = guest_memory(MEM_SIZE);
    let dev: Arc<Mutex<dyn VirtioDevice>> = net.clone();
    let transport = Arc::new(Mutex::new(MmioTransport::new(mem.clone(), dev)?));
    let mut d = GuestDriver::new(mem.clone(), transport)?;
    let got = d.init(features(), QUEUE_SIZE)?;
    if got & features() != features() {
        return Err(format!("negotiated {got:#x}, wanted {:#x}", features()).into());
    }
    if pairs > 1 {
        set_pairs(&mut d, pairs)?;
    }
    let (hdr, frame) = tx_frame(Kind::Small, GUEST_MAC, host_mac, GUEST, HOST);
    let mut rings = Vec::new();
    for pair in 0..usize::from(pairs) {
        // One flow per pair: its own UDP source port.
        let mut frame = frame.clone();
        frame[34..36].copy_from_slice(&(4000 + pair as u16).to_be_bytes());
        let pool = d.alloc(SLOT * u64::from(QUEUE_SIZE), 4096)?;
        let q = 2 * pair + 1;
        for i in 0..QUEUE_SIZE {
            let at = GuestAddress(pool.0 + SLOT * u64::from(i));
            d.write_mem(at, &hdr)?;
            d.write_mem(GuestAddress(at.0 + NET_HDR_LEN as u64), &frame)?;
            let desc = RawDesc {
                addr: at.0,
                len: (NET_HDR_LEN + frame.len()) as u32,
                flags: 0,
                next: 0,
            };
            d.write_desc(q, i, desc)?;
        }
        rings.push((Ring::new(&d, &mem, q)?, (0..QUEUE_SIZE).rev().collect()));
    }
    let tids = datapath_tids(usize::from(pairs))?;
    tx_rings(&d, &mut rings, Instant::now() + WARMUP)?;
    let mut out = Vec::new();
    for _ in 0..WINDOWS {
        let cpu = |tids: &[i32]| -> Res<u64> { tids.iter().map(|t| thread_cpu_ns(*t)).sum() };
        let (dp0, pr0, t0) = (cpu(&tids)?, process_cpu_ns()?, Instant::now());
        let n = tx_rings(&d, &mut rings, t0 + window)?;
        let (dp1, pr1, secs) = (cpu(&tids)?, process_cpu_ns()?, t0.elapsed().as_secs_f64());
        let n = n.max(1) as f64;
        out.push(Window {
            pps: n / secs,
            datapath_ns_per_pkt: (dp1 - dp0) as f64 / n,
            process_ns_per_pkt: (pr1 - pr0) as f64 / n,
        });
    }
    let stats = net.lock().map_err(|_| "device lock")?.stats();
    if stats.tx_faults.total() > 0 {
        return Err(format!("the device dropped frames: {:?}", stats.tx_faults).into());
    }
    Ok(out)
}

fn median(mut w: Vec<Window>) -> Window {
    w.sort_by(|a, b| a.pps.total_cmp(&b.pps));
    w[w.len() / 2]
}

pub fn bench_mq() {
    let secs = std::env::var("GODWIT_BENCH_NET_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(3.0);
    let window = Duration::from_secs_f64(secs);
    println!("## Multi-queue scaling on a TAP (TX, 64-byte UDP, one flow per pair)");
    println!();
    println!("| queue pairs | packets/s | datapath CPU per packet | process CPU per packet |");
    println!("|---|---|---|---|");
    let mut medians = Vec::new();
    for pairs in [1u16, 2] {
        match run(pairs, window) {
            Ok(w) => {
                let m = median(w);
                println!(
                    "| {pairs} | {:.0} | {:.2} µs | {:.2} µs |",
                    m.pps,
                    m.datapath_ns_per_pkt / 1e3,
                    m.process_ns_per_pkt / 1e3
                );
                medians.push(m);
            }
            Err(e) => println!("| {pairs} | failed: {e} | | |"),
        }
    }
    if let [one, two] = medians[..] {
        println!();
        println!(
            "2 pairs / 1 pair: {:.2}x packets/s, {:.2}x datapath CPU per packet, {:.2}x process CPU per packet",
            two.pps / one.pps,
            two.datapath_ns_per_pkt / one.datapath_ns_per_pkt,
            two.process_ns_per_pkt / one.process_ns_per_pkt
        );
    }
}
