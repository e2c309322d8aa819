//! Planner benchmark: `godwit plan` over 1,000 host reports (time and
//! memory), in process and as the command, against a one-report baseline.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use serde_json::Value;

use godwit_tests::{godwit_bin, TempDir};
use godwit_vmm::planning::host_caps::parse_report;
use godwit_vmm::planning::planner::{self, HostInput};

use crate::median;

const HOSTS: usize = 1000;
const RUNS: usize = 20;

/// 1,000 reports made from the recorded fixtures: a third each of
/// full-offload TAP hosts, TAP hosts without USO (another CPU) and hosts
/// with a godwit vhost-user backend that only knows interface v1, each
/// with its own name.
fn reports() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/host-caps");
    let kinds: Vec<Value> = ["full-tap", "tap-no-uso", "backend-v1"]
        .iter()
        .map(|n| {
            let text = std::fs::read_to_string(dir.join(format!("{n}.json")))
                .expect("read a fixture report");
            serde_json::from_str(&text).expect("a fixture report is JSON")
        })
        .collect();
    (0..HOSTS)
        .map(|i| {
            let mut v = kinds[i % kinds.len()].clone();
            v["host"]["name"] = Value::from(format!("host{i:04}"));
            (
                format!("host{i:04}.json"),
                serde_json::to_string_pretty(&v).expect("serialize"),
            )
        })
        .collect()
}

fn parse_all(texts: &[(String, String)]) -> Vec<HostInput> {
    texts
        .iter()
        .map(|(file, text)| HostInput {
            file: file.clone(),
            report: parse_report(text, file).expect("a valid report"),
        })
        .collect()
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs `godwit ARGS`; returns (wall ms, peak RSS KiB, exit code). The
/// peak is the child's own VmHWM (its high-water mark since exec), sampled
/// until it exits: `ru_maxrss` would also count the benchmark's pages, which
/// a vfork-spawned child carries into exec.
fn run_measured(args: &[String]) -> (f64, u64, i32) {
    let start = Instant::now();
    let mut child = Command::new(godwit_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn godwit");
    let pid = child.id();
    let mut peak = 0;
    let status = loop {
        if let Some(kib) = vm_hwm_kib(pid) {
            peak = peak.max(kib);
        }
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => std::thread::sleep(std::time::Duration::from_micros(100)),
            Err(e) => panic!("waiting for godwit: {e}"),
        }
    };
    let elapsed = start.elapsed().as_secs_f64() * 1e3;
    (elapsed, peak, status.code().unwrap_or(-1))
}

pub fn bench_planner() {
    let texts = reports();
    let bytes: usize = texts.iter().map(|(_, t)| t.len()).sum();
    println!(
        "## planner: {HOSTS} host reports ({:.1} MiB of JSON), median of {RUNS} runs\n",
        bytes as f64 / (1 << 20) as f64
    );

    // In process: reading (parse + every field checked) and planning.
    let mut parse_ms = Vec::new();
    let mut plan_ms = Vec::new();
    let mut vm_ms = Vec::new();
    let mut plan = None;
    for _ in 0..RUNS {
        let t = Instant::now();
        let hosts = parse_all(&texts);
        parse_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let p = planner::plan(&hosts, &[]).expect("a plan");
        plan_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let vm = planner::VmView {
            source: "bench".into(),
            machine: "godwit-1.1".into(),
            devices: vec![planner::VmDevice {
                id: "net0".into(),
                kind: godwit_vmm::planning::host_caps::PeerKind::Tap,
                offered: godwit_vmm::abi::machine_types::newest().net_features(),
                acked: 0,
                interface: None,
            }],
            blockers: Vec::new(),
            cpuid: Some(hosts[0].report.cpuid.entries.clone()),
        };
        let t = Instant::now();
        let v = planner::plan_vm(&hosts, &vm).expect("a VM plan");
        vm_ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(!v.ok, "a third of the hosts lack USO");
        plan = Some(p);
    }
    let p = plan.expect("at least one run");
    assert!(p.ok, "the reports have a common ABI");
    let (parse, plan_t, vm_t) = (
        median(&mut parse_ms),
        median(&mut plan_ms),
        median(&mut vm_ms),
    );

    // The command: files on disk, read, planned, printed as JSON.
    let dir = TempDir::new("bench-plan");
    let mut paths = Vec::new();
    for (file, text) in &texts {
        let path = dir.join(file);
        std::fs::write(&path, text).expect("write a report");
        paths.push(path.display().to_string());
    }
    let cli = |n: usize| {
        let mut args = vec!["plan".to_string(), "--json".to_string()];
        args.extend(paths.iter().take(n).cloned());
        let mut wall = Vec::new();
        let mut rss = Vec::new();
        for _ in 0..RUNS {
            let (ms, kib, code) = run_measured(&args);
            assert_eq!(code, 0, "godwit plan over {n} report(s)");
            wall.push(ms);
            rss.push(kib as f64);
        }
        (median(&mut wall), median(&mut rss) / 1024.0)
    };
    let (one_ms, one_mib) = cli(1);
    let (all_ms, all_mib) = cli(HOSTS);

    println!("| what | {HOSTS} reports | 1 report (baseline) | per report |");
    println!("|---|---|---|---|");
    println!(
        "| in process: read every report (JSON parse + every field checked) | {parse:.2} ms | | {:.1} us |",
        parse * 1e3 / HOSTS as f64
    );
    println!(
        "| in process: plan a new VM (machine type, overrides, CPU groups) | {plan_t:.3} ms | | {:.2} us |",
        plan_t * 1e3 / HOSTS as f64
    );
    println!(
        "| in process: judge an existing VM (features, machine type, CPUID per host) | {vm_t:.3} ms | | {:.2} us |",
        vm_t * 1e3 / HOSTS as f64
    );
    println!(
        "| `godwit plan --json` (process start to exit) | {all_ms:.1} ms | {one_ms:.1} ms | {:.1} us |",
        (all_ms - one_ms) * 1e3 / (HOSTS - 1) as f64
    );
    println!(
        "| `godwit plan --json` peak RSS | {all_mib:.1} MiB | {one_mib:.1} MiB | {:.1} KiB |",
        (all_mib - one_mib) * 1024.0 / (HOSTS - 1) as f64
    );
    println!();
    println!(
        "Plan: {} over {HOSTS} hosts, overrides {}, CPU start hosts {}.\n",
        p.machine.as_deref().unwrap_or("-"),
        p.devices
            .first()
            .map(|d| d.overrides.join(","))
            .unwrap_or_default(),
        p.cpu.start_on.len()
    );
}
