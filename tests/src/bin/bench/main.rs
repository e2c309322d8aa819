//! godwit's benchmarks. `make bench` runs them all; results are copied into
//! BENCHMARKS.md together with this command line.
//!
//! Each benchmark prints a table whose rows compare against a baseline or a
//! target measured or stated in the same run, as ratios.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use godwit_tests::godwit_bin;

mod migration;
mod mq;
mod net;
mod planner;
mod snapshot;
mod tunnel;
mod vhost_user;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

struct BootSample {
    released_ms: f64,
    first_byte_ms: f64,
    poweroff_ms: f64,
    vmm_rss_kib: u64,
    guest_rss_kib: u64,
}

fn boot_once(vcpus: u32) -> BootSample {
    let start = Instant::now();
    let mut child = Command::new(godwit_bin())
        .args([
            "run",
            "--vcpus",
            &vcpus.to_string(),
            "--memory",
            "128M",
            "--serial",
            "stdio",
        ])
        .env("GODWIT_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn godwit");
    let pid = child.id();
    let stderr = child.stderr.take().expect("stderr");
    let released = std::thread::spawn(move || {
        let mut at = None;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if at.is_none() && line.contains("vCPUs released") {
                at = Some(start.elapsed());
            }
        }
        at
    });
    let mut stdout = child.stdout.take().expect("stdout");
    let sampler = std::thread::spawn(move || {
        let (mut vmm, mut guest) = (0, 0);
        while let (Some(anon), Some(file)) =
            (status_kib(pid, "RssAnon:"), status_kib(pid, "RssFile:"))
        {
            vmm = vmm.max(anon + file);
            guest = guest.max(status_kib(pid, "RssShmem:").unwrap_or(0));
            std::thread::sleep(Duration::from_millis(2));
        }
        (vmm, guest)
    });
    let mut first = [0u8; 1];
    stdout.read_exact(&mut first).expect("first serial byte");
    let first_byte = start.elapsed();
    let mut rest = Vec::new();
    let _ = stdout.read_to_end(&mut rest);
    let status = child.wait().expect("wait");
    let poweroff = start.elapsed();
    assert!(status.success(), "godwit failed: {status}");
    let (vmm_rss_kib, guest_rss_kib) = sampler.join().unwrap_or((0, 0));
    let released = released.join().ok().flatten().unwrap_or(first_byte);
    BootSample {
        released_ms: released.as_secs_f64() * 1e3,
        first_byte_ms: first_byte.as_secs_f64() * 1e3,
        poweroff_ms: poweroff.as_secs_f64() * 1e3,
        vmm_rss_kib,
        guest_rss_kib,
    }
}

fn spawn_baseline_ms() -> f64 {
    let start = Instant::now();
    Command::new("true").status().expect("run true");
    start.elapsed().as_secs_f64() * 1e3
}

/// `godwit-kvm-floor`, next to this benchmark's own binary (`cargo build
/// --release`, as `make bench` does, builds it).
fn floor_bin() -> std::path::PathBuf {
    let bin = godwit_bin().with_file_name("godwit-kvm-floor");
    assert!(
        bin.exists(),
        "{} does not exist: build the workspace first (`cargo build --release`)",
        bin.display()
    );
    bin
}

/// Process spawn to the floor program's `vCPUs released` line (right
/// before its first KVM_RUN), read from its stderr as godwit's is.
fn floor_once(memory: &str) -> f64 {
    let start = Instant::now();
    let mut child = Command::new(floor_bin())
        .args(["--memory", memory])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn godwit-kvm-floor");
    let stderr = child.stderr.take().expect("stderr");
    let mut at = None;
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        if at.is_none() && line.contains("vCPUs released") {
            at = Some(start.elapsed());
        }
    }
    let status = child.wait().expect("wait");
    assert!(status.success(), "godwit-kvm-floor failed: {status}");
    at.expect("the floor program's 'vCPUs released' line")
        .as_secs_f64()
        * 1e3
}

fn bench_boot() {
    const RUNS: usize = 20;
    println!("## boot: built-in test guest, 128 MiB, median of {RUNS} runs\n");
    println!("Floor: `godwit-kvm-floor --memory 128M` (tests/src/bin/kvm_floor.rs): opens /dev/kvm, creates a VM, 128 MiB memfd mapped shared as one memory slot, an in-kernel irqchip, one vCPU, logs `vCPUs released` and enters KVM_RUN. godwit (1 and 2 vCPUs), the floor and `true` run round-robin, one of each in turn.\n");
    println!("| vCPUs | process start -> vCPUs released | / floor (target <= 1.5x) | -> first serial byte | -> poweroff (exit) | VMM RSS (anon+file) | guest RAM touched | floor -> vCPUs released | spawn of `true` |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut samples: [Vec<BootSample>; 2] = [Vec::new(), Vec::new()];
    let mut floors = Vec::new();
    let mut spawns = Vec::new();
    for _ in 0..RUNS {
        for (i, vcpus) in [1u32, 2].into_iter().enumerate() {
            samples[i].push(boot_once(vcpus));
        }
        floors.push(floor_once("128M"));
        spawns.push(spawn_baseline_ms());
    }
    let floor = median(&mut floors);
    let base = median(&mut spawns);
    for (vcpus, samples) in [1u32, 2].into_iter().zip(&samples) {
        let col =
            |f: &dyn Fn(&BootSample) -> f64| median(&mut samples.iter().map(f).collect::<Vec<_>>());
        let released = col(&|s| s.released_ms);
        let first = col(&|s| s.first_byte_ms);
        let off = col(&|s| s.poweroff_ms);
        let vmm = col(&|s| s.vmm_rss_kib as f64) / 1024.0;
        let guest = col(&|s| s.guest_rss_kib as f64) / 1024.0;
        let ratio = released / floor;
        println!(
            "| {vcpus} | {released:.2} ms ({:.2}x the 10 ms target) | {ratio:.2}x ({}) | {first:.2} ms | {off:.2} ms | {vmm:.2} MiB ({:.2}x the 10 MiB target) | {guest:.2} MiB | {floor:.2} ms | {base:.2} ms |",
            released / 10.0,
            if ratio <= 1.5 { "met" } else { "**missed**" },
            vmm / 10.0
        );
    }
    println!();
}

fn main() {
    let which = std::env::args().nth(1).unwrap_or_else(|| "all".to_string());
    let all = which == "all";
    if all || which == "boot" {
        bench_boot();
    }
    if all || which == "net" {
        net::bench_net();
    }
    if all || which == "snapshot" {
        snapshot::bench_snapshot();
    }
    if all || which == "restore" {
        snapshot::bench_restore();
    }
    if all || which == "migration" {
        migration::bench_migration();
    }
    if all || which == "migration-tls" {
        migration::bench_migration_tls();
    }
    if all || which == "planner" {
        planner::bench_planner();
    }
    if all || which == "vhost-user" {
        vhost_user::bench_vhost_user();
    }
    if all || which == "tunnel" {
        tunnel::bench_tunnel();
    }
    if all || which == "mq" {
        mq::bench_mq();
    }
    if !all
        && ![
            "boot",
            "net",
            "snapshot",
            "restore",
            "migration",
            "migration-tls",
            "planner",
            "vhost-user",
            "tunnel",
            "mq",
        ]
        .contains(&which.as_str())
    {
        eprintln!("unknown benchmark '{which}': use boot, net, snapshot, restore, migration, migration-tls, planner, vhost-user, tunnel, mq or all");
        std::process::exit(2);
    }
}
