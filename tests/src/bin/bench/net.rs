//! `godwit-bench net`: the virtio-net datapath, without a guest.
//!
//! Guest instructions are emulated on the development machine, so a guest
//! would measure the emulator. Instead the benchmark thread plays the guest
//! driver on guest memory ([`GuestDriver`]) through godwit's real
//! `MmioTransport` and `VirtioNet`: feature negotiation and ring set-up
//! through the transport registers, then, like Linux's virtio-net driver,
//! buffers posted on the available ring, kicks through the queue eventfd only
//! when the device asks for them (EVENT_IDX), used entries reaped in batches,
//! and an interrupt (the interrupt eventfd) requested only when nothing moves.
//! The device's own datapath thread moves the frames between guest memory and
//! a TAP in a network namespace the benchmark creates and deletes; the peer
//! is that namespace's kernel stack.
//!
//! With two or more CPUs the datapath thread (godwit's worker, or the raw
//! baseline's loop) is pinned on one CPU and the harness on another. The RX
//! sender runs alone on a CPU of its own: a third one if there is one; with
//! two, the harness's, and the harness then moves to the datapath's CPU for
//! the RX cases (it needs ~10% of a CPU there and its time is not counted),
//! so that the sender outpaces the datapath and the RX rows measure the
//! datapath, not the sender.
//!
//! * TX 64 B / 1514 B: UDP frames (checksum offloaded, as Linux sends them)
//!   to the TAP's MAC and address, port 9000, where a socket is bound and not
//!   read: the kernel runs IP and UDP input for every frame and then queues
//!   or drops it (`Udp: InDatagrams + InErrors` counts them, checked).
//! * TX 64 KiB TSO4: a virtio-net header with gso_type TCPV4 (gso_size 1448,
//!   NEEDS_CSUM) and a 65214-byte TCP frame, laid out like Linux does (the
//!   header and protocol headers in one buffer, the payload in 16 page
//!   buffers, behind an indirect descriptor). The segments have RST set and
//!   go to a port without a socket: the kernel runs IP and TCP input
//!   (`Tcp: InSegs`, checked) and drops them without replying.
//! * RX: a thread sends from a UDP socket in the namespace as fast as it can
//!   (`sendmmsg`): 64-byte and 1514-byte frames, and for 64 KiB UDP_SEGMENT
//!   (USO) sends of 44 x 1472 bytes, which reach the guest as one 64810-byte
//!   frame because the driver acked GUEST_USO4/6 (and GUEST_TSO4). The driver
//!   posts 4 KiB MRG_RXBUF buffers, as Linux does.
//!
//! The baseline is the kernel's own TAP cost in the same run: one thread
//! doing raw `write()` of the same frames (header included) to a second TAP
//! in the same namespace, or raw `read()` from it with the same sender on the
//! other side.
//!
//! CPU time per packet is the device's datapath thread's CPU time (user +
//! system, read through its per-thread CPU clock; the user/system split from
//! `/proc/self/task/<tid>/stat`) over the measured window divided by the
//! frames moved. The harness thread is not counted; its own load is shown.
//! After a 0.5 s warm-up each case is measured in three windows and the
//! median one is reported; a window in which the pinned CPUs did more than
//! 10% of a CPU of other work (other processes) is marked "disturbed".
//!
//! Environment (for profiling): `GODWIT_BENCH_NET_SECS` (window, default 3),
//! `GODWIT_BENCH_NET_CASES` (comma-separated: tx64,tx1514,txtso,rx64,rx1514,
//! rxuso).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use godwit_devices::net::{Tap, VnetHdr};
use godwit_devices::virtio::mmio::MmioTransport;
use godwit_devices::virtio::net::{
    NetConfig, NetStats, VirtioNet, NET_HDR_LEN, RX_QUEUE, TX_QUEUE,
};
use godwit_devices::virtio::testing::{
    csum_add, csum_fold, guest_memory, net_hdr, udp_frame, GuestDriver, NetNs, RawDesc, UdpCsum,
};
use godwit_devices::virtio::{
    feature, VirtioDevice, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use godwit_devices::GuestMemory;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
};
use vm_memory::{Bytes, GuestAddress};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const QUEUE_SIZE: u16 = 256;
const MEM_SIZE: usize = 64 << 20;
const DEV_TAP: &str = "gwdev0";
const RAW_TAP: &str = "gwraw0";
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const RAW_PEER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x57];
const DEV_HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const RAW_HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
const RAW_PEER: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
/// A socket is bound here in the namespace and never read.
const UDP_PORT: u16 = 9000;
/// No socket here.
const TCP_PORT: u16 = 9001;
const SPORT: u16 = 4000;

const ETH_IP_UDP: usize = 14 + 20 + 8;
const ETH_IP_TCP: usize = 14 + 20 + 20;
const TSO_MSS: usize = 1448;
const TSO_SEGS: usize = 45;
const USO_SEG: usize = 1472;
const USO_SEGS: usize = 44;
/// Mergeable receive buffers, one descriptor each.
const RX_BUF: u64 = 4096;
/// Guest buffer per small TX slot (header + up to 1514 bytes).
const SMALL_SLOT: u64 = 2048;
/// Payload pages per TSO frame (65160 bytes).
const TSO_PAGES: u64 = 16;
/// A TSO slot: one page for the headers, then the payload pages.
const TSO_SLOT: u64 = 4096 * (1 + TSO_PAGES);
const TSO_TABLE: u64 = 16 * (1 + TSO_PAGES);

const WARMUP: Duration = Duration::from_millis(500);
/// The measured time is split into this many windows; the median one is
/// reported (the machine is shared: a burst of foreign load hits one window).
const WINDOWS: usize = 3;
/// Foreign CPU use (in CPUs) above which a measurement is marked disturbed.
const FOREIGN_LIMIT: f64 = 0.1;
/// Runs of a disturbed case before the least disturbed one is taken.
const ATTEMPTS: u32 = 3;
/// A case fails when nothing moves for this long.
const STALL: Duration = Duration::from_secs(2);
const IRQ_WAIT: Duration = Duration::from_millis(10);
/// How often the transmit harness looks at the used ring while busy.
const TX_POLL: Duration = Duration::from_micros(5);
/// How long it keeps looking without completions before it sleeps.
const TX_SPIN: Duration = Duration::from_micros(50);
/// The receive harness naps this long between looks while frames arrive...
const RX_NAP: Duration = Duration::from_micros(100);
/// ...and waits for an interrupt after this long without any.
const RX_NAP_FOR: Duration = Duration::from_millis(1);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dir {
    Tx,
    Rx,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kind {
    Small,
    Mtu,
    Gso,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    dir: Dir,
    kind: Kind,
}

const CASES: [Case; 6] = [
    Case {
        dir: Dir::Tx,
        kind: Kind::Small,
    },
    Case {
        dir: Dir::Tx,
        kind: Kind::Mtu,
    },
    Case {
        dir: Dir::Tx,
        kind: Kind::Gso,
    },
    Case {
        dir: Dir::Rx,
        kind: Kind::Small,
    },
    Case {
        dir: Dir::Rx,
        kind: Kind::Mtu,
    },
    Case {
        dir: Dir::Rx,
        kind: Kind::Gso,
    },
];

impl Case {
    fn key(&self) -> &'static str {
        match (self.dir, self.kind) {
            (Dir::Tx, Kind::Small) => "tx64",
            (Dir::Tx, Kind::Mtu) => "tx1514",
            (Dir::Tx, Kind::Gso) => "txtso",
            (Dir::Rx, Kind::Small) => "rx64",
            (Dir::Rx, Kind::Mtu) => "rx1514",
            (Dir::Rx, Kind::Gso) => "rxuso",
        }
    }

    fn name(&self) -> &'static str {
        match (self.dir, self.kind) {
            (Dir::Tx, Kind::Small) => "TX 64 B",
            (Dir::Tx, Kind::Mtu) => "TX 1514 B",
            (Dir::Tx, Kind::Gso) => "TX 64 KiB TSO4 (65214 B)",
            (Dir::Rx, Kind::Small) => "RX 64 B",
            (Dir::Rx, Kind::Mtu) => "RX 1514 B",
            (Dir::Rx, Kind::Gso) => "RX 64 KiB USO (64810 B)",
        }
    }

    /// The target from the issue, in the case's primary unit.
    fn target(&self) -> Option<(f64, &'static str)> {
        match (self.dir, self.kind) {
            (Dir::Tx, Kind::Small) => Some((1e6, "1 Mpps")),
            (Dir::Tx, Kind::Gso) => Some((10e9, "10 Gbit/s")),
            _ => None,
        }
    }

    /// Payload of one UDP datagram (RX sender) or one TX frame.
    fn payload(&self) -> usize {
        match self.kind {
            Kind::Small => 64 - ETH_IP_UDP,
            Kind::Mtu => 1514 - ETH_IP_UDP,
            Kind::Gso => match self.dir {
                Dir::Tx => TSO_MSS * TSO_SEGS,
                Dir::Rx => USO_SEG * USO_SEGS,
            },
        }
    }
}

fn wanted_features() -> godwit_devices::virtio::Features {
    [
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_USO4,
        VIRTIO_NET_F_GUEST_USO6,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
    ]
    .iter()
    .fold(0, |acc, b| acc | feature(*b))
}

// ------------------------------------------------------------ threads --

fn gettid() -> i32 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

fn clock_ns(clock: libc::clockid_t) -> Res<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to a live local.
    if unsafe { libc::clock_gettime(clock, &mut ts) } < 0 {
        return Err(format!(
            "clock_gettime({clock}): {}",
            std::io::Error::last_os_error()
        )
        .into());
    }
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// CPU time (user + system, ns) of thread `tid` of this process, through its
/// per-thread CPU clock (MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED)).
pub(crate) fn thread_cpu_ns(tid: i32) -> Res<u64> {
    clock_ns(((!tid) << 3) | 6)
}

fn own_cpu_ns() -> Res<u64> {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// utime and stime (clock ticks) of thread `tid` of this process.
fn thread_ticks(tid: i32) -> Res<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))?;
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or("malformed stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat; `rest` starts at field 3.
    let get = |i: usize| -> Res<u64> { Ok(f.get(i).ok_or("short stat")?.parse()?) };
    Ok((get(11)?, get(12)?))
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Res<Vec<usize>> {
    // SAFETY: cpu_set_t is plain old data; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: a live cpu_set_t and its size.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } < 0 {
        return Err(format!("sched_getaffinity: {}", std::io::Error::last_os_error()).into());
    }
    // SAFETY: CPU_ISSET reads the set for indexes below CPU_SETSIZE.
    Ok((0..libc::CPU_SETSIZE as usize)
        .filter(|c| unsafe { libc::CPU_ISSET(*c, &set) })
        .collect())
}

/// Restricts thread `tid` of this process (0: the caller) to `cpus`.
fn pin(tid: i32, cpus: &[usize]) -> Res<()> {
    // SAFETY: cpu_set_t is plain old data; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for c in cpus {
        // SAFETY: CPU_SET writes inside the set for indexes below CPU_SETSIZE.
        unsafe { libc::CPU_SET(*c, &mut set) };
    }
    // SAFETY: a live cpu_set_t and its size.
    if unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) } < 0 {
        return Err(format!(
            "sched_setaffinity({tid}): {}",
            std::io::Error::last_os_error()
        )
        .into());
    }
    Ok(())
}

/// Where the threads run: the datapath thread (godwit's worker, or the raw
/// loop) alone on one CPU; the harness and the namespace's sender on another.
#[derive(Clone, Debug)]
struct Cpus {
    all: Vec<usize>,
    datapath: usize,
    other: usize,
    /// The RX sender's CPU, where nothing else of the benchmark runs: a
    /// third CPU if there is one; with two, `other`, and the harness (the
    /// driver, ~10% of a CPU on receive) moves to the datapath's CPU for
    /// the RX cases (its time is not counted: the datapath thread's own CPU
    /// clock is what is measured).
    sender: usize,
}

impl Cpus {
    fn choose() -> Res<Option<Cpus>> {
        let all = allowed_cpus()?;
        Ok(match all[..] {
            [a, b, c, ..] => Some(Cpus {
                datapath: b,
                other: a,
                sender: c,
                all: all.clone(),
            }),
            [a, b] => Some(Cpus {
                datapath: b,
                other: a,
                sender: a,
                all: all.clone(),
            }),
            _ => None,
        })
    }

    /// The harness's CPU while the RX sender runs.
    fn rx_harness(&self) -> usize {
        if self.sender == self.other {
            self.datapath
        } else {
            self.other
        }
    }
}

/// Busy and total jiffies per CPU from /proc/stat (busy excludes idle and iowait).
fn cpu_jiffies() -> Res<HashMap<usize, (u64, u64)>> {
    let text = std::fs::read_to_string("/proc/stat")?;
    let mut out = HashMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("cpu") else {
            continue;
        };
        let mut it = rest.split_whitespace();
        let Some(Ok(cpu)) = it.next().map(str::parse::<usize>) else {
            continue;
        };
        let v: Vec<u64> = it.filter_map(|x| x.parse().ok()).collect();
        let total: u64 = v.iter().take(8).sum();
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        out.insert(cpu, (total - idle, total));
    }
    Ok(out)
}

/// The device's datapath thread (named gw-net-<tap>; the new thread names
/// itself, so wait for it).
fn worker_tid() -> Res<i32> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let mut found = Vec::new();
        for e in std::fs::read_dir("/proc/self/task")? {
            let e = e?;
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            if comm.trim_end().starts_with("gw-net-") {
                found.push(e.file_name().to_string_lossy().parse::<i32>()?);
            }
        }
        match found[..] {
            [tid] => return Ok(tid),
            [] if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
            _ => {
                return Err(
                    format!("expected one virtio-net datapath thread, found {found:?}").into(),
                )
            }
        }
    }
}

// ------------------------------------------------------------- frames --

fn pseudo(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    csum_add(csum_add(0, &src.octets()), &dst.octets()) + u32::from(proto) + len as u32
}

/// Ethernet + IPv4 + TCP (RST|ACK, no options) with `payload` zero bytes and
/// the pseudo-header sum in the checksum field (checksum offload).
fn tcp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    payload: usize,
) -> Vec<u8> {
    let tcp_len = 20 + payload;
    let ip_len = 20 + tcp_len;
    let mut f = Vec::with_capacity(14 + ip_len);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = !csum_fold(csum_add(0, &ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&SPORT.to_be_bytes());
    tcp[2..4].copy_from_slice(&TCP_PORT.to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[8..12].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x14; // RST | ACK: no socket, and nothing is sent back
    tcp[14..16].copy_from_slice(&512u16.to_be_bytes());
    let c = csum_fold(pseudo(src, dst, 6, tcp_len));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&tcp);
    f.resize(14 + ip_len, 0);
    f
}

/// The virtio-net header and frame the driver (or the raw baseline) sends.
pub(crate) fn tx_frame(
    kind: Kind,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
) -> ([u8; NET_HDR_LEN], Vec<u8>) {
    let csum = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    let case = Case { dir: Dir::Tx, kind };
    match kind {
        Kind::Small | Kind::Mtu => {
            let payload = vec![0u8; case.payload()];
            let frame = udp_frame(
                src_mac,
                dst_mac,
                src,
                dst,
                SPORT,
                UDP_PORT,
                &payload,
                UdpCsum::Partial,
            );
            let hdr = net_hdr(
                csum,
                VIRTIO_NET_HDR_GSO_NONE as u8,
                0,
                0,
                (14 + 20) as u16,
                6,
            );
            (hdr, frame)
        }
        Kind::Gso => {
            let frame = tcp_frame(src_mac, dst_mac, src, dst, case.payload());
            let hdr = net_hdr(
                csum,
                VIRTIO_NET_HDR_GSO_TCPV4 as u8,
                ETH_IP_TCP as u16,
                TSO_MSS as u16,
                (14 + 20) as u16,
                16,
            );
            (hdr, frame)
        }
    }
}

// ---------------------------------------------------- kernel counters --

/// `/proc/net/snmp` of the namespace, as "Proto.Field" -> value.
fn snmp(ns: &NetNs) -> Res<HashMap<String, i64>> {
    let text = ns.enter(|| std::fs::read_to_string("/proc/thread-self/net/snmp"))??;
    let mut out = HashMap::new();
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { break };
        let (proto, names) = names.split_once(':').ok_or("malformed snmp")?;
        let (_, values) = values.split_once(':').ok_or("malformed snmp")?;
        for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
            out.insert(format!("{proto}.{n}"), v.parse().unwrap_or(0));
        }
    }
    Ok(out)
}

fn l4_count(kind: Kind, s: &HashMap<String, i64>) -> u64 {
    let g = |k: &str| s.get(k).copied().unwrap_or(0).max(0) as u64;
    match kind {
        Kind::Gso => g("Tcp.InSegs"),
        _ => g("Udp.InDatagrams") + g("Udp.InErrors"),
    }
}

// -------------------------------------------------------------- ring --

/// The driver side of one split ring, fast path: descriptors are written
/// once per case (slot i = descriptor i), then only heads are published.
///
/// The rings are accessed through their host addresses, as a guest's stores
/// would land, and not through `GuestMemory`'s accessors: those also mark
/// the pages in godwit's dirty bitmap, whose words the device's own ring
/// writes update too, so the harness would bounce that cache line between
/// the two CPUs on every packet, a cost a real guest does not cause.
pub(crate) struct Ring {
    q: usize,
    size: u16,
    event_idx: bool,
    /// Host addresses of the available and used rings.
    avail: *mut u8,
    used: *mut u8,
    pub(crate) avail_idx: u16,
    pub(crate) last_used: u16,
}

impl Ring {
    pub(crate) fn new(d: &GuestDriver, mem: &GuestMemory, q: usize) -> Res<Ring> {
        use vm_memory::GuestMemoryBackend;
        let dq = d.queue(q).ok_or("queue not set up")?;
        let size = u64::from(dq.size);
        // Both rings (with their event fields) must lie in one mapping.
        for (at, len) in [(dq.avail, 6 + 2 * size), (dq.used, 6 + 8 * size)] {
            if !GuestMemoryBackend::check_range(mem, at, len as usize)
                || mem.get_slice(at, len as usize).is_err()
            {
                return Err(format!("ring at {:#x} is not in one mapping", at.0).into());
            }
        }
        Ok(Ring {
            q,
            size: dq.size,
            event_idx: dq.event_idx,
            avail: GuestMemoryBackend::get_host_address(mem, dq.avail)?,
            used: GuestMemoryBackend::get_host_address(mem, dq.used)?,
            avail_idx: 0,
            last_used: 0,
        })
    }

    /// The 16-bit ring field `offset` bytes into the ring at `base`.
    fn field(&self, base: *mut u8, offset: usize) -> &AtomicU16 {
        // SAFETY: `base` is one of this ring's checked, mapped rings (the
        // benchmark's GuestMemory outlives every Ring) and `offset` stays
        // inside it; ring fields are 2-byte aligned.
        unsafe { AtomicU16::from_ptr(base.add(offset).cast()) }
    }

    pub(crate) fn used_idx(&self) -> u16 {
        u16::from_le(self.field(self.used, 2).load(Ordering::Acquire))
    }

    /// Head and length of used entry `idx`.
    pub(crate) fn used_elem(&self, idx: u16) -> Res<(u16, u32)> {
        let at = 4 + 8 * usize::from(idx % self.size);
        // SAFETY: a used-ring element inside the checked ring; 4-aligned.
        let (id, len) = unsafe {
            let p = self.used.add(at).cast::<u32>();
            (p.read_volatile(), p.add(1).read_volatile())
        };
        let id = u32::from_le(id);
        if id >= u32::from(self.size) {
            return Err(format!("the device returned head {id} on queue {}", self.q).into());
        }
        Ok((id as u16, u32::from_le(len)))
    }

    pub(crate) fn post(&mut self, head: u16) {
        let slot = usize::from(self.avail_idx % self.size);
        self.field(self.avail, 4 + 2 * slot)
            .store(head.to_le(), Ordering::Relaxed);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.field(self.avail, 2)
            .store(self.avail_idx.to_le(), Ordering::Release);
    }

    /// Kicks if the device asked for a notification for the entries
    /// published since `old` (avail_event, or the used ring's NO_NOTIFY).
    pub(crate) fn kick_if_needed(&self, d: &GuestDriver, old: u16) -> Res<bool> {
        let new = self.avail_idx;
        if new == old {
            return Ok(false);
        }
        fence(Ordering::SeqCst);
        let kick = if self.event_idx {
            let event = self.field(self.used, 4 + 8 * usize::from(self.size));
            let event = u16::from_le(event.load(Ordering::Acquire));
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            let flags = u16::from_le(self.field(self.used, 0).load(Ordering::Acquire));
            flags & VRING_USED_F_NO_NOTIFY as u16 == 0
        };
        if kick {
            d.kick(self.q)?;
        }
        Ok(kick)
    }

    /// Asks for an interrupt when used entry `at` is published; true if
    /// the used index moved meanwhile (do not sleep).
    fn arm(&self, at: u16) -> bool {
        let event = self.field(self.avail, 4 + 2 * usize::from(self.size));
        event.store(at.to_le(), Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.used_idx() != self.last_used
    }
}

fn stalled(what: &str, since: Instant) -> Res<()> {
    if since.elapsed() > STALL {
        return Err(format!("{what}: nothing moved for {STALL:?}").into());
    }
    Ok(())
}

/// Keeps the transmit ring full until `until`; returns the frames completed.
fn tx_loop(d: &mut GuestDriver, r: &mut Ring, free: &mut Vec<u16>, until: Instant) -> Res<u64> {
    let mut done = 0u64;
    let mut progress = Instant::now();
    loop {
        let idx = r.used_idx();
        let reaped = idx.wrapping_sub(r.last_used);
        while r.last_used != idx {
            let (id, _) = r.used_elem(r.last_used)?;
            free.push(id);
            r.last_used = r.last_used.wrapping_add(1);
        }
        done += u64::from(reaped);
        let now = Instant::now();
        if now >= until {
            return Ok(done);
        }
        let old = r.avail_idx;
        while let Some(h) = free.pop() {
            r.post(h);
        }
        r.kick_if_needed(d, old)?;
        if reaped > 0 {
            progress = now;
        }
        // Reap in batches, like a guest that frees completed buffers when it
        // transmits again: polling the used index continuously would bounce
        // its cache line between the two CPUs on every completion.
        let pace = Instant::now();
        while pace.elapsed() < TX_POLL {
            std::hint::spin_loop();
        }
        if r.used_idx() == r.last_used && now.duration_since(progress) >= TX_SPIN {
            stalled("transmit", progress)?;
            // Nothing for a while: an interrupt once half the ring is done.
            let inflight = r.avail_idx.wrapping_sub(r.last_used);
            if !r.arm(r.last_used.wrapping_add(inflight / 2)) {
                d.wait_irq(IRQ_WAIT)?;
            }
        }
    }
}

/// MRG_RXBUF frame assembly state across calls.
#[derive(Default)]
struct RxState {
    /// Buffers still to come of the current frame.
    remaining: u16,
    rejected: u64,
}

/// Reaps received buffers and reposts them until `until`; returns frames
/// and frame bytes (virtio-net headers excluded).
fn rx_loop(
    d: &mut GuestDriver,
    mem: &GuestMemory,
    r: &mut Ring,
    bufs: GuestAddress,
    st: &mut RxState,
    until: Instant,
) -> Res<(u64, u64)> {
    let (mut frames, mut bytes) = (0u64, 0u64);
    let mut progress = Instant::now();
    loop {
        let idx = r.used_idx();
        let old = r.avail_idx;
        let got = idx.wrapping_sub(r.last_used);
        while r.last_used != idx {
            let (id, len) = r.used_elem(r.last_used)?;
            let buf = GuestAddress(bufs.0 + RX_BUF * u64::from(id));
            if len == 0 {
                st.rejected += 1;
            } else if st.remaining == 0 {
                let nb = u16::from_le(mem.read_obj::<u16>(GuestAddress(buf.0 + 10))?);
                st.remaining = nb.max(1) - 1;
                frames += 1;
                bytes += u64::from(len).saturating_sub(NET_HDR_LEN as u64);
            } else {
                st.remaining -= 1;
                bytes += u64::from(len);
            }
            r.post(id);
            r.last_used = r.last_used.wrapping_add(1);
        }
        r.kick_if_needed(d, old)?;
        let now = Instant::now();
        if now >= until {
            return Ok((frames, bytes));
        }
        if got > 0 {
            progress = now;
        } else if now.duration_since(progress) < RX_NAP_FOR {
            // Traffic is flowing: look again shortly instead of waiting for
            // an interrupt, whose wake-up on the CPU the sender keeps busy
            // can take longer than the device needs to use up the ring.
            std::thread::sleep(RX_NAP);
        } else {
            stalled("receive", progress)?;
            if !r.arm(r.last_used) {
                d.wait_irq(IRQ_WAIT)?;
            }
        }
    }
}

// ----------------------------------------------------------- baseline --

fn raw_write_loop(fd: RawFd, frames: &[Vec<u8>], until: Instant) -> Res<u64> {
    let mut n = 0u64;
    let mut i = 0;
    loop {
        for _ in 0..32 {
            let f = &frames[i];
            i = (i + 1) % frames.len();
            // SAFETY: writes from a live buffer of its own length.
            let r = unsafe { libc::write(fd, f.as_ptr().cast(), f.len()) };
            if r < 0 {
                return Err(format!("raw TAP write: {}", std::io::Error::last_os_error()).into());
            }
            n += 1;
        }
        if Instant::now() >= until {
            return Ok(n);
        }
    }
}

fn raw_read_loop(fd: RawFd, buf: &mut [u8], until: Instant) -> Res<(u64, u64)> {
    let (mut frames, mut bytes) = (0u64, 0u64);
    let mut progress = Instant::now();
    // Look at the clock every 32 frames only.
    let mut until_check = 32u32;
    loop {
        // SAFETY: reads into a live buffer of its own length.
        let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if r > 0 {
            frames += 1;
            bytes += (r as u64).saturating_sub(NET_HDR_LEN as u64);
            until_check -= 1;
            if until_check > 0 {
                continue;
            }
            until_check = 32;
            progress = Instant::now();
            if progress >= until {
                return Ok((frames, bytes));
            }
            continue;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::WouldBlock {
            return Err(format!("raw TAP read: {e}").into());
        }
        if Instant::now() >= until {
            return Ok((frames, bytes));
        }
        stalled("raw receive", progress)?;
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, IRQ_WAIT.as_millis() as i32) };
    }
}

// ------------------------------------------------------------- sender --

/// A thread in the namespace sending UDP (USO for Kind::Gso) as fast as it
/// can, alone on its CPU (`Cpus::sender`).
struct Sender {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    tid: i32,
    thread: JoinHandle<Result<(), String>>,
}

impl Sender {
    fn start(
        ns: &NetNs,
        from: Ipv4Addr,
        to: Ipv4Addr,
        case: Case,
        cpu: Option<usize>,
    ) -> Res<Sender> {
        let sock = ns.enter(|| UdpSocket::bind(SocketAddrV4::new(from, 0)))??;
        sock.connect(SocketAddrV4::new(to, UDP_PORT))?;
        let (batch, payload) = match case.kind {
            Kind::Gso => {
                let seg = USO_SEG as libc::c_int;
                // SAFETY: setsockopt with a live int and its size.
                let r = unsafe {
                    libc::setsockopt(
                        sock.as_raw_fd(),
                        libc::SOL_UDP,
                        libc::UDP_SEGMENT,
                        (&seg as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                if r < 0 {
                    return Err(format!("UDP_SEGMENT: {}", std::io::Error::last_os_error()).into());
                }
                (4usize, case.payload())
            }
            _ => (64usize, case.payload()),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::channel();
        let thread = {
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::Builder::new()
                .name("bench-sender".into())
                .spawn(move || {
                    let pinned = cpu.map_or(Ok(()), |c| pin(0, &[c]).map_err(|e| e.to_string()));
                    let me = gettid();
                    let _ = tx.send(me);
                    pinned?;
                    let data = vec![0x5au8; payload];
                    let mut iov: Vec<libc::iovec> = (0..batch)
                        .map(|_| libc::iovec {
                            iov_base: data.as_ptr() as *mut libc::c_void,
                            iov_len: data.len(),
                        })
                        .collect();
                    let mut msgs: Vec<libc::mmsghdr> = iov
                        .iter_mut()
                        .map(|v| {
                            // SAFETY: mmsghdr is plain old data; zero is valid.
                            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                            m.msg_hdr.msg_iov = v;
                            m.msg_hdr.msg_iovlen = 1;
                            m
                        })
                        .collect();
                    while !stop.load(Ordering::Relaxed) {
                        // Never blocks (a full send buffer must not keep the
                        // thread from seeing `stop`).
                        // SAFETY: `batch` messages, each with one iovec into
                        // `data`; all outlive the call.
                        let n = unsafe {
                            libc::sendmmsg(
                                sock.as_raw_fd(),
                                msgs.as_mut_ptr(),
                                batch as u32,
                                libc::MSG_DONTWAIT,
                            )
                        };
                        if n > 0 {
                            sent.fetch_add(n as u64, Ordering::Relaxed);
                        } else if n < 0 {
                            let e = std::io::Error::last_os_error();
                            match e.raw_os_error() {
                                Some(libc::ENOBUFS | libc::EAGAIN | libc::ECONNREFUSED) => {
                                    std::thread::yield_now()
                                }
                                _ => return Err(format!("sendmmsg: {e}")),
                            }
                        }
                    }
                    Ok(())
                })?
        };
        let tid = rx.recv_timeout(Duration::from_secs(5))?;
        Ok(Sender {
            stop,
            sent,
            tid,
            thread,
        })
    }

    fn finish(self) -> Res<()> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| "the sender thread panicked")??;
        Ok(())
    }
}

// ------------------------------------------------------- measurement --

#[derive(Clone, Default)]
struct Snap {
    at: Option<Instant>,
    cpu_ns: u64,
    ticks: (u64, u64),
    harness_ns: u64,
    sender_ns: u64,
    sent: u64,
    l4: u64,
    stats: NetStats,
    jiffies: HashMap<usize, (u64, u64)>,
}

/// One measured window of one side (godwit or raw).
#[derive(Clone, Default)]
struct Run {
    secs: f64,
    frames: u64,
    bytes: u64,
    /// CPU of the datapath thread (godwit's worker, or the raw loop thread).
    cpu_ns: u64,
    user_share: f64,
    harness_ns: Option<u64>,
    sender_ns: Option<u64>,
    /// RX: datagrams (USO: super-frames) the namespace sent.
    offered: Option<u64>,
    /// TX: frames the namespace's UDP/TCP input counted.
    l4: Option<u64>,
    /// Device fault counters (dropped frames, rejected buffers).
    faults: u64,
    /// How busy the datapath thread's CPU and the other CPU were (all
    /// processes, interrupts included), when pinned.
    cpu_busy: Option<(f64, f64)>,
    /// Lowest and highest primary rate over the windows.
    spread: (f64, f64),
    /// Which run of the case this is (see ATTEMPTS).
    attempts: u32,
}

impl Run {
    fn from(a: &Snap, b: &Snap, frames: u64, bytes: u64, cpus: Option<&Cpus>) -> Run {
        let busy = |cpu: usize| {
            let (Some(x), Some(y)) = (a.jiffies.get(&cpu), b.jiffies.get(&cpu)) else {
                return 0.0;
            };
            let total = y.1.saturating_sub(x.1);
            y.0.saturating_sub(x.0) as f64 / total.max(1) as f64
        };
        let secs = match (a.at, b.at) {
            (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
            _ => 0.0,
        };
        let (u, s) = (
            b.ticks.0.saturating_sub(a.ticks.0),
            b.ticks.1.saturating_sub(a.ticks.1),
        );
        Run {
            secs,
            frames,
            bytes,
            cpu_ns: b.cpu_ns.saturating_sub(a.cpu_ns),
            user_share: if u + s > 0 {
                u as f64 / (u + s) as f64
            } else {
                0.0
            },
            harness_ns: None,
            sender_ns: None,
            offered: None,
            l4: None,
            faults: (b.stats.tx_faults.total() + b.stats.rx_faults.total())
                .saturating_sub(a.stats.tx_faults.total() + a.stats.rx_faults.total()),
            cpu_busy: cpus.map(|c| (busy(c.datapath), busy(c.other))),
            spread: (0.0, 0.0),
            attempts: 1,
        }
    }

    fn pps(&self) -> f64 {
        self.frames as f64 / self.secs
    }

    fn bps(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.secs
    }

    /// The case's primary rate: packets/s for 64 B, bits/s otherwise.
    fn primary(&self, kind: Kind) -> f64 {
        match kind {
            Kind::Small => self.pps(),
            _ => self.bps(),
        }
    }

    fn cpu_per_frame_ns(&self) -> f64 {
        self.cpu_ns as f64 / self.frames.max(1) as f64
    }

    fn busy(&self, ns: u64) -> f64 {
        ns as f64 / (self.secs * 1e9)
    }

    /// CPU time (in CPUs) the two pinned CPUs spent on anything but this
    /// benchmark's threads: other processes, or interrupts not charged to
    /// a thread.
    fn foreign(&self) -> Option<f64> {
        let (dp, other) = self.cpu_busy?;
        // Wherever the harness and the sender run (the RX cases move the
        // harness), what the two CPUs did beyond the benchmark's threads.
        let ours =
            self.busy(self.cpu_ns + self.harness_ns.unwrap_or(0) + self.sender_ns.unwrap_or(0));
        Some((dp + other - ours).max(0.0))
    }
}

fn fmt_rate(kind: Kind, r: &Run) -> String {
    match kind {
        Kind::Small => format!("{:.3} Mpps ({:.2} Gbit/s)", r.pps() / 1e6, r.bps() / 1e9),
        _ => format!("{:.2} Gbit/s ({:.1} kpps)", r.bps() / 1e9, r.pps() / 1e3),
    }
}

fn fmt_primary(kind: Kind, v: f64) -> String {
    match kind {
        Kind::Small => format!("{:.3} Mpps", v / 1e6),
        _ => format!("{:.2} Gbit/s", v / 1e9),
    }
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 10_000.0 {
        format!("{:.1} µs", ns / 1e3)
    } else {
        format!("{:.2} µs", ns / 1e3)
    }
}

/// Marks a measurement taken while something else used the pinned CPUs.
fn disturbed(r: &Run) -> &'static str {
    match r.foreign() {
        Some(f) if f > FOREIGN_LIMIT => " (disturbed)",
        _ => "",
    }
}

fn pct(x: f64) -> String {
    format!("{:.0}%", x * 100.0)
}

// -------------------------------------------------------------- bench --

struct Pools {
    small: GuestAddress,
    tso: GuestAddress,
    tables: GuestAddress,
    rx: GuestAddress,
}

struct Bench {
    window: Duration,
    driver: GuestDriver,
    mem: GuestMemory,
    net: Arc<Mutex<VirtioNet>>,
    raw: Tap,
    dev_host_mac: [u8; 6],
    raw_host_mac: [u8; 6],
    pools: Pools,
    cpus: Option<Cpus>,
    _sink: UdpSocket,
    /// Last: the TAPs and sockets above are closed before it is deleted.
    ns: NetNs,
}

pub(crate) fn ip(ns: &NetNs, args: &[&str]) -> Res<()> {
    ns.ip(args)?;
    Ok(())
}

pub(crate) fn mac_str(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Bench {
    fn setup(window: Duration) -> Res<Bench> {
        let ns = NetNs::new("bench")?;
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        let dev_tap = ns.enter(|| Tap::open(DEV_TAP, VnetHdr::On))??;
        let raw = ns.enter(|| Tap::open(RAW_TAP, VnetHdr::On))??;
        for (tap, addr, peer, mac) in [
            (DEV_TAP, "10.0.0.1/24", GUEST, GUEST_MAC),
            (RAW_TAP, "10.0.1.1/24", RAW_PEER, RAW_PEER_MAC),
        ] {
            ip(&ns, &["addr", "add", addr, "dev", tap])?;
            ip(&ns, &["link", "set", tap, "up"])?;
            let peer = peer.to_string();
            ip(
                &ns,
                &["neigh", "add", &peer, "lladdr", &mac_str(&mac), "dev", tap],
            )?;
        }
        let dev_host_mac = dev_tap.host_mac()?;
        let raw_host_mac = raw.host_mac()?;
        let sink =
            ns.enter(|| UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, UDP_PORT)))??;
        let net = VirtioNet::new(dev_tap, NetConfig::new(GUEST_MAC, wanted_features()))?;
        let net = Arc::new(Mutex::new(net));
        let mem = guest_memory(MEM_SIZE);
        let dev: Arc<Mutex<dyn VirtioDevice>> = net.clone();
        let transport = Arc::new(Mutex::new(MmioTransport::new(mem.clone(), dev)?));
        let mut driver = GuestDriver::new(mem.clone(), transport)?;
        let n = u64::from(QUEUE_SIZE);
        let pools = Pools {
            small: driver.alloc(n * SMALL_SLOT, 4096)?,
            tso: driver.alloc(n * TSO_SLOT, 4096)?,
            tables: driver.alloc(n * TSO_TABLE, 16)?,
            rx: driver.alloc(n * RX_BUF, 4096)?,
        };
        let mut b = Bench {
            window,
            driver,
            mem,
            net,
            raw,
            dev_host_mac,
            raw_host_mac,
            pools,
            cpus: Cpus::choose()?,
            _sink: sink,
            ns,
        };
        // The raw TAP gets the receive offloads the device sets on its TAP.
        b.activate()?;
        let offloads = b.net.lock().map_err(|_| "device lock")?.tap().offload();
        b.raw.set_offload(offloads)?;
        Ok(b)
    }

    /// (Re)initialises the device like a guest driver; returns the datapath
    /// thread's id.
    fn activate(&mut self) -> Res<i32> {
        let want = wanted_features();
        let got = self.driver.init(want, QUEUE_SIZE)?;
        if got & want != want {
            return Err(format!(
                "the device did not offer every feature the benchmark needs: wanted {want:#x}, \
                 negotiated {got:#x}"
            )
            .into());
        }
        worker_tid()
    }

    fn probe<'a>(&'a self, tid: i32, sender: Option<&'a Sender>, kind: Kind) -> Probe<'a> {
        Probe {
            ns: &self.ns,
            net: &self.net,
            tid,
            sender,
            kind,
        }
    }

    fn godwit(&mut self, case: Case) -> Res<Run> {
        let tid = self.activate()?;
        if let Some(c) = &self.cpus {
            pin(tid, &[c.datapath])?;
            pin(0, &[c.other])?;
        }
        // Short naps must be short (the default slack is 50 µs).
        // SAFETY: PR_SET_TIMERSLACK takes an integer (ns) for this thread.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong) };
        match case.dir {
            Dir::Tx => self.godwit_tx(case, tid),
            Dir::Rx => self.godwit_rx(case, tid),
        }
    }

    fn godwit_tx(&mut self, case: Case, tid: i32) -> Res<Run> {
        let (hdr, frame) = tx_frame(case.kind, GUEST_MAC, self.dev_host_mac, GUEST, DEV_HOST);
        let d = &mut self.driver;
        for i in 0..QUEUE_SIZE {
            let desc = match case.kind {
                Kind::Small | Kind::Mtu => {
                    let at = GuestAddress(self.pools.small.0 + SMALL_SLOT * u64::from(i));
                    d.write_mem(at, &hdr)?;
                    d.write_mem(GuestAddress(at.0 + NET_HDR_LEN as u64), &frame)?;
                    RawDesc {
                        addr: at.0,
                        len: (NET_HDR_LEN + frame.len()) as u32,
                        flags: 0,
                        next: 0,
                    }
                }
                Kind::Gso => {
                    // Linux's layout: header + protocol headers, then pages.
                    let base = self.pools.tso.0 + TSO_SLOT * u64::from(i);
                    let table = self.pools.tables.0 + TSO_TABLE * u64::from(i);
                    d.write_mem(GuestAddress(base), &hdr)?;
                    d.write_mem(
                        GuestAddress(base + NET_HDR_LEN as u64),
                        &frame[..ETH_IP_TCP],
                    )?;
                    let mut entries = vec![(base, NET_HDR_LEN + ETH_IP_TCP)];
                    for (k, chunk) in frame[ETH_IP_TCP..].chunks(4096).enumerate() {
                        let page = base + 4096 * (1 + k as u64);
                        d.write_mem(GuestAddress(page), chunk)?;
                        entries.push((page, chunk.len()));
                    }
                    for (k, (addr, len)) in entries.iter().enumerate() {
                        let last = k + 1 == entries.len();
                        let e = RawDesc {
                            addr: *addr,
                            len: *len as u32,
                            flags: if last { 0 } else { VRING_DESC_F_NEXT as u16 },
                            next: if last { 0 } else { k as u16 + 1 },
                        };
                        d.write_mem(GuestAddress(table + 16 * k as u64), &e.to_bytes())?;
                    }
                    RawDesc {
                        addr: table,
                        len: 16 * entries.len() as u32,
                        flags: VRING_DESC_F_INDIRECT as u16,
                        next: 0,
                    }
                }
            };
            d.write_desc(TX_QUEUE, i, desc)?;
        }
        let mut ring = Ring::new(d, &self.mem, TX_QUEUE)?;
        let mut free: Vec<u16> = (0..QUEUE_SIZE).rev().collect();
        let len = frame.len() as u64;
        let mut step = |until| tx_loop(d, &mut ring, &mut free, until).map(|n| (n, n * len));
        let probe = Probe {
            ns: &self.ns,
            net: &self.net,
            tid,
            sender: None,
            kind: case.kind,
        };
        measure(case, self.window, self.cpus.as_ref(), &mut step, &probe)
    }

    fn godwit_rx(&mut self, case: Case, tid: i32) -> Res<Run> {
        let d = &mut self.driver;
        for i in 0..QUEUE_SIZE {
            let desc = RawDesc {
                addr: self.pools.rx.0 + RX_BUF * u64::from(i),
                len: RX_BUF as u32,
                flags: VRING_DESC_F_WRITE as u16,
                next: 0,
            };
            d.write_desc(RX_QUEUE, i, desc)?;
        }
        let mut ring = Ring::new(d, &self.mem, RX_QUEUE)?;
        for i in 0..QUEUE_SIZE {
            ring.post(i);
        }
        d.kick(RX_QUEUE)?;
        let cpu = self.cpus.as_ref().map(|c| c.sender);
        if let Some(c) = &self.cpus {
            pin(0, &[c.rx_harness()])?;
        }
        let sender = Sender::start(&self.ns, DEV_HOST, GUEST, case, cpu)?;
        let mem = self.mem.clone();
        let bufs = self.pools.rx;
        let mut st = RxState::default();
        let mut step = |until| rx_loop(d, &mem, &mut ring, bufs, &mut st, until);
        let probe = Probe {
            ns: &self.ns,
            net: &self.net,
            tid,
            sender: Some(&sender),
            kind: case.kind,
        };
        let res = measure(case, self.window, self.cpus.as_ref(), &mut step, &probe);
        sender.finish()?;
        if let Some(c) = &self.cpus {
            pin(0, &[c.other])?;
        }
        let mut run = res?;
        run.faults += st.rejected;
        Ok(run)
    }

    fn raw(&mut self, case: Case) -> Res<Run> {
        if let Some(c) = &self.cpus {
            pin(0, &[c.datapath])?;
        }
        let res = self.raw_pinned(case);
        if let Some(c) = &self.cpus {
            pin(0, &[c.other])?;
        }
        res
    }

    fn raw_pinned(&mut self, case: Case) -> Res<Run> {
        let fd = self.raw.as_raw_fd();
        let me = gettid();
        match case.dir {
            Dir::Tx => {
                let (hdr, frame) = tx_frame(
                    case.kind,
                    RAW_PEER_MAC,
                    self.raw_host_mac,
                    RAW_PEER,
                    RAW_HOST,
                );
                let mut one = hdr.to_vec();
                one.extend_from_slice(&frame);
                // As many distinct buffers as the guest has in flight.
                let frames = vec![one; usize::from(QUEUE_SIZE)];
                let len = frame.len() as u64;
                let mut step = |until| raw_write_loop(fd, &frames, until).map(|n| (n, n * len));
                let probe = self.probe(me, None, case.kind);
                measure(case, self.window, self.cpus.as_ref(), &mut step, &probe)
            }
            Dir::Rx => {
                let mut buf = vec![0u8; 68 * 1024];
                let cpu = self.cpus.as_ref().map(|c| c.sender);
                let sender = Sender::start(&self.ns, RAW_HOST, RAW_PEER, case, cpu)?;
                let mut step = |until| raw_read_loop(fd, &mut buf, until);
                let probe = self.probe(me, Some(&sender), case.kind);
                let res = measure(case, self.window, self.cpus.as_ref(), &mut step, &probe);
                sender.finish()?;
                // Leave nothing queued for the next case.
                while raw_read_loop(fd, &mut buf, Instant::now())?.0 > 0 {}
                res
            }
        }
    }
}

/// What a snapshot reads: the measured thread, the sender, the namespace's
/// counters, the device's counters.
struct Probe<'a> {
    ns: &'a NetNs,
    net: &'a Mutex<VirtioNet>,
    tid: i32,
    sender: Option<&'a Sender>,
    kind: Kind,
}

impl Probe<'_> {
    fn snap(&self) -> Res<Snap> {
        let l4 = l4_count(self.kind, &snmp(self.ns)?);
        let stats = self.net.lock().map_err(|_| "device lock")?.stats();
        Ok(Snap {
            at: Some(Instant::now()),
            cpu_ns: thread_cpu_ns(self.tid)?,
            ticks: thread_ticks(self.tid)?,
            harness_ns: own_cpu_ns()?,
            sender_ns: match self.sender {
                Some(s) => thread_cpu_ns(s.tid)?,
                None => 0,
            },
            sent: self.sender.map_or(0, |s| s.sent.load(Ordering::Relaxed)),
            l4,
            stats,
            jiffies: cpu_jiffies()?,
        })
    }
}

/// Warm-up, then `WINDOWS` windows of `window / WINDOWS` each; returns the
/// median window by the case's primary rate, with the spread of all of them.
fn measure(
    case: Case,
    window: Duration,
    cpus: Option<&Cpus>,
    step: &mut dyn FnMut(Instant) -> Res<(u64, u64)>,
    probe: &Probe<'_>,
) -> Res<Run> {
    step(Instant::now() + WARMUP)?;
    let sub = window / WINDOWS as u32;
    let mut a = probe.snap()?;
    let mut runs = Vec::with_capacity(WINDOWS);
    for _ in 0..WINDOWS {
        let (frames, bytes) = step(Instant::now() + sub)?;
        let b = probe.snap()?;
        let mut run = Run::from(&a, &b, frames, bytes, cpus);
        if probe.tid != gettid() {
            run.harness_ns = Some(b.harness_ns.saturating_sub(a.harness_ns));
        }
        if probe.sender.is_some() {
            run.sender_ns = Some(b.sender_ns.saturating_sub(a.sender_ns));
            run.offered = Some(b.sent.saturating_sub(a.sent));
        } else {
            run.l4 = Some(b.l4.saturating_sub(a.l4));
        }
        runs.push(run);
        a = b;
    }
    let kind = case.kind;
    runs.sort_by(|x, y| x.primary(kind).total_cmp(&y.primary(kind)));
    let spread = (
        runs.first().map_or(0.0, |r| r.primary(kind)),
        runs.last().map_or(0.0, |r| r.primary(kind)),
    );
    let mut median = runs.swap_remove(runs.len() / 2);
    median.spread = spread;
    Ok(median)
}

fn env_secs() -> Duration {
    std::env::var("GODWIT_BENCH_NET_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0 && *s <= 60.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(3))
}

fn selected() -> Vec<Case> {
    let only = std::env::var("GODWIT_BENCH_NET_CASES").unwrap_or_default();
    CASES
        .iter()
        .copied()
        .filter(|c| only.is_empty() || only.split(',').any(|k| k.trim() == c.key()))
        .collect()
}

fn run() -> Res<()> {
    let window = env_secs();
    let cases = selected();
    let mut b = Bench::setup(window)?;
    let cpus = b.cpus.clone();
    let res = run_cases(&mut b, &cases);
    if let Some(c) = &cpus {
        pin(0, &c.all)?;
    }
    drop(b);
    print_tables(window, cpus.as_ref(), &res?);
    Ok(())
}

fn run_cases(b: &mut Bench, cases: &[Case]) -> Res<Vec<(Case, Run, Run)>> {
    let mut results = Vec::new();
    for &case in cases {
        // The machine is shared: a case disturbed by other work is run
        // again (up to ATTEMPTS times) and the least disturbed attempt kept.
        let mut best: Option<(f64, Run, Run)> = None;
        for attempt in 1..=ATTEMPTS {
            eprintln!("net: {} (attempt {attempt}) ...", case.name());
            let mut g = b
                .godwit(case)
                .map_err(|e| format!("{} (godwit): {e}", case.name()))?;
            let mut r = b
                .raw(case)
                .map_err(|e| format!("{} (raw TAP): {e}", case.name()))?;
            g.attempts = attempt;
            r.attempts = attempt;
            let noise = g.foreign().unwrap_or(0.0).max(r.foreign().unwrap_or(0.0));
            let better = match &best {
                Some((n, _, _)) => noise < *n,
                None => true,
            };
            if better {
                best = Some((noise, g, r));
            }
            if noise <= FOREIGN_LIMIT {
                break;
            }
        }
        if let Some((_, g, r)) = best {
            results.push((case, g, r));
        }
    }
    Ok(results)
}

fn print_tables(window: Duration, cpus: Option<&Cpus>, results: &[(Case, Run, Run)]) {
    println!(
        "## net: virtio-net datapath through a TAP, guest driver played on guest memory; \
         median of {WINDOWS} windows of {:.1} s per case after {:.1} s warm-up\n",
        window.as_secs_f64() / WINDOWS as f64,
        WARMUP.as_secs_f64()
    );
    match cpus {
        Some(c) if c.sender == c.other => println!(
            "Datapath thread (godwit's worker / the raw loop) pinned to CPU {}; harness on CPU {} \
             for TX; for RX the namespace sender runs alone on CPU {} (nice 0) and the harness \
             moves to CPU {} (its time is not counted in the datapath thread's CPU).\n",
            c.datapath, c.other, c.sender, c.datapath
        ),
        Some(c) => println!(
            "Datapath thread (godwit's worker / the raw loop) pinned to CPU {}; harness on CPU {}; \
             the RX namespace sender alone on CPU {}.\n",
            c.datapath, c.other, c.sender
        ),
        None => println!("One CPU only: nothing pinned.\n"),
    }
    println!("| case | godwit | raw TAP write()/read(), 1 thread | godwit / raw | target | godwit CPU per packet (datapath thread) | raw CPU per packet | CPU ratio | godwit at 100% of its one core |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (case, g, r) in results {
        let gp = g.primary(case.kind);
        let rp = r.primary(case.kind);
        let target = match case.target() {
            Some((t, name)) => format!(
                "{name}: {:.2}x ({})",
                gp / t,
                if gp >= t { "met" } else { "missed" }
            ),
            None => "-".into(),
        };
        let (gc, rc) = (g.cpu_per_frame_ns(), r.cpu_per_frame_ns());
        let per_frame_bits = g.bytes as f64 * 8.0 / g.frames.max(1) as f64;
        let capacity = match case.kind {
            Kind::Small => 1e9 / gc,
            _ => 1e9 / gc * per_frame_bits,
        };
        println!(
            "| {} | {}{} | {}{} | {:.2}x | {} | {} | {} | {:.2}x | {} |",
            case.name(),
            fmt_rate(case.kind, g),
            disturbed(g),
            fmt_rate(case.kind, r),
            disturbed(r),
            gp / rp,
            target,
            fmt_ns(gc),
            fmt_ns(rc),
            gc / rc,
            fmt_primary(case.kind, capacity),
        );
    }
    println!();
    println!("| case | godwit datapath thread busy (user share) | harness thread busy | namespace sender busy (godwit / raw) | raw thread busy (user share) | spread of the windows (godwit; raw) | foreign CPU load (godwit; raw) | kernel check (godwit / raw) | device faults | attempt |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (case, g, r) in results {
        let sender = match (g.sender_ns, r.sender_ns) {
            (Some(a), Some(b)) => format!("{} / {}", pct(g.busy(a)), pct(r.busy(b))),
            _ => "-".into(),
        };
        let check = match case.dir {
            Dir::Tx => {
                let proto = if case.kind == Kind::Gso {
                    "Tcp InSegs"
                } else {
                    "Udp InDatagrams+InErrors"
                };
                let f = |x: &Run| x.l4.unwrap_or(0) as f64 / x.frames.max(1) as f64;
                format!("{proto} = {} / {} of frames sent", pct(f(g)), pct(f(r)))
            }
            Dir::Rx => {
                let f = |x: &Run| x.frames as f64 / x.offered.unwrap_or(0).max(1) as f64;
                format!(
                    "received {} / {} of {} / {} sent",
                    pct(f(g)),
                    pct(f(r)),
                    g.offered.unwrap_or(0),
                    r.offered.unwrap_or(0)
                )
            }
        };
        let spread = |x: &Run| {
            format!(
                "{}-{}",
                fmt_primary(case.kind, x.spread.0),
                fmt_primary(case.kind, x.spread.1)
            )
        };
        let foreign = |x: &Run| x.foreign().map_or("-".into(), pct);
        println!(
            "| {} | {} ({}) | {} | {} | {} ({}) | {}; {} | {}; {} | {} | {} | {} |",
            case.name(),
            pct(g.busy(g.cpu_ns)),
            pct(g.user_share),
            pct(g.busy(g.harness_ns.unwrap_or(0))),
            sender,
            pct(r.busy(r.cpu_ns)),
            pct(r.user_share),
            spread(g),
            spread(r),
            foreign(g),
            foreign(r),
            check,
            g.faults,
            g.attempts
        );
    }
    println!();
}

pub fn bench_net() {
    if let Err(e) = run() {
        eprintln!("net benchmark failed: {e}");
        std::process::exit(1);
    }
}
