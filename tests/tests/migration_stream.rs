//! A hostile migration source against `godwit run --incoming`: the
//! destination refuses what does not fit, says why, never panics, never
//! allocates what a message merely claims, and never deletes what lies at
//! its listening path.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use godwit_migration::format::FORMAT_VERSION;
use godwit_migration::protocol::{
    encode_runs, read_message, write_json, write_message, Hello, HelloReply, Kind, PageRun,
    PAGE_SIZE,
};
use godwit_tests::{RunningVm, TempDir};
use godwit_vmm::vstate::memory::ram_ranges;
use godwit_vmm::vstate::state::vcpu::host_cpuid;
use godwit_vmm::vstate::vm::open_kvm;

const GUEST_RAM: u64 = 1 << 30;

/// A Hello this host accepts: the newest machine type, no devices, this
/// host's own CPUID.
fn acceptable_hello() -> Hello {
    let kvm = open_kvm().expect("open /dev/kvm");
    Hello {
        godwit_version: env!("CARGO_PKG_VERSION").to_string(),
        format_version: FORMAT_VERSION,
        machine_type: "godwit".to_string(),
        memory_size: GUEST_RAM,
        vcpus: 1,
        memory_layout: ram_ranges(GUEST_RAM)
            .iter()
            .map(|r| (r.guest_addr, r.size))
            .collect(),
        devices: Vec::new(),
        cpuid: host_cpuid(&kvm, 1).expect("host CPUID"),
        kvm_caps: Vec::new(),
        multifd: None,
    }
}

fn connect(path: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("cannot reach the destination at {}: {e}", path.display()),
        }
    }
}

/// A destination that accepted our Hello, and the stream to it.
fn accepted_destination(dir: &TempDir) -> (RunningVm, UnixStream) {
    let sock = dir.join("incoming.sock");
    let uri = format!("unix:{}", sock.display());
    let vm = RunningVm::spawn(&["run", "--incoming", &uri]);
    let mut conn = connect(&sock);
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write_json(&mut conn, Kind::Hello, &acceptable_hello()).expect("send Hello");
    let reply: HelloReply = read_message(&mut conn)
        .and_then(|m| m.json())
        .expect("HelloReply");
    assert!(reply.accept, "the destination refused: {:?}", reply.reasons);
    (vm, conn)
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[test]
fn page_runs_whose_total_wraps_end_the_migration_with_a_message() {
    let dir = TempDir::new("mig-wrap");
    let (mut vm, mut conn) = accepted_destination(&dir);
    // 2^20 runs of 2^32-1 pages plus one of 2^20+1: 2^64 + 4096 bytes,
    // which wraps to the one page of data that follows.
    let mut runs = vec![
        PageRun {
            gpa: 0,
            pages: u32::MAX,
        };
        1 << 20
    ];
    runs.push(PageRun {
        gpa: 0,
        pages: (1 << 20) + 1,
    });
    let payload = encode_runs(&runs, &[0x55; PAGE_SIZE as usize]);
    write_message(&mut conn, Kind::Pages, &payload).expect("send Pages");
    let (status, stderr) = vm.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "stderr:\n{stderr}");
    assert!(stderr.contains("cover more than"), "stderr:\n{stderr}");
}

#[test]
fn a_zero_page_run_over_all_of_ram_allocates_nothing_of_its_size() {
    let dir = TempDir::new("mig-zero");
    let (mut vm, mut conn) = accepted_destination(&dir);
    let runs = [PageRun {
        gpa: 0,
        pages: (ram_ranges(GUEST_RAM)[0].size / PAGE_SIZE) as u32,
    }];
    write_message(&mut conn, Kind::ZeroPages, &encode_runs(&runs, &[])).expect("send ZeroPages");
    let round_end = serde_json::json!({"round": 0, "pages": runs[0].pages});
    write_json(&mut conn, Kind::RoundEnd, &round_end).expect("send RoundEnd");
    // The destination now waits for the next message; its high-water mark
    // already covers the zero run.
    std::thread::sleep(Duration::from_secs(2));
    let peak = peak_rss_kib(vm.pid());
    drop(conn);
    let (status, stderr) = vm.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "stderr:\n{stderr}");
    assert!(
        peak < 128 << 10,
        "peak RSS {peak} KiB after a zero run over a 1 GiB guest's RAM"
    );
}

#[test]
fn incoming_on_a_regular_file_leaves_it_alone() {
    let dir = TempDir::new("mig-file");
    let path = dir.join("not-a-socket");
    std::fs::write(&path, b"precious").unwrap();
    let uri = format!("unix:{}", path.display());
    let mut vm = RunningVm::spawn(&["run", "--incoming", &uri]);
    let (status, stderr) = vm.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "stderr:\n{stderr}");
    assert!(stderr.contains("is not a socket"), "stderr:\n{stderr}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}
