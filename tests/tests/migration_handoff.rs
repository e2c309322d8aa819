//! Exactly one running copy, whatever the network does to the end of a
//! migration. A relay inside the test sits between source and destination,
//! reads the stream frame by frame and, at one message of the final
//! handoff (`State`, `Complete`, `Ready`, `Go`, `Resumed`), cuts the
//! connection before it, cuts it half-way through it, delays it, or
//! swallows it and keeps the connection open (a silent peer). Each time: at
//! most one side runs the guest (query-status, and no heartbeat number
//! printed by both), and wherever it runs the guest's verify buffer is
//! intact.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use godwit_migration::protocol::{Kind, HEADER_LEN};
use godwit_tests::verify::full_round_without_mismatch;
use godwit_tests::{heartbeat, qmp_connect, QmpClient, RunningVm, TempDir, BOOT};

/// What the relay does to the first message of the chosen kind.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Closes both connections instead of passing it on.
    Cut,
    /// Passes on half of it, then closes both connections.
    Truncate,
    /// Passes it on this much later.
    Delay(Duration),
    /// Swallows it and everything after it in that direction, and keeps
    /// both connections open: the peer hears nothing.
    Stall,
}

/// Longer than the source waits for `Resumed` after `Go`.
const SILENCE: Duration = Duration::from_secs(120);

/// Relays one migration from a Unix socket at `listen` to the destination
/// at `dst`, applying `fault` to the first `kind` message.
fn relay(listen: &Path, dst: PathBuf, kind: Kind, fault: Fault) {
    let listener = UnixListener::bind(listen).unwrap();
    std::thread::spawn(move || {
        let (src, _) = listener.accept().unwrap();
        let dst = UnixStream::connect(&dst).unwrap();
        let stalled = Arc::new(AtomicBool::new(false));
        let ends = || [src.try_clone().unwrap(), dst.try_clone().unwrap()];
        let (a, b) = (ends(), ends());
        let (s1, s2) = (stalled.clone(), stalled);
        let up = std::thread::spawn(move || {
            let [from, to] = a;
            forward(from, to, kind, fault, &s1);
        });
        let [to, from] = b;
        forward(from, to, kind, fault, &s2);
        let _ = up.join();
    });
}

fn shut(from: &UnixStream, to: &UnixStream) {
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// Passes frames from `from` to `to` until either end closes.
fn forward(
    mut from: UnixStream,
    mut to: UnixStream,
    kind: Kind,
    fault: Fault,
    stalled: &AtomicBool,
) {
    loop {
        let mut header = [0u8; HEADER_LEN];
        if from.read_exact(&mut header).is_err() {
            break;
        }
        let len = u32::from_le_bytes(header[8..12].try_into().unwrap()) as usize;
        let mut payload = vec![0u8; len];
        if from.read_exact(&mut payload).is_err() {
            break;
        }
        let this = Kind::from_u16(u16::from_le_bytes([header[6], header[7]]));
        if this == Some(kind) {
            eprintln!("relay: {fault:?} on {kind:?} ({len} bytes)");
            match fault {
                Fault::Cut => break,
                Fault::Truncate => {
                    let mut frame = header.to_vec();
                    frame.extend_from_slice(&payload);
                    let half = if len == 0 {
                        HEADER_LEN / 2
                    } else {
                        HEADER_LEN + len / 2
                    };
                    let _ = to.write_all(&frame[..half]);
                    break;
                }
                Fault::Delay(d) => std::thread::sleep(d),
                Fault::Stall => {
                    stalled.store(true, Ordering::SeqCst);
                    // Both ends stay open as long as these descriptors do.
                    std::thread::sleep(SILENCE);
                    break;
                }
            }
        }
        if to
            .write_all(&header)
            .and_then(|()| to.write_all(&payload))
            .is_err()
        {
            break;
        }
    }
    if !stalled.load(Ordering::SeqCst) {
        shut(&from, &to);
    }
}

fn cmdline() -> String {
    // 64 pages, all checked many times a second: a round takes one heartbeat.
    "console=ttyS0 reboot=k godwit.mode=serve godwit.heartbeat_ms=200 godwit.verify=256K"
        .to_string()
}

/// The status `query-status` reports, or None when nothing answers there
/// (the process exited, or a destination that has not started the guest).
fn status(api: &Path) -> Option<String> {
    let mut qmp = QmpClient::connect(api, Duration::from_secs(2)).ok()?;
    let v = qmp.execute("query-status", Value::Null).ok()?;
    Some(v["status"].as_str()?.to_string())
}

/// Polls `query-migrate` until the migration ends; None when the source
/// exited (it does once the destination confirmed).
fn wait_outcome(qmp: &mut QmpClient, timeout: Duration) -> Option<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let info = qmp.execute("query-migrate", Value::Null).ok()?;
        let s = info["status"].as_str().unwrap_or("");
        if matches!(s, "completed" | "failed" | "cancelled" | "postmigrate") {
            return Some(info);
        }
        assert!(
            Instant::now() < deadline,
            "migration did not end within {timeout:?}: {info}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Heartbeat counters a console printed.
fn heartbeats(vm: &RunningVm) -> Vec<u64> {
    vm.seen
        .iter()
        .filter(|l| l.starts_with("heartbeat "))
        .map(|l| heartbeat(l))
        .collect()
}

/// Reads what a console prints for `time`.
fn drain(vm: &mut RunningVm, time: Duration) {
    let until = Instant::now() + time;
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        if vm.try_line(left).is_none() {
            break;
        }
    }
}

/// Where the guest must end up running.
#[derive(Debug, PartialEq)]
enum Runs {
    /// The source never committed: it resumed, the destination never ran.
    Source,
    /// The destination runs; the source is paused (postmigrate) or gone.
    Destination,
    /// The source committed and the destination never got `Go`: nobody
    /// runs until the operator resumes the source.
    Nowhere,
}

fn handoff(kind: Kind, fault: Fault, expect: Runs) {
    let what = format!("{fault:?} on {kind:?}");
    let dir = TempDir::new("handoff");
    let (api, dst_api) = (dir.join("src.sock"), dir.join("dst.sock"));
    let (relay_sock, dst_sock) = (dir.join("relay.sock"), dir.join("dst-mig.sock"));
    let mut src = RunningVm::spawn(&[
        "run",
        "--api-socket",
        api.to_str().unwrap(),
        "--cmdline",
        &cmdline(),
    ]);
    src.wait_line("serve: ready", BOOT);
    full_round_without_mismatch(&mut src, &format!("{what}: before"));
    let mut dst = RunningVm::spawn(&[
        "run",
        "--incoming",
        &format!("unix:{}", dst_sock.display()),
        "--api-socket",
        dst_api.to_str().unwrap(),
    ]);
    godwit_tests::netns::wait_for_path(&dst_sock, Duration::from_secs(20), "the destination");
    relay(&relay_sock, dst_sock.clone(), kind, fault);

    let mut qmp = qmp_connect(&api);
    qmp.execute(
        "migrate",
        json!({"uri": format!("unix:{}", relay_sock.display())}),
    )
    .unwrap();
    let outcome = wait_outcome(&mut qmp, Duration::from_secs(150));
    eprintln!("{what}: {outcome:?}");
    let src_status = status(&api);
    match expect {
        Runs::Source => {
            let info = outcome.unwrap_or_else(|| panic!("{what}: the source exited"));
            assert_eq!(info["status"], "failed", "{what}: {info}");
            assert_eq!(src_status.as_deref(), Some("running"), "{what}");
            let (code, stderr) = dst.wait_exit(Duration::from_secs(90));
            assert!(
                !code.success(),
                "{what}: the destination gives up: {stderr}"
            );
        }
        Runs::Destination => {
            if let Some(info) = &outcome {
                assert!(
                    matches!(info["status"].as_str(), Some("postmigrate" | "completed")),
                    "{what}: {info}"
                );
            }
            // Shut down: it exits, as the destination confirmed.
            assert!(
                matches!(
                    src_status.as_deref(),
                    None | Some("postmigrate" | "shutdown")
                ),
                "{what}: the source stays paused: {src_status:?}"
            );
            let dst_status = status(&dst_api);
            if dst_status.as_deref() != Some("running") {
                let (code, stderr) = dst.wait_exit(Duration::from_secs(5));
                panic!("{what}: the destination does not run ({dst_status:?}): {code:?} {stderr}");
            }
        }
        Runs::Nowhere => {
            let info = outcome.unwrap_or_else(|| panic!("{what}: the source exited"));
            assert_eq!(info["status"], "postmigrate", "{what}: {info}");
            assert!(
                info["error"].as_str().unwrap_or("").contains("force"),
                "{what}: the error says what to do: {info}"
            );
            assert_eq!(src_status.as_deref(), Some("postmigrate"), "{what}");
            let (code, stderr) = dst.wait_exit(Duration::from_secs(90));
            assert!(
                !code.success(),
                "{what}: the destination gives up: {stderr}"
            );
        }
    }

    // Whatever stays paused prints nothing more; one counter, never two.
    drain(&mut src, Duration::from_millis(1500));
    drain(&mut dst, Duration::from_millis(1500));
    let (on_src, on_dst) = (heartbeats(&src), heartbeats(&dst));
    let last_on_src = *on_src.last().unwrap();
    assert!(
        !on_dst.iter().any(|n| on_src.contains(n)),
        "{what}: both sides ran the guest: source {on_src:?}, destination {on_dst:?}"
    );

    match expect {
        Runs::Source => {
            assert!(on_dst.is_empty(), "{what}: the destination ran: {on_dst:?}");
            full_round_without_mismatch(&mut src, &format!("{what}: on the source"));
            qmp.execute("quit", Value::Null).unwrap();
        }
        Runs::Destination => {
            assert_eq!(on_dst.first(), Some(&(last_on_src + 1)), "{what}");
            full_round_without_mismatch(&mut dst, &format!("{what}: on the destination"));
            if src_status.as_deref() == Some("postmigrate") {
                let refused = qmp.execute("cont", Value::Null).unwrap_err().to_string();
                assert!(refused.contains("postmigrate"), "{what}: {refused}");
                drain(&mut src, Duration::from_millis(600));
                assert_eq!(heartbeats(&src).last(), Some(&last_on_src), "{what}");
                qmp.execute("quit", Value::Null).unwrap();
            }
            qmp_connect(&dst_api).execute("quit", Value::Null).unwrap();
            assert!(dst.wait_exit(Duration::from_secs(20)).0.success(), "{what}");
        }
        Runs::Nowhere => {
            assert!(on_dst.is_empty(), "{what}: the destination ran: {on_dst:?}");
            let refused = qmp.execute("cont", Value::Null).unwrap_err().to_string();
            assert!(refused.contains("postmigrate"), "{what}: {refused}");
            // The operator checked: the destination does not run it.
            let answer = qmp.execute("cont", json!({"force": true})).unwrap();
            assert!(
                answer["warning"]
                    .as_str()
                    .unwrap_or("")
                    .contains("responsibility"),
                "{what}: {answer}"
            );
            assert_eq!(status(&api).as_deref(), Some("running"), "{what}");
            let next = heartbeat(&src.wait_prefix("heartbeat ", Duration::from_secs(10)));
            assert_eq!(
                next,
                last_on_src + 1,
                "{what}: the guest goes on where it stopped"
            );
            full_round_without_mismatch(&mut src, &format!("{what}: resumed on the source"));
            qmp.execute("quit", Value::Null).unwrap();
        }
    }
    if src_status.is_some() {
        // After quit, or by itself once the destination confirmed.
        assert!(src.wait_exit(Duration::from_secs(20)).0.success(), "{what}");
    }
}

#[test]
fn a_connection_lost_before_the_commit_leaves_the_guest_on_the_source() {
    for kind in [Kind::State, Kind::Complete, Kind::Ready] {
        for fault in [Fault::Cut, Fault::Truncate] {
            handoff(kind, fault, Runs::Source);
        }
    }
}

#[test]
fn a_lost_go_leaves_the_source_paused_until_the_operator_resumes_it() {
    for fault in [Fault::Cut, Fault::Truncate] {
        handoff(Kind::Go, fault, Runs::Nowhere);
    }
}

#[test]
fn a_lost_confirmation_leaves_the_guest_on_the_destination_only() {
    for fault in [Fault::Cut, Fault::Truncate] {
        handoff(Kind::Resumed, fault, Runs::Destination);
    }
}

#[test]
fn late_messages_of_the_handoff_complete_the_migration() {
    for kind in [
        Kind::State,
        Kind::Complete,
        Kind::Ready,
        Kind::Go,
        Kind::Resumed,
    ] {
        handoff(
            kind,
            Fault::Delay(Duration::from_secs(3)),
            Runs::Destination,
        );
    }
}

/// The destination hears no `Go`: it gives up, says it will not run the
/// guest, and the source, hearing that, resumes it.
#[test]
fn a_destination_that_never_hears_go_gives_the_guest_back() {
    handoff(Kind::Go, Fault::Stall, Runs::Source);
}

/// The source hears nothing after `Go`: the destination runs the guest and
/// the source stays paused in postmigrate.
#[test]
fn a_silent_destination_leaves_the_source_in_postmigrate() {
    handoff(Kind::Resumed, Fault::Stall, Runs::Destination);
}
