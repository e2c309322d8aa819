//! System-call filters: every thread of a running VM is filtered by
//! default, and a thread that makes a call outside its list stops godwit
//! with a message naming the thread and the call.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use godwit_tests::guest::spawn_serving;
use godwit_tests::{
    godwit_command, qmp_connect, serve_cmdline, wait_with_deadline, NetHost, TempDir, BOOT,
};

/// `godwit run`'s exit status after a forbidden call (README).
const EXIT_SECCOMP: i32 = 159;

/// Each thread of `pid` as (name, value of the `Seccomp:` line).
fn thread_seccomp_modes(pid: u32) -> Vec<(String, String)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("list the threads");
    let mut modes = Vec::new();
    for task in tasks.map_while(Result::ok) {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        modes.push((field("Name:"), field("Seccomp:")));
    }
    modes.sort();
    modes
}

#[test]
fn every_thread_of_a_running_vm_is_filtered() {
    let host = NetHost::new(true, 130);
    let dir = TempDir::new("seccomp-threads");
    let socket = dir.join("api.sock");
    let cmdline = serve_cmdline(100, &host.guest_ip_param());
    let mut vm = spawn_serving(
        Some(&host.ns),
        &["--vcpus", "2"],
        &host.tap_net(""),
        &cmdline,
        Some(&socket),
    );
    vm.wait_line("heartbeat 2", BOOT);
    // A management client adds its reader and writer threads.
    let mut qmp = qmp_connect(&socket);
    assert_eq!(
        qmp.execute("query-status", Value::Null).unwrap()["status"],
        "running"
    );
    host.assert_ping(
        &host.guest_ip(),
        1,
        "the guest answers through its TAP datapath",
    );
    let modes = thread_seccomp_modes(vm.pid());
    let names: Vec<&str> = modes.iter().map(|(n, _)| n.as_str()).collect();
    for expected in ["vcpu0", "vcpu1", "console", "api-accept", "signals"] {
        assert!(names.contains(&expected), "no thread {expected}: {modes:?}");
    }
    assert!(names.iter().any(|n| n.starts_with("gw-net-")), "{modes:?}");
    // The default machine type's second queue pair has a thread of its own
    // (its ending, when the VM quits, must stay inside its filter too).
    assert!(names.iter().any(|n| n.starts_with("gw-net1-")), "{modes:?}");
    assert!(names.iter().any(|n| n.starts_with("api-conn")), "{modes:?}");
    for (name, mode) in &modes {
        assert_eq!(mode, "2", "thread {name} is not filtered: {modes:?}");
    }
    qmp.execute("quit", Value::Null).unwrap();
    let (status, stderr) = vm.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{stderr}");
}

#[test]
fn seccomp_off_leaves_the_threads_unfiltered() {
    let dir = TempDir::new("seccomp-off");
    let socket = dir.join("api.sock");
    let mut vm = godwit_tests::RunningVm::spawn(&[
        "run",
        "--seccomp",
        "off",
        "--api-socket",
        socket.to_str().unwrap(),
        "--cmdline",
        &serve_cmdline(100, ""),
    ]);
    vm.wait_line("heartbeat 1", BOOT);
    let modes = thread_seccomp_modes(vm.pid());
    assert!(modes.iter().all(|(_, m)| m == "0"), "{modes:?}");
    let mut qmp = qmp_connect(&socket);
    qmp.execute("quit", Value::Null).unwrap();
    let (status, stderr) = vm.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{stderr}");
}

/// Runs a serving VM whose first thread of `kind` makes a forbidden call
/// (the GODWIT_SECCOMP_SELFTEST test hook); `client` connects to its API
/// so that the API's threads start. Returns godwit's stderr.
fn forbidden_call_in(kind: &str, client: bool) -> String {
    let dir = TempDir::new("seccomp-selftest");
    let socket = dir.join("api.sock");
    let child = godwit_command(
        None,
        &[
            "run",
            "--api-socket",
            socket.to_str().unwrap(),
            "--cmdline",
            &serve_cmdline(100, ""),
        ],
    )
    .env("GODWIT_SECCOMP_SELFTEST", kind)
    .stdin(Stdio::piped())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn godwit");
    if client {
        connect_once(&socket);
    }
    let done = wait_with_deadline(child, BOOT);
    assert_eq!(done.code(), Some(EXIT_SECCOMP), "{kind}: {done:?}");
    done.stderr
}

/// Connects to the API socket once it exists (the connection may be cut
/// at once: the thread that serves it is the one stopped).
fn connect_once(socket: &Path) {
    for _ in 0..600 {
        if let Ok(s) = std::os::unix::net::UnixStream::connect(socket) {
            std::thread::sleep(Duration::from_millis(500));
            drop(s);
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the API socket {} never appeared", socket.display());
}

#[test]
fn a_forbidden_call_stops_godwit_naming_the_thread_and_the_call() {
    let getppid = libc::SYS_getppid;
    for (kind, thread, client) in [
        ("vcpu", "vcpu0", false),
        ("console", "console", false),
        ("serial-stdin", "serial-stdin", false),
        ("main", "main", false),
        ("main-loop", "main", false),
        ("signals", "signals", false),
        ("api-accept", "api-accept", false),
        ("api-reader", "api-conn1-rd", true),
        ("api-writer", "api-conn1-wr", true),
    ] {
        let stderr = forbidden_call_in(kind, client);
        let expected = format!(
            "godwit: seccomp: thread '{thread}' ({kind}) made the forbidden system call {getppid} "
        );
        assert!(stderr.contains(&expected), "{kind}: {stderr}");
        assert!(!stderr.contains("panicked"), "{kind}: {stderr}");
    }
}

#[test]
fn a_forbidden_call_on_the_tap_datapath_is_stopped_too() {
    let host = NetHost::new(true, 131);
    let cmdline = serve_cmdline(100, &host.guest_ip_param());
    let argv = ["run", "--net", &host.tap_net(""), "--cmdline", &cmdline];
    let child = godwit_command(Some(&host.ns), &argv)
        .env("GODWIT_SECCOMP_SELFTEST", "net-datapath")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn godwit");
    let done = wait_with_deadline(child, BOOT);
    assert_eq!(done.code(), Some(EXIT_SECCOMP), "{done:?}");
    assert!(
        done.stderr
            .contains("(net-datapath) made the forbidden system call"),
        "{done:?}"
    );
}

#[test]
fn every_thread_of_a_net_backend_and_its_vm_is_filtered() {
    let host = NetHost::new(true, 132);
    let dir = TempDir::new("seccomp-backend");
    let socket = dir.join("backend.sock");
    let socket_s = socket.to_str().unwrap();
    let backend = godwit_command(
        Some(&host.ns),
        &["net-backend", "--socket", socket_s, "--tap", &host.tap],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("spawn godwit net-backend");
    let backend = KillOnDrop(backend);
    // The socket is made after the filter is installed.
    godwit_tests::netns::wait_for_path(&socket, BOOT, "godwit net-backend");
    let net = format!("vhost-user,socket={socket_s},queues=1");
    let cmdline = serve_cmdline(100, &host.guest_ip_param());
    // vhost-user carries no feature bit above 63: godwit-1.1, not 1.2.
    let vm = spawn_serving(None, &["--machine", "godwit-1.1"], &net, &cmdline, None);
    host.assert_ping(&host.guest_ip(), 1, "the guest answers through the backend");
    for pid in [backend.0.id(), vm.pid()] {
        let modes = thread_seccomp_modes(pid);
        assert!(modes.len() > 1, "{modes:?}");
        for (name, mode) in &modes {
            assert_eq!(
                mode, "2",
                "thread {name} of {pid} is not filtered: {modes:?}"
            );
        }
    }
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
