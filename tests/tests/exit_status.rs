//! Each way a VM can end gives its own exit status: the guest's choice
//! through isa-debug-exit, a panic reported through pvpanic, and --timeout.

use std::time::{Duration, Instant};

use godwit_tests::{qmp_connect, run_godwit, RunningVm, TempDir};

const DEADLINE: Duration = Duration::from_secs(60);

#[test]
fn debug_exit_ends_with_the_guests_status_as_qemu_does() {
    for n in [0u32, 3, 21] {
        let cmdline = format!("console=ttyS0 reboot=k godwit.exit={n}");
        let out = run_godwit(&["run", "--debug-exit", "--cmdline", &cmdline], DEADLINE);
        assert_eq!(out.code(), Some(((n << 1) | 1) as i32), "{out:?}");
        assert!(out.has_line("godwit-test-guest: checks passed"), "{out:?}");
        assert!(
            out.has_line(&format!("godwit-test-guest: debug-exit {n}")),
            "{out:?}"
        );
        assert!(!out.has_line("godwit-test-guest: poweroff"), "{out:?}");
    }
}

#[test]
fn without_debug_exit_the_port_is_absent_and_the_guest_resets() {
    let out = run_godwit(
        &["run", "--cmdline", "console=ttyS0 reboot=k godwit.exit=3"],
        DEADLINE,
    );
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.has_line("godwit-test-guest: debug-exit 3"), "{out:?}");
    assert!(out.has_line("godwit-test-guest: poweroff"), "{out:?}");
}

#[test]
fn a_pvpanic_report_fails_the_run_with_its_own_status() {
    let out = run_godwit(
        &["run", "--cmdline", "console=ttyS0 reboot=k godwit.panic=1"],
        DEADLINE,
    );
    assert_eq!(out.code(), Some(6), "{out:?}");
    assert!(
        out.has_line("godwit-test-guest: pvpanic: host handles events 0x3"),
        "{out:?}"
    );
    assert!(
        out.stderr.contains("guest panicked")
            && out.stderr.contains("reported a panic through pvpanic"),
        "{out:?}"
    );
    assert!(!out.has_line("godwit-test-guest: poweroff"), "{out:?}");
}

#[test]
fn a_pvpanic_report_is_announced_to_management_clients() {
    let dir = TempDir::new("pvpanic-api");
    let socket = dir.join("api.sock");
    let mut vm = RunningVm::spawn(&[
        "run",
        "--api-socket",
        socket.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 reboot=k godwit.mode=serve godwit.heartbeat_ms=100 godwit.poweroff_after=30 godwit.panic=1",
    ]);
    vm.wait_line("heartbeat 2", DEADLINE);
    let mut qmp = qmp_connect(&socket);
    let panicked = qmp.wait_event("GUEST_PANICKED", DEADLINE).unwrap();
    assert_eq!(panicked["data"]["action"], "poweroff", "{panicked}");
    let shutdown = qmp.wait_event("SHUTDOWN", Duration::from_secs(5)).unwrap();
    assert_eq!(shutdown["data"]["reason"], "guest-panic", "{shutdown}");
    assert_eq!(shutdown["data"]["guest"], true, "{shutdown}");
    let (status, stderr) = vm.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(6), "{stderr}");
}

#[test]
fn timeout_stops_a_guest_that_runs_forever() {
    let started = Instant::now();
    let out = run_godwit(
        &[
            "run",
            "--timeout",
            "3s",
            "--cmdline",
            "console=ttyS0 reboot=k godwit.mode=serve godwit.heartbeat_ms=500",
        ],
        DEADLINE,
    );
    let took = started.elapsed();
    assert_eq!(out.code(), Some(124), "{out:?}");
    assert!(
        out.stderr
            .contains("timeout: the VM ran for 3s (--timeout) and was stopped"),
        "{out:?}"
    );
    assert!(out.has_line("godwit-test-guest: checks passed"), "{out:?}");
    assert!(took >= Duration::from_secs(3), "stopped after {took:?}");
    assert!(took < Duration::from_secs(30), "stopped after {took:?}");
}

#[test]
fn bad_timeouts_are_refused_at_parse_time() {
    for bad in ["0s", "soon", "1.5s"] {
        let out = run_godwit(&["run", "--timeout", bad], DEADLINE);
        assert_eq!(out.code(), Some(2), "{bad}: {out:?}");
        assert!(out.stderr.contains("invalid duration"), "{bad}: {out:?}");
    }
}
