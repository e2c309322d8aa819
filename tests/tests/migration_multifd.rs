//! Multifd live migration between two namespace hosts: the verifying
//! guest's pages striped over 1, 2 and 4 extra tcp: channels and 2 mutual
//! TLS channels, hopping A -> B -> A -> B -> A, arrives with nothing lost and
//! its heartbeat going on; a destination that never gets its channels, or
//! gets a connection that is not one of them, fails the migration with a
//! message saying so while the guest runs on at the source.

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use godwit_migration::protocol::{read_message, write_json, ChannelHello, Kind, ProtocolError};
use godwit_tests::guest::spawn_serving_env;
use godwit_tests::migrate::{assert_heartbeat_continues, wait_migration};
use godwit_tests::tls_creds::{good_creds, SERVER_NAME};
use godwit_tests::verify::full_round_without_mismatch;
use godwit_tests::{
    qmp_connect, serve_cmdline, wait_listening, QmpClient, RunningVm, TempDir, TwoHosts, BOOT,
};

const PORT: u16 = 4444;
/// The verifying guest's buffer: 4 MiB (1024 pages), rewritten at 2000
/// pages/s: about half of what the capped link (16 MB/s) carries, so each
/// pre-copy round sends again about half of the pages of the round before,
/// and the same page travels in successive rounds on different channels.
const VERIFY: &str = "godwit.verify=4M godwit.verify_rate=2000";
/// The link cap and downtime limit of the successful hops.
const LINK: u64 = 16_000_000;
const DOWNTIME_MS: u64 = 10;
/// The source test hook that opens no channel (vmm/src/migration/multifd.rs).
const WITHHOLD: (&str, &str) = ("GODWIT_TEST_MULTIFD_WITHHOLD", "1");
/// godwit's info log: each side says how many channels it used.
const INFO: (&str, &str) = ("GODWIT_LOG", "info");

/// A godwit in namespace `ns` running the verifying guest, or receiving it.
struct Host {
    vm: RunningVm,
    api: PathBuf,
}

fn start_source(hosts: &TwoHosts, dir: &TempDir, env: &[(&str, &str)]) -> Host {
    start_source_verifying(hosts, dir, env, VERIFY)
}

/// Like [`start_source`], with the guest's own `godwit.verify...` words.
fn start_source_verifying(
    hosts: &TwoHosts,
    dir: &TempDir,
    env: &[(&str, &str)],
    verify: &str,
) -> Host {
    let api = dir.join("a0.sock");
    let cmdline = serve_cmdline(200, &format!("{} {verify}", hosts.guest_ip_param()));
    let mut vm = spawn_serving_env(
        Some(&hosts.ns_a()),
        // The multifd channels are under test, not the queue pairs: the
        // machine type of one pair (with godwit-1.2's two, the hops of the
        // verifying test completed in one pre-copy round; see the report of
        // issue 16 part 2).
        &["--machine", "godwit-1.1"],
        "tap,ifname=gwtap0",
        &cmdline,
        Some(&api),
        env,
    );
    vm.wait_prefix("heartbeat ", BOOT);
    Host { vm, api }
}

/// `godwit run --incoming SCHEME:ADDR:PORT` in `ns`, with an API socket.
fn start_destination(ns: &str, addr: &str, scheme: &str, tls: Option<&Path>, api: PathBuf) -> Host {
    start_destination_env(ns, addr, scheme, tls, api, &[INFO])
}

/// Like [`start_destination`], with the environment `env`.
fn start_destination_env(
    ns: &str,
    addr: &str,
    scheme: &str,
    tls: Option<&Path>,
    api: PathBuf,
    env: &[(&str, &str)],
) -> Host {
    let uri = format!("{scheme}:{addr}:{PORT}");
    let api_s = api.display().to_string();
    let mut args = vec![
        "run",
        "--incoming",
        &uri,
        "--net",
        "tap,ifname=gwtap0",
        "--api-socket",
        &api_s,
    ];
    let tls_s = tls.map(|d| d.display().to_string());
    if let Some(d) = &tls_s {
        args.extend(["--tls-dir", d.as_str()]);
    }
    let vm = RunningVm::spawn_env(Some(ns), &args, env);
    wait_listening(ns, PORT);
    Host { vm, api }
}

/// Turns multifd on with `channels` and sets `params` on the source.
fn set_multifd(qmp: &mut QmpClient, channels: u16, mut params: Value) {
    qmp.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "multifd", "state": true}]}),
    )
    .unwrap();
    let caps = qmp
        .execute("query-migrate-capabilities", Value::Null)
        .unwrap();
    assert!(
        caps.as_array()
            .unwrap()
            .contains(&json!({"capability": "multifd", "state": true})),
        "{caps}"
    );
    params["multifd-channels"] = json!(channels);
    qmp.execute("migrate-set-parameters", params).unwrap();
    let shown = qmp
        .execute("query-migrate-parameters", Value::Null)
        .unwrap();
    assert_eq!(shown["multifd-channels"], channels, "{shown}");
}

#[test]
fn the_verifying_guest_moves_intact_over_1_2_and_4_tcp_channels_and_2_tls_channels() {
    let hosts = TwoHosts::new(136, true, true);
    let dir = TempDir::new("migmultifd");
    let creds = good_creds(&dir.join("creds"), &hosts);
    let mut src = start_source(&hosts, &dir, &[INFO]);
    // Let the guest write a good part of its buffer before the first hop.
    std::thread::sleep(Duration::from_secs(2));
    let (a, b) = (
        (hosts.ns_a(), hosts.addr_a()),
        (hosts.ns_b(), hosts.addr_b()),
    );
    let hops: [(u16, &str, &(String, String)); 4] = [
        (1, "tcp", &b),
        (2, "tcp", &a),
        (4, "tcp", &b),
        (2, "tls", &a),
    ];
    for (i, (channels, scheme, (ns, addr))) in hops.into_iter().enumerate() {
        let what = format!("hop {i}: {channels} {scheme} channel(s) to {addr}");
        let tls = (scheme == "tls").then_some(creds.as_path());
        let mut dst = start_destination(ns, addr, scheme, tls, dir.join(&format!("h{i}.sock")));
        let mut qmp = qmp_connect(&src.api);
        // A small downtime limit and a capped link: several pre-copy
        // rounds, so pages the guest rewrites travel again, on whichever
        // channel their batch lands.
        let mut params = json!({"downtime-limit": DOWNTIME_MS, "max-bandwidth": LINK});
        if tls.is_some() {
            params["tls-creds"] = json!(creds.display().to_string());
            params["tls-hostname"] = json!(SERVER_NAME);
        }
        set_multifd(&mut qmp, channels, params);
        qmp.execute("migrate", json!({"uri": format!("{scheme}:{addr}:{PORT}")}))
            .unwrap();
        let info = wait_migration(&mut qmp, Duration::from_secs(120));
        assert_eq!(info["status"], "completed", "{what}: {info}");
        let (status, stderr) = src.vm.wait_exit(Duration::from_secs(30));
        assert_eq!(status.code(), Some(0), "{what}: source: {stderr}");
        assert!(
            stderr.contains(&format!("{channels} multifd channel(s) connected")),
            "{what}: the source used its channels: {stderr}"
        );
        assert_heartbeat_continues(&mut src.vm, &mut dst.vm);
        full_round_without_mismatch(&mut dst.vm, &what);
        let incoming = qmp_connect(&dst.api)
            .execute("query-migrate", Value::Null)
            .unwrap();
        assert_eq!(incoming["status"], "completed", "{what}: {incoming}");
        assert!(
            incoming["ram"]["normal"].as_u64().unwrap() > 100,
            "{what}: the channels' pages are counted: {incoming}"
        );
        eprintln!(
            "{what}: {} rounds, {} bytes",
            incoming["rounds"], incoming["ram"]["transferred"]
        );
        // At least one pre-copy round after the first: pages the guest
        // rewrote travel again, maybe on another channel. (How many more
        // depends on how fast the emulated guest runs on a loaded host.)
        assert!(
            incoming["rounds"].as_u64().unwrap() >= 2,
            "{what}: rewritten pages travelled in several rounds: {incoming}"
        );
        src = dst;
    }
}

/// The source's migration fails with `says` in its error, the destination
/// exits with it too, and the guest runs on at the source.
fn assert_failed_here(src: &mut Host, qmp: &mut QmpClient, mut dst: Host, says: &[&str]) {
    let info = wait_migration(qmp, Duration::from_secs(60));
    assert_eq!(info["status"], "failed", "{info}");
    let error = info["error"].as_str().unwrap_or_default();
    for s in says {
        assert!(error.contains(s), "the source's error says {s:?}: {error}");
    }
    let (status, stderr) = dst.vm.wait_exit(Duration::from_secs(30));
    assert_ne!(status.code(), Some(0), "destination: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for s in says {
        assert!(stderr.contains(s), "the destination says {s:?}: {stderr}");
    }
    assert_eq!(
        qmp.execute("query-status", Value::Null).unwrap()["status"],
        "running"
    );
    let last = src.vm.last_heartbeat();
    src.vm
        .wait_prefix(&format!("heartbeat {}", last + 2), Duration::from_secs(20));
}

#[test]
fn missing_channels_and_a_stray_connection_fail_the_migration_and_the_source_runs_on() {
    let hosts = TwoHosts::new(137, true, true);
    let dir = TempDir::new("migmultifdfail");
    // This source opens no channel, as if something dropped them.
    let mut src = start_source(&hosts, &dir, &[WITHHOLD]);
    let mut qmp = qmp_connect(&src.api);
    let uri = format!("tcp:{}:{PORT}", hosts.addr_b());

    // The parameter's range, and multifd's need of a network address.
    for bad in [0, 17] {
        let e = qmp
            .execute("migrate-set-parameters", json!({"multifd-channels": bad}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("from 1 to 16"), "{e}");
    }
    set_multifd(&mut qmp, 2, json!({}));
    let e = qmp
        .execute(
            "migrate",
            json!({"uri": "unix:/tmp/godwit-multifd-none.sock"}),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("multifd needs a tcp: or tls: URI"), "{e}");

    // No channel ever comes.
    let dst = start_destination(
        &hosts.ns_b(),
        &hosts.addr_b(),
        "tcp",
        None,
        dir.join("b1.sock"),
    );
    qmp.execute("migrate", json!({ "uri": uri })).unwrap();
    assert_failed_here(
        &mut src,
        &mut qmp,
        dst,
        &["multifd channel(s) 0, 1 of 2 did not connect within 10 s"],
    );

    // A connection that greets like a channel but does not know this
    // migration's token is refused, told why, and named.
    let dst = start_destination(
        &hosts.ns_b(),
        &hosts.addr_b(),
        "tcp",
        None,
        dir.join("b2.sock"),
    );
    qmp.execute("migrate", json!({ "uri": uri })).unwrap();
    // The source's main stream connects at once; the stray waits in the
    // backlog until the destination looks for channels.
    std::thread::sleep(Duration::from_millis(500));
    let addr = format!("{}:{PORT}", hosts.addr_b());
    let answer = TwoHosts::run_in(&hosts.ns_a(), move || {
        let mut s = TcpStream::connect(&addr).expect("connect the stray");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let hello = ChannelHello {
            channel: 0,
            token: "00".repeat(32),
        };
        write_json(&mut s, Kind::ChannelHello, &hello).expect("send ChannelHello");
        match read_message(&mut s) {
            Err(ProtocolError::Aborted(why)) => why,
            other => panic!("the stray was not refused with a reason: {other:?}"),
        }
    })
    .join()
    .unwrap();
    assert!(
        answer.contains("token is not this migration's"),
        "the stray is told why: {answer}"
    );
    assert_failed_here(
        &mut src,
        &mut qmp,
        dst,
        &[
            "did not connect within 10 s",
            "refused 1 other connection(s)",
            "token is not this migration's",
        ],
    );

    // A connection that trickles its greeting, a byte a second (each read
    // well within the per-read timeout), is cut when the wait for channels
    // ends: the destination gives up after its 10 s, not after the peer.
    let dst = start_destination(
        &hosts.ns_b(),
        &hosts.addr_b(),
        "tcp",
        None,
        dir.join("b3.sock"),
    );
    qmp.execute("migrate", json!({ "uri": uri })).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let started = std::time::Instant::now();
    let addr = format!("{}:{PORT}", hosts.addr_b());
    let trickler = TwoHosts::run_in(&hosts.ns_a(), move || {
        let mut greeting = Vec::new();
        let hello = ChannelHello {
            channel: 0,
            token: "00".repeat(32),
        };
        write_json(&mut greeting, Kind::ChannelHello, &hello).expect("encode ChannelHello");
        let mut s = TcpStream::connect(&addr).expect("connect the trickler");
        let until = std::time::Instant::now() + Duration::from_secs(60);
        for byte in greeting.iter().cycle() {
            if std::time::Instant::now() > until || s.write_all(&[*byte]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    assert_failed_here(
        &mut src,
        &mut qmp,
        dst,
        &["multifd channel(s) 0, 1 of 2 did not connect within 10 s"],
    );
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "the destination gave up in time: {:?}",
        started.elapsed()
    );
    trickler.join().unwrap();
}

/// With multifd the main stream carries one `RoundEnd` a round, so it may
/// stay silent for as long as a round takes; a round longer than the main
/// stream's read timeout (shortened here by a test hook to 1.5 s, 60 s in
/// use) must not fail the migration. Round 0 here carries the guest's
/// ~100-150 written pages (400-600 KB) over a 150 kB/s link: about 3 s.
#[test]
fn a_round_longer_than_the_main_streams_timeout_completes() {
    let hosts = TwoHosts::new(138, true, true);
    let dir = TempDir::new("migmultifdslow");
    let mut src = start_source_verifying(
        &hosts,
        &dir,
        &[INFO],
        "godwit.verify=4M godwit.verify_rate=10",
    );
    std::thread::sleep(Duration::from_secs(1));
    let mut dst = start_destination_env(
        &hosts.ns_b(),
        &hosts.addr_b(),
        "tcp",
        None,
        dir.join("b.sock"),
        &[INFO, ("GODWIT_TEST_MAIN_STREAM_TIMEOUT_MS", "1500")],
    );
    let mut qmp = qmp_connect(&src.api);
    set_multifd(
        &mut qmp,
        2,
        json!({"downtime-limit": 200, "max-bandwidth": 150_000}),
    );
    let uri = format!("tcp:{}:{PORT}", hosts.addr_b());
    let started = std::time::Instant::now();
    qmp.execute("migrate", json!({ "uri": uri })).unwrap();
    let info = wait_migration(&mut qmp, Duration::from_secs(120));
    assert_eq!(info["status"], "completed", "{info}");
    assert!(
        started.elapsed() > Duration::from_millis(2000),
        "the migration should outlast the main stream's timeout: {:?}, {info}",
        started.elapsed()
    );
    let (status, stderr) = src.vm.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "source: {stderr}");
    assert_heartbeat_continues(&mut src.vm, &mut dst.vm);
    full_round_without_mismatch(&mut dst.vm, "after a slow multifd round");
}
