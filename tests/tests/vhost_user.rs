//! virtio-net over vhost-user, end to end: the test guest on real KVM with
//! its rings served by a real backend process, either DPDK's testpmd (from
//! Debian's dpdk-dev) or godwit's own `godwit net-backend` on a TAP in a
//! namespace the test creates; and scripted misbehaving backends.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use godwit_tests::guest::spawn_serving;
use godwit_tests::netns::wait_for_path;
use godwit_tests::process::{stop_child, testpmd_command_with_queues, TESTPMD_LACKS_OF_GODWIT_1_1};
use godwit_tests::udp::sizes_up_to_mtu;
use godwit_tests::{
    godwit_command, hex_field, qmp_connect, remedy_line, run_godwit, serve_cmdline, sh, udp_echo,
    NetHost, RunningVm, TempDir, BOOT,
};
/// The versions godwit's backend publishes.
const V1: &str = "org.godwit.net.v1";
const V2: &str = "org.godwit.net.v2";
/// org.godwit.net.v1's features (tests/golden/net-interfaces).
const V1_FEATURES: u64 = 0x0000_0001_3027_ffab;
/// DPDK testpmd 22.11's GET_FEATURES (shared/reference/platform.md).
const DPDK_FEATURES: &str = "0xd7c66e7cb";
/// What DPDK lacks of godwit-1.0 (host TSO, and ECN with it).
const DPDK_OVERRIDES: &str = "host_tso4=off,host_tso6=off,host_ecn=off";
/// The newest machine type a vhost-user peer can carry: godwit-1.2 adds
/// feature bits above 63 (UDP tunnel GSO), which vhost-user's 64-bit
/// GET_FEATURES/SET_FEATURES cannot express.
const M11: &str = "godwit-1.1";

// `godwit net-backend` on a namespace's TAP, killed on drop.
use godwit_tests::net_backend::NetBackend as Backend;

/// One testpmd at a time: its forwarding thread busy-polls a core.
static DPDK: Mutex<()> = Mutex::new(());

/// DPDK testpmd with a vhost-user port (listening on `socket`) and, with a
/// namespace, a `net_tap` port `dtap0` in it, forwarding `io` between them
/// (or looping the one port back). Stopped with SIGINT on drop.
struct Testpmd {
    child: Child,
    _lock: MutexGuard<'static, ()>,
}

impl Testpmd {
    fn start(socket: &Path, ns: Option<&str>) -> Testpmd {
        Self::start_with(socket, ns, false, 1)
    }

    /// testpmd of `queues` pairs in `host`'s namespace, forwarding to its
    /// `dtap0`, which gets address `addr` once testpmd made it.
    fn with_dtap0(socket: &Path, host: &NetHost, queues: u16, addr: &str) -> Testpmd {
        let tp = Self::start_with(socket, Some(&host.ns), false, queues);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !host.exec(&["ip", "link", "show", "dtap0"]).status.success() {
            assert!(Instant::now() < deadline, "testpmd made no dtap0");
            std::thread::sleep(Duration::from_millis(100));
        }
        sh(&format!(
            "ip -n {ns} addr add {addr} dev dtap0 && ip -n {ns} link set dtap0 up",
            ns = host.ns
        ));
        tp
    }

    /// `client`: testpmd connects to `socket` (godwit listens, server=on).
    /// `queues`: queue pairs of its ports.
    fn start_with(socket: &Path, ns: Option<&str>, client: bool, queues: u16) -> Testpmd {
        let lock = DPDK
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let bin = "dpdk-testpmd";
        assert!(
            Command::new("sh")
                .args(["-c", &format!("command -v {bin}")])
                .stdout(Stdio::null())
                .status()
                .unwrap()
                .success(),
            "{bin} is not installed: apt-get install -y dpdk-dev (.ci/run does)"
        );
        let child = testpmd_command_with_queues(ns, socket, client, queues)
            .spawn()
            .expect("spawn dpdk-testpmd");
        let t = Testpmd { child, _lock: lock };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !client && !socket.exists() {
            assert!(Instant::now() < deadline, "testpmd made no socket");
            std::thread::sleep(Duration::from_millis(50));
        }
        t
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        stop_child(&mut self.child, libc::SIGINT, Duration::from_secs(15));
    }
}

fn query_net(api: &Path) -> Value {
    let mut q = qmp_connect(api);
    let v = q.execute("query-net", json!({})).expect("query-net");
    v[0].clone()
}

/// Traffic through DPDK: the namespace's kernel stack talks to the guest
/// over a TAP that testpmd drives (net_tap), testpmd forwards (io) to its
/// vhost-user port, whose rings the guest's driver fills; and back.
#[test]
fn guest_traffic_through_dpdk_testpmd_and_back() {
    let host = NetHost::new(true, 91);
    let dir = TempDir::new("vu-dpdk");
    let socket = dir.join("dpdk.sock");
    let _tp = Testpmd::with_dtap0(&socket, &host, 1, "10.92.0.1/24");
    let api = dir.join("api.sock");
    let net = format!(
        "vhost-user,socket={},queues=1,{DPDK_OVERRIDES}",
        socket.display()
    );
    let cmdline = serve_cmdline(1000, "ip=10.92.0.2::10.92.0.1:255.255.255.0");
    let mut vm = spawn_serving(
        None,
        &["--machine", "godwit-1.0"],
        &net,
        &cmdline,
        Some(&api),
    );
    let dev = vm.wait_line("virtio-net0: base=", BOOT);
    let link = vm.wait_line("virtio-net0: mac=", BOOT);
    assert!(link.contains("link=up"), "{link}");
    // The guest sees godwit-1.0 minus what DPDK lacks, nothing else.
    assert_eq!(
        hex_field(&dev, "offered"),
        V1_FEATURES & !((1 << 11) | (1 << 12) | (1 << 13)),
        "{dev}"
    );
    host.assert_ping("10.92.0.2", 3, "ping through testpmd");
    let sizes = sizes_up_to_mtu(200);
    let echoed = host.run(move || udp_echo("10.92.0.2:7", 200, &sizes, 8, Duration::from_secs(60)));
    assert_eq!(echoed, 200, "UDP echo through testpmd");

    let q = query_net(&api);
    assert_eq!(q["peer"]["kind"], "vhost-user", "{q:#}");
    assert_eq!(q["peer"]["connected"], true, "{q:#}");
    assert_eq!(q["peer"]["rings_running"], true, "{q:#}");
    assert_eq!(
        q["interface"],
        Value::Null,
        "DPDK has no interface versions: {q:#}"
    );
    let backend = q["peer"]["backend_features"]["hex"].as_str().unwrap();
    assert_eq!(
        u64::from_str_radix(backend.trim_start_matches("0x"), 16).unwrap(),
        u64::from_str_radix(DPDK_FEATURES.trim_start_matches("0x"), 16).unwrap(),
        "{q:#}"
    );
    // DPDK offers LOG_ALL and LOG_SHMFD: the device is migratable.
    assert_eq!(q["peer"]["migratable"], true, "{q:#}");
    assert_eq!(q["link"], "up");
}

/// godwit-1.1 with mq on and less what DPDK lacks of it, two queue pairs,
/// over vhost-user at `socket`.
fn two_pair_spec(socket: &Path) -> String {
    let overrides = TESTPMD_LACKS_OF_GODWIT_1_1
        .iter()
        .map(|f| format!("{f}=off"))
        .collect::<Vec<_>>()
        .join(",");
    format!(
        "vhost-user,socket={},mq=on,queues=2,{overrides}",
        socket.display()
    )
}

/// Boots the test guest on `net` (two pairs) in the namespace `host`'s
/// subnet `guest_ip`, and checks that its driver uses both pairs, that
/// eight flows (a socket each: all on one queue has odds of 1 in 256) are
/// all answered, and that query-net shows both pairs in use.
fn guest_uses_two_pairs(host: &NetHost, net: &str, guest_ip: &str, gateway: &str, dir: &TempDir) {
    let api = dir.join("api.sock");
    let cmdline = serve_cmdline(1000, &format!("ip={guest_ip}::{gateway}:255.255.255.0"));
    let mut vm = spawn_serving(None, &["--machine", M11], net, &cmdline, Some(&api));
    let pairs = vm.wait_line("virtio-net0: queue pairs=", BOOT);
    assert!(pairs.contains("queue pairs=2 of 2"), "{pairs}");
    vm.wait_line("serve: ready", BOOT);
    host.assert_ping(guest_ip, 3, "ping with two queue pairs");
    let sizes = sizes_up_to_mtu(8);
    let target = format!("{guest_ip}:7");
    let echoed = host.run(move || {
        (0..8)
            .map(|_| udp_echo(&target, 8, &sizes, 4, Duration::from_secs(30)))
            .sum::<usize>()
    });
    assert_eq!(echoed, 64, "UDP echo of eight flows on two pairs");
    let q = query_net(&api);
    assert_eq!(q["queue_pairs"]["offered"], 2, "{q:#}");
    assert_eq!(q["queue_pairs"]["active"], 2, "{q:#}");
    assert_eq!(q["peer"]["rings_running"], true, "{q:#}");
}

/// godwit's backend with one pair (GET_QUEUE_NUM 1) is refused by strict
/// for a two-pair device, naming the count, with `queues=1` among the
/// remedies; with `--queues 2` (a multi-queue TAP, interface
/// org.godwit.net.v3) the guest's driver uses both pairs.
#[test]
fn two_queue_pairs_through_godwits_backend_and_one_pair_refused() {
    let host = NetHost::new(true, 96);
    let dir = TempDir::new("vu-mq");
    let socket = dir.join("backend.sock");
    let net = two_pair_spec(&socket);
    {
        let _backend = Backend::start(&host, &socket, &[]);
        let out = run_godwit(&["run", "--machine", M11, "--net", &net], BOOT);
        assert_eq!(out.code(), Some(4), "strict refusal: {out:?}");
        for needle in ["1 queue pair(s) (GET_QUEUE_NUM)", "queues=1"] {
            assert!(out.stderr.contains(needle), "{needle}: {}", out.stderr);
        }
    }
    let _ = std::fs::remove_file(&socket);
    let backend = Backend::start(&host, &socket, &["--queues", "2"]);
    assert!(
        backend.seen.iter().any(|l| l.contains("net-backend: ready")
            && l.contains("queues=2 interface=org.godwit.net.v3")),
        "{:?}",
        backend.seen
    );
    guest_uses_two_pairs(&host, &net, &host.guest_ip(), &host.host_ip, &dir);
}

/// DPDK with two queue pairs (`queues=2`, its ports with two receive and
/// transmit queues each) carries a two-pair device. (DPDK 22.11 answers
/// GET_QUEUE_NUM with its library's maximum, 128, whatever `queues=` says,
/// so neither godwit nor QEMU can tell its `queues=1` from `queues=2`.)
#[test]
fn two_queue_pairs_through_dpdk_testpmd() {
    let host = NetHost::new(true, 97);
    let dir = TempDir::new("vu-dpdk-mq");
    let socket = dir.join("dpdk.sock");
    let _tp = Testpmd::with_dtap0(&socket, &host, 2, "10.94.0.1/24");
    guest_uses_two_pairs(
        &host,
        &two_pair_spec(&socket),
        "10.94.0.2",
        "10.94.0.1",
        &dir,
    );
}

/// The alias `godwit` is godwit-1.2, whose UDP tunnel GSO bits (65-68) no
/// vhost-user backend can carry (GET_FEATURES/SET_FEATURES are 64 bits
/// wide): over godwit's own backend strict refuses naming the four bits,
/// with remedies a user pastes; the first two start a guest that answers
/// pings, the third starts it with a migration blocker.
#[test]
fn godwit_1_2_over_vhost_user_is_refused_naming_the_tunnel_bits() {
    let host = NetHost::new(true, 181);
    let dir = TempDir::new("vu-tunnel");
    let socket = dir.join("backend.sock");
    let _backend = Backend::start(&host, &socket, &[]);
    let net = format!("vhost-user,socket={}", socket.display());
    let out = run_godwit(&["run", "--net", &net], BOOT);
    assert_eq!(out.code(), Some(4), "strict refusal: {out:?}");
    let err = &out.stderr;
    for needle in [
        "machine type godwit-1.2 requires, and strict=on",
        "guest_tunnel (bit 65)",
        "guest_tunnel_csum (bit 66)",
        "host_tunnel (bit 67)",
        "host_tunnel_csum (bit 68)",
        "carry bits 0-63 only",
    ] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
    let r1 = remedy_line(err, 1).expect("remedy 1");
    let r1 = r1.strip_prefix("--net ").unwrap().to_string();
    for off in [
        "guest_tunnel=off",
        "guest_tunnel_csum=off",
        "host_tunnel=off",
        "host_tunnel_csum=off",
    ] {
        assert!(r1.contains(off), "{off}: {r1}");
    }
    assert_eq!(remedy_line(err, 2).as_deref(), Some("--machine godwit-1.1"));
    let r3 = remedy_line(err, 3).expect("remedy 3");
    assert!(r3.ends_with("strict=off"), "{r3}");
    let cmdline = serve_cmdline(1000, &host.guest_ip_param());
    // Remedy 1 pasted.
    {
        let mut vm = spawn_serving(None, &[], &r1, &cmdline, None);
        vm.wait_line("serve: ready", BOOT);
        host.assert_ping(&host.guest_ip(), 2, "remedy 1: the tunnel features off");
    }
    // Remedy 2 pasted.
    {
        let mut vm = spawn_serving(None, &["--machine", "godwit-1.1"], &net, &cmdline, None);
        vm.wait_line("serve: ready", BOOT);
        host.assert_ping(&host.guest_ip(), 2, "remedy 2: godwit-1.1");
    }
    // Remedy 3 pasted: it runs, and cannot migrate.
    let api = dir.join("api.sock");
    let r3 = r3.strip_prefix("--net ").unwrap().to_string();
    let mut vm = spawn_serving(None, &[], &r3, &cmdline, Some(&api));
    vm.wait_line("serve: ready", BOOT);
    let mut qmp = qmp_connect(&api);
    let blocked = qmp.execute("query-migrate", Value::Null).unwrap()["blocked-reasons"].clone();
    assert!(blocked.to_string().contains("guest_tunnel"), "{blocked}");
}

/// godwit-1.1 requires USO and host TSO, which DPDK does not offer: strict
/// refuses with remedies naming DPDK's GET_FEATURES; each remedy starts the
/// VM; strict=off registers the blocker. An interface version pinned on a
/// backend without godwit's extension is checked against what it offers.
#[test]
fn strict_against_dpdk_refuses_with_remedies_that_start_the_vm() {
    let dir = TempDir::new("vu-strict");
    let socket = dir.join("dpdk.sock");
    let _tp = Testpmd::start(&socket, None);
    let net = format!("vhost-user,socket={},queues=1", socket.display());
    let out = run_godwit(&["run", "--machine", "godwit-1.1", "--net", &net], BOOT);
    assert_eq!(out.code(), Some(4), "strict refusal: {out:?}");
    let err = &out.stderr;
    for needle in [
        "requires, and strict=on",
        "guest_uso4 (bit 54)",
        "guest_uso6 (bit 55)",
        "host_uso (bit 56)",
        "host_tso4 (bit 11)",
        "host_tso6 (bit 12)",
        &format!("does not offer host_tso4 (its GET_FEATURES = {DPDK_FEATURES})"),
    ] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
    assert!(
        err.contains("no machine type works with this peer"),
        "{err}"
    );

    // Remedy 1 pasted: the guest comes up, sees exactly what is left.
    let spec = remedy_line(err, 1).expect("remedy 1");
    let spec = spec.strip_prefix("--net ").unwrap();
    for off in [
        "host_tso4=off",
        "host_tso6=off",
        "host_uso=off",
        "guest_uso4=off",
    ] {
        assert!(spec.contains(off), "{spec}");
    }
    let cmdline =
        "console=ttyS0 reboot=k godwit.mode=serve godwit.heartbeat_ms=300 godwit.poweroff_after=1";
    let out = run_godwit(
        &[
            "run",
            "--machine",
            "godwit-1.1",
            "--net",
            spec,
            "--cmdline",
            cmdline,
        ],
        BOOT,
    );
    assert_eq!(out.code(), Some(0), "remedy 1: {out:?}");
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("virtio-net0: base="))
        .unwrap_or_else(|| panic!("{out:?}"));
    let offered = hex_field(line, "offered");
    for bit in [11, 12, 13, 54, 55, 56] {
        assert_eq!(offered & (1 << bit), 0, "bit {bit}: {line}");
    }

    // Remedy 3 pasted: strict=off starts and registers the blocker.
    let spec = remedy_line(err, 3).expect("remedy 3");
    let spec = spec.strip_prefix("--net ").unwrap();
    assert!(spec.ends_with("strict=off"), "{spec}");
    let api = dir.join("api.sock");
    let mut vm = spawn_serving(
        None,
        &["--machine", "godwit-1.1"],
        spec,
        "console=ttyS0 reboot=k godwit.mode=serve godwit.heartbeat_ms=1000",
        Some(&api),
    );
    let mut q = qmp_connect(&api);
    let migrate = q.execute("query-migrate", json!({})).unwrap();
    let reasons = migrate["blocked-reasons"].to_string();
    assert!(
        reasons.contains("strict=off") && reasons.contains("host_tso4 (bit 11)"),
        "{migrate:#}"
    );
    let netq = q.execute("query-net", json!({})).unwrap();
    assert!(
        netq[0]["blockers"]
            .to_string()
            .contains("guest_uso4 (bit 54)"),
        "{netq:#}"
    );
    assert_eq!(
        netq[0]["dropped"]["names"],
        json!(TESTPMD_LACKS_OF_GODWIT_1_1),
        "{netq:#}"
    );
    let _ = q.execute("quit", json!({}));
    let (status, _) = vm.wait_exit(Duration::from_secs(20));
    assert!(status.success());

    // An interface version pinned on DPDK (no extension): checked.
    let pinned = format!(
        "vhost-user,socket={},queues=1,interface={V1}",
        socket.display()
    );
    let out = run_godwit(
        &[
            "run",
            "--machine",
            "godwit-1.0",
            "--net",
            &format!("{pinned},{DPDK_OVERRIDES}"),
        ],
        BOOT,
    );
    assert_eq!(out.code(), Some(4), "{out:?}");
    assert!(
        out.stderr
            .contains(&format!("does not provide interface {V1}"))
            && out.stderr.contains("lacks host_tso4,host_tso6"),
        "{out:?}"
    );
    let unknown = format!(
        "vhost-user,socket={},queues=1,interface=org.example.v7",
        socket.display()
    );
    let out = run_godwit(&["run", "--machine", M11, "--net", &unknown], BOOT);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr
            .contains("interface org.example.v7 is not one godwit knows")
            && out
                .stderr
                .contains("lacks godwit's interface-version extension"),
        "{out:?}"
    );
}

/// godwit's own backend on a TAP in a namespace: ARP, ping and UDP echo
/// between the namespace's kernel stack and the guest.
#[test]
fn ping_and_udp_echo_through_godwits_backend() {
    let host = NetHost::new(true, 93);
    let dir = TempDir::new("vu-godwit");
    let socket = dir.join("backend.sock");
    let _backend = Backend::start(&host, &socket, &[]);
    let api = dir.join("api.sock");
    let net = format!("vhost-user,socket={},queues=1", socket.display());
    let cmdline = serve_cmdline(1000, &host.guest_ip_param());
    let _vm = spawn_serving(None, &["--machine", M11], &net, &cmdline, Some(&api));
    host.assert_ping(&host.guest_ip(), 3, "ping through godwit's backend");
    let target = host.guest_echo();
    let sizes = sizes_up_to_mtu(1000);
    let echoed = host.run(move || udp_echo(&target, 1000, &sizes, 16, Duration::from_secs(90)));
    assert_eq!(echoed, 1000, "UDP echo through godwit's backend");
    let q = query_net(&api);
    assert_eq!(q["interface"]["name"], V2, "{q:#}");
    assert_eq!(q["interface"]["pinned"], false, "{q:#}");
    assert_eq!(q["interface"]["how"], "extension", "{q:#}");
    assert_eq!(q["peer"]["migratable"], true, "{q:#}");
    assert!(
        q["peer"]["negotiated_protocol"]
            .as_str()
            .unwrap()
            .contains("GODWIT_INTERFACE"),
        "{q:#}"
    );
}

/// v1 pinned on a backend that supports v1 and v2 (and presents v2 by
/// default): the guest gets exactly v1's features and ring size; godwit-1.1
/// (USO) on v1 is refused with remedies; an unknown version is refused with
/// the supported list.
#[test]
fn interface_pinning_gives_the_old_abi_and_refuses_unknown_versions() {
    let host = NetHost::new(true, 94);
    let dir = TempDir::new("vu-pin");
    let socket = dir.join("backend.sock");
    let _backend = Backend::start(&host, &socket, &[]);
    let versions = godwit_command(None, &["net-backend", "--print-versions"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&versions.stdout).unwrap();
    assert_eq!(v, json!({"latest": V2, "supported": [V1, V2]}));

    let api = dir.join("api.sock");
    let net = format!(
        "vhost-user,socket={},queues=1,interface={V1}",
        socket.display()
    );
    let mut vm = spawn_serving(
        None,
        &["--machine", "godwit-1.0"],
        &net,
        &serve_cmdline(1000, &host.guest_ip_param()),
        Some(&api),
    );
    let dev = vm.wait_line("virtio-net0: base=", BOOT);
    assert_eq!(hex_field(&dev, "offered"), V1_FEATURES, "{dev}");
    let q = query_net(&api);
    assert_eq!(q["interface"]["name"], V1, "{q:#}");
    assert_eq!(q["interface"]["pinned"], true, "{q:#}");
    assert_eq!(q["interface"]["values"]["max_ring_size"], 256, "{q:#}");
    assert_eq!(q["queue_max_sizes"], json!([256, 256, 64]), "{q:#}");
    // The backend presents exactly v1 (plus the transport bits).
    let backend = q["peer"]["backend_features"]["hex"].as_str().unwrap();
    assert_eq!(
        u64::from_str_radix(backend.trim_start_matches("0x"), 16).unwrap(),
        V1_FEATURES | (1 << 30) | (1 << 26),
        "{q:#}"
    );
    let ping = host.exec(&["ping", "-c", "2", "-W", "5", &host.guest_ip()]);
    assert!(ping.status.success());
    let mut qmp = qmp_connect(&api);
    let _ = qmp.execute("quit", json!({}));
    vm.wait_exit(Duration::from_secs(20));

    // godwit-1.1 requires USO, which v1 does not have.
    let out = run_godwit(&["run", "--machine", "godwit-1.1", "--net", &net], BOOT);
    assert_eq!(out.code(), Some(4), "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "presents interface {V1}, which does not include guest_uso4"
        )),
        "{out:?}"
    );
    assert!(out.stderr.contains("--machine godwit-1.0"), "{out:?}");

    // A version the backend does not have.
    let bad = format!(
        "vhost-user,socket={},queues=1,interface=org.godwit.net.v9",
        socket.display()
    );
    let out = run_godwit(&["run", "--machine", M11, "--net", &bad], BOOT);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "does not support interface org.godwit.net.v9; it supports {V1}, {V2} (latest {V2})"
        )),
        "{out:?}"
    );
}

/// The backend is killed during traffic: godwit and the guest keep running,
/// the guest sees the link go down; a new backend on the same socket brings
/// it back and traffic resumes.
#[test]
fn backend_killed_during_traffic_link_goes_down_and_traffic_resumes() {
    let host = NetHost::new(true, 95);
    let dir = TempDir::new("vu-kill");
    let socket = dir.join("backend.sock");
    let mut backend = Backend::start(&host, &socket, &[]);
    let api = dir.join("api.sock");
    let net = format!("vhost-user,socket={},queues=1", socket.display());
    let cmdline = serve_cmdline(500, &host.guest_ip_param());
    let mut vm = spawn_serving(None, &["--machine", M11], &net, &cmdline, Some(&api));
    // Traffic in flight while the backend dies.
    let target = host.guest_echo();
    let t2 = target.clone();
    let traffic =
        host.spawn(move || udp_echo(&t2, 2000, &[64, 512, 1400], 16, Duration::from_secs(4)));
    std::thread::sleep(Duration::from_millis(500));
    backend.kill9();
    let _ = traffic.join();
    vm.wait_line("virtio-net0: link=down", Duration::from_secs(20));
    let mut q = qmp_connect(&api);
    let status = q.execute("query-status", json!({})).unwrap();
    assert_eq!(status["status"], "running", "{status:#}");
    let netq = q.execute("query-net", json!({})).unwrap();
    assert_eq!(netq[0]["link"], "down", "{netq:#}");
    assert_eq!(netq[0]["peer"]["connected"], false, "{netq:#}");

    let _backend2 = Backend::start(&host, &socket, &[]);
    vm.wait_line("virtio-net0: link=up", Duration::from_secs(30));
    let echoed =
        host.run(move || udp_echo(&target, 200, &[64, 700, 1400], 8, Duration::from_secs(60)));
    assert_eq!(echoed, 200, "traffic after the backend came back");
    let netq = q.execute("query-net", json!({})).unwrap();
    assert_eq!(netq[0]["peer"]["reconnects"], 1, "{netq:#}");
    assert_eq!(netq[0]["link"], "up");
}

/// A backend that comes back with fewer features (v1 instead of v2, no
/// USO) is handled by strict as at start-up: strict=on keeps the link down
/// and says why; strict=off drops the features, registers a blocker and
/// makes the driver negotiate again, after which traffic flows.
#[test]
fn backend_returning_with_fewer_features_follows_strict() {
    for strict in [true, false] {
        let host = NetHost::new(true, if strict { 96 } else { 97 });
        let dir = TempDir::new("vu-fewer");
        let socket = dir.join("backend.sock");
        let mut backend = Backend::start(&host, &socket, &["--interface", V2]);
        let api = dir.join("api.sock");
        let net = format!(
            "vhost-user,socket={},queues=1,strict={}",
            socket.display(),
            if strict { "on" } else { "off" }
        );
        let cmdline = serve_cmdline(500, &host.guest_ip_param());
        let mut vm = spawn_serving(
            None,
            &["--machine", "godwit-1.1"],
            &net,
            &cmdline,
            Some(&api),
        );
        let first = vm.wait_line("virtio-net0: base=", BOOT);
        assert_ne!(hex_field(&first, "offered") & (1 << 54), 0, "{first}");
        backend.kill9();
        vm.wait_line("virtio-net0: link=down", Duration::from_secs(20));
        let _older = Backend::start(&host, &socket, &["--interface", V1]);
        let mut q = qmp_connect(&api);
        if strict {
            let deadline = Instant::now() + Duration::from_secs(20);
            let netq = loop {
                let n = q.execute("query-net", json!({})).unwrap();
                if n[0]["peer"]["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("strict=on"))
                {
                    break n;
                }
                assert!(Instant::now() < deadline, "no refusal: {n:#}");
                std::thread::sleep(Duration::from_millis(200));
            };
            let why = netq[0]["peer"]["last_error"].as_str().unwrap();
            assert!(
                why.contains("guest_uso4") && why.contains(V1) && why.contains("link stays down"),
                "{why}"
            );
            assert_eq!(netq[0]["link"], "down", "{netq:#}");
            let status = q.execute("query-status", json!({})).unwrap();
            assert_eq!(status["status"], "running");
        } else {
            vm.wait_line("virtio-net0: device needs reset", Duration::from_secs(30));
            let again = vm.wait_new_line("virtio-net0: base=", Duration::from_secs(60));
            assert_eq!(hex_field(&again, "offered") & (7 << 54), 0, "{again}");
            vm.wait_new_line("link=up", Duration::from_secs(30));
            let migrate = q.execute("query-migrate", json!({})).unwrap();
            let netq = q.execute("query-net", json!({})).unwrap();
            let blockers = netq[0]["blockers"].to_string();
            assert!(
                blockers.contains("came back") && blockers.contains("guest_uso4"),
                "{netq:#} / {migrate:#}"
            );
            let ping = host.exec(&["ping", "-c", "2", "-W", "5", &host.guest_ip()]);
            assert!(ping.status.success(), "traffic after renegotiation");
        }
        let _ = q.execute("quit", json!({}));
        vm.wait_exit(Duration::from_secs(20));
    }
}

// ------------------------------------------------------------------------
// Misbehaving backends: every bad reply is a clear start-up error naming the
// message, godwit exits 1 within the reply timeout, never hangs or crashes.

fn read_msg(s: &mut UnixStream) -> Option<(u32, Vec<u8>)> {
    let mut hdr = [0u8; 12];
    s.read_exact(&mut hdr).ok()?;
    let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
    let mut p = vec![0u8; size];
    s.read_exact(&mut p).ok()?;
    Some((u32::from_le_bytes(hdr[..4].try_into().unwrap()), p))
}

fn send(s: &mut UnixStream, code: u32, flags: u32, payload: &[u8]) {
    let mut m = Vec::new();
    m.extend_from_slice(&code.to_le_bytes());
    m.extend_from_slice(&flags.to_le_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    let _ = s.write_all(&m);
}

const GET_FEATURES: u32 = 1;
const SET_OWNER: u32 = 3;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_CONFIG: u32 = 24;
const SET_CONFIG: u32 = 25;
const REPLY: u32 = 0x5;
const F_PROTOCOL: u64 = 1 << 30;
const P_REPLY_ACK: u64 = 1 << 3;
const P_CONFIG: u64 = 1 << 9;
const P_GODWIT: u64 = 1 << 60;

/// A backend that answers with `script` on one connection.
fn fake_backend(
    socket: PathBuf,
    script: impl FnOnce(&mut UnixStream) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(&socket).unwrap();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            script(&mut s);
            // Stay silent until godwit gives up.
            let mut buf = [0u8; 256];
            let _ = s.set_read_timeout(Some(Duration::from_secs(15)));
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
        }
    })
}

fn expect_clear_error(socket: &Path, needles: &[&str]) {
    let net = format!("vhost-user,socket={},queues=1", socket.display());
    let started = Instant::now();
    let out = run_godwit(
        &["run", "--machine", M11, "--net", &net],
        Duration::from_secs(30),
    );
    assert_eq!(
        out.code(),
        Some(1),
        "a start-up error, not a crash: {out:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    for n in needles {
        assert!(out.stderr.contains(n), "{n}: {}", out.stderr);
    }
}

#[test]
fn bad_replies_from_a_backend_are_clear_errors_without_hangs() {
    let dir = TempDir::new("vu-bad");

    // A reply of the wrong type.
    let s = dir.join("wrong-type.sock");
    let t = fake_backend(s.clone(), |c| {
        let _ = read_msg(c);
        send(c, GET_PROTOCOL_FEATURES, REPLY, &0u64.to_le_bytes());
    });
    expect_clear_error(
        &s,
        &[
            "bad reply to GET_FEATURES",
            "the reply is for request 15 (GET_PROTOCOL_FEATURES)",
        ],
    );
    let _ = t.join();

    // A short payload: 4 bytes where GET_FEATURES answers with 8.
    let s = dir.join("short.sock");
    let t = fake_backend(s.clone(), |c| {
        let _ = read_msg(c);
        send(c, GET_FEATURES, REPLY, &[1, 2, 3, 4]);
    });
    expect_clear_error(
        &s,
        &[
            "bad reply to GET_FEATURES",
            "its payload is 4 bytes",
            "8 bytes",
        ],
    );
    let _ = t.join();

    // A header that announces 8 bytes, of which 4 come.
    let s = dir.join("truncated.sock");
    let t = fake_backend(s.clone(), |c| {
        let _ = read_msg(c);
        let mut m = Vec::new();
        m.extend_from_slice(&GET_FEATURES.to_le_bytes());
        m.extend_from_slice(&REPLY.to_le_bytes());
        m.extend_from_slice(&8u32.to_le_bytes());
        m.extend_from_slice(&[1, 2, 3, 4]);
        let _ = c.write_all(&m);
    });
    expect_clear_error(
        &s,
        &["no complete reply to GET_FEATURES within", "16 of 20 bytes"],
    );
    let _ = t.join();

    // Closed in the middle of the handshake.
    let s = dir.join("closed.sock");
    let t = fake_backend(s.clone(), |c| {
        let _ = read_msg(c);
        send(
            c,
            GET_FEATURES,
            REPLY,
            &(F_PROTOCOL | (1 << 32)).to_le_bytes(),
        );
        let _ = read_msg(c);
        let _ = c.shutdown(std::net::Shutdown::Both);
    });
    expect_clear_error(
        &s,
        &["closed the connection while godwit waited for the reply to GET_PROTOCOL_FEATURES"],
    );
    let _ = t.join();

    // Features outside what was asked: a backend with godwit's extension
    // accepts the pin of v1 but then offers USO as well.
    let s = dir.join("outside.sock");
    let t = fake_backend(s.clone(), |c| {
        while let Some((code, payload)) = read_msg(c) {
            match code {
                GET_FEATURES => send(
                    c,
                    code,
                    REPLY,
                    &(V1_FEATURES | F_PROTOCOL | (7u64 << 54)).to_le_bytes(),
                ),
                GET_PROTOCOL_FEATURES => send(
                    c,
                    code,
                    REPLY,
                    &(P_REPLY_ACK | P_CONFIG | P_GODWIT).to_le_bytes(),
                ),
                SET_PROTOCOL_FEATURES => {}
                SET_CONFIG | SET_OWNER => send(c, code, REPLY, &0u64.to_le_bytes()),
                GET_CONFIG => {
                    let size = u32::from_le_bytes(payload[4..8].try_into().unwrap()) as usize;
                    let mut record = format!(
                        "godwit-interface 1\nactive={V1}\npinned=1\nlatest={V2}\nfeatures={V1_FEATURES:#x}\nmax_ring=256\nmtu=1500\nqueue_pairs=1\nsupported={V1},{V2}\n"
                    )
                    .into_bytes();
                    record.resize(size, 0);
                    let mut reply = payload[..12].to_vec();
                    reply.extend_from_slice(&record);
                    send(c, code, REPLY, &reply);
                }
                _ => send(c, code, REPLY, &0u64.to_le_bytes()),
            }
        }
    });
    let net = format!("vhost-user,socket={},interface={V1}", s.display());
    let out = run_godwit(
        &["run", "--machine", M11, "--net", &net],
        Duration::from_secs(30),
    );
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr
            .contains("features outside what was asked: guest_uso4,guest_uso6,host_uso"),
        "{}",
        out.stderr
    );
    drop(t);

    // Silence: no reply at all.
    let s = dir.join("silent.sock");
    let t = fake_backend(s.clone(), |c| {
        let _ = read_msg(c);
    });
    expect_clear_error(
        &s,
        &[
            "no complete reply to GET_FEATURES within 5s",
            "0 of 20 bytes",
        ],
    );
    let _ = t.join();

    // Nothing listening at all.
    let out = run_godwit(
        &[
            "run",
            "--machine",
            M11,
            "--net",
            &format!(
                "vhost-user,socket={},queues=1",
                dir.join("none.sock").display()
            ),
        ],
        Duration::from_secs(60),
    );
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr
            .contains("cannot connect to the vhost-user backend socket")
            && out.stderr.contains("server=on"),
        "{}",
        out.stderr
    );
}

/// server=on: godwit listens and the backend connects (DPDK's client=1;
/// godwit net-backend --client).
#[test]
fn server_mode_lets_the_backend_connect() {
    let host = NetHost::new(true, 98);
    let dir = TempDir::new("vu-server");
    let socket = dir.join("godwit.sock");
    let net = format!("vhost-user,socket={},queues=1,server=on", socket.display());
    let cmdline = serve_cmdline(1000, &host.guest_ip_param());
    let mut vm = RunningVm::spawn(&[
        "run",
        "--machine",
        M11,
        "--net",
        &net,
        "--cmdline",
        &cmdline,
    ]);
    wait_for_path(&socket, Duration::from_secs(20), "godwit does not listen");
    let _backend = Backend::start(&host, &socket, &["--client"]);
    vm.wait_line("serve: ready", BOOT);
    let ping = host.exec(&["ping", "-c", "2", "-W", "5", &host.guest_ip()]);
    assert!(ping.status.success());
}

/// server=on with DPDK: godwit listens, testpmd connects (client=1).
#[test]
fn dpdk_connects_to_godwit_in_server_mode() {
    let dir = TempDir::new("vu-dpdk-server");
    let socket = dir.join("godwit.sock");
    let net = format!(
        "vhost-user,socket={},queues=1,server=on,{DPDK_OVERRIDES}",
        socket.display()
    );
    let mut vm = RunningVm::spawn(&[
        "run",
        "--machine",
        "godwit-1.0",
        "--net",
        &net,
        "--cmdline",
        "console=ttyS0 reboot=k godwit.mode=serve godwit.heartbeat_ms=300 godwit.poweroff_after=2",
    ]);
    wait_for_path(&socket, Duration::from_secs(20), "godwit does not listen");
    let _tp = Testpmd::start_with(&socket, None, true, 1);
    let dev = vm.wait_line("virtio-net0: base=", BOOT);
    assert_eq!(
        hex_field(&dev, "offered"),
        V1_FEATURES & !((1 << 11) | (1 << 12) | (1 << 13)),
        "{dev}"
    );
    let link = vm.wait_line("virtio-net0: mac=", BOOT);
    assert!(link.contains("link=up"), "{link}");
    let (status, err) = vm.wait_exit(BOOT);
    assert!(status.success(), "{err}");
}

/// Pausing and resuming the VM (`stop`/`cont`, snapshots, migrations that
/// are cancelled), each a GET_VRING_BASE and a restart of the backend's
/// rings, on a guest with no traffic: a notification the stop swallowed
/// (the backend's interrupt, or the guest's kick) must not leave the
/// datapath waiting for one that never comes. Afterwards every echo is
/// answered. (Before the fix, one run in two ended with no answer at all.)
#[test]
fn many_pauses_of_an_idle_guest_keep_the_datapath_flowing() {
    let host = NetHost::new(true, 94);
    let dir = TempDir::new("vu-stopcont");
    let socket = dir.join("backend.sock");
    let mut backend = Backend::start(&host, &socket, &[]);
    let api = dir.join("api.sock");
    let net = format!("vhost-user,socket={},queues=1", socket.display());
    let cmdline = serve_cmdline(200, &format!("{} godwit.verify=1M", host.guest_ip_param()));
    let mut vm = spawn_serving(
        Some(&host.ns),
        &["--machine", M11, "--memory", "64M"],
        &net,
        &cmdline,
        Some(&api),
    );
    let target = host.guest_echo();
    let echoed = host.run(move || udp_echo(&target, 10, &[64], 1, Duration::from_secs(20)));
    assert_eq!(echoed, 10, "UDP echo before the pauses");

    // A destination that accepts and never answers: each migration stays
    // in its handshake until cancelled.
    let stalled = host.run(|| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"));
    let stalled_addr = stalled.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let held: Vec<_> = stalled.incoming().map_while(Result::ok).collect();
        drop(held);
    });
    let mut qmp = qmp_connect(&api);
    for cycle in 0..200u32 {
        qmp.execute("stop", json!({}))
            .unwrap_or_else(|e| panic!("stop {cycle}: {e}"));
        // Mostly short pauses, and every tenth as long as a snapshot's.
        let paused = if cycle % 10 == 9 {
            150_000
        } else {
            u64::from(cycle % 7) * 300
        };
        std::thread::sleep(Duration::from_micros(paused));
        qmp.execute("cont", json!({}))
            .unwrap_or_else(|e| panic!("cont {cycle}: {e}"));
        std::thread::sleep(Duration::from_micros(u64::from(cycle % 5) * 500));
        if cycle % 15 == 7 {
            let _ = qmp.execute("migrate", json!({ "uri": format!("tcp:{stalled_addr}") }));
            std::thread::sleep(Duration::from_millis(20));
            let _ = qmp.execute("migrate_cancel", json!({}));
            while matches!(
                qmp.execute("query-migrate", json!({})).unwrap()["status"].as_str(),
                Some("setup" | "active" | "cancelling")
            ) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if cycle % 20 == 10 {
            let snap = dir.join(&format!("snap{}", cycle % 3));
            qmp.execute("snapshot-save", json!({ "dir": snap }))
                .unwrap_or_else(|e| panic!("snapshot {cycle}: {e}"));
        }
        if cycle % 50 == 0 {
            vm.try_line(Duration::from_millis(1));
        }
    }
    let target = host.guest_echo();
    let echoed = host.run(move || udp_echo(&target, 20, &[64, 1000], 1, Duration::from_secs(30)));
    assert_eq!(
        echoed,
        20,
        "echoes answered after 200 pauses; query-net: {:#}\nbackend:\n{}",
        query_net(&api),
        backend.output()
    );
}
