//! SIGTERM and SIGINT end godwit in order (exit status 128 + the signal,
//! API socket, snapshot staging directories and an incoming migration's
//! socket removed), and a closed standard output ends a command quietly.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use godwit_tests::{
    godwit_command, qmp_connect, serve_cmdline, wait_with_deadline, RunningVm, TempDir, BOOT,
};

fn send(pid: u32, signal: i32) {
    let pid = i32::try_from(pid).expect("pid");
    // SAFETY: kill only sends a signal to the godwit this test started.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "kill {pid}");
}

fn serving_vm(dir: &TempDir, memory: &str) -> RunningVm {
    let socket = dir.join("api.sock");
    let mut vm = RunningVm::spawn(&[
        "run",
        "--memory",
        memory,
        "--api-socket",
        socket.to_str().unwrap(),
        "--cmdline",
        &serve_cmdline(100, ""),
    ]);
    vm.wait_line("heartbeat 1", BOOT);
    vm
}

/// Names in `dir` that godwit made for itself (snapshot staging).
fn leftovers(dir: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for entry in walk(dir) {
        let name = entry.file_name().map(|n| n.to_string_lossy().into_owned());
        if let Some(name) = name.filter(|n| n.contains("godwit-tmp") || n.contains(".tmp-")) {
            names.push(name);
        }
    }
    names
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut all = Vec::new();
    for e in std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .map_while(Result::ok)
    {
        let p = e.path();
        if p.is_dir() {
            all.extend(walk(&p));
        }
        all.push(p);
    }
    all
}

fn terminate_running_vm(signal: i32) {
    let dir = TempDir::new("signal-run");
    let socket = dir.join("api.sock");
    let mut vm = serving_vm(&dir, "128M");
    let mut qmp = qmp_connect(&socket);
    vm.wait_line("heartbeat 3", BOOT);
    send(vm.pid(), signal);
    let event = qmp
        .wait_event("SHUTDOWN", Duration::from_secs(20))
        .expect("a SHUTDOWN event");
    assert_eq!(
        event["data"],
        json!({"guest": false, "reason": "host-signal"}),
        "{event}"
    );
    let (status, stderr) = vm.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(128 + signal), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!socket.exists(), "the API socket is left behind");
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );
}

#[test]
fn sigterm_shuts_a_running_vm_down_in_order() {
    terminate_running_vm(libc::SIGTERM);
}

#[test]
fn sigint_shuts_a_running_vm_down_in_order() {
    terminate_running_vm(libc::SIGINT);
}

#[test]
fn sigterm_during_a_snapshot_save_leaves_no_temporary_files() {
    let dir = TempDir::new("signal-snapshot");
    let socket = dir.join("api.sock");
    let snap = dir.join("snap");
    // Enough memory that the save is still writing when the signal comes.
    let mut vm = serving_vm(&dir, "2G");
    let save = {
        let (socket, snap) = (socket.clone(), snap.clone());
        std::thread::spawn(move || {
            let mut qmp = qmp_connect(&socket);
            qmp.set_timeout(Duration::from_secs(120));
            let _ = qmp.execute("snapshot-save", json!({"dir": snap}));
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while leftovers(dir.path()).is_empty() {
        assert!(Instant::now() < deadline, "the save never started staging");
        std::thread::sleep(Duration::from_millis(1));
    }
    send(vm.pid(), libc::SIGTERM);
    let (status, stderr) = vm.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(143), "{stderr}");
    let _ = save.join();
    assert!(!socket.exists(), "the API socket is left behind");
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );
}

#[test]
fn sigterm_while_waiting_for_a_migration_removes_its_socket() {
    let dir = TempDir::new("signal-incoming");
    let incoming = dir.join("incoming.sock");
    let uri = format!("unix:{}", incoming.display());
    let mut vm = RunningVm::spawn(&["run", "--incoming", &uri]);
    let deadline = Instant::now() + BOOT;
    while !incoming.exists() {
        assert!(Instant::now() < deadline, "godwit never listened on {uri}");
        std::thread::sleep(Duration::from_millis(20));
    }
    send(vm.pid(), libc::SIGTERM);
    let (status, stderr) = vm.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(143), "{stderr}");
    assert!(!incoming.exists(), "the migration socket is left behind");
}

/// A pipe whose reading end is already closed.
fn closed_pipe() -> OwnedFd {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fresh descriptors that this function owns.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors are fresh and owned here.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    write
}

#[test]
fn a_closed_stdout_ends_a_command_quietly() {
    for args in [
        vec!["machines"],
        vec!["run", "--machine", "help"],
        vec!["net-backend", "--print-versions"],
    ] {
        let child = godwit_command(None, &args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(closed_pipe()))
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn godwit");
        let done = wait_with_deadline(child, Duration::from_secs(20));
        assert_eq!(done.code(), Some(141), "{args:?}: {done:?}");
        assert!(done.stderr.is_empty(), "{args:?}: {done:?}");
    }
}

#[test]
fn quit_still_exits_zero() {
    let dir = TempDir::new("signal-quit");
    let socket = dir.join("api.sock");
    let mut vm = serving_vm(&dir, "128M");
    let mut qmp = qmp_connect(&socket);
    qmp.execute("quit", Value::Null).unwrap();
    let (status, stderr) = vm.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{stderr}");
}
