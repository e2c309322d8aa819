//! Tests of the API server and client against real Unix sockets.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Map, Value};
use vmm_sys_util::tempdir::TempDir;

use super::*;

const TIMEOUT: Duration = Duration::from_secs(10);

/// A command handler for tests.
#[derive(Default)]
struct Fake {
    events: EventSender,
    finished: AtomicUsize,
    quit_requested: std::sync::atomic::AtomicBool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SleepArgs {
    ms: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TypedArgs {
    size: u64,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmitArgs {
    name: String,
}

qmp_commands! {
    enum FakeCommand {
        "echo" => Echo(Map<String, Value>),
        "fail" => Fail,
        "no-device" => NoDevice,
        "sleep" => Sleep(SleepArgs),
        "typed" => Typed(TypedArgs),
        "emit" => Emit(EmitArgs),
        "boom" => Boom,
        "quit" => Quit,
        "take-fd" => TakeFd(EmitArgs),
    }
}

impl CommandHandler for Fake {
    type Command = FakeCommand;

    fn execute(&self, command: FakeCommand, session: &mut Session) -> Result<Value, QmpError> {
        match command {
            FakeCommand::Echo(args) => Ok(Value::Object(args)),
            FakeCommand::Fail => Err(QmpError::generic("it failed")),
            FakeCommand::NoDevice => Err(QmpError::device_not_found("Device 'x' not found")),
            FakeCommand::Sleep(a) => {
                thread::sleep(Duration::from_millis(a.ms));
                self.finished.fetch_add(1, Ordering::SeqCst);
                Ok(json!({}))
            }
            FakeCommand::Typed(a) => Ok(json!({"size": a.size, "name": a.name})),
            FakeCommand::Emit(a) => {
                self.events.emit(&a.name, json!({"from": "command"}));
                Ok(json!({}))
            }
            FakeCommand::Boom => panic!("boom"),
            FakeCommand::TakeFd(a) => {
                let fd = session
                    .take_fd(&a.name)
                    .map_err(|e| QmpError::generic(e.to_string()))?;
                let target = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                    .map_err(|e| QmpError::generic(e.to_string()))?;
                Ok(json!({"target": target.display().to_string()}))
            }
            FakeCommand::Quit => {
                // Like a VM core: ask the main thread to stop (which drops the
                // server), and return a moment later.
                self.quit_requested.store(true, Ordering::SeqCst);
                thread::sleep(Duration::from_millis(50));
                Ok(json!({}))
            }
        }
    }
}

struct Setup {
    // Dropped after the server: keeps the socket directory alive.
    server: ApiServer,
    events: EventSender,
    handler: Arc<Fake>,
    path: PathBuf,
    _dir: TempDir,
}

fn setup() -> Setup {
    setup_with(ServerOptions::default())
}

fn setup_with(options: ServerOptions) -> Setup {
    let dir = TempDir::new_with_prefix("/tmp/godwit-api-test").expect("temp dir");
    let path = dir.as_path().join("api.sock");
    let events = EventSender::new();
    let handler = Arc::new(Fake {
        events: events.clone(),
        ..Fake::default()
    });
    let server = ApiServer::start_with_options(&path, handler.clone(), events.clone(), options)
        .expect("start API server");
    Setup {
        server,
        events,
        handler,
        path,
        _dir: dir,
    }
}

/// A hand-driven client that sees every line.
struct Raw {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Raw {
    fn connect(path: &Path) -> Raw {
        let stream = UnixStream::connect(path).expect("connect");
        stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone"));
        Raw { stream, reader }
    }

    /// Connects and reads the greeting.
    fn greeted(path: &Path) -> Raw {
        let mut raw = Raw::connect(path);
        let greeting = raw.recv();
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        raw
    }

    /// Connects, reads the greeting and negotiates.
    fn negotiated(path: &Path) -> Raw {
        let mut raw = Raw::greeted(path);
        raw.send("{\"execute\": \"qmp_capabilities\"}\n");
        assert_eq!(raw.recv(), json!({"return": {}}));
        raw
    }

    fn send(&mut self, text: &str) {
        self.stream.write_all(text.as_bytes()).expect("send");
    }

    fn recv_line(&mut self) -> String {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read a line");
        assert!(n > 0, "connection closed");
        assert!(line.ends_with('\n'), "line not terminated: {line:?}");
        assert_eq!(line.matches('\n').count(), 1, "multi-line reply: {line:?}");
        line
    }

    fn recv(&mut self) -> Value {
        let line = self.recv_line();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"))
    }

    /// Next message that is not an event.
    fn reply(&mut self) -> Value {
        loop {
            let msg = self.recv();
            if msg.get("event").is_none() {
                return msg;
            }
        }
    }

    fn request(&mut self, text: &str) -> Value {
        self.send(text);
        self.send("\n");
        self.reply()
    }

    /// `None` if nothing arrives within `wait`.
    fn try_recv(&mut self, wait: Duration) -> Option<Value> {
        self.stream.set_read_timeout(Some(wait)).expect("timeout");
        let mut line = String::new();
        let got = match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(serde_json::from_str(&line).expect("JSON")),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
            Err(e) => panic!("read: {e}"),
        };
        self.stream
            .set_read_timeout(Some(TIMEOUT))
            .expect("timeout");
        got
    }

    /// True when the server closed the connection.
    fn at_eof(&mut self) -> bool {
        let mut line = String::new();
        loop {
            line.clear();
            match self.reader.read_line(&mut line) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn greeting_and_negotiation() {
    let s = setup();
    let mut c = Raw::connect(&s.path);
    let greeting = c.recv();
    assert_eq!(
        greeting,
        json!({"QMP": {
            "version": {
                "godwit": {"major": 0, "minor": 1, "micro": 0},
                "package": format!("godwit {}", env!("CARGO_PKG_VERSION")),
            },
            "capabilities": [],
        }})
    );
    assert_eq!(
        c.request(r#"{"execute": "qmp_capabilities", "id": "neg"}"#),
        json!({"return": {}, "id": "neg"})
    );
    assert_eq!(
        c.request(r#"{"execute": "qmp_capabilities"}"#),
        json!({"error": {"class": "CommandNotFound",
            "desc": "Capabilities negotiation is already complete, command ignored"}})
    );
    assert_eq!(c.request(r#"{"execute": "echo"}"#), json!({"return": {}}));
}

#[test]
fn negotiation_refuses_unknown_capabilities() {
    let s = setup();
    let mut c = Raw::greeted(&s.path);
    assert_eq!(
        c.request(r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#),
        json!({"error": {"class": "GenericError", "desc": "Capability 'oob' not available"}})
    );
    assert_eq!(
        c.request(r#"{"execute": "qmp_capabilities", "arguments": {"bogus": 1}}"#),
        json!({"error": {"class": "GenericError", "desc": "Parameter 'bogus' is unexpected"}})
    );
    // Still not negotiated, and can still negotiate.
    assert_eq!(
        c.request(r#"{"execute": "echo"}"#)["error"]["class"],
        "CommandNotFound"
    );
    assert_eq!(
        c.request(r#"{"execute": "qmp_capabilities", "arguments": {"enable": []}}"#),
        json!({"return": {}})
    );
}

#[test]
fn commands_before_negotiation_are_refused() {
    let s = setup();
    let mut c = Raw::greeted(&s.path);
    let refused = json!({"error": {"class": "CommandNotFound",
        "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 3});
    assert_eq!(c.request(r#"{"execute": "echo", "id": 3}"#), refused);
    assert_eq!(
        c.request(r#"{"execute": "query-commands", "id": 3}"#),
        refused
    );
    assert_eq!(c.request(r#"{"execute": "nope", "id": 3}"#), refused);
    assert_eq!(s.handler.finished.load(Ordering::SeqCst), 0);
}

#[test]
fn return_and_error_shapes_echo_id() {
    let s = setup();
    let mut c = Raw::negotiated(&s.path);
    assert_eq!(
        c.request(r#"{"execute": "echo", "arguments": {"a": [1, "x"]}, "id": 42}"#),
        json!({"return": {"a": [1, "x"]}, "id": 42})
    );
    assert_eq!(
        c.request(r#"{"id": {"any": ["json"]}, "execute": "echo"}"#),
        json!({"return": {}, "id": {"any": ["json"]}})
    );
    assert_eq!(
        c.request(r#"{"execute": "fail", "id": "f"}"#),
        json!({"error": {"class": "GenericError", "desc": "it failed"}, "id": "f"})
    );
    assert_eq!(
        c.request(r#"{"execute": "no-device", "id": null}"#),
        json!({"error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"}, "id": null})
    );
    // Without an id, none is sent back.
    let reply = c.request(r#"{"execute": "fail"}"#);
    assert!(reply.get("id").is_none(), "{reply}");
    // The reply line keeps "return" first, like QEMU.
    c.send("{\"execute\": \"echo\", \"id\": 1}\n");
    assert_eq!(c.recv_line(), "{\"return\":{},\"id\":1}\n");
}

#[test]
fn query_commands_lists_protocol_and_handler_commands() {
    let s = setup();
    let mut c = Raw::negotiated(&s.path);
    let reply = c.request(r#"{"execute": "query-commands"}"#);
    let names: Vec<&str> = reply["return"]
        .as_array()
        .expect("array")
        .iter()
        .map(|e| e["name"].as_str().expect("name"))
        .collect();
    assert_eq!(
        names,
        [
            "qmp_capabilities",
            "query-commands",
            "getfd",
            "closefd",
            "echo",
            "fail",
            "no-device",
            "sleep",
            "typed",
            "emit",
            "boom",
            "quit",
            "take-fd"
        ]
    );
    assert_eq!(
        c.request(r#"{"execute": "query-commands", "arguments": {"x": 1}}"#)["error"]["desc"],
        "Parameter 'x' is unexpected"
    );
}

#[test]
fn unknown_command() {
    let s = setup();
    let mut c = Raw::negotiated(&s.path);
    assert_eq!(
        c.request(r#"{"execute": "nope", "id": 1}"#),
        json!({"error": {"class": "CommandNotFound",
            "desc": "The command nope has not been found"}, "id": 1})
    );
}

#[test]
fn malformed_requests_get_generic_errors() {
    let s = setup();
    let mut c = Raw::negotiated(&s.path);
    let generic = |desc: &str| json!({"error": {"class": "GenericError", "desc": desc}});
    let cases = [
        ("[1, 2]", generic("QMP input must be a JSON object")),
        ("42", generic("QMP input must be a JSON object")),
        ("\"execute\"", generic("QMP input must be a JSON object")),
        ("{}", generic("QMP input member 'execute' is missing")),
        (
            r#"{"arguments": {}, "id": 5}"#,
            json!({"error": {"class": "GenericError",
                "desc": "QMP input member 'execute' is missing"}, "id": 5}),
        ),
        (
            r#"{"execute": 1}"#,
            generic("QMP input member 'execute' must be a string"),
        ),
        (
            r#"{"execute": "echo", "arguments": [1]}"#,
            generic("QMP input member 'arguments' must be an object"),
        ),
        (
            r#"{"execute": "echo", "foo": 1, "id": "u"}"#,
            json!({"error": {"class": "GenericError",
                "desc": "QMP input member 'foo' is unexpected"}, "id": "u"}),
        ),
    ];
    for (input, want) in cases {
        assert_eq!(c.request(input), want, "input {input}");
    }
    // Still usable.
    assert_eq!(c.request(r#"{"execute": "echo"}"#), json!({"return": {}}));
}

#[test]
fn bad_arguments_name_the_parameter() {
    let s = setup();
    let mut c = Raw::negotiated(&s.path);
    let cases = [
        (r#"{"size": 1, "foo": 2}"#, "Parameter 'foo' is unexpected"),
        (r#"{"name": "x"}"#, "Parameter 'size' is missing"),
        (
            r#"{"size": "big"}"#,
            "Invalid parameter type for 'size': expected u64, got string \"big\"",
        ),
        (
            r#"{"size": 1, "name": 7}"#,
            "Invalid parameter type for 'name': expected a string, got integer `7`",
        ),
    ];
    for (args, desc) in cases {
        let reply = c.request(&format!(
            r#"{{"execute": "typed", "arguments": {args}, "id": 9}}"#
        ));
        assert_eq!(
            reply,
            json!({"error": {"class": "GenericError", "desc": desc}, "id": 9}),
            "args {args}"
        );
    }
    assert_eq!(
        c.request(r#"{"execute": "typed", "arguments": {"size": 3}}"#),
        json!({"return": {"size": 3, "name": null}})
    );
}

#[test]
fn malformed_json_then_valid_command() {
    let s = setup();
    let mut c = Raw::negotiated(&s.path);
    c.send("{\"execute\": }\n{\"execute\": \"echo\", \"id\": 1}\n");
    let err = c.recv();
    assert_eq!(err["error"]["class"], "GenericError", "{err}");
    let desc = err["error"]["desc"].as_str().expect("desc");
    assert!(
        desc.starts_with("JSON parse error: expected value"),
        "{desc}"
    );
    assert!(err.get("id").is_none());
    assert_eq!(c.recv(), json!({"return": {}, "id": 1}));

    // Garbage after an error on the same line is discarded with it.
    c.send(
        "{\"a\" 1} {\"execute\": \"echo\", \"id\": \"lost\"}\n{\"execute\": \"echo\", \"id\": 2}\n",
    );
    assert_eq!(c.recv()["error"]["class"], "GenericError");
    assert_eq!(c.recv(), json!({"return": {}, "id": 2}));

    // Garbage without a newline: discarded until one arrives.
    c.send("}}} not json");
    assert_eq!(c.recv()["error"]["class"], "GenericError");
    c.send(" more garbage {\"execute\": \"echo\", \"id\": \"lost\"}");
    assert!(c.try_recv(Duration::from_millis(200)).is_none());
    c.send("\n{\"execute\": \"echo\", \"id\": 3}\n");
    assert_eq!(c.recv(), json!({"return": {}, "id": 3}));

    // A control character, invalid UTF-8 and a raw newline inside a string.
    c.send("{\"execute\": \"\u{1}\"}\n");
    assert_eq!(c.recv()["error"]["class"], "GenericError");
    c.stream
        .write_all(b"{\"execute\": \"ec\xff\xfeho\"}\n")
        .expect("send");
    assert_eq!(c.recv()["error"]["class"], "GenericError");
    c.send("{\"execute\": \"ec\nho\"}\n{\"execute\": \"echo\", \"id\": 4}\n");
    assert_eq!(c.recv()["error"]["class"], "GenericError");
    assert_eq!(c.recv(), json!({"return": {}, "id": 4}));
}

#[test]
fn objects_sharing_a_line_spanning_lines_and_split_writes() {
    let s = setup();
    let mut c = Raw::negotiated(&s.path);
    c.send("{\"execute\": \"echo\", \"id\": 1}{\"execute\": \"echo\", \"id\": 2} {\"execute\": \"fail\", \"id\": 3}\n");
    assert_eq!(c.recv()["id"], 1);
    assert_eq!(c.recv()["id"], 2);
    assert_eq!(c.recv()["id"], 3);

    c.send("{\n  \"execute\": \"echo\",\n  \"arguments\": {\"k\":\n \"v\"},\n  \"id\": 4\n}\n");
    assert_eq!(c.recv(), json!({"return": {"k": "v"}, "id": 4}));

    for part in ["{\"exec", "ute\": \"ec", "ho\", \"id\"", ": 5}"] {
        c.send(part);
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(c.recv(), json!({"return": {}, "id": 5}));
}

#[test]
fn oversized_input_is_refused_and_connection_recovers() {
    let s = setup();
    let mut c = Raw::negotiated(&s.path);
    let big = "x".repeat(MAX_INPUT_SIZE + 1000);
    c.send(&format!(
        "{{\"execute\": \"echo\", \"arguments\": {{\"a\": \"{big}"
    ));
    let err = c.recv();
    let desc = err["error"]["desc"].as_str().expect("desc");
    assert!(
        desc.starts_with("QMP input exceeds 1048576 bytes"),
        "{desc}"
    );
    c.send("\"}}\n{\"execute\": \"echo\", \"id\": 1}\n");
    assert_eq!(c.recv(), json!({"return": {}, "id": 1}));
}

#[test]
fn handler_panic_becomes_an_error() {
    let s = setup();
    let mut c = Raw::negotiated(&s.path);
    let reply = c.request(r#"{"execute": "boom", "id": 1}"#);
    assert_eq!(reply["error"]["class"], "GenericError");
    let desc = reply["error"]["desc"].as_str().expect("desc");
    assert!(
        desc.contains("command 'boom' failed") && desc.contains("boom"),
        "{desc}"
    );
    assert_eq!(c.request(r#"{"execute": "echo"}"#), json!({"return": {}}));
}

#[test]
fn events_reach_negotiated_clients_only() {
    let s = setup();
    let mut a = Raw::negotiated(&s.path);
    let mut b = Raw::negotiated(&s.path);
    let mut early = Raw::greeted(&s.path);
    wait_until("two listeners", || s.events.listeners() == 2);

    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    s.events.emit("STOP", json!({}));
    s.events.emit("RESET", json!({"guest": true}));
    s.events.emit("RESUME", Value::Null);
    for c in [&mut a, &mut b] {
        let stop = c.recv();
        assert_eq!(stop["event"], "STOP");
        assert_eq!(stop["data"], json!({}));
        let secs = stop["timestamp"]["seconds"].as_u64().expect("seconds");
        assert!(secs >= before && secs < before + 60, "{stop}");
        assert!(stop["timestamp"]["microseconds"].as_u64().expect("us") < 1_000_000);
        let reset = c.recv();
        assert_eq!(reset["event"], "RESET");
        assert_eq!(reset["data"], json!({"guest": true}));
        assert_eq!(c.recv()["data"], json!({}));
    }
    assert!(early.try_recv(Duration::from_millis(200)).is_none());

    // After negotiating, the late client gets later events only.
    assert_eq!(
        early.request(r#"{"execute": "qmp_capabilities"}"#),
        json!({"return": {}})
    );
    s.events
        .emit("SHUTDOWN", json!({"reason": "host-qmp-quit"}));
    assert_eq!(early.recv()["event"], "SHUTDOWN");
    assert_eq!(a.recv()["event"], "SHUTDOWN");
}

#[test]
fn stuck_client_does_not_block_emit() {
    let s = setup();
    // Negotiates blindly, then never reads anything.
    let mut stuck = UnixStream::connect(&s.path).expect("connect");
    stuck
        .write_all(b"{\"execute\": \"qmp_capabilities\"}\n")
        .expect("send");
    let mut good = Raw::negotiated(&s.path);
    wait_until("two listeners", || s.events.listeners() == 2);

    let start = Instant::now();
    for i in 0..10_000 {
        s.events.emit(
            "TICK",
            json!({"i": i, "padding": "some text to fill the socket buffer faster"}),
        );
    }
    let took = start.elapsed();
    assert!(took < Duration::from_secs(2), "emit took {took:?}");

    // The reading client still gets replies and, once it has caught up, events.
    assert_eq!(
        good.request(r#"{"execute": "echo", "id": "still"}"#),
        json!({"return": {}, "id": "still"})
    );
    let mark_seen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let emitter = {
        let events = s.events.clone();
        let seen = Arc::clone(&mark_seen);
        thread::spawn(move || {
            while !seen.load(Ordering::SeqCst) {
                events.emit("MARK", json!({}));
                thread::sleep(Duration::from_millis(50));
            }
        })
    };
    loop {
        let msg = good.recv();
        if msg["event"] == "MARK" {
            break;
        }
    }
    mark_seen.store(true, Ordering::SeqCst);
    emitter.join().expect("emitter");

    // The stuck client is disconnected after the write timeout.
    let deadline = Instant::now() + WRITE_TIMEOUT + TIMEOUT;
    while s.events.listeners() != 1 {
        assert!(Instant::now() < deadline, "stuck client not dropped");
        thread::sleep(Duration::from_millis(50));
    }
    drop(stuck);
}

#[test]
fn client_disconnecting_mid_command() {
    let s = setup();
    let mut other = Raw::negotiated(&s.path);
    {
        let mut c = Raw::negotiated(&s.path);
        c.send("{\"execute\": \"sleep\", \"arguments\": {\"ms\": 300}}\n");
        // Dropped with the command running.
    }
    {
        // Another one sends half an object and leaves.
        let mut c = Raw::negotiated(&s.path);
        c.send("{\"execute\": \"ech");
    }
    s.events.emit("WHILE_RUNNING", json!({}));
    assert_eq!(other.recv()["event"], "WHILE_RUNNING");
    assert_eq!(
        other.request(r#"{"execute": "echo", "id": 1}"#),
        json!({"return": {}, "id": 1})
    );
    wait_until("the command finished", || {
        s.handler.finished.load(Ordering::SeqCst) == 1
    });
    wait_until("dead clients removed", || s.events.listeners() == 1);
    s.events.emit("AFTER", json!({}));
    assert_eq!(other.recv()["event"], "AFTER");
    let mut fresh = Raw::negotiated(&s.path);
    assert_eq!(
        fresh.request(r#"{"execute": "echo"}"#),
        json!({"return": {}})
    );
}

#[test]
fn replies_are_flushed_when_the_client_stops_sending() {
    let s = setup();
    let mut c = Raw::greeted(&s.path);
    c.send("{\"execute\": \"qmp_capabilities\"}\n{\"execute\": \"sleep\", \"arguments\": {\"ms\": 100}, \"id\": 1}\n");
    c.stream
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    assert_eq!(c.recv(), json!({"return": {}}));
    assert_eq!(c.recv(), json!({"return": {}, "id": 1}));
    assert!(c.at_eof());
}

#[test]
fn events_never_split_reply_lines() {
    let s = setup();
    let mut c = Raw::negotiated(&s.path);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let emitter = {
        let events = s.events.clone();
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let data = json!({"blob": "e".repeat(3000)});
            while !stop.load(Ordering::SeqCst) {
                events.emit("NOISE", data.clone());
                thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let payload = "r".repeat(50_000);
    for id in 0..50 {
        c.send(&format!(
            "{{\"execute\": \"echo\", \"arguments\": {{\"p\": \"{payload}\"}}, \"id\": {id}}}\n"
        ));
        // recv() checks every line is one complete JSON object.
        let reply = c.reply();
        assert_eq!(reply["id"], id);
        assert_eq!(
            reply["return"]["p"].as_str().map(str::len),
            Some(payload.len())
        );
    }
    stop.store(true, Ordering::SeqCst);
    emitter.join().expect("emitter");
}

#[test]
fn stale_socket_is_replaced() {
    let dir = TempDir::new_with_prefix("/tmp/godwit-api-test").expect("temp dir");
    let path = dir.as_path().join("api.sock");
    drop(UnixListener::bind(&path).expect("bind"));
    assert!(path.exists(), "stale socket file should remain");
    let handler = Arc::new(Fake::default());
    let (server, _events) = ApiServer::start(&path, handler).expect("replace stale socket");
    let mut c = Raw::negotiated(&path);
    assert_eq!(c.request(r#"{"execute": "echo"}"#), json!({"return": {}}));
    drop(server);
    assert!(!path.exists(), "socket removed on shutdown");
    assert!(c.at_eof(), "client closed on shutdown");
}

#[test]
fn non_socket_file_is_not_replaced() {
    let dir = TempDir::new_with_prefix("/tmp/godwit-api-test").expect("temp dir");
    let path = dir.as_path().join("api.sock");
    std::fs::write(&path, "precious").expect("write");
    let handler = Arc::new(Fake::default());
    let err = ApiServer::start(&path, handler).expect_err("must refuse");
    assert!(matches!(err, ApiError::NotASocket { .. }), "{err}");
    assert!(
        err.to_string().contains("exists and is not a socket"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&path).expect("read"), "precious");
}

#[test]
fn live_socket_is_not_stolen() {
    let s = setup();
    let mut c = Raw::negotiated(&s.path);
    let handler = Arc::new(Fake::default());
    let err = ApiServer::start(&s.path, handler).expect_err("must refuse");
    assert!(matches!(err, ApiError::SocketInUse { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "API socket {} is already served by another process (a test connection to it \
             succeeded); stop that process or choose another --api-socket path",
            s.path.display()
        )
    );
    // The first server is intact.
    assert!(s.path.exists());
    assert_eq!(c.request(r#"{"execute": "echo"}"#), json!({"return": {}}));
    let mut d = Raw::negotiated(&s.path);
    assert_eq!(d.request(r#"{"execute": "echo"}"#), json!({"return": {}}));
}

#[test]
fn shutdown_leaves_a_replaced_socket_alone() {
    let mut s = setup();
    std::fs::remove_file(&s.path).expect("remove");
    let other = UnixListener::bind(&s.path).expect("bind");
    s.server.shutdown();
    assert!(s.path.exists(), "someone else's socket must stay");
    s.server.shutdown(); // idempotent
    s.events.emit("AFTER_SHUTDOWN", json!({}));
    drop(other);
}

#[test]
fn path_too_long_is_reported() {
    let long = PathBuf::from(format!("/tmp/{}.sock", "x".repeat(120)));
    let handler = Arc::new(Fake::default());
    let err = ApiServer::start(&long, handler).expect_err("must refuse");
    assert!(matches!(err, ApiError::PathTooLong { .. }), "{err}");
    let missing_dir = Path::new("/nonexistent-godwit-dir/api.sock");
    let handler = Arc::new(Fake::default());
    let err = ApiServer::start(missing_dir, handler).expect_err("must refuse");
    assert!(
        err.to_string().starts_with(
            "cannot create the API socket /nonexistent-godwit-dir/api.sock: No such file or directory"
        ),
        "{err}"
    );
}

#[test]
fn client_skips_and_keeps_events() {
    let s = setup();
    let mut client = QmpClient::connect(&s.path, TIMEOUT).expect("connect");
    assert_eq!(client.greeting()["QMP"]["version"]["godwit"]["minor"], 1);
    // The event is emitted while the command runs, before its reply.
    assert_eq!(
        client
            .execute("emit", json!({"name": "DURING"}))
            .expect("emit"),
        json!({})
    );
    assert_eq!(
        client.execute("echo", json!({"x": 1})).expect("echo"),
        json!({"x": 1})
    );
    let events = client.take_events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["event"], "DURING");
    assert_eq!(events[0]["data"], json!({"from": "command"}));
    assert!(client.take_events().is_empty());

    // wait_event skips (and keeps) other events.
    let events = s.events.clone();
    let t = thread::spawn(move || {
        thread::sleep(Duration::from_millis(50));
        events.emit("OTHER", json!({}));
        events.emit("WANTED", json!({"n": 1}));
    });
    let got = client.wait_event("WANTED", TIMEOUT).expect("wait_event");
    assert_eq!(got["data"], json!({"n": 1}));
    t.join().expect("emitter");
    let rest = client.take_events();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0]["event"], "OTHER");

    // Already-received events are found without reading.
    client
        .execute("emit", json!({"name": "QUEUED"}))
        .expect("emit");
    assert_eq!(
        client
            .wait_event("QUEUED", Duration::from_millis(1))
            .expect("queued")["event"],
        "QUEUED"
    );

    let err = client
        .wait_event("NEVER", Duration::from_millis(100))
        .expect_err("timeout");
    assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("waiting for event NEVER"), "{err}");

    let err = client.execute("no-device", Value::Null).expect_err("error");
    assert_eq!(
        err.to_string(),
        "error: DeviceNotFound: Device 'x' not found"
    );
    let err = client.execute("echo", json!([1])).expect_err("bad args");
    assert!(matches!(err, ClientError::InvalidArgs { .. }), "{err}");
    // Still in sync.
    assert_eq!(
        client.execute("echo", Value::Null).expect("echo"),
        json!({})
    );
}

#[test]
fn client_reports_server_going_away() {
    let mut s = setup();
    let mut client = QmpClient::connect(&s.path, TIMEOUT).expect("connect");
    s.server.shutdown();
    let err = client.execute("echo", Value::Null).expect_err("closed");
    assert!(
        matches!(err, ClientError::Closed { .. } | ClientError::Io { .. }),
        "{err}"
    );
}

#[test]
fn client_connect_retry_waits_for_the_server() {
    let dir = TempDir::new_with_prefix("/tmp/godwit-api-test").expect("temp dir");
    let path = dir.as_path().join("api.sock");
    let server_path = path.clone();
    let server = thread::spawn(move || {
        thread::sleep(Duration::from_millis(100));
        let handler = Arc::new(Fake::default());
        ApiServer::start(&server_path, handler).expect("start")
    });
    let mut client = QmpClient::connect_retry(&path, TIMEOUT).expect("connect");
    assert_eq!(
        client.execute("echo", Value::Null).expect("echo"),
        json!({})
    );
    drop(server.join().expect("server"));
}

#[test]
fn run_ctl_output_and_errors() {
    let s = setup();
    assert_eq!(
        run_ctl(&s.path, "echo", Some(r#"{"a": 1, "b": [true]}"#)).expect("echo"),
        "{\n  \"a\": 1,\n  \"b\": [\n    true\n  ]\n}"
    );
    assert_eq!(run_ctl(&s.path, "echo", None).expect("echo"), "{}");

    let err = run_ctl(&s.path, "no-device", None).expect_err("error");
    assert_eq!(
        err.to_string(),
        "error: DeviceNotFound: Device 'x' not found"
    );
    let err = run_ctl(&s.path, "nope", None).expect_err("error");
    assert_eq!(
        err.to_string(),
        "error: CommandNotFound: The command nope has not been found"
    );
    let err = run_ctl(&s.path, "typed", Some(r#"{"size": "x"}"#)).expect_err("error");
    assert_eq!(
        err.to_string(),
        "error: GenericError: Invalid parameter type for 'size': expected u64, got string \"x\""
    );
    match run_ctl(&s.path, "fail", None) {
        Err(ClientError::Qmp { class, desc }) => {
            assert_eq!(
                (class.as_str(), desc.as_str()),
                ("GenericError", "it failed")
            );
        }
        other => panic!("unexpected {other:?}"),
    }

    let err = run_ctl(&s.path, "echo", Some("{bad")).expect_err("bad JSON");
    assert_eq!(
        err.to_string(),
        "invalid JSON-ARGS '{bad': key must be a string at line 1 column 2"
    );
    let err = run_ctl(&s.path, "echo", Some("[1]")).expect_err("not an object");
    assert_eq!(
        err.to_string(),
        "invalid JSON-ARGS '[1]': expected a JSON object such as '{\"id\": \"disk0\"}', got an array"
    );

    let missing = s.path.with_file_name("nope.sock");
    let err = run_ctl(&missing, "echo", None).expect_err("no socket");
    let m = missing.display();
    assert_eq!(
        err.to_string(),
        format!(
            "cannot connect to {m}: No such file or directory (os error 2); \
             is godwit running with --api-socket {m}?"
        )
    );
}

#[test]
fn many_clients_in_parallel() {
    let s = setup();
    let results = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..16)
        .map(|n| {
            let path = s.path.clone();
            let results = Arc::clone(&results);
            thread::spawn(move || {
                let mut client = QmpClient::connect(&path, TIMEOUT).expect("connect");
                for i in 0..20 {
                    let ret = client
                        .execute("echo", json!({"n": n, "i": i}))
                        .expect("echo");
                    assert_eq!(ret, json!({"n": n, "i": i}));
                }
                results.lock().expect("lock").push(n);
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    assert_eq!(results.lock().expect("lock").len(), 16);
}

#[test]
fn pipelined_commands_without_reading_replies() {
    let s = setup();
    let mut c = Raw::negotiated(&s.path);
    let mut writer = c.stream.try_clone().expect("clone");
    // 3000 replies of ~250 bytes: more than a socket buffer holds.
    let pad = "p".repeat(200);
    let sent_pad = pad.clone();
    let sender = thread::spawn(move || {
        let pad = sent_pad;
        for id in 0..3000 {
            let line = format!(
                "{{\"execute\": \"echo\", \"arguments\": {{\"n\": {id}, \"pad\": \"{pad}\"}}, \"id\": {id}}}\n"
            );
            writer.write_all(line.as_bytes()).expect("send");
        }
    });
    // Let replies pile up; the server must hold back instead of buffering
    // without bound, and other clients must not notice.
    thread::sleep(Duration::from_millis(300));
    let mut other = Raw::negotiated(&s.path);
    assert_eq!(
        other.request(r#"{"execute": "echo"}"#),
        json!({"return": {}})
    );
    for id in 0..3000 {
        assert_eq!(c.recv(), json!({"return": {"n": id, "pad": pad}, "id": id}));
    }
    sender.join().expect("sender");
}

#[test]
fn connections_beyond_the_limit_are_refused() {
    let s = setup();
    let mut clients: Vec<Raw> = (0..MAX_CONNECTIONS)
        .map(|_| Raw::greeted(&s.path))
        .collect();
    let mut extra = Raw::connect(&s.path);
    let refused = extra.recv();
    assert_eq!(refused["error"]["class"], "GenericError");
    assert_eq!(
        refused["error"]["desc"],
        format!("too many API connections (limit {MAX_CONNECTIONS}); close one and retry")
    );
    assert!(extra.at_eof());
    // Room again once a client leaves.
    clients.pop();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let mut c = Raw::connect(&s.path);
        if c.recv().get("QMP").is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "no room after a client left");
        thread::sleep(Duration::from_millis(20));
    }
    let c = clients.first_mut().expect("client");
    assert_eq!(
        c.request(r#"{"execute": "qmp_capabilities"}"#),
        json!({"return": {}})
    );
}

#[test]
fn quit_reply_and_last_events_are_delivered_on_shutdown() {
    let mut s = setup();
    let mut c = Raw::negotiated(&s.path);
    let mut watcher = Raw::negotiated(&s.path);
    let mut quiet = Raw::greeted(&s.path);
    c.send("{\"execute\": \"quit\", \"id\": \"q\"}\n");
    // The "main thread": as soon as quit is requested, emit SHUTDOWN and
    // drop the server, while the command has not returned yet.
    wait_until("quit requested", || {
        s.handler.quit_requested.load(Ordering::SeqCst)
    });
    s.events.emit(
        "SHUTDOWN",
        json!({"guest": false, "reason": "host-qmp-quit"}),
    );
    let start = Instant::now();
    s.server.shutdown();
    assert!(start.elapsed() < SHUTDOWN_FLUSH_TIMEOUT + Duration::from_secs(1));
    assert!(!s.path.exists());

    let mut got = [c.recv(), c.recv()];
    got.sort_by_key(|m| m.get("event").is_none());
    assert_eq!(got[0]["event"], "SHUTDOWN");
    assert_eq!(got[1], json!({"return": {}, "id": "q"}));
    assert!(c.at_eof());
    assert_eq!(watcher.recv()["event"], "SHUTDOWN");
    assert!(watcher.at_eof());
    assert!(quiet.at_eof());
}

#[test]
fn shutdown_does_not_wait_long_for_stuck_clients() {
    let mut s = setup();
    let mut stuck = UnixStream::connect(&s.path).expect("connect");
    stuck
        .write_all(b"{\"execute\": \"qmp_capabilities\"}\n")
        .expect("send");
    wait_until("listener", || s.events.listeners() == 1);
    let blob = "b".repeat(10_000);
    for _ in 0..200 {
        s.events.emit("BIG", json!({ "blob": blob }));
    }
    let start = Instant::now();
    s.server.shutdown();
    let took = start.elapsed();
    assert!(
        took < SHUTDOWN_FLUSH_TIMEOUT + Duration::from_millis(500),
        "shutdown took {took:?}"
    );
}

#[test]
fn socket_is_created_for_the_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let s = setup();
    let mode = std::fs::metadata(&s.path)
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, SOCKET_MODE);
    assert_eq!(SOCKET_MODE, 0o600);
}

/// A process of another user is refused by SO_PEERCRED even when the
/// socket's mode would let it connect.
#[test]
fn peers_of_other_users_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let s = setup_with(ServerOptions {
        mode: 0o666,
        ..ServerOptions::default()
    });
    let dir = s.path.parent().expect("socket dir");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // SAFETY: geteuid has no preconditions.
    let own = unsafe { libc::geteuid() };
    let path = s.path.clone();
    let line = thread::spawn(move || {
        // Credentials are per thread in the kernel; the raw syscall changes
        // only this thread's (glibc's setresuid would change every thread).
        // SAFETY: plain syscall with integer arguments; it only affects this
        // thread, which ends right after the connection.
        let rc = unsafe { libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) };
        let changed = rc == 0;
        let stream = UnixStream::connect(&path).expect("connect");
        stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).expect("read");
        (changed, line)
    })
    .join()
    .expect("client thread");
    match line {
        (true, line) => {
            let reply: Value = serde_json::from_str(&line).expect("JSON");
            assert_eq!(reply["error"]["class"], "GenericError", "{line}");
            let desc = reply["error"]["desc"].as_str().expect("desc");
            assert!(
                desc.contains("uid 65534") && desc.contains(&format!("uid {own}")),
                "{desc}"
            );
        }
        // Not privileged to change uid: at least the own user is served.
        (false, line) => assert!(line.contains("\"QMP\""), "{line}"),
    }
    // The own user still is.
    let mut c = Raw::negotiated(&s.path);
    assert_eq!(c.request(r#"{"execute": "echo"}"#), json!({"return": {}}));
}

#[test]
fn silent_connections_are_closed_after_the_negotiation_timeout() {
    let timeout = Duration::from_millis(300);
    let s = setup_with(ServerOptions {
        negotiation_timeout: timeout,
        ..ServerOptions::default()
    });
    // Every slot taken by a client that never speaks (or never finishes).
    let mut idle: Vec<Raw> = (0..MAX_CONNECTIONS)
        .map(|_| Raw::greeted(&s.path))
        .collect();
    idle[0].send("{\"execute\": \"qmp_cap");
    let mut refused = Raw::connect(&s.path);
    assert!(refused.recv()["error"]["desc"]
        .as_str()
        .expect("desc")
        .starts_with("too many API connections"));
    for c in &mut idle {
        let reply = c.recv();
        assert_eq!(
            reply["error"]["desc"],
            format!("no qmp_capabilities within {timeout:?} of connecting; closing the connection")
        );
        assert!(c.at_eof());
    }
    // Management gets in again, and a negotiated client may stay quiet.
    let mut c = Raw::negotiated(&s.path);
    thread::sleep(timeout * 2);
    assert_eq!(c.request(r#"{"execute": "echo"}"#), json!({"return": {}}));
}

#[test]
fn getfd_names_descriptors_passed_with_scm_rights() {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let s = setup();
    let mut c = Raw::negotiated(&s.path);
    assert_eq!(
        c.request(r#"{"execute": "getfd", "arguments": {"fdname": "a"}}"#),
        json!({"error": {"class": "GenericError", "desc": "No file descriptor supplied via SCM_RIGHTS"}})
    );
    let file = std::fs::File::open("/dev/null").expect("open");
    let line = b"{\"execute\": \"getfd\", \"arguments\": {\"fdname\": \"null\"}}\n";
    c.stream
        .send_with_fds(&[&line[..]], &[file.as_raw_fd()])
        .expect("send with fd");
    drop(file);
    assert_eq!(c.reply(), json!({"return": {}}));
    assert_eq!(
        c.request(r#"{"execute": "take-fd", "arguments": {"name": "null"}}"#),
        json!({"return": {"target": "/dev/null"}})
    );
    assert_eq!(
        c.request(r#"{"execute": "take-fd", "arguments": {"name": "null"}}"#)["error"]["desc"],
        "File descriptor named 'null' not found"
    );
    assert_eq!(
        c.request(r#"{"execute": "closefd", "arguments": {"fdname": "nope"}}"#)["error"]["desc"],
        "File descriptor named 'nope' not found"
    );
    assert_eq!(
        c.request(r#"{"execute": "getfd", "arguments": {"fdname": "7"}}"#)["error"]["desc"],
        "Parameter 'fdname' expects a name not starting with a digit"
    );
    assert_eq!(
        c.request(r#"{"execute": "getfd"}"#)["error"]["desc"],
        "Parameter 'fdname' is missing"
    );
}
