//! `godwit-bench snapshot`: snapshot time and restore-to-running time for
//! 256 MiB, 1 GiB and 4 GiB guests, against the disk's own sequential write
//! speed measured in the same run and directory.
//!
//! The guest is the built-in test guest in serve mode with `godwit.dirty`
//! over (nearly) all of its RAM, so that the memory file holds real data:
//! the benchmark waits until the guest's `dirty:` count shows every page of
//! the buffer written once. The guest allocates below 3 GiB only, so a 4 GiB
//! guest fills about 3 GiB; the table gives the bytes actually written (the
//! memory file is sparse: zero pages are holes).
//!
//! * Snapshot: `snapshot-save` through the API; its own `total_ms`,
//!   `paused_ms` and `data_bytes`. Baseline: the same number of bytes written
//!   sequentially (8 MiB writes) to a new file in the same directory, then
//!   `fsync`, in the same run.
//! * Restore: `godwit run --restore DIR` with `GODWIT_LOG=info`, timed from
//!   process spawn to its `vCPUs released` log line (and to the guest's first
//!   `heartbeat` console line), for `--restore-memory map` (the default) and
//!   `copy`, with the memory file in the page cache (warm: just written or
//!   read) and evicted from it (cold: `posix_fadvise(DONTNEED)` on the
//!   snapshot's files only). Baseline: a fresh boot of a VM of the same size
//!   to the same log line.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use godwit_tests::{qmp_connect, TempDir};

use super::median;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Guest RAM sizes measured.
const SIZES: [u64; 3] = [256 * MIB, GIB, 4 * GIB];
/// Pages per second the guest dirties: its first pass over the buffer is
/// bounded by first-touch faults, later passes keep this rate.
const DIRTY_RATE: u64 = 200_000;
const HEARTBEAT_MS: u64 = 100;
/// Runs per restore configuration (the median is shown): `map` restores
/// are cheap, `copy` restores of a 3 GiB file take seconds each.
const RESTORE_RUNS_MAP: usize = 11;
const RESTORE_RUNS_COPY: usize = 3;
/// Runs of the fresh-boot baseline.
const BOOT_RUNS: usize = 11;

pub(crate) fn size_name(bytes: u64) -> String {
    if bytes >= GIB && bytes.is_multiple_of(GIB) {
        format!("{} GiB", bytes / GIB)
    } else {
        format!("{} MiB", bytes / MIB)
    }
}

pub(crate) fn fmt_bytes(bytes: u64) -> String {
    if bytes >= GIB {
        format!("{:.2} GiB", bytes as f64 / GIB as f64)
    } else if bytes >= MIB {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

/// MB/s (10^6 bytes per second).
fn mb_s(bytes: u64, ms: f64) -> f64 {
    bytes as f64 / 1e6 / (ms / 1e3)
}

/// Which output of a process a line came from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

/// A child process whose output lines arrive with the time they were read,
/// measured from just before the spawn. Killed on drop.
pub(crate) struct Proc {
    pub child: Option<Child>,
    lines: Receiver<(Stream, String, Duration)>,
    /// Every line read so far.
    pub seen: Vec<(Stream, String, Duration)>,
}

impl Proc {
    pub fn spawn(mut cmd: Command) -> Proc {
        let start = Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send((Stream::Stdout, line, start.elapsed())).is_err() {
                    break;
                }
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx2.send((Stream::Stderr, line, start.elapsed())).is_err() {
                    break;
                }
            }
        });
        Proc {
            child: Some(child),
            lines,
            seen: Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// The next new line on `stream` for which `pick` says yes, with its time.
    pub fn wait_for(
        &mut self,
        stream: Stream,
        timeout: Duration,
        pick: impl Fn(&str) -> bool,
    ) -> Option<(String, Duration)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (s, line, at) = self.lines.recv_timeout(left).ok()?;
            self.seen.push((s, line.clone(), at));
            if s == stream && pick(&line) {
                return Some((line, at));
            }
        }
    }

    /// Like [`Proc::wait_for`], but also looks at the lines already seen.
    pub fn find_or_wait(
        &mut self,
        stream: Stream,
        timeout: Duration,
        pick: impl Fn(&str) -> bool,
    ) -> Option<(String, Duration)> {
        if let Some((_, l, at)) = self.seen.iter().find(|(s, l, _)| *s == stream && pick(l)) {
            return Some((l.clone(), *at));
        }
        self.wait_for(stream, timeout, pick)
    }

    /// Takes the lines that arrived without waiting.
    pub fn drain(&mut self) {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
    }

    /// Waits up to `timeout` for the process to end; its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                std::thread::sleep(Duration::from_millis(50));
                self.drain();
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The last lines, for a failure message.
    pub fn tail(&mut self) -> String {
        self.drain();
        let from = self.seen.len().saturating_sub(25);
        self.seen[from..]
            .iter()
            .map(|(s, l, _)| format!("{s:?}: {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The test guest with `ram` bytes of memory, an API socket `api`, its
/// console on stdout and command line `cmdline`, in namespace `ns` if given.
pub(crate) fn spawn_guest(ns: Option<&str>, ram: u64, api: &Path, cmdline: &str) -> Proc {
    let (mem, api_s) = (format!("{}M", ram / MIB), api.display().to_string());
    Proc::spawn(godwit_cmd(
        ns,
        &[
            "run",
            "--memory",
            &mem,
            "--api-socket",
            &api_s,
            "--serial",
            "stdio",
            "--cmdline",
            cmdline,
        ],
    ))
}

/// `godwit ARGS` with `GODWIT_LOG=info`, inside namespace `ns` if given.
pub(crate) fn godwit_cmd(ns: Option<&str>, args: &[&str]) -> Command {
    let mut cmd = godwit_tests::godwit_command(ns, args);
    cmd.env("GODWIT_LOG", "info");
    cmd
}

/// The number after `prefix` at the start of `line`.
pub(crate) fn number_after(line: &str, prefix: &str) -> Option<u64> {
    line.trim()
        .strip_prefix(prefix)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The float right before `unit` after `marker` in `line`
/// (e.g. "restored X in 1.2 ms" with marker " in ", unit " ms").
pub(crate) fn float_between(line: &str, marker: &str, unit: &str) -> Option<f64> {
    let rest = &line[line.rfind(marker)? + marker.len()..];
    rest[..rest.find(unit)?].trim().parse().ok()
}

fn free_disk_bytes(dir: &Path) -> u64 {
    let c = std::ffi::CString::new(dir.as_os_str().to_string_lossy().as_bytes()).unwrap();
    // SAFETY: statvfs writes into a zeroed struct we own; `c` is a valid
    // NUL-terminated path.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) != 0 {
            return 0;
        }
        s.f_bavail as u64 * s.f_frsize as u64
    }
}

pub(crate) fn mem_available_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            let l = t.lines().find(|l| l.starts_with("MemAvailable:"))?;
            l.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .unwrap_or(0)
        * 1024
}

/// The `df` line of the filesystem holding `dir`.
fn df_line(dir: &Path) -> String {
    Command::new("df")
        .args(["-h", "--output=source,fstype,size,avail,target"])
        .arg(dir)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .nth(1)
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_else(|| "?".into())
}

/// Drops `path`'s pages from the page cache (they are clean: the save
/// fsynced them). Only this file is affected.
fn evict(path: &Path) {
    if let Ok(f) = File::open(path) {
        // SAFETY: fadvise on an open descriptor we own; it only drops
        // clean cached pages of this file.
        unsafe {
            libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    }
}

/// Reads `path` once, so that its pages are in the page cache.
fn warm(path: &Path) {
    if let Ok(mut f) = File::open(path) {
        let mut buf = vec![0u8; 8 << 20];
        while matches!(f.read(&mut buf), Ok(n) if n > 0) {}
    }
}

/// Writes `bytes` (a non-zero pattern) sequentially to a new file and
/// fsyncs it; the time in ms. The file is removed afterwards.
fn disk_write_ms(path: &Path, bytes: u64) -> f64 {
    let chunk: Vec<u8> = (0..8 * MIB as usize).map(|i| (i % 251) as u8 | 1).collect();
    let start = Instant::now();
    let mut f = File::create(path).expect("create disk-speed file");
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n]).expect("write disk-speed file");
        left -= n as u64;
    }
    f.sync_all().expect("fsync disk-speed file");
    drop(f);
    let ms = start.elapsed().as_secs_f64() * 1e3;
    let _ = std::fs::remove_file(path);
    ms
}

struct SnapResult {
    ram: u64,
    buffer_bytes: u64,
    fill_s: f64,
    data_bytes: u64,
    zero_pages: u64,
    total_ms: f64,
    paused_ms: f64,
    api_ms: f64,
    disk_ms: f64,
}

/// Boots a guest of `ram` bytes that writes a buffer of `fill` bytes (the
/// guest caps it to its free RAM), saves it to `snap`; an error saying why
/// when it could not.
fn take_snapshot(dir: &TempDir, ram: u64, fill: u64, snap: &Path) -> Result<SnapResult, String> {
    let api = dir.join("api.sock");
    let mib = fill / MIB;
    let cmdline = format!(
        "console=ttyS0 reboot=k godwit.mode=serve godwit.heartbeat_ms={HEARTBEAT_MS} godwit.dirty={mib}M:{DIRTY_RATE}"
    );
    let mut vm = spawn_guest(None, ram, &api, &cmdline);
    let Some((line, _)) = vm.wait_for(Stream::Stdout, Duration::from_secs(60), |l| {
        l.starts_with("serve: dirty buffer=")
    }) else {
        return Err(format!("the guest did not start dirtying:\n{}", vm.tail()));
    };
    let kib = number_after(&line, "serve: dirty buffer=").unwrap_or(0);
    let pages = kib / 4;
    let fill_start = Instant::now();
    // The first pass faults every page in; allow ~40 us per page.
    let budget = Duration::from_secs(60 + pages / 25_000);
    loop {
        let left = budget.saturating_sub(fill_start.elapsed());
        let Some((l, _)) = vm.wait_for(Stream::Stdout, left, |l| l.starts_with("dirty: ")) else {
            return Err(format!(
                "the guest did not fill its {kib} KiB buffer within {budget:?}:\n{}",
                vm.tail()
            ));
        };
        if number_after(&l, "dirty: ").unwrap_or(0) >= pages {
            break;
        }
    }
    let fill_s = fill_start.elapsed().as_secs_f64();
    let mut qmp = qmp_connect(&api);
    qmp.set_timeout(Duration::from_secs(600));
    let t = Instant::now();
    let stats = qmp
        .execute("snapshot-save", json!({ "dir": snap }))
        .map_err(|e| format!("snapshot-save failed: {e}"))?;
    let api_ms = t.elapsed().as_secs_f64() * 1e3;
    let _ = qmp.execute("quit", Value::Null);
    if vm.wait_exit(Duration::from_secs(30)) != Some(0) {
        eprintln!("snapshot: the source did not quit cleanly:\n{}", vm.tail());
    }
    vm.kill();
    let data_bytes = stats["data_bytes"].as_u64().unwrap_or(0);
    let disk_ms = disk_write_ms(&dir.join("disk-speed.bin"), data_bytes);
    Ok(SnapResult {
        ram,
        buffer_bytes: kib * 1024,
        fill_s,
        data_bytes,
        zero_pages: stats["zero_pages"].as_u64().unwrap_or(0),
        total_ms: stats["total_ms"].as_f64().unwrap_or(f64::NAN),
        paused_ms: stats["paused_ms"].as_f64().unwrap_or(f64::NAN),
        api_ms,
        disk_ms,
    })
}

/// One timed start: process spawn to `vCPUs released`, to the first
/// heartbeat, and godwit's own "restored ... in X ms".
struct StartSample {
    released_ms: f64,
    heartbeat_ms: f64,
    internal_ms: f64,
}

fn timed_start(args: &[&str], heartbeat: bool) -> Result<StartSample, String> {
    let mut p = Proc::spawn(godwit_cmd(None, args));
    let timeout = Duration::from_secs(120);
    let Some((_, released)) = p.wait_for(Stream::Stderr, timeout, |l| l.contains("vCPUs released"))
    else {
        return Err(format!("no 'vCPUs released':\n{}", p.tail()));
    };
    let internal_ms = p
        .seen
        .iter()
        .find(|(s, l, _)| *s == Stream::Stderr && l.contains("restored "))
        .and_then(|(_, l, _)| float_between(l, " in ", " ms"))
        .unwrap_or(f64::NAN);
    let heartbeat_ms = if heartbeat {
        match p.find_or_wait(Stream::Stdout, timeout, |l| l.starts_with("heartbeat ")) {
            Some((_, at)) => at.as_secs_f64() * 1e3,
            None => return Err(format!("no heartbeat after restore:\n{}", p.tail())),
        }
    } else {
        f64::NAN
    };
    p.kill();
    Ok(StartSample {
        released_ms: released.as_secs_f64() * 1e3,
        heartbeat_ms,
        internal_ms,
    })
}

struct RestoreRow {
    mode: &'static str,
    cache: &'static str,
    released_ms: f64,
    internal_ms: f64,
    heartbeat_ms: f64,
}

/// The restore configurations and the fresh boot of the same size, run
/// round-robin (one run of each in turn) so that load changes on the host
/// touch them all alike; the rows and the boot baseline's median.
fn restore_rows(snap: &Path, ram: u64) -> Result<(Vec<RestoreRow>, f64), String> {
    let mem_file = snap.join("memory.gwm");
    let state_file = snap.join("state.gws");
    let snap_s = snap.display().to_string();
    let mem = format!("{}M", ram / MIB);
    let configs = [
        ("map", "warm", RESTORE_RUNS_MAP),
        ("copy", "warm", RESTORE_RUNS_COPY),
        ("map", "cold", RESTORE_RUNS_MAP),
        ("copy", "cold", RESTORE_RUNS_COPY),
    ];
    let mut samples: Vec<Vec<StartSample>> = configs.iter().map(|_| Vec::new()).collect();
    let mut boots = Vec::new();
    let rounds = RESTORE_RUNS_MAP.max(RESTORE_RUNS_COPY).max(BOOT_RUNS);
    for round in 0..rounds {
        for (i, &(mode, cache, runs)) in configs.iter().enumerate() {
            if round >= runs {
                continue;
            }
            if cache == "warm" {
                warm(&mem_file);
                warm(&state_file);
            } else {
                evict(&mem_file);
                evict(&state_file);
            }
            samples[i].push(timed_start(
                &[
                    "run",
                    "--restore",
                    &snap_s,
                    "--restore-memory",
                    mode,
                    "--serial",
                    "stdio",
                ],
                true,
            )?);
        }
        if round < BOOT_RUNS {
            if let Ok(s) = timed_start(&["run", "--memory", &mem, "--serial", "null"], false) {
                boots.push(s.released_ms);
            }
        }
    }
    let rows = configs
        .iter()
        .zip(&samples)
        .map(|(&(mode, cache, _), samples)| {
            let col = |f: &dyn Fn(&StartSample) -> f64| {
                median(&mut samples.iter().map(f).collect::<Vec<_>>())
            };
            RestoreRow {
                mode,
                cache,
                released_ms: col(&|s| s.released_ms),
                internal_ms: col(&|s| s.internal_ms),
                heartbeat_ms: col(&|s| s.heartbeat_ms),
            }
        })
        .collect();
    let boot = if boots.is_empty() {
        f64::NAN
    } else {
        median(&mut boots)
    };
    Ok((rows, boot))
}

/// The host's load average, for the record (other work on the machine
/// shows up in the times).
pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

pub fn bench_snapshot() {
    let dir = TempDir::new("bench-snapshot");
    println!("## snapshot: snapshot and restore of the serving test guest with most of its RAM written\n");
    println!(
        "Directory {} on `{}` (memory file, state file and the disk-speed file all there). Guest: `godwit.mode=serve godwit.heartbeat_ms={HEARTBEAT_MS} godwit.dirty=<RAM>:{DIRTY_RATE}` (the guest caps the buffer to its free RAM below 3 GiB), snapshot taken once every page of the buffer was written. Restore: median of {RESTORE_RUNS_MAP} runs per `map` row and {RESTORE_RUNS_COPY} per `copy` row, from process spawn; fresh boot: median of {BOOT_RUNS}; the configurations and the fresh boot run round-robin.\n",
        dir.path().display(),
        df_line(dir.path())
    );
    println!("Host load average at the start: {}.", loadavg());
    let mut snaps = Vec::new();
    let mut restores: Vec<(u64, Vec<RestoreRow>, f64)> = Vec::new();
    for &ram in &SIZES {
        let free = free_disk_bytes(dir.path());
        // The memory file (at most the RAM) and the disk-speed file of the
        // same size exist one after the other; keep 2 GiB spare.
        let need_disk = 2 * ram + 2 * GIB;
        let avail = mem_available_bytes();
        // Guest RAM, then the file in the page cache and a copy-mode memfd.
        let need_mem = 2 * ram + GIB;
        if free < need_disk {
            println!(
                "- {}: skipped: {} free on the disk, {} needed (memory file + disk-speed file + 2 GiB)",
                size_name(ram),
                fmt_bytes(free),
                fmt_bytes(need_disk)
            );
            continue;
        }
        if avail < need_mem {
            println!(
                "- {}: skipped: {} of host memory available, {} needed",
                size_name(ram),
                fmt_bytes(avail),
                fmt_bytes(need_mem)
            );
            continue;
        }
        let snap = dir.join(&format!("snap-{}", ram / MIB));
        match take_snapshot(&dir, ram, ram, &snap) {
            Ok(s) => {
                match restore_rows(&snap, ram) {
                    Ok((rows, boot)) => restores.push((ram, rows, boot)),
                    Err(e) => println!("- {}: restore failed: {e}", size_name(ram)),
                }
                snaps.push(s);
            }
            Err(e) => println!("- {}: snapshot failed: {e}", size_name(ram)),
        }
        let _ = std::fs::remove_dir_all(&snap);
    }

    println!("Host load average at the end: {}.", loadavg());
    println!("\n### Snapshot (`snapshot-save`) against the disk's sequential write speed\n");
    println!("| guest RAM | guest buffer filled (time) | data written (non-zero pages) | zero pages (holes) | snapshot total | guest paused | API round trip | snapshot write rate | disk: same bytes, write + fsync | ratio (target >= 0.80) |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for s in &snaps {
        let snap_rate = mb_s(s.data_bytes, s.total_ms);
        let disk_rate = mb_s(s.data_bytes, s.disk_ms);
        let ratio = snap_rate / disk_rate;
        println!(
            "| {} | {} ({:.1} s) | {} | {} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} MB/s | {:.0} ms = {:.0} MB/s | {:.2}x {} |",
            size_name(s.ram),
            fmt_bytes(s.buffer_bytes),
            s.fill_s,
            fmt_bytes(s.data_bytes),
            s.zero_pages,
            s.total_ms,
            s.paused_ms,
            s.api_ms,
            snap_rate,
            s.disk_ms,
            disk_rate,
            ratio,
            if ratio >= 0.8 { "(met)" } else { "(**missed**)" }
        );
    }

    println!("\n### Restore to running (`godwit run --restore`)\n");
    println!("| guest RAM | memory | memory file | -> vCPUs released | vs 10 ms target | godwit's own restore time | -> first heartbeat | fresh boot of the same size -> vCPUs released |");
    println!("|---|---|---|---|---|---|---|---|");
    for (ram, rows, boot) in &restores {
        for r in rows {
            let ok = if r.released_ms <= 10.0 {
                "met"
            } else {
                "**missed**"
            };
            println!(
                "| {} | {} | {} | {:.2} ms | {:.2}x ({ok}) | {:.2} ms | {:.1} ms | {:.2} ms |",
                size_name(*ram),
                r.mode,
                if r.cache == "warm" {
                    "in page cache"
                } else {
                    "evicted"
                },
                r.released_ms,
                r.released_ms / 10.0,
                r.internal_ms,
                r.heartbeat_ms,
                boot
            );
        }
    }
    // Flatness: the largest against the smallest size, per configuration.
    if restores.len() >= 2 {
        let (first, last) = (&restores[0], &restores[restores.len() - 1]);
        println!(
            "\nGrowth with guest size, {} -> {} (target: nearly flat):",
            size_name(first.0),
            size_name(last.0)
        );
        for (a, b) in first.1.iter().zip(&last.1) {
            println!(
                "- {} / {}: vCPUs released {:.2} -> {:.2} ms ({:.2}x); first heartbeat {:.1} -> {:.1} ms ({:.2}x)",
                a.mode,
                if a.cache == "warm" {
                    "in page cache"
                } else {
                    "evicted"
                },
                a.released_ms,
                b.released_ms,
                b.released_ms / a.released_ms,
                a.heartbeat_ms,
                b.heartbeat_ms,
                b.heartbeat_ms / a.heartbeat_ms
            );
        }
    }
    println!("\nFirecracker's published restore figure (not measured here): under 8 ms.\n");
}

/// Runs of each side of the restore-vs-boot comparison.
const RESTORE_VS_BOOT_RUNS: usize = 21;

/// `godwit-bench restore`: issue 17's restore target. A 1 GiB guest with
/// 512 MiB of its RAM written is snapshotted; then `godwit run --restore`
/// (`map`, memory file in the page cache) and a fresh boot of a 1 GiB VM run
/// round-robin, each timed from spawn to `vCPUs released`.
pub fn bench_restore() {
    let dir = TempDir::new("bench-restore");
    let (ram, fill) = (GIB, 512 * MIB);
    println!("## restore: `godwit run --restore` of a 1 GiB snapshot (512 MiB written) against a fresh boot of a 1 GiB VM\n");
    println!("Host load average at the start: {}.", loadavg());
    let snap = dir.join("snap");
    let s = match take_snapshot(&dir, ram, fill, &snap) {
        Ok(s) => s,
        Err(e) => {
            println!("- snapshot failed: {e}");
            return;
        }
    };
    let snap_s = snap.display().to_string();
    let mem = format!("{}M", ram / MIB);
    let (mut restores, mut internal, mut boots) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..RESTORE_VS_BOOT_RUNS {
        warm(&snap.join("memory.gwm"));
        warm(&snap.join("state.gws"));
        match timed_start(&["run", "--restore", &snap_s, "--serial", "null"], false) {
            Ok(r) => {
                restores.push(r.released_ms);
                internal.push(r.internal_ms);
            }
            Err(e) => {
                println!("- restore failed: {e}");
                return;
            }
        }
        match timed_start(&["run", "--memory", &mem, "--serial", "null"], false) {
            Ok(b) => boots.push(b.released_ms),
            Err(e) => {
                println!("- fresh boot failed: {e}");
                return;
            }
        }
    }
    println!("Host load average at the end: {}.\n", loadavg());
    let (r, i, b) = (
        median(&mut restores),
        median(&mut internal),
        median(&mut boots),
    );
    let ratio = r / b;
    println!("| snapshot data written | restore -> vCPUs released | godwit's own restore time | fresh boot 1 GiB -> vCPUs released | restore / fresh boot (target <= 1.0x) |");
    println!("|---|---|---|---|---|");
    println!(
        "| {} | {r:.2} ms | {i:.2} ms | {b:.2} ms | {ratio:.2}x ({}) |",
        fmt_bytes(s.data_bytes),
        if ratio <= 1.0 { "met" } else { "**missed**" }
    );
    println!("\nMedians of {RESTORE_VS_BOOT_RUNS} runs each, round-robin (one restore, one boot, in turn); memory file in the page cache, `--restore-memory map` (the default).\n");
    let _ = std::fs::remove_dir_all(&snap);
}
