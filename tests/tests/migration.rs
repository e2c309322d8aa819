//! Live migration between two hosts (network namespaces bridged onto one
//! segment with a client), with the migration stream over TCP across the
//! veths. The guest serves UDP echo and prints a heartbeat; a client keeps
//! sending while it moves.

use std::io::Write;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use godwit_migration::protocol::{self, Kind};
use godwit_tests::guest::spawn_serving;
use godwit_tests::migrate::{assert_heartbeat_continues, wait_migration};
use godwit_tests::net_backend::NetBackend;
use godwit_tests::{
    heartbeat, qmp_connect, serve_cmdline, wait_listening, EchoClient, QmpClient, RunningVm,
    TempDir, TwoHosts, BOOT,
};

const PORT: u16 = 4444;

struct Source {
    vm: RunningVm,
    qmp: QmpClient,
}

fn start_source(
    hosts: &TwoHosts,
    dir: &TempDir,
    vcpus: u32,
    net_extra: &str,
    cmdline_extra: &str,
) -> Source {
    let api = dir.join("a.sock");
    let cmdline = serve_cmdline(200, &format!("{} {cmdline_extra}", hosts.guest_ip_param()));
    let net = format!("tap,ifname=gwtap0{net_extra}");
    let mut vm = spawn_serving(
        Some(&hosts.ns_a()),
        &["--vcpus", &vcpus.to_string()],
        &net,
        &cmdline,
        Some(&api),
    );
    vm.wait_prefix("heartbeat ", BOOT);
    let qmp = qmp_connect(&api);
    Source { vm, qmp }
}

fn start_destination(hosts: &TwoHosts, net: &str) -> RunningVm {
    let uri = format!("tcp:{}:{PORT}", hosts.addr_b());
    let vm = RunningVm::spawn_in(&hosts.ns_b(), &["run", "--incoming", &uri, "--net", net]);
    wait_listening(&hosts.ns_b(), PORT);
    vm
}

/// Migrates a running guest from A to B while a client talks to it.
fn migrate_and_check(vcpus: u32, subnet: u8, cmdline_extra: &str) {
    let hosts = TwoHosts::new(subnet, true, true);
    let dir = TempDir::new("mig");
    let mut src = start_source(&hosts, &dir, vcpus, "", cmdline_extra);
    let mut dst = start_destination(&hosts, "tap,ifname=gwtap0");
    let client = EchoClient::start(&hosts.ns_c(), hosts.guest_echo(), Duration::from_millis(20));
    std::thread::sleep(Duration::from_millis(500));

    let uri = format!("tcp:{}:{PORT}", hosts.addr_b());
    src.qmp.execute("migrate", json!({ "uri": uri })).unwrap();
    let info = wait_migration(&mut src.qmp, Duration::from_secs(120));
    assert_eq!(info["status"], "completed", "{info}");
    let migrated_at = Instant::now();

    // The source exits cleanly once the destination confirmed.
    let (status, stderr) = src.vm.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "source: {stderr}");

    // The counter continues on B.
    let first_on_b = assert_heartbeat_continues(&mut src.vm, &mut dst);
    dst.wait_prefix(
        &format!("heartbeat {}", first_on_b + 2),
        Duration::from_secs(20),
    );

    // The client kept being answered, now by the guest on B.
    std::thread::sleep(Duration::from_secs(1));
    // B announced the guest in rounds, as QEMU does, so that one lost
    // frame or interrupt does not leave the segment sending to A.
    while dst.try_line(Duration::from_millis(100)).is_some() {}
    let announced = dst
        .seen
        .iter()
        .filter(|l| l.ends_with("announce: gratuitous arp sent"))
        .count();
    assert!(
        announced >= 2,
        "the guest on B announced itself {announced} times (5 rounds asked for); console:\n{}",
        dst.seen.join("\n")
    );
    let (sent, replies) = client.finish();
    let after = replies.iter().filter(|t| **t > migrated_at).count();
    assert!(
        after >= 10,
        "echo replies after migration: {after} of {sent} sent; the guest's console on B:\n{}",
        dst.seen.join("\n")
    );
    assert!(
        replies.len() as u64 >= sent * 8 / 10,
        "most echoes answered: {} of {sent}",
        replies.len()
    );
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &hosts.ns_c(),
            "ping",
            "-c",
            "2",
            "-W",
            "3",
            &hosts.guest_ip(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "ping the migrated guest");
}

#[test]
fn migrates_a_tap_guest_between_hosts() {
    migrate_and_check(1, 101, "");
}

#[test]
fn migrates_a_two_vcpu_guest() {
    migrate_and_check(2, 102, "");
}

#[test]
fn migrates_a_guest_that_dirties_memory() {
    migrate_and_check(1, 103, "godwit.dirty=8M:2000");
}

/// The guest was offered 2 queue pairs (godwit-1.2): a destination whose
/// TAP is a single-queue TAP refuses before any page, naming the count.
#[test]
fn destination_peer_with_fewer_queue_pairs_is_rejected_before_any_page() {
    let hosts = TwoHosts::new(105, true, true);
    let dir = TempDir::new("migrejq");
    let out = std::process::Command::new("ip")
        .args([
            "-n",
            &hosts.ns_b(),
            "tuntap",
            "add",
            "dev",
            "gwsq0",
            "mode",
            "tap",
            "vnet_hdr",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut src = start_source(&hosts, &dir, 1, "", "");
    let mut dst = start_destination(&hosts, "tap,ifname=gwsq0");
    let uri = format!("tcp:{}:{PORT}", hosts.addr_b());
    src.qmp.execute("migrate", json!({ "uri": uri })).unwrap();
    let info = wait_migration(&mut src.qmp, Duration::from_secs(30));
    assert_eq!(info["status"], "failed", "{info}");
    assert_eq!(
        info["transferred-bytes"], 0,
        "not a single page was sent: {info}"
    );
    let (status, stderr) = dst.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("lacks queue pairs the guest was offered")
            && stderr.contains("2 queue pairs, the peer carries 1")
            && stderr.contains("single-queue TAP"),
        "{stderr}"
    );
    assert_eq!(
        src.qmp.execute("query-status", Value::Null).unwrap()["status"],
        "running"
    );
    src.qmp.execute("quit", Value::Null).unwrap();
}

#[test]
fn destination_peer_without_vnet_hdr_is_rejected_before_any_page() {
    let hosts = TwoHosts::new(104, true, true);
    let dir = TempDir::new("migrej");
    let mut src = start_source(&hosts, &dir, 1, "", "");
    let mut dst = start_destination(&hosts, "tap,ifname=gwtap0,vnet_hdr=off");
    let uri = format!("tcp:{}:{PORT}", hosts.addr_b());
    src.qmp.execute("migrate", json!({ "uri": uri })).unwrap();
    let info = wait_migration(&mut src.qmp, Duration::from_secs(30));
    assert_eq!(info["status"], "failed", "{info}");
    let err = info["error"].as_str().unwrap();
    assert!(
        err.contains("destination refused") && err.contains("csum (bit 0)"),
        "{err}"
    );
    assert_eq!(
        info["transferred-bytes"], 0,
        "not a single page was sent: {info}"
    );
    // The destination ends with the same reasons; the source never paused.
    let (status, stderr) = dst.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("lacks features the guest was offered"),
        "{stderr}"
    );
    assert_eq!(
        src.qmp.execute("query-status", Value::Null).unwrap()["status"],
        "running"
    );
    let events = src.qmp.take_events();
    assert!(
        !events.iter().any(|e| e["event"] == "STOP"),
        "the source never stopped: {events:?}"
    );
    let next = heartbeat(&src.vm.wait_prefix("heartbeat ", Duration::from_secs(5)));
    src.vm
        .wait_prefix(&format!("heartbeat {}", next + 1), Duration::from_secs(5));
    src.qmp.execute("quit", Value::Null).unwrap();
}

#[test]
fn a_blocked_vm_is_refused_up_front() {
    let hosts = TwoHosts::new(105, true, true);
    let dir = TempDir::new("migblock");
    let mut src = start_source(&hosts, &dir, 1, ",vnet_hdr=off,strict=off", "");
    let err = src
        .qmp
        .execute("migrate", json!({"uri": "tcp:10.105.0.12:4444"}))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot migrate") && err.contains("net0: strict=off"),
        "{err}"
    );
    let info = src.qmp.execute("query-migrate", Value::Null).unwrap();
    assert!(
        info["blocked-reasons"][0]
            .as_str()
            .unwrap()
            .contains("strict=off"),
        "{info}"
    );
    src.qmp.execute("quit", Value::Null).unwrap();
}

/// A stand-in destination that follows the protocol up to `phase` and then
/// drops the connection, as a killed destination would.
fn fake_destination(ns: &str, addr: String, phase: &'static str) -> std::thread::JoinHandle<()> {
    TwoHosts::run_in(ns, move || {
        let listener = TcpListener::bind((addr.as_str(), PORT)).unwrap();
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let hello: protocol::Hello = protocol::expect(&mut conn, Kind::Hello, "Hello")
            .unwrap()
            .json()
            .unwrap();
        if phase == "handshake" {
            return;
        }
        if phase == "garbage" {
            conn.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").unwrap();
            std::thread::sleep(Duration::from_millis(500));
            return;
        }
        let reply = protocol::HelloReply {
            accept: true,
            reasons: vec![],
            godwit_version: "fake".into(),
            machine_types: vec![hello.machine_type.clone()],
            devices: hello
                .devices
                .iter()
                .map(|d| protocol::DevicePeer {
                    id: d.id.clone(),
                    peer_kind: d.peer_kind.clone(),
                    peer: "fake".into(),
                    supported: u128::MAX,
                    max_queue_pairs: d.queue_pairs,
                })
                .collect(),
            host_cpuid: hello.cpuid.clone(),
        };
        protocol::write_json(&mut conn, Kind::HelloReply, &reply).unwrap();
        loop {
            let m = match protocol::read_message(&mut conn) {
                Ok(m) => m,
                Err(_) => return,
            };
            if phase == "pages" && m.kind == Kind::Pages {
                return;
            }
            if m.kind == Kind::Complete {
                // "confirm": the destination dies before confirming.
                return;
            }
        }
    })
}

#[test]
fn the_source_survives_a_destination_that_dies_in_each_phase() {
    for (i, phase) in ["refused", "handshake", "garbage", "pages", "confirm"]
        .into_iter()
        .enumerate()
    {
        let hosts = TwoHosts::new(110 + i as u8, true, true);
        let dir = TempDir::new("migkill");
        let mut src = start_source(&hosts, &dir, 1, "", "godwit.dirty=2M:500");
        let fake =
            (phase != "refused").then(|| fake_destination(&hosts.ns_b(), hosts.addr_b(), phase));
        if fake.is_some() {
            wait_listening(&hosts.ns_b(), PORT);
        }
        let uri = format!("tcp:{}:{PORT}", hosts.addr_b());
        let started = src.qmp.execute("migrate", json!({ "uri": uri }));
        if let Err(e) = started {
            panic!("{phase}: migrate refused at once: {e}");
        }
        let info = wait_migration(&mut src.qmp, Duration::from_secs(90));
        assert_eq!(info["status"], "failed", "{phase}: {info}");
        assert!(
            info["error"].as_str().unwrap().len() > 10,
            "{phase}: a reason: {info}"
        );
        if let Some(f) = fake {
            f.join().unwrap();
        }
        // The guest runs on the source, nothing lost: the counter goes on.
        assert_eq!(
            src.qmp.execute("query-status", Value::Null).unwrap()["status"],
            "running",
            "{phase}"
        );
        let n = heartbeat(&src.vm.wait_prefix("heartbeat ", Duration::from_secs(5)));
        let m = heartbeat(&src.vm.wait_prefix("heartbeat ", Duration::from_secs(5)));
        assert_eq!(m, n + 1, "{phase}: the guest keeps counting on the source");
        let echo = TwoHosts::run_in(&hosts.ns_c(), {
            let target = hosts.guest_echo();
            move || godwit_tests::udp_echo(&target, 5, &[64], 1, Duration::from_secs(10))
        });
        assert_eq!(echo.join().unwrap(), 5, "{phase}: the source guest answers");
        src.qmp.execute("quit", Value::Null).unwrap();
        assert_eq!(
            src.vm.wait_exit(Duration::from_secs(10)).0.code(),
            Some(0),
            "{phase}"
        );
    }
}

#[test]
fn a_corrupted_stream_is_refused_by_the_destination() {
    let hosts = TwoHosts::new(120, true, true);
    let mut dst = start_destination(&hosts, "tap,ifname=gwtap0");
    let addr = hosts.addr_b();
    TwoHosts::run_in(&hosts.ns_a(), move || {
        let mut conn = std::net::TcpStream::connect((addr.as_str(), PORT)).unwrap();
        let mut msg = Vec::new();
        protocol::write_message(&mut msg, Kind::Hello, b"{\"not\": \"a hello\"}").unwrap();
        let last = msg.len() - 1;
        msg[last] ^= 0x40;
        conn.write_all(&msg).unwrap();
        std::thread::sleep(Duration::from_millis(500));
    })
    .join()
    .unwrap();
    let (status, stderr) = dst.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("Hello message is corrupt: checksum"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Sets the migration `parameters` on the source, then starts migrating to
/// host B.
fn migrate_with(src: &mut Source, hosts: &TwoHosts, parameters: Value) {
    src.qmp
        .execute("migrate-set-parameters", parameters)
        .unwrap();
    src.qmp
        .execute(
            "migrate",
            json!({"uri": format!("tcp:{}:{PORT}", hosts.addr_b())}),
        )
        .unwrap();
}

#[test]
fn cancel_and_non_convergence_leave_the_source_running() {
    let hosts = TwoHosts::new(121, true, true);
    let dir = TempDir::new("migcancel");
    let mut src = start_source(&hosts, &dir, 1, "", "godwit.dirty=16M:4000");
    src.vm.wait_prefix("dirty: ", BOOT);
    // Slow link: cancel in the middle of pre-copy.
    let mut dst = start_destination(&hosts, "tap,ifname=gwtap0");
    migrate_with(&mut src, &hosts, json!({"max-bandwidth": 2_000_000}));
    std::thread::sleep(Duration::from_secs(2));
    src.qmp.execute("migrate_cancel", Value::Null).unwrap();
    let info = wait_migration(&mut src.qmp, Duration::from_secs(30));
    assert_eq!(info["status"], "cancelled", "{info}");
    let (status, _) = dst.wait_exit(Duration::from_secs(20));
    assert_ne!(
        status.code(),
        Some(0),
        "the destination discards what it received"
    );

    // A guest that dirties faster than the link: a clear outcome, not a loop.
    let mut dst = start_destination(&hosts, "tap,ifname=gwtap0");
    migrate_with(
        &mut src,
        &hosts,
        json!({"max-bandwidth": 1_000_000, "downtime-limit": 1, "max-rounds": 3}),
    );
    let info = wait_migration(&mut src.qmp, Duration::from_secs(120));
    assert_eq!(info["status"], "failed", "{info}");
    assert!(
        info["error"]
            .as_str()
            .unwrap()
            .contains("dirties memory faster than the link"),
        "{info}"
    );
    assert_eq!(
        src.qmp.execute("query-status", Value::Null).unwrap()["status"],
        "running"
    );
    let _ = dst.wait_exit(Duration::from_secs(20));
    src.qmp.execute("quit", Value::Null).unwrap();
}

/// Two queue pairs on godwit's backend (`--queues 2`) on both hosts: every
/// ring's place moves with the guest (GET_VRING_BASE on the source,
/// SET_VRING_BASE on the destination), and the pairs in use with it.
#[test]
fn migrates_a_vhost_user_guest_with_the_backends_dirty_log() {
    let hosts = TwoHosts::new(122, true, true);
    let dir = TempDir::new("migvu");
    let (sock_a, sock_b) = (dir.join("a.vu"), dir.join("b.vu"));
    let two = ["--queues", "2"];
    let _backend_a = NetBackend::start_in(&hosts.ns_a(), "gwtap0", &sock_a, &two);
    let _backend_b = NetBackend::start_in(&hosts.ns_b(), "gwtap0", &sock_b, &two);
    let api = dir.join("a.sock");
    let cmdline = serve_cmdline(
        200,
        &format!("{} godwit.dirty=4M:1000", hosts.guest_ip_param()),
    );
    let net_a = format!("vhost-user,socket={},mq=on,queues=2", sock_a.display());
    // vhost-user carries no feature bit above 63: godwit-1.1 (with mq), not
    // 1.2.
    let mut src = spawn_serving(
        Some(&hosts.ns_a()),
        &["--machine", "godwit-1.1"],
        &net_a,
        &cmdline,
        Some(&api),
    );
    src.wait_prefix("heartbeat ", BOOT);
    let mut qmp = qmp_connect(&api);
    let net0 = &qmp.execute("query-net", Value::Null).unwrap()[0];
    assert_eq!(net0["peer"]["kind"], "vhost-user", "{net0}");
    assert_eq!(net0["queue_pairs"]["active"], 2, "{net0}");
    assert_eq!(
        qmp.execute("query-migrate", Value::Null).unwrap()["blocked-reasons"],
        json!([]),
        "godwit's backend logs dirty pages"
    );
    let mut dst = start_destination(
        &hosts,
        &format!("vhost-user,socket={},mq=on,queues=2", sock_b.display()),
    );
    let client = EchoClient::start(&hosts.ns_c(), hosts.guest_echo(), Duration::from_millis(20));
    std::thread::sleep(Duration::from_millis(500));
    qmp.execute(
        "migrate",
        json!({"uri": format!("tcp:{}:{PORT}", hosts.addr_b())}),
    )
    .unwrap();
    let info = wait_migration(&mut qmp, Duration::from_secs(120));
    assert_eq!(info["status"], "completed", "{info}");
    let migrated_at = Instant::now();
    let (status, stderr) = src.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "source: {stderr}");
    assert_heartbeat_continues(&mut src, &mut dst);
    std::thread::sleep(Duration::from_secs(1));
    let (sent, replies) = client.finish();
    let after = replies.iter().filter(|t| **t > migrated_at).count();
    assert!(
        after >= 10,
        "echo replies after migration through B's backend: {after} of {sent}"
    );
}
