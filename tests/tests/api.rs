//! The management API against a running VM: stop/cont/query-status/quit,
//! events, errors, and clients that misbehave.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use godwit_tests::{qmp_connect, RunningVm, TempDir};

const BOOT: Duration = Duration::from_secs(30);

/// A test guest that stays up, printing `heartbeat N` every 100 ms.
fn serving_vm(dir: &TempDir, vcpus: u32) -> (RunningVm, std::path::PathBuf) {
    let socket = dir.join("api.sock");
    let vm = RunningVm::spawn(&[
        "run",
        "--vcpus",
        &vcpus.to_string(),
        "--api-socket",
        socket.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 reboot=k godwit.mode=serve godwit.heartbeat_ms=100",
    ]);
    (vm, socket)
}

fn heartbeat_number(line: &str) -> u64 {
    line.trim()
        .strip_prefix("heartbeat ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a heartbeat line: {line:?}"))
}

#[test]
fn stop_cont_query_status_and_quit() {
    let dir = TempDir::new("api");
    let (mut vm, socket) = serving_vm(&dir, 2);
    vm.wait_line("heartbeat 2", BOOT);
    let mut qmp = qmp_connect(&socket);

    let version = qmp.execute("query-version", Value::Null).unwrap();
    assert!(
        version["package"].as_str().unwrap().starts_with("godwit "),
        "{version}"
    );
    let status = qmp.execute("query-status", Value::Null).unwrap();
    assert_eq!(status["status"], "running");
    assert_eq!(status["running"], true);

    assert_eq!(qmp.execute("stop", Value::Null).unwrap(), json!({}));
    qmp.wait_event("STOP", Duration::from_secs(5)).unwrap();
    assert_eq!(
        qmp.execute("query-status", Value::Null).unwrap()["status"],
        "paused"
    );
    // While paused, the guest makes no progress: once the lines already in
    // the pipe are read, no heartbeat follows.
    let mut last = 0;
    while let Some(l) = vm.try_line(Duration::from_millis(150)) {
        if l.starts_with("heartbeat ") {
            last = heartbeat_number(&l);
        }
    }
    if last == 0 {
        last = vm
            .seen
            .iter()
            .rev()
            .find(|l| l.starts_with("heartbeat "))
            .map(|l| heartbeat_number(l))
            .unwrap();
    }
    if let Some(l) = vm.try_line(Duration::from_millis(800)) {
        panic!("the guest printed {l:?} while paused");
    }

    // A second stop is harmless; cont resumes and the counter continues.
    qmp.execute("stop", Value::Null).unwrap();
    assert_eq!(qmp.execute("cont", Value::Null).unwrap(), json!({}));
    qmp.wait_event("RESUME", Duration::from_secs(5)).unwrap();
    assert_eq!(
        qmp.execute("query-status", Value::Null).unwrap()["status"],
        "running"
    );
    let next = format!("heartbeat {}", last + 3);
    vm.wait_line(&next, Duration::from_secs(10));

    assert_eq!(qmp.execute("quit", Value::Null).unwrap(), json!({}));
    let shutdown = qmp.wait_event("SHUTDOWN", Duration::from_secs(5)).unwrap();
    assert_eq!(shutdown["data"]["reason"], "host-qmp-quit");
    let (status, stderr) = vm.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(!socket.exists(), "the API socket is removed at exit");
}

#[test]
fn ctl_client_round_trip() {
    let dir = TempDir::new("ctl");
    let (mut vm, socket) = serving_vm(&dir, 1);
    vm.wait_line("heartbeat 1", BOOT);
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(godwit_tests::godwit_bin())
            .args(["ctl", "--api-socket", socket.to_str().unwrap()])
            .args(args)
            .output()
            .expect("run godwit ctl");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = ctl(&["stop"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.trim(), "{}");
    let (code, out, _) = ctl(&["query-status"]);
    assert_eq!(code, Some(0));
    let v: Value = serde_json::from_str(&out).expect("ctl prints JSON");
    assert_eq!(v["status"], "paused");
    let (code, _, err) = ctl(&["no-such-command"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("CommandNotFound"), "{err}");
    let (code, _, err) = ctl(&["stop", "{not json"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("invalid JSON-ARGS"), "{err}");
    let (code, _, err) = ctl(&["stop", r#"{"force": true}"#]);
    assert_eq!(code, Some(1));
    assert!(err.contains("'force'"), "{err}");
    let (code, _, _) = ctl(&["cont"]);
    assert_eq!(code, Some(0));
    let (code, _, _) = ctl(&["quit"]);
    assert_eq!(code, Some(0));
    let (status, stderr) = vm.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{stderr}");

    let (code, _, err) = ctl(&["query-status"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("cannot connect to") && err.contains("--api-socket"),
        "{err}"
    );
}

fn read_line(stream: &mut UnixStream) -> Value {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match stream.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) => buf.push(byte[0]),
            _ => break,
        }
    }
    serde_json::from_slice(&buf)
        .unwrap_or_else(|e| panic!("bad line {:?}: {e}", String::from_utf8_lossy(&buf)))
}

#[test]
fn malformed_requests_keep_the_connection_and_the_vm() {
    let dir = TempDir::new("apibad");
    let (mut vm, socket) = serving_vm(&dir, 1);
    vm.wait_line("heartbeat 1", BOOT);
    let mut raw = UnixStream::connect(&socket).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(read_line(&mut raw).get("QMP").is_some());
    raw.write_all(b"{\"execute\": \"qmp_capabilities\"}\n")
        .unwrap();
    assert_eq!(read_line(&mut raw)["return"], json!({}));
    for (input, needle) in [
        ("{\"execute\": \n", ""),
        ("}}}garbage\n", "JSON parse error"),
        ("[1,2]\n", "object"),
        ("{\"arguments\": {}}\n", "'execute' is missing"),
        ("{\"execute\": \"frobnicate\"}\n", "frobnicate"),
        (
            "{\"execute\": \"stop\", \"arguments\": {\"now\": 1}}\n",
            "'now'",
        ),
        ("{\"execute\": \"stop\", \"arguments\": 5}\n", "arguments"),
    ] {
        raw.write_all(input.as_bytes()).unwrap();
        if needle.is_empty() {
            continue; // incomplete: completed (as garbage) by the next line
        }
        let reply = read_line(&mut raw);
        let desc = reply["error"]["desc"]
            .as_str()
            .unwrap_or_else(|| panic!("{input:?} -> {reply}"));
        assert!(desc.contains(needle), "{input:?} -> {desc}");
    }
    raw.write_all(b"{\"execute\": \"query-status\", \"id\": 9}\n")
        .unwrap();
    let reply = read_line(&mut raw);
    assert_eq!(reply["id"], 9);
    assert_eq!(reply["return"]["status"], "running");

    // A client that sends half a command and disappears does not disturb the VM.
    let mut gone = UnixStream::connect(&socket).unwrap();
    gone.write_all(b"{\"execute\": \"qmp_capabilities\"}\n{\"execute\": \"st")
        .unwrap();
    drop(gone);
    let last = vm
        .seen
        .iter()
        .rev()
        .find(|l| l.starts_with("heartbeat "))
        .cloned()
        .unwrap();
    vm.wait_line(
        &format!("heartbeat {}", heartbeat_number(&last) + 3),
        Duration::from_secs(10),
    );
    let mut qmp = qmp_connect(&socket);
    assert_eq!(
        qmp.execute("query-status", Value::Null).unwrap()["status"],
        "running"
    );
    qmp.execute("quit", Value::Null).unwrap();
    assert_eq!(vm.wait_exit(Duration::from_secs(10)).0.code(), Some(0));
}

/// Commands are parsed into typed arguments before they run: errors name
/// the command or the field, with QEMU's error classes.
#[test]
fn typed_commands_name_what_is_wrong() {
    let dir = TempDir::new("apityped");
    let (mut vm, socket) = serving_vm(&dir, 1);
    vm.wait_line("heartbeat 1", BOOT);
    let mut qmp = qmp_connect(&socket);
    let error = |qmp: &mut godwit_vmm::api::QmpClient, command: &str, args: Value| match qmp
        .execute(command, args)
    {
        Err(godwit_vmm::api::ClientError::Qmp { class, desc }) => (class, desc),
        other => panic!("{command}: expected a QMP error, got {other:?}"),
    };
    let cases = [
        (
            "frobnicate",
            json!({}),
            "CommandNotFound",
            "The command frobnicate has not been found",
        ),
        (
            "snapshot-save",
            json!({}),
            "GenericError",
            "Parameter 'dir' is missing",
        ),
        (
            "migrate",
            json!({"uri": 5}),
            "GenericError",
            "Invalid parameter type for 'uri': expected a string, got integer `5`",
        ),
        (
            "migrate-set-parameters",
            json!({"max-rounds": -1}),
            "GenericError",
            "Invalid value for parameter 'max-rounds': expected u32, got integer `-1`",
        ),
        (
            "snapshot-save",
            json!({"dir": dir.join("snap").to_str().unwrap(), "format": "raw"}),
            "GenericError",
            "Parameter 'format' is unexpected",
        ),
        (
            "query-status",
            json!({"verbose": true}),
            "GenericError",
            "Parameter 'verbose' is unexpected",
        ),
    ];
    for (command, args, class, desc) in cases {
        let got = error(&mut qmp, command, args.clone());
        assert_eq!(
            (got.0.as_str(), got.1.as_str()),
            (class, desc),
            "{command} {args}"
        );
    }
    // Nothing ran: no snapshot directory, the VM still runs.
    assert!(!dir.join("snap").exists());
    assert_eq!(
        qmp.execute("query-status", Value::Null).unwrap()["status"],
        "running"
    );
    let names: Vec<String> = qmp
        .execute("query-commands", Value::Null)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    for name in [
        "qmp_capabilities",
        "query-commands",
        "stop",
        "snapshot-save",
        "plan",
    ] {
        assert!(names.iter().any(|n| n == name), "{name} not in {names:?}");
    }
    qmp.execute("quit", Value::Null).unwrap();
    assert_eq!(vm.wait_exit(Duration::from_secs(10)).0.code(), Some(0));
}

#[test]
fn api_socket_in_use_is_refused() {
    let dir = TempDir::new("apiuse");
    let (mut vm, socket) = serving_vm(&dir, 1);
    vm.wait_line("heartbeat 1", BOOT);
    let out = godwit_tests::run_godwit(
        &["run", "--api-socket", socket.to_str().unwrap()],
        Duration::from_secs(30),
    );
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.contains("cannot start the API server"),
        "{out:?}"
    );
    let mut qmp = qmp_connect(&socket);
    qmp.execute("quit", Value::Null).unwrap();
    assert_eq!(vm.wait_exit(Duration::from_secs(10)).0.code(), Some(0));
}

#[test]
fn guest_crashes_are_reported_with_rip() {
    for (mode, needle) in [
        ("triple", "triple-faulted"),
        ("sse", "could not emulate the instruction at RIP 0x"),
    ] {
        let cmdline = format!("console=ttyS0 reboot=k godwit.crash={mode}");
        let out =
            godwit_tests::run_godwit(&["run", "--cmdline", &cmdline], Duration::from_secs(30));
        assert_eq!(out.code(), Some(3), "{mode}: {out:?}");
        assert!(out.stderr.contains(needle), "{mode}: {out:?}");
        assert!(out.stderr.contains("RIP 0x"), "{mode}: {out:?}");
    }
}

/// `VmHWM` (peak resident set) of process `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in {status}"))
}

/// A JSON array of about `bytes` bytes of empty arrays: one element per
/// three bytes, the shape that cost the most per byte.
fn wide_array(bytes: usize) -> String {
    let mut s = String::with_capacity(bytes + 2);
    s.push('[');
    while s.len() < bytes {
        if s.len() > 1 {
            s.push(',');
        }
        s.push_str("[]");
    }
    s.push(']');
    s
}

/// Requests of ~200 KB, before and after negotiation, in every place a
/// client controls (arguments, nested arguments, id), keep godwit's peak
/// RSS far below 100 MiB (a 196 KB request once held 4.2 GB), and the VM
/// runs on.
#[test]
fn large_requests_cost_memory_in_proportion() {
    let dir = TempDir::new("apirss");
    let (mut vm, socket) = serving_vm(&dir, 1);
    vm.wait_line("heartbeat 1", BOOT);
    let before = peak_rss_kib(vm.pid());
    let wide = wide_array(200 * 1024);
    let mut raw = UnixStream::connect(&socket).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert!(read_line(&mut raw).get("QMP").is_some());
    let requests = [
        format!(r#"{{"execute": "qmp_capabilities", "arguments": {{"enable": {wide}}}}}"#),
        "{\"execute\": \"qmp_capabilities\"}".to_string(),
        format!(r#"{{"execute": "query-host-caps", "arguments": {{"net": {wide}}}}}"#),
        format!(r#"{{"execute": "plan", "arguments": {{"hosts": {wide}}}}}"#),
        format!(r#"{{"execute": "query-status", "arguments": {{"x": {wide}}}}}"#),
        format!(r#"{{"execute": "frobnicate", "arguments": {{"x": {wide}}}}}"#),
        format!(r#"{{"execute": "query-status", "id": {wide}}}"#),
    ];
    for request in &requests {
        raw.write_all(request.as_bytes()).unwrap();
        raw.write_all(b"\n").unwrap();
        let reply = read_line(&mut raw);
        assert!(
            reply.get("return").is_some() || reply.get("error").is_some(),
            "{reply}"
        );
    }
    let peak = peak_rss_kib(vm.pid());
    assert!(
        peak < 100 * 1024,
        "peak RSS {peak} KiB (was {before} KiB before the requests)"
    );
    let mut qmp = qmp_connect(&socket);
    assert_eq!(
        qmp.execute("query-status", Value::Null).unwrap()["status"],
        "running"
    );
    qmp.execute("quit", Value::Null).unwrap();
    assert_eq!(vm.wait_exit(Duration::from_secs(10)).0.code(), Some(0));
}

/// CPU time (user + system) of the API reader threads of `pid`, in clock
/// ticks.
fn api_reader_cpu_ticks(pid: u32) -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if !(comm.starts_with("api-conn") && comm.trim_end().ends_with("-rd")) {
            continue;
        }
        let stat = std::fs::read_to_string(task.join("stat")).unwrap_or_default();
        // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let tick = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        total += tick(11) + tick(12);
    }
    total
}

/// 200 KB arriving one byte per write is framed in linear time (the framer
/// used to re-parse the whole pending buffer on every read: 3.9 s of CPU).
#[test]
fn byte_at_a_time_input_is_cheap() {
    let dir = TempDir::new("apibytes");
    let (mut vm, socket) = serving_vm(&dir, 1);
    vm.wait_line("heartbeat 1", BOOT);
    let mut raw = UnixStream::connect(&socket).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    assert!(read_line(&mut raw).get("QMP").is_some());
    raw.write_all(b"{\"execute\": \"qmp_capabilities\"}\n")
        .unwrap();
    assert_eq!(read_line(&mut raw)["return"], json!({}));
    let request = format!(
        r#"{{"execute": "query-status", "id": 1, "arguments": {{"x": {}}}}}"#,
        wide_array(200 * 1024)
    );
    let before = api_reader_cpu_ticks(vm.pid());
    for b in request.as_bytes() {
        raw.write_all(std::slice::from_ref(b)).unwrap();
    }
    raw.write_all(b"\n").unwrap();
    let reply = read_line(&mut raw);
    assert_eq!(reply["id"], 1, "{reply}");
    assert_eq!(reply["error"]["desc"], "Parameter 'x' is unexpected");
    let ticks = api_reader_cpu_ticks(vm.pid()) - before;
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    assert!(
        ticks < hz,
        "framing {} bytes one at a time took {ticks} ticks of CPU ({hz} per second)",
        request.len()
    );
    drop(raw);
    let mut qmp = qmp_connect(&socket);
    qmp.execute("quit", Value::Null).unwrap();
    assert_eq!(vm.wait_exit(Duration::from_secs(10)).0.code(), Some(0));
}

/// query-host-caps takes no descriptor numbers (they would name godwit's
/// own KVM, memory or TAP descriptors, which the probe closed) and creates
/// no server sockets (which replaced whatever socket was at the path).
#[test]
fn host_caps_over_the_api_touches_nothing_of_godwit() {
    let dir = TempDir::new("apicaps");
    let (mut vm, socket) = serving_vm(&dir, 1);
    vm.wait_line("heartbeat 1", BOOT);
    let backend = dir.join("backend.sock");
    let listener = std::os::unix::net::UnixListener::bind(&backend).unwrap();
    let mut qmp = qmp_connect(&socket);
    for fd in 0..16 {
        let err = qmp
            .execute("query-host-caps", json!({"net": [format!("tap,fd={fd}")]}))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("fd={fd} is not accepted over the API")),
            "{err}"
        );
    }
    let spec = format!("vhost-user,socket={},queues=1,server=on", backend.display());
    let err = qmp
        .execute("query-host-caps", json!({"net": [spec]}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("server=on is not accepted"), "{err}");
    // The backend's socket is still the one it listens on.
    let _client = UnixStream::connect(&backend).unwrap();
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_ok());
    // And godwit's own descriptors are intact: the guest runs, the API answers.
    let last = vm
        .seen
        .iter()
        .rev()
        .find(|l| l.starts_with("heartbeat "))
        .cloned()
        .unwrap();
    vm.wait_line(
        &format!("heartbeat {}", heartbeat_number(&last) + 3),
        Duration::from_secs(10),
    );
    assert_eq!(
        qmp.execute("query-status", Value::Null).unwrap()["status"],
        "running"
    );
    qmp.execute("quit", Value::Null).unwrap();
    assert_eq!(vm.wait_exit(Duration::from_secs(10)).0.code(), Some(0));
}

/// A descriptor the client passes with SCM_RIGHTS and names with `getfd`
/// is what `fd=NAME` probes; the probe takes it, and it is the client's
/// file (here /dev/null, reported as not a TAP), never one of godwit's.
#[test]
fn host_caps_probes_descriptors_passed_with_getfd() {
    use std::os::fd::AsRawFd;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let dir = TempDir::new("apigetfd");
    let (mut vm, socket) = serving_vm(&dir, 1);
    vm.wait_line("heartbeat 1", BOOT);
    let mut raw = UnixStream::connect(&socket).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(read_line(&mut raw).get("QMP").is_some());
    raw.write_all(b"{\"execute\": \"qmp_capabilities\"}\n")
        .unwrap();
    assert_eq!(read_line(&mut raw)["return"], json!({}));
    let null = std::fs::File::open("/dev/null").unwrap();
    let getfd = b"{\"execute\": \"getfd\", \"arguments\": {\"fdname\": \"tap0\"}}\n";
    raw.send_with_fds(&[&getfd[..]], &[null.as_raw_fd()])
        .unwrap();
    drop(null);
    assert_eq!(read_line(&mut raw), json!({"return": {}}));
    raw.write_all(
        b"{\"execute\": \"query-host-caps\", \"arguments\": {\"net\": [\"tap,fd=tap0\"]}}\n",
    )
    .unwrap();
    let reply = read_line(&mut raw);
    let peers = reply["return"]["peers"]
        .as_array()
        .unwrap_or_else(|| panic!("{reply}"));
    let tap = peers
        .iter()
        .find(|p| p["kind"] == "tap")
        .unwrap_or_else(|| panic!("{reply}"));
    assert_ne!(tap["status"], "ok", "/dev/null is no TAP: {tap}");
    // Taken by the probe: the name is gone.
    raw.write_all(
        b"{\"execute\": \"query-host-caps\", \"arguments\": {\"net\": [\"tap,fd=tap0\"]}}\n",
    )
    .unwrap();
    let reply = read_line(&mut raw);
    let desc = reply["error"]["desc"]
        .as_str()
        .unwrap_or_else(|| panic!("{reply}"));
    assert!(
        desc.contains("File descriptor named 'tap0' not found"),
        "{desc}"
    );
    drop(raw);
    let mut qmp = qmp_connect(&socket);
    assert_eq!(
        qmp.execute("query-status", Value::Null).unwrap()["status"],
        "running"
    );
    qmp.execute("quit", Value::Null).unwrap();
    assert_eq!(vm.wait_exit(Duration::from_secs(10)).0.code(), Some(0));
}

/// The socket is created 0600, and clients that connect and never
/// negotiate are dropped, so they cannot lock management out.
#[test]
fn api_socket_is_private_and_silent_clients_do_not_lock_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("apiprivate");
    let (mut vm, socket) = serving_vm(&dir, 1);
    vm.wait_line("heartbeat 1", BOOT);
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");

    let started = Instant::now();
    let mut idle: Vec<UnixStream> = (0..godwit_vmm::api::MAX_CONNECTIONS)
        .map(|_| {
            let mut s = UnixStream::connect(&socket).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            assert!(read_line(&mut s).get("QMP").is_some());
            s
        })
        .collect();
    let mut extra = UnixStream::connect(&socket).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let refused = read_line(&mut extra);
    assert!(
        refused["error"]["desc"]
            .as_str()
            .unwrap()
            .starts_with("too many API connections"),
        "{refused}"
    );
    // Each silent client is told why, and disconnected.
    std::thread::sleep(godwit_vmm::api::NEGOTIATION_TIMEOUT.saturating_sub(started.elapsed()));
    for s in &mut idle {
        let reply = read_line(s);
        assert!(
            reply["error"]["desc"]
                .as_str()
                .unwrap()
                .starts_with("no qmp_capabilities within"),
            "{reply}"
        );
    }
    assert!(started.elapsed() >= godwit_vmm::api::NEGOTIATION_TIMEOUT);
    let mut qmp = qmp_connect(&socket);
    assert_eq!(
        qmp.execute("query-status", Value::Null).unwrap()["status"],
        "running"
    );
    qmp.execute("quit", Value::Null).unwrap();
    assert_eq!(vm.wait_exit(Duration::from_secs(10)).0.code(), Some(0));
}
