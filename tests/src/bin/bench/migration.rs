//! `godwit-bench migration`: live migration between two network namespaces
//! joined by a veth pair (created and deleted here; addresses only inside
//! them), side by side with raw TCP throughput over the same veth and with
//! QEMU migrating an idle VM of the same size between the same namespaces.
//!
//! * godwit: the serving test guest (`godwit.mode=serve`) in namespace A
//!   with an API socket; `godwit run --incoming tcp:<B>:<port>` in namespace
//!   B. `migrate-set-parameters` sets the downtime limit and
//!   `max-bandwidth` 0 (no limit); `migrate`; `query-migrate` is polled
//!   until `completed` (the source then exits; its log line with the
//!   downtime is the fallback). The guest must go on printing heartbeats on
//!   B, continuing the source's count.
//! * Raw TCP: a Rust sender in A and receiver in B over the same veth, the
//!   guest's RAM size in 1 MiB writes, timed from connect until the receiver
//!   acknowledges the last byte.
//! * QEMU: Debian's `qemu-system-x86` (installed with apt-get when missing),
//!   `-enable-kvm -machine pc -m SIZE -nodefaults -nographic` with no boot
//!   device (SeaBIOS runs, finds nothing to boot and waits), the destination
//!   with `-incoming tcp:<B>:<port>`; `max-bandwidth` set to 100 GiB/s and the
//!   same downtime limit; `query-migrate` polled until `completed`.
//!
//! An idle guest's RAM is almost all zero pages, for both VMMs: neither
//! sends their data (godwit skips them in its first round, QEMU sends a
//! zero-page marker), so idle migrations measure how fast each VMM finds
//! the non-zero pages, not the link.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use godwit_tests::{qmp_connect, QmpClient, TempDir, TwoHosts};

use super::snapshot::{
    float_between, fmt_bytes, godwit_cmd, loadavg, mem_available_bytes, number_after, size_name,
    spawn_guest, Proc, Stream,
};
use super::{median, status_kib};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const ADDR_A: &str = "10.199.0.1";
const ADDR_B: &str = "10.199.0.2";
/// Runs per configuration, each paired with a raw TCP transfer just
/// before it; tables show the median of each column (5: one run of the
/// dirtying guest alone ranged from 0.74x to 1.67x of raw TCP).
const RUNS: usize = 5;
/// The downtime limit given to both VMMs (the target for an idle guest).
const DOWNTIME_LIMIT_MS: u64 = 10;
/// The dirtying guest: 1 GiB, a 256 MiB buffer written at this rate.
const DIRTY_RAM: u64 = GIB;
const DIRTY_BUFFER_MIB: u64 = 256;
const DIRTY_RATE: u64 = 20_000;
/// Its downtime limit: pages keep being dirtied while the last ones go.
const DIRTY_DOWNTIME_LIMIT_MS: u64 = 50;
const HEARTBEAT_MS: u64 = 100;
/// How long QEMU's source VM runs before migrating (SeaBIOS, emulated).
const QEMU_SETTLE: Duration = Duration::from_secs(3);

static PORT: AtomicU16 = AtomicU16::new(47000);

fn next_port() -> u16 {
    PORT.fetch_add(1, Ordering::Relaxed)
}

/// Namespaces A and B joined by a veth pair; deleted on drop.
struct Link {
    a: String,
    b: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

impl Link {
    fn new() -> Result<Link, String> {
        let id = std::process::id() % 100_000;
        let link = Link {
            a: format!("gwbm{id}a"),
            b: format!("gwbm{id}b"),
        };
        ip(&["netns", "add", &link.a])?;
        ip(&["netns", "add", &link.b])?;
        ip(&[
            "link", "add", "veth-a", "netns", &link.a, "type", "veth", "peer", "name", "veth-b",
            "netns", &link.b,
        ])?;
        for (ns, dev, addr) in [(&link.a, "veth-a", ADDR_A), (&link.b, "veth-b", ADDR_B)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(link)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}

/// Sends `bytes` from A to B over one TCP connection; ms from connect until
/// the receiver has acknowledged the last byte.
fn raw_tcp_ms(link: &Link, bytes: u64) -> Result<f64, String> {
    let addr = format!("{ADDR_B}:{}", next_port());
    let (ready_tx, ready_rx) = mpsc::channel();
    let listen_addr = addr.clone();
    let receiver = TwoHosts::run_in(&link.b, move || -> Result<u64, String> {
        let l = TcpListener::bind(&listen_addr).map_err(|e| format!("bind: {e}"))?;
        let _ = ready_tx.send(());
        let (mut s, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
        let mut buf = vec![0u8; MIB as usize];
        let mut n = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => n += k as u64,
                Err(e) => return Err(format!("receive: {e}")),
            }
        }
        s.write_all(&[1]).map_err(|e| format!("ack: {e}"))?;
        Ok(n)
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| "the receiver did not start".to_string())?;
    let sender = TwoHosts::run_in(&link.a, move || -> Result<Duration, String> {
        let buf = vec![0x5au8; MIB as usize];
        let start = Instant::now();
        let mut s = TcpStream::connect(&addr).map_err(|e| format!("connect: {e}"))?;
        let _ = s.set_nodelay(true);
        let mut left = bytes;
        while left > 0 {
            let n = left.min(MIB) as usize;
            s.write_all(&buf[..n]).map_err(|e| format!("send: {e}"))?;
            left -= n as u64;
        }
        s.shutdown(std::net::Shutdown::Write)
            .map_err(|e| format!("shutdown: {e}"))?;
        let mut ack = [0u8; 1];
        s.read_exact(&mut ack).map_err(|e| format!("ack: {e}"))?;
        Ok(start.elapsed())
    });
    let took = sender.join().map_err(|_| "sender panicked")??;
    let got = receiver.join().map_err(|_| "receiver panicked")??;
    if got != bytes {
        return Err(format!("received {got} of {bytes} bytes"));
    }
    Ok(took.as_secs_f64() * 1e3)
}

/// Samples `field` of /proc/PID/status until stopped; the peak in KiB.
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<u64>,
}

impl Sampler {
    fn start(pid: u32, field: &'static str) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak = 0;
            while !s.load(Ordering::Relaxed) {
                match status_kib(pid, field) {
                    Some(v) => peak = peak.max(v),
                    None => break,
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            peak
        });
        Sampler { stop, handle }
    }
    fn peak_kib(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or(0)
    }
}

/// One migration's numbers.
#[derive(Clone, Default)]
struct Mig {
    total_ms: f64,
    /// As the guest sees it (godwit: vCPUs stopped on A to running on B
    /// confirmed); QEMU reports only its own definition, below.
    downtime_ms: f64,
    /// As QEMU defines it: vCPUs stopped until the source sent the last of
    /// the state (godwit's `downtime-detail` `source-ms`).
    source_downtime_ms: f64,
    wire_bytes: u64,
    wire_mbps: f64,
    rounds: f64,
    /// Source guest RAM resident before and at most during the migration.
    ram_before_kib: u64,
    ram_peak_kib: u64,
    /// Destination-side restore (godwit) / setup time (QEMU).
    extra_ms: f64,
    /// Raw TCP time for the RAM size, measured right before this run.
    raw_ms: f64,
    /// total_ms / raw_ms of the same run.
    ratio: f64,
    note: String,
}

fn serve_cmdline(dirty: Option<(u64, u64)>) -> String {
    let mut c =
        format!("console=ttyS0 reboot=k godwit.mode=serve godwit.heartbeat_ms={HEARTBEAT_MS}");
    if let Some((mib, rate)) = dirty {
        c.push_str(&format!(" godwit.dirty={mib}M:{rate}"));
    }
    c
}

fn last_heartbeat(p: &Proc) -> u64 {
    p.seen
        .iter()
        .rev()
        .filter(|(s, _, _)| *s == Stream::Stdout)
        .find_map(|(_, l, _)| number_after(l, "heartbeat "))
        .unwrap_or(0)
}

/// How godwit's migration stream travels.
#[derive(Clone)]
struct Transport {
    name: &'static str,
    /// tls-creds-x509 directory: `tls:` on both sides.
    tls: Option<PathBuf>,
    /// The multifd capability with this many channels.
    channels: Option<u16>,
}

impl Transport {
    fn plain() -> Transport {
        Transport {
            name: "TCP",
            tls: None,
            channels: None,
        }
    }
}

fn godwit_migrate(
    link: &Link,
    dir: &Path,
    ram: u64,
    dirty: Option<(u64, u64)>,
    downtime_limit: u64,
    transport: &Transport,
) -> Result<Mig, String> {
    let port = next_port();
    let scheme = if transport.tls.is_some() {
        "tls"
    } else {
        "tcp"
    };
    let uri = format!("{scheme}:{ADDR_B}:{port}");
    let tls_dir = transport.tls.as_ref().map(|d| d.display().to_string());
    let mut dest_args = vec!["run", "--incoming", &uri, "--serial", "stdio"];
    if let Some(d) = &tls_dir {
        dest_args.extend(["--tls-dir", d.as_str()]);
    }
    let mut dest = Proc::spawn(godwit_cmd(Some(&link.b), &dest_args));
    if dest
        .wait_for(Stream::Stderr, Duration::from_secs(30), |l| {
            l.contains("waiting for an incoming migration")
        })
        .is_none()
    {
        return Err(format!("the destination did not listen:\n{}", dest.tail()));
    }
    let api = dir.join(format!("src-{port}.sock"));
    let mut src = spawn_guest(Some(&link.a), ram, &api, &serve_cmdline(dirty));
    let boot = Duration::from_secs(60);
    if src
        .wait_for(Stream::Stdout, boot, |l| l.starts_with("heartbeat "))
        .is_none()
    {
        return Err(format!("the source guest did not start:\n{}", src.tail()));
    }
    if dirty.is_some() {
        let pages = src
            .find_or_wait(Stream::Stdout, boot, |l| {
                l.starts_with("serve: dirty buffer=")
            })
            .and_then(|(l, _)| number_after(&l, "serve: dirty buffer="))
            .unwrap_or(0)
            / 4;
        loop {
            let Some((l, _)) = src.wait_for(Stream::Stdout, boot, |l| l.starts_with("dirty: "))
            else {
                return Err(format!(
                    "the guest did not fill its buffer:\n{}",
                    src.tail()
                ));
            };
            if number_after(&l, "dirty: ").unwrap_or(0) >= pages {
                break;
            }
        }
    }
    let mut qmp = qmp_connect(&api);
    let mut params = json!({"downtime-limit": downtime_limit, "max-bandwidth": 0});
    if let Some(d) = &tls_dir {
        params["tls-creds"] = json!(d);
    }
    if let Some(n) = transport.channels {
        qmp.execute(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "multifd", "state": true}]}),
        )
        .map_err(|e| format!("migrate-set-capabilities: {e}"))?;
        params["multifd-channels"] = json!(n);
    }
    qmp.execute("migrate-set-parameters", params)
        .map_err(|e| format!("migrate-set-parameters: {e}"))?;
    let ram_before_kib = status_kib(src.pid(), "RssShmem:").unwrap_or(0);
    let sampler = Sampler::start(src.pid(), "RssShmem:");
    let t0 = Instant::now();
    qmp.execute("migrate", json!({ "uri": uri }))
        .map_err(|e| format!("migrate: {e}"))?;
    let mut last = Value::Null;
    // The source ends right after completing: an error ends the polling.
    while let Ok(info) = qmp.execute("query-migrate", Value::Null) {
        let status = info["status"].as_str().unwrap_or("").to_string();
        last = info;
        if ["completed", "failed", "cancelled"].contains(&status.as_str()) {
            break;
        }
        if t0.elapsed() > Duration::from_secs(600) {
            return Err("the migration did not end within 600 s".into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let bench_ms = t0.elapsed().as_secs_f64() * 1e3;
    let ram_peak_kib = sampler.peak_kib();
    if last["status"] == "failed" || last["status"] == "cancelled" {
        return Err(format!(
            "migration {}: {}",
            last["status"],
            last["error"].as_str().unwrap_or("")
        ));
    }
    let code = src.wait_exit(Duration::from_secs(30));
    src.drain();
    let log_line = src
        .seen
        .iter()
        .find(|(s, l, _)| *s == Stream::Stderr && l.contains("the guest runs on the destination"))
        .map(|(_, l, _)| l.clone());
    let Some(log_line) = log_line else {
        return Err(format!(
            "the source did not report completion (exit {code:?}):\n{}",
            src.tail()
        ));
    };
    let src_beat = last_heartbeat(&src);
    let dest_beat = dest
        .wait_for(Stream::Stdout, Duration::from_secs(30), |l| {
            l.starts_with("heartbeat ")
        })
        .and_then(|(l, _)| number_after(&l, "heartbeat "));
    let note = match dest_beat {
        Some(n) if n > src_beat => format!("heartbeat {src_beat} on A, then {n} on B"),
        Some(n) => {
            return Err(format!(
                "B's first heartbeat {n} does not continue A's {src_beat}"
            ))
        }
        None => return Err(format!("no heartbeat on B:\n{}", dest.tail())),
    };
    dest.kill();
    let completed = last["status"] == "completed";
    let downtime_ms = last["downtime-ms"]
        .as_f64()
        .or_else(|| float_between(&log_line, "(downtime ", " ms"))
        .unwrap_or(f64::NAN);
    let source_downtime_ms = last["downtime-detail"]["source-ms"]
        .as_f64()
        .or_else(|| float_between(&log_line, "ms: ", " ms until the state was sent"))
        .unwrap_or(f64::NAN);
    Ok(Mig {
        source_downtime_ms,
        total_ms: if completed {
            last["total-time-ms"].as_f64().unwrap_or(bench_ms)
        } else {
            bench_ms
        },
        downtime_ms,
        wire_bytes: last["transferred-bytes"].as_u64().unwrap_or(0),
        wire_mbps: last["throughput-mbps"].as_f64().unwrap_or(f64::NAN),
        rounds: last["rounds"].as_f64().unwrap_or(f64::NAN),
        ram_before_kib,
        ram_peak_kib,
        extra_ms: float_between(&log_line, "destination restore ", " ms").unwrap_or(f64::NAN),
        note,
        ..Mig::default()
    })
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

/// QEMU's binary, installed from Debian (`qemu-system-x86`) when missing.
fn ensure_qemu() -> Result<PathBuf, String> {
    if let Some(q) = find_in_path("qemu-system-x86_64") {
        return Ok(q);
    }
    println!("qemu-system-x86_64 is missing: installing Debian's qemu-system-x86 (apt-get install -y --no-install-recommends qemu-system-x86)\n");
    let install = || {
        Command::new("apt-get")
            .args([
                "install",
                "-y",
                "--no-install-recommends",
                "qemu-system-x86",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
    };
    let mut out = install().map_err(|e| format!("cannot run apt-get: {e}"))?;
    if !out.status.success() {
        let _ = Command::new("apt-get").arg("update").output();
        out = install().map_err(|e| format!("cannot run apt-get: {e}"))?;
    }
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(3).collect();
        return Err(format!(
            "apt-get install qemu-system-x86 failed: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
        ));
    }
    find_in_path("qemu-system-x86_64")
        .ok_or_else(|| "qemu-system-x86 installed but qemu-system-x86_64 not found".into())
}

fn qemu_version(qemu: &Path) -> String {
    Command::new(qemu)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "?".into())
}

fn qemu_cmd(
    qemu: &Path,
    ns: &str,
    ram: u64,
    qmp: &Path,
    incoming: Option<&str>,
    tls: Option<&Path>,
) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(qemu).args([
        "-enable-kvm",
        "-machine",
        "pc",
        "-m",
        &format!("{}M", ram / MIB),
        "-nodefaults",
        "-nographic",
        "-qmp",
        &format!("unix:{},server=on,wait=off", qmp.display()),
    ]);
    if let Some(dir) = tls {
        let endpoint = if incoming.is_some() {
            "server"
        } else {
            "client"
        };
        c.args([
            "-object",
            &format!(
                "tls-creds-x509,id=tls0,dir={},endpoint={endpoint}",
                dir.display()
            ),
        ]);
    }
    if let Some(uri) = incoming {
        // With TLS the credentials are set before listening.
        c.args(["-incoming", if tls.is_some() { "defer" } else { uri }]);
    }
    c
}

fn qemu_qmp(p: &mut Proc, path: &Path) -> Result<QmpClient, String> {
    match QmpClient::connect_retry(path, Duration::from_secs(20)) {
        Ok(c) => Ok(c),
        Err(e) => Err(format!(
            "QEMU's QMP socket {}: {e}; QEMU said:\n{}",
            path.display(),
            p.tail()
        )),
    }
}

fn qemu_migrate(
    qemu: &Path,
    link: &Link,
    dir: &Path,
    ram: u64,
    tls: Option<&Path>,
) -> Result<Mig, String> {
    let port = next_port();
    let uri = format!("tcp:{ADDR_B}:{port}");
    let (qa, qb) = (
        dir.join(format!("qemu-a-{port}.sock")),
        dir.join(format!("qemu-b-{port}.sock")),
    );
    let mut dest = Proc::spawn(qemu_cmd(qemu, &link.b, ram, &qb, Some(&uri), tls));
    let mut qmp_b = qemu_qmp(&mut dest, &qb)?;
    if tls.is_some() {
        qmp_b
            .execute("migrate-set-parameters", json!({"tls-creds": "tls0"}))
            .map_err(|e| format!("QEMU destination migrate-set-parameters: {e}"))?;
        qmp_b
            .execute("migrate-incoming", json!({ "uri": uri }))
            .map_err(|e| format!("QEMU migrate-incoming: {e}"))?;
    }
    let mut src = Proc::spawn(qemu_cmd(qemu, &link.a, ram, &qa, None, tls));
    let mut qmp = qemu_qmp(&mut src, &qa)?;
    std::thread::sleep(QEMU_SETTLE);
    let status = qmp
        .execute("query-status", Value::Null)
        .map_err(|e| format!("query-status: {e}"))?;
    if status["status"] != "running" {
        return Err(format!("QEMU's source VM is {status}, not running"));
    }
    let mut params = json!({"downtime-limit": DOWNTIME_LIMIT_MS, "max-bandwidth": 100 * GIB});
    if tls.is_some() {
        params["tls-creds"] = json!("tls0");
    }
    qmp.execute("migrate-set-parameters", params)
        .map_err(|e| format!("migrate-set-parameters: {e}"))?;
    // QEMU's guest RAM is anonymous memory of the QEMU process.
    let ram_before_kib = status_kib(src.pid(), "RssAnon:").unwrap_or(0);
    let sampler = Sampler::start(src.pid(), "RssAnon:");
    qmp.execute("migrate", json!({ "uri": uri }))
        .map_err(|e| format!("migrate: {e}"))?;
    let t0 = Instant::now();
    let info = loop {
        let info = qmp
            .execute("query-migrate", Value::Null)
            .map_err(|e| format!("query-migrate: {e}"))?;
        match info["status"].as_str() {
            Some("completed") => break info,
            Some("failed") | Some("cancelled") => {
                return Err(format!("QEMU migration {}: {info}", info["status"]))
            }
            _ => {}
        }
        if t0.elapsed() > Duration::from_secs(600) {
            return Err("QEMU's migration did not end within 600 s".into());
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let ram_peak_kib = sampler.peak_kib();
    // The destination runs the guest once the migration completes.
    let mut dest_status = Value::Null;
    for _ in 0..200 {
        dest_status = qmp_b
            .execute("query-status", Value::Null)
            .unwrap_or(Value::Null);
        if dest_status["status"] == "running" {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let r = &info["ram"];
    let note = format!(
        "B {}; {} zero pages, {} normal pages",
        dest_status["status"].as_str().unwrap_or("?"),
        r["duplicate"],
        r["normal"]
    );
    src.kill();
    dest.kill();
    Ok(Mig {
        total_ms: info["total-time"].as_f64().unwrap_or(f64::NAN),
        // QEMU's downtime ends when its source sent the last of the state;
        // it has no guest-side figure.
        downtime_ms: f64::NAN,
        source_downtime_ms: info["downtime"].as_f64().unwrap_or(f64::NAN),
        wire_bytes: r["transferred"].as_u64().unwrap_or(0),
        wire_mbps: r["mbps"].as_f64().unwrap_or(f64::NAN),
        rounds: r["dirty-sync-count"].as_f64().unwrap_or(f64::NAN),
        ram_before_kib,
        ram_peak_kib,
        extra_ms: info["setup-time"].as_f64().unwrap_or(f64::NAN),
        note,
        ..Mig::default()
    })
}

/// Median of each column over the runs.
fn median_mig(runs: &[Mig]) -> Mig {
    let col = |f: &dyn Fn(&Mig) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
    Mig {
        total_ms: col(&|m| m.total_ms),
        downtime_ms: col(&|m| m.downtime_ms),
        source_downtime_ms: col(&|m| m.source_downtime_ms),
        wire_bytes: col(&|m| m.wire_bytes as f64) as u64,
        wire_mbps: col(&|m| m.wire_mbps),
        rounds: col(&|m| m.rounds),
        ram_before_kib: col(&|m| m.ram_before_kib as f64) as u64,
        ram_peak_kib: col(&|m| m.ram_peak_kib as f64) as u64,
        extra_ms: col(&|m| m.extra_ms),
        raw_ms: col(&|m| m.raw_ms),
        ratio: col(&|m| m.ratio),
        note: runs.last().map(|m| m.note.clone()).unwrap_or_default(),
    }
}

/// Runs `f` [`RUNS`] times, each right after a raw TCP transfer of `ram`
/// bytes over the same veth (so that both see the same host load); every
/// raw time goes to `raw`.
fn repeat(
    what: &str,
    link: &Link,
    ram: u64,
    raw: &mut Vec<(u64, f64)>,
    mut f: impl FnMut() -> Result<Mig, String>,
) -> Option<Mig> {
    let mut runs = Vec::new();
    for i in 0..RUNS {
        let raw_ms = match raw_tcp_ms(link, ram) {
            Ok(ms) => ms,
            Err(e) => {
                println!("- raw TCP {}: failed: {e}\n", size_name(ram));
                f64::NAN
            }
        };
        raw.push((ram, raw_ms));
        match f() {
            Ok(mut m) => {
                m.raw_ms = raw_ms;
                m.ratio = m.total_ms / raw_ms;
                runs.push(m);
            }
            Err(e) => {
                println!("- {what}, run {}: failed: {e}\n", i + 1);
                return None;
            }
        }
    }
    Some(median_mig(&runs))
}

struct Row {
    scenario: String,
    vmm: &'static str,
    ram: u64,
    idle: bool,
    mig: Mig,
}

pub fn bench_migration() {
    println!("## migration: live migration between two namespaces joined by a veth\n");
    let link = match Link::new() {
        Ok(l) => l,
        Err(e) => {
            println!("skipped: cannot create the namespaces: {e}\n");
            return;
        }
    };
    let dir = TempDir::new("bench-migration");
    let qemu = ensure_qemu();
    println!(
        "Namespaces {} ({ADDR_A}) and {} ({ADDR_B}), one veth pair (MTU 1500). Median of {RUNS} runs per row, each column on its own. godwit: `migrate-set-parameters` downtime-limit {DOWNTIME_LIMIT_MS} ms for idle guests ({DIRTY_DOWNTIME_LIMIT_MS} ms for the dirtying one), max-bandwidth 0 (unlimited). QEMU: {}, `-enable-kvm -machine pc -nodefaults -nographic`, no boot device, migrated {} s after start, downtime-limit {DOWNTIME_LIMIT_MS} ms, max-bandwidth 100 GiB/s; installed on demand with `apt-get install -y qemu-system-x86` when missing.\n",
        link.a,
        link.b,
        match &qemu {
            Ok(q) => qemu_version(q),
            Err(_) => "not available".into(),
        },
        QEMU_SETTLE.as_secs()
    );
    if let Err(e) = &qemu {
        println!("QEMU cannot run here: {e}\n");
    }

    println!("Host load average at the start: {}.\n", loadavg());
    let mut raw: Vec<(u64, f64)> = Vec::new();
    let mut rows: Vec<Row> = Vec::new();
    for ram in [GIB, 4 * GIB] {
        let avail = mem_available_bytes();
        if avail < 2 * ram + GIB {
            println!(
                "- {} guests: skipped: {} of host memory available, {} needed (source and destination RAM)\n",
                size_name(ram),
                fmt_bytes(avail),
                fmt_bytes(2 * ram + GIB)
            );
            continue;
        }
        let name = format!("idle {}", size_name(ram));
        if let Some(m) = repeat(&format!("godwit {name}"), &link, ram, &mut raw, || {
            godwit_migrate(
                &link,
                dir.path(),
                ram,
                None,
                DOWNTIME_LIMIT_MS,
                &Transport::plain(),
            )
        }) {
            rows.push(Row {
                scenario: name.clone(),
                vmm: "godwit",
                ram,
                idle: true,
                mig: m,
            });
        }
        if let Ok(q) = &qemu {
            if let Some(m) = repeat(&format!("QEMU {name}"), &link, ram, &mut raw, || {
                qemu_migrate(q, &link, dir.path(), ram, None)
            }) {
                rows.push(Row {
                    scenario: name,
                    vmm: "QEMU",
                    ram,
                    idle: true,
                    mig: m,
                });
            }
        }
    }
    let name = format!(
        "{} dirtying {DIRTY_BUFFER_MIB} MiB at {DIRTY_RATE} pages/s",
        size_name(DIRTY_RAM)
    );
    if let Some(m) = repeat(
        &format!("godwit {name}"),
        &link,
        DIRTY_RAM,
        &mut raw,
        || {
            godwit_migrate(
                &link,
                dir.path(),
                DIRTY_RAM,
                Some((DIRTY_BUFFER_MIB, DIRTY_RATE)),
                DIRTY_DOWNTIME_LIMIT_MS,
                &Transport::plain(),
            )
        },
    ) {
        rows.push(Row {
            scenario: name,
            vmm: "godwit",
            ram: DIRTY_RAM,
            idle: false,
            mig: m,
        });
    }

    println!("### Raw TCP between the namespaces (Rust sender and receiver, 1 MiB writes)\n");
    println!("One transfer of the RAM size right before every migration run.\n");
    println!("| bytes | transfers | median time | median throughput | range |");
    println!("|---|---|---|---|---|");
    for size in [GIB, 4 * GIB] {
        let mut t: Vec<f64> = raw
            .iter()
            .filter(|(b, ms)| *b == size && ms.is_finite())
            .map(|(_, ms)| *ms)
            .collect();
        if t.is_empty() {
            continue;
        }
        let gbit = |ms: f64| size as f64 * 8.0 / 1e9 / (ms / 1e3);
        let (lo, hi) = (
            t.iter().copied().fold(f64::INFINITY, f64::min),
            t.iter().copied().fold(0.0, f64::max),
        );
        let m = median(&mut t);
        println!(
            "| {} | {} | {m:.0} ms | {:.2} Gbit/s | {:.2}-{:.2} Gbit/s |",
            size_name(size),
            t.len(),
            gbit(m),
            gbit(hi),
            gbit(lo)
        );
    }

    println!("\n### Migration\n");
    println!("Target total time: 1.25 x (RAM size / raw TCP throughput) = 1.25 x the raw TCP time for the RAM size, taken run by run against the transfer just before (median of the per-run ratios). Target downtime for an idle guest: at most QEMU's in the same run (aim: 2 ms). Downtime is given two ways: as QEMU defines it (vCPUs stopped until the source sent the last of the state; QEMU reports whole milliseconds) and, for godwit, as the guest sees it (vCPUs stopped on A until B confirmed that its vCPUs run, B's restore and the handoff's round trip included).\n");
    println!("| guest | VMM | total time | / raw TCP time of the RAM size (target <= 1.25x) | downtime as QEMU defines it | downtime as the guest sees it | bytes on the wire | wire throughput | RAM size / total time | rounds (QEMU: dirty syncs) | source guest RAM resident: before -> peak | dest. restore (godwit) / setup (QEMU) | check |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let m = &r.mig;
        let ratio = m.ratio;
        let total_verdict = if ratio <= 1.25 { "met" } else { "**missed**" };
        let source_down = format!("{:.1} ms", m.source_downtime_ms);
        let down = if m.downtime_ms.is_nan() {
            "not reported".to_string()
        } else if r.idle {
            format!("{:.1} ms", m.downtime_ms)
        } else {
            format!(
                "{:.1} ms (limit {DIRTY_DOWNTIME_LIMIT_MS} ms)",
                m.downtime_ms
            )
        };
        println!(
            "| {} | {} | {:.0} ms | {:.2}x ({total_verdict}) | {source_down} | {down} | {} | {:.1} Mbit/s | {:.2} Gbit/s | {:.0} | {} -> {} | {:.1} ms | {} |",
            r.scenario,
            r.vmm,
            m.total_ms,
            ratio,
            fmt_bytes(m.wire_bytes),
            m.wire_mbps,
            r.ram as f64 * 8.0 / 1e9 / (m.total_ms / 1e3),
            m.rounds,
            fmt_bytes(m.ram_before_kib * 1024),
            fmt_bytes(m.ram_peak_kib * 1024),
            m.extra_ms,
            m.note
        );
    }
    let godwit_vs_qemu: Vec<String> = rows
        .iter()
        .filter(|r| r.vmm == "godwit" && r.idle)
        .filter_map(|g| {
            let q = rows
                .iter()
                .find(|q| q.vmm == "QEMU" && q.scenario == g.scenario)?;
            let as_qemu = g.mig.source_downtime_ms / q.mig.source_downtime_ms;
            let as_guest = g.mig.downtime_ms / q.mig.source_downtime_ms;
            Some(format!(
                "- {}: godwit / QEMU total time {:.2}x ({}); downtime as QEMU defines it {:.2}x ({}); godwit's downtime as the guest sees it / QEMU's {:.2}x ({})",
                g.scenario,
                g.mig.total_ms / q.mig.total_ms,
                if g.mig.total_ms < q.mig.total_ms {
                    "faster: met"
                } else {
                    "slower: **missed**"
                },
                as_qemu,
                if as_qemu <= 1.0 { "met" } else { "**missed**" },
                as_guest,
                if as_guest <= 1.0 { "met" } else { "**missed**" },
            ))
        })
        .collect();
    println!("\nHost load average at the end: {}.", loadavg());
    if !godwit_vs_qemu.is_empty() {
        println!("\nAgainst QEMU (targets: total time faster, downtime at most QEMU's):\n");
        for l in godwit_vs_qemu {
            println!("{l}");
        }
    }
    println!();
}

/// `godwit-bench migration-tls`: the same namespaces, 1 GiB guests idle and
/// dirtying, migrated over plain TCP, mutual TLS, and TLS with 2 multifd
/// channels, beside QEMU over plain TCP and over TLS (`tls-creds-x509`).
pub fn bench_migration_tls() {
    println!("## migration-tls: live migration over TLS and multifd, beside plain TCP and QEMU\n");
    let link = match Link::new() {
        Ok(l) => l,
        Err(e) => {
            println!("skipped: cannot create the namespaces: {e}\n");
            return;
        }
    };
    let dir = TempDir::new("bench-migration-tls");
    // One CA for both roles; the server certificate names B's address.
    let creds = godwit_tests::tls_creds::good_creds_for(&dir.join("creds"), ADDR_B);
    let qemu = ensure_qemu();
    println!(
        "Namespaces {} ({ADDR_A}) and {} ({ADDR_B}), one veth pair. Median of {RUNS} runs per row. godwit: downtime-limit {DOWNTIME_LIMIT_MS} ms idle, {DIRTY_DOWNTIME_LIMIT_MS} ms dirtying, max-bandwidth 0; TLS: `--incoming tls:` with `--tls-dir`, `tls-creds` on the source (TLS 1.3, rustls with ring, both certificates ECDSA P-256 from rcgen); multifd: capability on, `multifd-channels` 2. QEMU: {}, the same machine as the `migration` section; TLS: `-object tls-creds-x509,id=tls0,dir=DIR,endpoint=server|client` over the same directory, `-incoming defer` then `migrate-set-parameters {{\"tls-creds\": \"tls0\"}}` and `migrate-incoming` on B, `tls-creds` tls0 on A.\n",
        link.a,
        link.b,
        match &qemu {
            Ok(q) => qemu_version(q),
            Err(_) => "not available".into(),
        },
    );
    if let Err(e) = &qemu {
        println!("QEMU cannot run here: {e}\n");
    }
    println!("Host load average at the start: {}.\n", loadavg());
    let transports = [
        Transport::plain(),
        Transport {
            name: "TLS",
            tls: Some(creds.clone()),
            channels: None,
        },
        Transport {
            name: "TLS, multifd 2 channels",
            tls: Some(creds.clone()),
            channels: Some(2),
        },
    ];
    let idle = format!("idle {}", size_name(GIB));
    let dirtying = format!(
        "{} dirtying {DIRTY_BUFFER_MIB} MiB at {DIRTY_RATE} pages/s",
        size_name(DIRTY_RAM)
    );
    let mut raw = Vec::new();
    // (scenario, VMM, transport, numbers)
    let mut rows: Vec<(String, &'static str, &'static str, Mig)> = Vec::new();
    for (scenario, dirty, limit) in [
        (&idle, None, DOWNTIME_LIMIT_MS),
        (
            &dirtying,
            Some((DIRTY_BUFFER_MIB, DIRTY_RATE)),
            DIRTY_DOWNTIME_LIMIT_MS,
        ),
    ] {
        for t in &transports {
            let what = format!("godwit {scenario} over {}", t.name);
            if let Some(m) = repeat(&what, &link, GIB, &mut raw, || {
                godwit_migrate(&link, dir.path(), GIB, dirty, limit, t)
            }) {
                rows.push((scenario.clone(), "godwit", t.name, m));
            }
        }
    }
    if let Ok(q) = &qemu {
        for (name, tls) in [("TCP", None), ("TLS", Some(creds.as_path()))] {
            let what = format!("QEMU {idle} over {name}");
            if let Some(m) = repeat(&what, &link, GIB, &mut raw, || {
                qemu_migrate(q, &link, dir.path(), GIB, tls)
            }) {
                rows.push((idle.clone(), "QEMU", name, m));
            }
        }
    }
    let mut t: Vec<f64> = raw
        .iter()
        .map(|(_, ms)| *ms)
        .filter(|ms| ms.is_finite())
        .collect();
    if !t.is_empty() {
        let m = median(&mut t);
        println!(
            "Raw TCP, 1 GiB in 1 MiB writes, once before every run: median {m:.0} ms ({:.2} Gbit/s) over {} transfers.\n",
            GIB as f64 * 8.0 / 1e9 / (m / 1e3),
            t.len()
        );
    }
    let plain = |scenario: &str, vmm: &str| {
        rows.iter()
            .find(|(s, v, t, _)| s == scenario && *v == vmm && *t == "TCP")
            .map(|r| r.3.total_ms)
    };
    println!("| guest | VMM | stream | total time | / the same VMM over plain TCP | downtime (as QEMU defines it) | bytes on the wire | wire throughput | rounds (QEMU: dirty syncs) | check |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (scenario, vmm, stream, m) in &rows {
        let ratio = plain(scenario, vmm).map_or(f64::NAN, |p| m.total_ms / p);
        println!(
            "| {scenario} | {vmm} | {stream} | {:.0} ms | {ratio:.2}x | {:.1} ms | {} | {:.1} Mbit/s | {:.0} | {} |",
            m.total_ms,
            m.source_downtime_ms,
            fmt_bytes(m.wire_bytes),
            m.wire_mbps,
            m.rounds,
            m.note
        );
    }
    println!("\nHost load average at the end: {}.\n", loadavg());
    println!("Targets:\n");
    for (scenario, vmm, stream, m) in &rows {
        if *vmm != "godwit" || *stream == "TCP" {
            continue;
        }
        if let Some(p) = plain(scenario, "godwit") {
            let r = m.total_ms / p;
            println!(
                "- {scenario}, godwit over {stream} / over plain TCP: {r:.2}x (target <= 1.1x: {})",
                if r <= 1.1 { "met" } else { "**missed**" }
            );
        }
        if let Some(q) = rows
            .iter()
            .find(|(s, v, t, _)| s == scenario && *v == "QEMU" && *t == "TLS")
        {
            let r = m.total_ms / q.3.total_ms;
            println!(
                "- {scenario}, godwit over {stream} / QEMU over TLS: {r:.2}x (target: faster: {})",
                if r < 1.0 { "met" } else { "**missed**" }
            );
        }
    }
    println!();
}
