//! The guest console never holds the VM hostage: a reader that stops
//! draining godwit's stdout does not block the vCPUs, so management keeps
//! working, and a console file can be capped.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Stdio;
use std::time::{Duration, Instant};

use godwit_tests::{godwit_command, qmp_connect, TempDir};
use serde_json::Value;

/// A pipe of one page whose reading end the test holds and never reads.
fn stalled_pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just created and are owned here only.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_SETPIPE_SZ on a pipe this process owns.
    unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    (read, write)
}

#[test]
fn a_console_reader_that_stops_draining_does_not_block_management() {
    let dir = TempDir::new("console-stall");
    let socket = dir.join("api.sock");
    let (_unread, write) = stalled_pipe();
    let mut child = godwit_command(
        None,
        &[
            "run",
            "--api-socket",
            socket.to_str().unwrap(),
            "--cmdline",
            "console=ttyS0 reboot=k godwit.mode=serve godwit.heartbeat_ms=5",
        ],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::from(write))
    .stderr(Stdio::null())
    .spawn()
    .expect("spawn godwit");
    let mut qmp = qmp_connect(&socket);
    // Heartbeats every 5 ms fill the one-page pipe within a few seconds.
    std::thread::sleep(Duration::from_secs(6));
    for command in ["stop", "cont", "stop"] {
        let started = Instant::now();
        qmp.execute(command, Value::Null)
            .unwrap_or_else(|e| panic!("{command}: {e}"));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{command} took {:?}",
            started.elapsed()
        );
    }
    let status = qmp.execute("query-status", Value::Null).unwrap();
    assert_eq!(status["status"], "paused", "{status}");
    qmp.execute("quit", Value::Null).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(0));
            break;
        }
        assert!(Instant::now() < deadline, "godwit did not exit after quit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_console_file_stops_at_its_max_size() {
    let dir = TempDir::new("console-cap");
    let file = dir.join("console.log");
    let serial = format!("file:{},max-size=300", file.display());
    let out = godwit_tests::run_godwit(&["run", "--serial", &serial], Duration::from_secs(60));
    assert_eq!(out.code(), Some(0), "{out:?}");
    let written = std::fs::read(&file).unwrap();
    assert_eq!(written.len(), 300, "{}", String::from_utf8_lossy(&written));
    assert!(written.starts_with(b"godwit-test-guest: booting"));
}
