//! `godwit-bench vhost-user`: virtio-net over vhost-user.
//!
//! Part 1, the datapath without a guest (guest instructions are emulated on
//! the development machine, so a guest would measure the emulator): the
//! benchmark thread plays the driver on a memfd-backed guest memory with the
//! virtio-net harness ([`GuestDriver`]) through godwit's real
//! `MmioTransport` and [`VhostUserNet`]; the rings are served by a real
//! backend process:
//!
//! * godwit's own backend (`godwit net-backend`) on a TAP in a namespace the
//!   benchmark creates: TX frames are UDP datagrams to the TAP's address
//!   (a socket is bound there and not read: the kernel runs IP/UDP input and
//!   drops them); RX frames come from a UDP sender thread in the namespace.
//! * DPDK testpmd doing the same job: its vhost-user port and a `net_tap`
//!   port in a namespace forwarded to each other (`--forward-mode=io`), with
//!   the same harness, frames and kind of TAP (no virtio-net header, as
//!   net_tap makes it); godwit's backend runs on such a TAP too. The anchor
//!   for godwit's backend: at least its packets/s with less CPU per packet.
//! * DPDK testpmd with one vhost-user port in `io` forwarding: every frame
//!   the driver transmits comes back on its receive ring (a loop), so
//!   TX and RX run at the same time through the same process.
//!
//! Frames are 64 bytes and 1514 bytes (Ethernet, without the virtio-net
//! header); 256-entry rings, MRG_RXBUF with 2 KiB buffers, no EVENT_IDX. Each
//! case runs a 0.5 s warm-up and a measured window (`GODWIT_BENCH_VU_SECS`,
//! default 3 s).
//!
//! CPU time per packet: godwit's own threads on this path (the vhost-user
//! device's monitor thread; the control queue thread is idle) from their
//! per-thread CPU clocks, and the backend process's (user + system from
//! /proc), over the window divided by the frames moved.
//!
//! Part 2, a real VM: the test guest echoes UDP sent from the namespace,
//! once with a TAP peer (godwit's own datapath thread moves the frames) and
//! once on godwit's vhost-user backend; godwit's CPU time outside its vCPU
//! threads (which emulate the guest) per frame moved.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use godwit_devices::vhost_user::{
    handshake, Connection, Endpoint, Recheck, VhostUserNet, VhostUserNetConfig,
};
use godwit_devices::virtio::mmio::MmioTransport;
use godwit_devices::virtio::net::{FrontendConfig, NET_HDR_LEN, RX_QUEUE, TX_QUEUE};
use godwit_devices::virtio::testing::{net_hdr, udp_frame, Buf, GuestDriver, UdpCsum, Used};
use godwit_devices::virtio::{feature, VirtioDevice, VIRTIO_F_VERSION_1};
use godwit_devices::GuestMemory;
use godwit_tests::process::{stop_child, testpmd_command};
use godwit_tests::{godwit_bin, NetHost, TempDir};
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF};
use vm_memory::{FileOffset, GuestAddress};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const QUEUE_SIZE: u16 = 256;
const RX_BUF: u32 = 2048;
const MEM: usize = 64 << 20;
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const WARMUP: Duration = Duration::from_millis(500);
const STALL: Duration = Duration::from_secs(3);

fn window() -> Duration {
    std::env::var("GODWIT_BENCH_VU_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(3))
}

/// Guest memory in a memfd, mapped shared: what a backend can map.
fn memfd_memory(size: usize) -> Res<GuestMemory> {
    // SAFETY: memfd_create with a NUL-terminated name; the fd is checked and
    // owned below.
    let fd = unsafe { libc::memfd_create(c"godwit-bench".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: a fresh fd nothing else owns.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size as u64)?;
    Ok(GuestMemory::from_ranges_with_files([(
        GuestAddress(0),
        size,
        Some(FileOffset::new(file, 0)),
    )])?)
}

/// CPU time (ns, the scheduler's sum_exec_runtime from
/// /proc/PID/task/TID/schedstat) of `pid`'s threads for which `keep` says
/// yes, given the thread's name.
fn threads_cpu_ns(pid: &str, keep: impl Fn(&str) -> bool) -> u64 {
    let mut total = 0;
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    for t in dir.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !keep(comm.trim_end()) {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        total += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

/// This process's threads named `gw-*`: the vhost-user device's.
fn own_threads_cpu_ns(prefix: &str) -> u64 {
    threads_cpu_ns("self", |name| name.starts_with(prefix))
}

fn process_cpu_ns(pid: u32) -> u64 {
    threads_cpu_ns(&pid.to_string(), |_| true)
}

/// CPU time of a process's threads, except those named `vcpu*`.
fn process_cpu_ns_without_vcpus(pid: u32) -> u64 {
    threads_cpu_ns(&pid.to_string(), |name| !name.starts_with("vcpu"))
}

/// The harness: a driver on a vhost-user device.
struct Harness {
    d: GuestDriver,
    _device: Arc<Mutex<VhostUserNet>>,
    tx_free: Vec<GuestAddress>,
    tx_len: u32,
}

impl Harness {
    fn new(socket: &Path) -> Res<Harness> {
        let mem = memfd_memory(MEM)?;
        let conn = Connection::connect(
            socket.to_str().ok_or("socket path")?,
            Duration::from_secs(5),
        )?;
        let session = handshake(conn, None)?;
        let features = feature(VIRTIO_F_VERSION_1)
            | feature(VIRTIO_NET_F_MRG_RXBUF)
            | feature(VIRTIO_NET_F_MAC);
        let dev = VhostUserNet::new(
            session,
            Endpoint::client(socket),
            VhostUserNetConfig {
                frontend: FrontendConfig {
                    mac: GUEST_MAC,
                    features,
                    mtu: 1500,
                    queue_size: QUEUE_SIZE,
                    queue_pairs: 1,
                },
                pin: None,
                timeout: Duration::from_secs(5),
            },
            Box::new(|_, _| Recheck::Accept),
        )?;
        let device = Arc::new(Mutex::new(dev));
        let as_virtio: Arc<Mutex<dyn VirtioDevice>> = device.clone();
        let transport = Arc::new(Mutex::new(MmioTransport::new(mem.clone(), as_virtio)?));
        let mut d = GuestDriver::new(mem, transport)?;
        d.init(features, QUEUE_SIZE)?;
        let mut tx_free = Vec::new();
        for _ in 0..QUEUE_SIZE {
            tx_free.push(d.alloc(2048, 64)?);
        }
        d.fill_rx(usize::from(QUEUE_SIZE), RX_BUF)?;
        Ok(Harness {
            d,
            _device: device,
            tx_free,
            tx_len: 0,
        })
    }

    /// Writes header + frame into every transmit buffer.
    fn set_frame(&mut self, frame: &[u8]) -> Res<()> {
        let hdr = net_hdr(0, 0, 0, 0, 0, 0);
        for b in &self.tx_free {
            self.d.write_mem(*b, &hdr)?;
            self.d
                .write_mem(GuestAddress(b.0 + NET_HDR_LEN as u64), frame)?;
        }
        self.tx_len = (NET_HDR_LEN + frame.len()) as u32;
        Ok(())
    }

    /// Posts every free transmit buffer; one kick.
    fn post_tx(&mut self) -> Res<bool> {
        let mut posted = false;
        while let Some(b) = self.tx_free.pop() {
            self.d.add_chain(TX_QUEUE, &[Buf::read(b, self.tx_len)])?;
            posted = true;
        }
        if posted {
            self.d.kick(TX_QUEUE)?;
        }
        Ok(posted)
    }

    fn reap_tx(&mut self) -> Res<u64> {
        let used = self.d.reap(TX_QUEUE)?;
        let n = used.len() as u64;
        for u in used {
            self.tx_free.push(u.bufs[0].addr);
        }
        Ok(n)
    }

    /// Reaps received frames and reposts their buffers.
    fn reap_rx(&mut self) -> Res<(u64, u64)> {
        let used: Vec<Used> = self.d.reap(RX_QUEUE)?;
        if used.is_empty() {
            return Ok((0, 0));
        }
        let (mut frames, mut bytes) = (0, 0);
        for u in &used {
            if u.len as usize > NET_HDR_LEN {
                frames += 1;
                bytes += u64::from(u.len) - NET_HDR_LEN as u64;
            }
        }
        self.d.refill_rx(&used)?;
        Ok((frames, bytes))
    }
}

#[derive(Default, Clone, Copy)]
struct Counts {
    tx: u64,
    rx: u64,
    rx_bytes: u64,
}

/// Runs `dur` of traffic: transmitting when `tx`, receiving always.
fn drive(h: &mut Harness, tx: bool, dur: Duration) -> Res<Counts> {
    let mut c = Counts::default();
    let until = Instant::now() + dur;
    let mut progress = Instant::now();
    while Instant::now() < until {
        let mut moved = false;
        if tx {
            let n = h.reap_tx()?;
            c.tx += n;
            moved |= n > 0;
            h.post_tx()?;
        }
        let (f, b) = h.reap_rx()?;
        c.rx += f;
        c.rx_bytes += b;
        moved |= f > 0;
        if moved {
            progress = Instant::now();
        } else {
            if progress.elapsed() > STALL {
                return Err("nothing moved for 3 s".into());
            }
            h.d.wait_irq(Duration::from_millis(1))?;
        }
    }
    Ok(c)
}

struct Sample {
    counts: Counts,
    secs: f64,
    godwit_ns: u64,
    backend_ns: u64,
}

fn measure(h: &mut Harness, tx: bool, backend_pid: u32) -> Res<Sample> {
    drive(h, tx, WARMUP)?;
    let (g0, b0, t0) = (
        own_threads_cpu_ns("gw-"),
        process_cpu_ns(backend_pid),
        Instant::now(),
    );
    let counts = drive(h, tx, window())?;
    Ok(Sample {
        counts,
        secs: t0.elapsed().as_secs_f64(),
        godwit_ns: own_threads_cpu_ns("gw-") - g0,
        backend_ns: process_cpu_ns(backend_pid) - b0,
    })
}

fn per_packet(ns: u64, packets: u64) -> String {
    if packets == 0 {
        return "-".into();
    }
    format!("{:.1} ns", ns as f64 / packets as f64)
}

fn rate(packets: u64, bytes_each: usize, secs: f64) -> (String, String) {
    let pps = packets as f64 / secs;
    (
        format!("{:.0} kpps", pps / 1e3),
        format!("{:.2} Gbit/s", pps * bytes_each as f64 * 8.0 / 1e9),
    )
}

/// A helper process and the signal that stops it, stopped on drop.
struct Proc(Child, libc::c_int);

impl Drop for Proc {
    fn drop(&mut self) {
        stop_child(&mut self.0, self.1, Duration::from_secs(15));
    }
}

fn start_backend(host: &NetHost, socket: &Path) -> Res<Proc> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &host.ns])
        .arg(godwit_bin())
        .args(["net-backend", "--socket"])
        .arg(socket)
        .args(["--tap", &host.tap])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let out = child.stdout.take().ok_or("stdout")?;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    if !line.contains("ready") {
        return Err(format!("godwit net-backend: {line}").into());
    }
    Ok(Proc(child, libc::SIGKILL))
}

fn start_testpmd_in(ns: Option<&str>, socket: &Path) -> Res<Proc> {
    let child = testpmd_command(ns, socket, false)
        .spawn()
        .map_err(|e| format!("dpdk-testpmd ({e}): apt-get install -y dpdk-dev"))?;
    let p = Proc(child, libc::SIGINT);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        if Instant::now() > deadline {
            return Err("testpmd made no socket".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(p)
}

fn guest_frame(size: usize, dst_mac: [u8; 6], dst: Ipv4Addr, src: Ipv4Addr) -> Vec<u8> {
    let payload = vec![0x5a; size - 42];
    udp_frame(
        GUEST_MAC,
        dst_mac,
        src,
        dst,
        40000,
        9000,
        &payload,
        UdpCsum::Full,
    )
}

fn tap_mac(host: &NetHost, tap: &str) -> Res<[u8; 6]> {
    let out = host.exec(&["cat", &format!("/sys/class/net/{tap}/address")]);
    let s = String::from_utf8_lossy(&out.stdout);
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(s.trim().split(':')) {
        *m = u8::from_str_radix(p, 16)?;
    }
    Ok(mac)
}

/// A UDP sender in the namespace, as fast as it can, until stopped.
fn sender(
    host: &NetHost,
    to: &str,
    size: usize,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let path = format!("/var/run/netns/{}", host.ns);
    let to = to.to_string();
    std::thread::spawn(move || {
        let Ok(file) = std::fs::File::open(&path) else {
            return;
        };
        use std::os::fd::AsRawFd;
        // SAFETY: setns with a namespace fd only changes this thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return;
        }
        let Ok(sock) = UdpSocket::bind("0.0.0.0:0") else {
            return;
        };
        let payload = vec![0xa5u8; size - 42];
        while !stop.load(Ordering::Relaxed) {
            for _ in 0..64 {
                let _ = sock.send_to(&payload, &to);
            }
        }
    })
}

struct Row {
    path: &'static str,
    case: String,
    pps: String,
    gbit: String,
    godwit: String,
    backend: String,
    /// Packets per second and the backend's CPU ns per packet, for ratios.
    sample: Option<(f64, f64)>,
}

/// Where a backend under test forwards: a TAP in `host`'s namespace.
struct TapSide<'a> {
    host: &'a NetHost,
    /// The TAP the backend drives (`host.tap`, or testpmd's `dtap0`).
    tap: &'a str,
}

/// TX and RX at 64 and 1514 bytes through a backend that forwards between
/// the harness's vhost-user rings (on `socket`) and a TAP: TX frames are UDP
/// datagrams to the namespace's address (bound and not read: the kernel
/// runs IP/UDP input and drops them), RX frames come from a UDP sender in
/// the namespace. The same harness and frames for every backend.
fn tap_forwarding_rows(
    rows: &mut Vec<Row>,
    path: &'static str,
    side: &TapSide<'_>,
    socket: &Path,
    backend_pid: u32,
) -> Res<()> {
    let host = side.host;
    let guest_ip = host.guest_ip();
    // The guest's address, resolved statically.
    let mac = GUEST_MAC
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    host.exec(&[
        "ip", "neigh", "replace", &guest_ip, "lladdr", &mac, "dev", side.tap,
    ]);
    let host_ip: Ipv4Addr = host.host_ip.parse()?;
    let bound = {
        let ip = host.host_ip.clone();
        host.run(move || UdpSocket::bind(format!("{ip}:9000")))?
    };
    let mut h = Harness::new(socket)?;
    let tmac = tap_mac(host, side.tap)?;
    for size in [64usize, 1514] {
        h.set_frame(&guest_frame(size, tmac, host_ip, guest_ip.parse()?))?;
        let s = measure(&mut h, true, backend_pid)?;
        let (pps, gbit) = rate(s.counts.tx, size, s.secs);
        rows.push(Row {
            path,
            case: format!("TX {size} B"),
            pps,
            gbit,
            godwit: per_packet(s.godwit_ns, s.counts.tx),
            backend: per_packet(s.backend_ns, s.counts.tx),
            sample: Some((
                s.counts.tx as f64 / s.secs,
                s.backend_ns as f64 / s.counts.tx.max(1) as f64,
            )),
        });
        // Let the transmit ring drain.
        drive(&mut h, false, Duration::from_millis(200)).ok();
        let stop = Arc::new(AtomicBool::new(false));
        let tx = sender(host, &format!("{guest_ip}:9"), size, stop.clone());
        let s = measure(&mut h, false, backend_pid);
        stop.store(true, Ordering::Relaxed);
        let _ = tx.join();
        let s = s?;
        let (pps, gbit) = rate(s.counts.rx, size, s.secs);
        rows.push(Row {
            path,
            case: format!("RX {size} B"),
            pps,
            gbit,
            godwit: per_packet(s.godwit_ns, s.counts.rx),
            backend: per_packet(s.backend_ns, s.counts.rx),
            sample: Some((
                s.counts.rx as f64 / s.secs,
                s.backend_ns as f64 / s.counts.rx.max(1) as f64,
            )),
        });
    }
    drop(bound);
    Ok(())
}

const GODWIT_TO_TAP: &str = "godwit net-backend <-> TAP";
const DPDK_TO_TAP: &str = "DPDK testpmd io, vhost-user <-> net_tap";

/// godwit's backend on a TAP without a virtio-net header, as DPDK's
/// net_tap makes its own.
fn godwit_backend_rows(rows: &mut Vec<Row>) -> Res<()> {
    let host = NetHost::new(false, 120);
    let dir = TempDir::new("bench-vu");
    let socket = dir.join("backend.sock");
    let backend = start_backend(&host, &socket)?;
    let side = TapSide {
        host: &host,
        tap: &host.tap,
    };
    tap_forwarding_rows(rows, GODWIT_TO_TAP, &side, &socket, backend.0.id())?;
    drop(backend);
    Ok(())
}

/// DPDK testpmd doing the same job: its vhost-user port and a net_tap port
/// (`dtap0`, in the namespace, given the namespace's address in place of
/// the TAP netns.sh made) forwarded `io` to each other.
fn testpmd_tap_rows(rows: &mut Vec<Row>) -> Res<()> {
    let host = NetHost::new(false, 125);
    let dir = TempDir::new("bench-vu-dpdk-tap");
    let socket = dir.join("dpdk.sock");
    let tp = start_testpmd_in(Some(&host.ns), &socket)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !host.exec(&["ip", "link", "show", "dtap0"]).status.success() {
        if Instant::now() > deadline {
            return Err("testpmd made no dtap0".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let cidr = format!("{}/24", host.host_ip);
    for args in [
        &["ip", "addr", "flush", "dev", &host.tap][..],
        &["ip", "link", "set", &host.tap, "down"],
        &["ip", "addr", "add", &cidr, "dev", "dtap0"],
        &["ip", "link", "set", "dtap0", "up"],
    ] {
        let out = host.exec(args);
        if !out.status.success() {
            return Err(format!(
                "{}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
    }
    let side = TapSide {
        host: &host,
        tap: "dtap0",
    };
    tap_forwarding_rows(rows, DPDK_TO_TAP, &side, &socket, tp.0.id())?;
    drop(tp);
    Ok(())
}

fn testpmd_rows(rows: &mut Vec<Row>) -> Res<()> {
    let dir = TempDir::new("bench-vu-dpdk");
    let socket = dir.join("dpdk.sock");
    let tp = start_testpmd_in(None, &socket)?;
    let pid = tp.0.id();
    let mut h = Harness::new(&socket)?;
    for size in [64usize, 1514] {
        let f = guest_frame(
            size,
            [0x02, 0, 0, 0, 0, 1],
            Ipv4Addr::new(10, 121, 0, 1),
            Ipv4Addr::new(10, 121, 0, 2),
        );
        h.set_frame(&f)?;
        let s = measure(&mut h, true, pid)?;
        let (pps, gbit) = rate(s.counts.rx, size, s.secs);
        let (txpps, _) = rate(s.counts.tx, size, s.secs);
        rows.push(Row {
            path: "DPDK testpmd io (loop back)",
            case: format!("{size} B, TX {txpps}, back on RX"),
            pps,
            gbit,
            godwit: per_packet(s.godwit_ns, s.counts.rx),
            backend: format!(
                "{} (busy-polls a core)",
                per_packet(s.backend_ns, s.counts.rx)
            ),
            sample: None,
        });
        drive(&mut h, false, Duration::from_millis(200)).ok();
    }
    drop(h);
    drop(tp);
    Ok(())
}

/// godwit's backend against DPDK doing the same job, case by case: target
/// at least 1.0x DPDK's packets/s with less CPU per packet.
fn print_against_dpdk(rows: &[Row]) {
    let lines: Vec<String> = rows
        .iter()
        .filter(|g| g.path == GODWIT_TO_TAP)
        .filter_map(|g| {
            let d = rows
                .iter()
                .find(|d| d.path == DPDK_TO_TAP && d.case == g.case)?;
            let ((gp, gc), (dp, dc)) = (g.sample?, d.sample?);
            let (pps, cpu) = (gp / dp, gc / dc);
            Some(format!(
                "- {}: packets/s {pps:.2}x DPDK's ({}), backend CPU per packet {cpu:.2}x DPDK's ({})",
                g.case,
                if pps >= 1.0 { "met" } else { "**missed**" },
                if cpu < 1.0 { "less: met" } else { "**more: missed**" },
            ))
        })
        .collect();
    if lines.is_empty() {
        return;
    }
    println!("godwit's backend against DPDK testpmd forwarding between the same kind of vhost-user port and TAP (target: at least 1.0x the packets/s, less CPU per packet):\n");
    for l in lines {
        println!("{l}");
    }
    println!();
}

/// A real VM echoing UDP: godwit's CPU outside the vCPU threads per frame.
fn vm_cpu_row(vhost: bool) -> Res<(String, u64, f64, f64)> {
    let host = NetHost::new(true, if vhost { 122 } else { 123 });
    let dir = TempDir::new("bench-vu-vm");
    let socket = dir.join("backend.sock");
    let _backend = if vhost {
        Some(start_backend(&host, &socket)?)
    } else {
        None
    };
    let net = if vhost {
        format!("vhost-user,socket={},queues=1", socket.display())
    } else {
        format!("tap,ifname={}", host.tap)
    };
    let cmdline = format!(
        "console=ttyS0 reboot=k godwit.mode=serve godwit.heartbeat_ms=1000 {}",
        host.guest_ip_param()
    );
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &host.ns]).arg(godwit_bin());
    // godwit-1.1 for both peers: the ABI godwit's vhost-user frontend
    // carries (one queue pair, no feature bit above 63).
    cmd.args([
        "run",
        "--machine",
        "godwit-1.1",
        "--net",
        &net,
        "--cmdline",
        &cmdline,
    ]);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let pid = child.id();
    let out = child.stdout.take().ok_or("stdout")?;
    let mut lines = BufReader::new(out).lines();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let l = lines.next().ok_or("godwit ended")??;
        if l.contains("serve: ready") {
            break;
        }
        if Instant::now() > deadline {
            return Err("the guest did not come up".into());
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let vm = Proc(child, libc::SIGKILL);
    let target = format!("{}:7", host.guest_ip());
    const N: usize = 3000;
    let c0 = process_cpu_ns_without_vcpus(pid);
    let t0 = Instant::now();
    let echoed = host.run(move || {
        godwit_tests::udp_echo(&target, N, &[64, 512, 1400], 16, Duration::from_secs(120))
    });
    let secs = t0.elapsed().as_secs_f64();
    let ns = process_cpu_ns_without_vcpus(pid) - c0;
    drop(vm);
    let frames = 2 * echoed as u64;
    Ok((per_packet(ns, frames), frames, secs, ns as f64 / 1e6 / secs))
}

pub fn bench_vhost_user() {
    println!("## vhost-user: the datapath in a backend process\n");
    let mut rows = Vec::new();
    if let Err(e) = godwit_backend_rows(&mut rows) {
        println!("godwit backend cases failed: {e}\n");
    }
    if let Err(e) = testpmd_tap_rows(&mut rows) {
        println!("testpmd vhost-user <-> TAP cases failed: {e}\n");
    }
    if let Err(e) = testpmd_rows(&mut rows) {
        println!("testpmd cases failed: {e}\n");
    }
    println!(
        "Driver harness on memfd guest memory, 256-entry rings, {:.1} s windows.\n",
        window().as_secs_f64()
    );
    println!("| path | case | packets/s | Gbit/s | godwit CPU / packet | backend CPU / packet |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.path, r.case, r.pps, r.gbit, r.godwit, r.backend
        );
    }
    println!();
    print_against_dpdk(&rows);
    println!(
        "### godwit's CPU per frame in a real VM (test guest echoing UDP from the namespace)\n"
    );
    println!("| peer | frames moved | time | godwit CPU outside vCPU threads / frame | same, ms per second |");
    println!("|---|---|---|---|---|");
    for vhost in [false, true] {
        let name = if vhost {
            "vhost-user (godwit net-backend)"
        } else {
            "TAP (godwit's datapath thread)"
        };
        match vm_cpu_row(vhost) {
            Ok((per, frames, secs, ms)) => {
                println!("| {name} | {frames} | {secs:.1} s | {per} | {ms:.2} ms/s |")
            }
            Err(e) => println!("| {name} | failed: {e} | | | |"),
        }
    }
    println!();
}
