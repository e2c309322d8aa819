//! Auto-converge: a guest that dirties memory at twice the rate the link
//! carries (max-bandwidth) cannot converge by itself; with QEMU's
//! `auto-converge` capability the source throttles its vCPUs until it does.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use godwit_tests::guest::spawn_serving;
use godwit_tests::migrate::{assert_heartbeat_continues, wait_migration};
use godwit_tests::{
    qmp_connect, serve_cmdline, wait_listening, RunningVm, TempDir, TwoHosts, BOOT,
};

const PORT: u16 = 4444;
/// 4 MB/s on the link.
const LINK: u64 = 4_000_000;
/// 2000 pages of 4 KiB per second: twice the link.
const DIRTY: &str = "godwit.dirty=4M:2000 godwit.dirty_pace=cpu";

fn start_destination(hosts: &TwoHosts) -> RunningVm {
    let uri = format!("tcp:{}:{PORT}", hosts.addr_b());
    let vm = RunningVm::spawn_in(
        &hosts.ns_b(),
        &["run", "--incoming", &uri, "--net", "tap,ifname=gwtap0"],
    );
    wait_listening(&hosts.ns_b(), PORT);
    vm
}

#[test]
fn auto_converge_throttles_a_guest_that_dirties_twice_the_link_until_it_moves() {
    let hosts = TwoHosts::new(134, true, true);
    let dir = TempDir::new("migconverge");
    let api = dir.join("a.sock");
    let cmdline = serve_cmdline(200, &format!("{} {DIRTY}", hosts.guest_ip_param()));
    let mut src = spawn_serving(
        Some(&hosts.ns_a()),
        &[],
        "tap,ifname=gwtap0",
        &cmdline,
        Some(&api),
    );
    src.wait_prefix("dirty: ", BOOT);
    let mut qmp = qmp_connect(&api);
    let uri = format!("tcp:{}:{PORT}", hosts.addr_b());

    // Without auto-converge the guest outruns the link.
    let dst = start_destination(&hosts);
    qmp.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": LINK, "max-rounds": 4}),
    )
    .unwrap();
    qmp.execute("migrate", json!({ "uri": uri })).unwrap();
    let info = wait_migration(&mut qmp, Duration::from_secs(120));
    assert_eq!(info["status"], "failed", "{info}");
    assert!(
        info["error"]
            .as_str()
            .unwrap_or_default()
            .contains("dirties memory faster than the link"),
        "{info}"
    );
    drop(dst);

    // With it, the same guest moves within a bounded time.
    let mut dst = start_destination(&hosts);
    qmp.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "auto-converge", "state": true}]}),
    )
    .unwrap();
    assert_eq!(
        qmp.execute("query-migrate-capabilities", Value::Null)
            .unwrap(),
        json!([
            {"capability": "auto-converge", "state": true},
            {"capability": "multifd", "state": false}
        ])
    );
    qmp.execute(
        "migrate-set-parameters",
        json!({"max-rounds": 30, "cpu-throttle-initial": 50, "cpu-throttle-increment": 20}),
    )
    .unwrap();
    let params = qmp
        .execute("query-migrate-parameters", Value::Null)
        .unwrap();
    assert_eq!(params["cpu-throttle-initial"], 50, "{params}");
    assert_eq!(params["cpu-throttle-increment"], 20, "{params}");
    let started = Instant::now();
    qmp.execute("migrate", json!({ "uri": uri })).unwrap();
    let mut throttle = 0;
    let info = loop {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "auto-converge did not end the migration within 90 s"
        );
        match qmp.execute("query-migrate", Value::Null) {
            Ok(info) => {
                throttle = throttle.max(info["cpu-throttle-percentage"].as_u64().unwrap_or(0));
                if matches!(
                    info["status"].as_str(),
                    Some("completed" | "failed" | "cancelled")
                ) {
                    break info;
                }
            }
            Err(_) => break json!({"status": "completed", "source-exited": true}),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(info["status"], "completed", "{info}");
    assert!(
        (50..=99).contains(&throttle),
        "query-migrate showed the throttle: {throttle}%"
    );
    let (status, stderr) = src.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "source: {stderr}");
    // The guest runs on, unthrottled, on B.
    let first = assert_heartbeat_continues(&mut src, &mut dst);
    dst.wait_prefix(&format!("heartbeat {}", first + 5), Duration::from_secs(5));
}
