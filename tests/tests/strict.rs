//! Machine types, the strict check and migration blockers against real TAP
//! peers: a TAP with virtio-net headers (everything this kernel offers) and
//! one without (no offload at all).

use std::time::Duration;

use serde_json::Value;

use godwit_tests::guest::spawn_serving;
use godwit_tests::{
    hex_field, qmp_connect, remedy_line, run_godwit, run_godwit_in, serve_cmdline, Finished,
    NetHost, TempDir, BOOT,
};

const MACHINES: [&str; 2] = ["godwit-1.0", "godwit-1.1"];

/// Boots the test guest (it reports and powers off) on `machine` with
/// `--net net`, in `host`'s namespace.
fn run_report(host: &NetHost, machine: &str, net: &str) -> Finished {
    run_godwit_in(
        Some(&host.ns),
        &[
            "run",
            "--machine",
            machine,
            "--net",
            net,
            "--cmdline",
            "console=ttyS0 reboot=k",
        ],
        BOOT,
    )
}

#[test]
fn full_offload_tap_starts_every_machine_type_strictly() {
    let host = NetHost::new(true, 71);
    for machine in MACHINES {
        let net = format!("tap,ifname={}", host.tap);
        let out = run_report(&host, machine, &net);
        assert_eq!(out.code(), Some(0), "{machine}: {out:?}");
    }
}

#[test]
fn tap_without_vnet_hdr_is_refused_and_each_remedy_works() {
    let host = NetHost::new(true, 72);
    for machine in MACHINES {
        let net = format!("tap,ifname={},vnet_hdr=off", host.tap);
        let out = run_godwit_in(
            Some(&host.ns),
            &["run", "--machine", machine, "--net", &net],
            BOOT,
        );
        assert_eq!(
            out.code(),
            Some(4),
            "{machine}: strict refusal has its own status: {out:?}"
        );
        let err = &out.stderr;
        assert!(
            err.contains("requires, and strict=on") && err.contains(machine),
            "{err}"
        );
        assert!(
            err.contains("csum (bit 0)") && err.contains("carries no virtio-net header"),
            "{err}"
        );
        assert!(err.contains("host_tso4 (bit 11)"), "{err}");
        if machine == "godwit-1.1" {
            assert!(err.contains("host_uso (bit 56)"), "{err}");
        }
        assert!(
            !out.stdout.contains("godwit-test-guest"),
            "no vCPU ran: {out:?}"
        );

        // Remedy 1, pasted: the explicit override list starts the VM.
        let remedy = remedy_line(err, 1).expect("remedy 1");
        let spec = remedy.strip_prefix("--net ").expect("a --net line");
        assert!(
            spec.contains("csum=off") && spec.contains("host_tso4=off"),
            "{spec}"
        );
        let out = run_report(&host, machine, spec);
        assert_eq!(
            out.code(),
            Some(0),
            "remedy 1 for {machine}: {spec}: {out:?}"
        );
        // No machine type carries a TAP without vnet header fully.
        assert!(
            err.contains("no machine type works with this peer"),
            "{err}"
        );

        // Remedy 3, pasted: strict=off starts with warnings.
        let remedy = remedy_line(err, 3).expect("remedy 3");
        let spec = remedy.strip_prefix("--net ").expect("a --net line");
        assert!(spec.ends_with("strict=off"), "{spec}");
        let out = run_report(&host, machine, spec);
        assert_eq!(out.code(), Some(0), "remedy 3 for {machine}: {out:?}");
        assert!(
            out.stderr.contains("dropping csum (bit 0)"),
            "a warning per dropped feature: {out:?}"
        );
    }
}

fn query_hex(v: &Value) -> u64 {
    u64::from_str_radix(v["hex"].as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
}

#[test]
fn strict_off_registers_a_blocker_and_query_net_matches_the_guest() {
    let host = NetHost::new(true, 74);
    let dir = TempDir::new("strictoff");
    let socket = dir.join("api.sock");
    let net = host.tap_net(",vnet_hdr=off,strict=off");
    let cmdline = serve_cmdline(1000, &host.guest_ip_param());
    let mut vm = spawn_serving(Some(&host.ns), &[], &net, &cmdline, Some(&socket));
    let line = vm.wait_line("virtio-net0: base=", BOOT);
    let mut qmp = qmp_connect(&socket);
    let migrate = qmp.execute("query-migrate", Value::Null).unwrap();
    let reasons = migrate["blocked-reasons"].as_array().unwrap();
    assert_eq!(reasons.len(), 1, "{migrate}");
    let reason = reasons[0].as_str().unwrap();
    assert!(
        reason.contains("net0") && reason.contains("strict=off") && reason.contains("csum (bit 0)"),
        "{reason}"
    );

    let nets = qmp.execute("query-net", Value::Null).unwrap();
    let net0 = &nets[0];
    assert_eq!(net0["id"], "net0");
    assert_eq!(net0["machine"], "godwit-1.2");
    assert_eq!(net0["strict"], false);
    assert_eq!(net0["peer"]["kind"], "tap");
    assert_eq!(net0["peer"]["vnet_hdr"], false);
    assert_eq!(
        query_hex(&net0["offered"]),
        hex_field(&line, "offered"),
        "{net0}\n{line}"
    );
    assert_eq!(
        query_hex(&net0["acked"]),
        hex_field(&line, "acked"),
        "{net0}\n{line}"
    );
    assert_eq!(query_hex(&net0["offered"]) & 1, 0, "csum dropped: {net0}");
    assert!(
        net0["dropped"]["names"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == "host_uso"),
        "{net0}"
    );
    assert_eq!(net0["blockers"][0].as_str().unwrap(), reason);
    qmp.execute("quit", Value::Null).unwrap();
    assert_eq!(vm.wait_exit(Duration::from_secs(10)).0.code(), Some(0));
}

#[test]
fn strict_vm_has_no_blocker_and_query_net_matches_the_guest() {
    let host = NetHost::new(true, 75);
    let dir = TempDir::new("stricton");
    let socket = dir.join("api.sock");
    let cmdline = serve_cmdline(1000, &host.guest_ip_param());
    let mut vm = spawn_serving(
        Some(&host.ns),
        &["--machine", "godwit-1.0"],
        &host.tap_net(""),
        &cmdline,
        Some(&socket),
    );
    let line = vm.wait_line("virtio-net0: base=", BOOT);
    let mut qmp = qmp_connect(&socket);
    assert_eq!(
        qmp.execute("query-migrate", Value::Null).unwrap()["blocked-reasons"],
        serde_json::json!([])
    );
    let net0 = &qmp.execute("query-net", Value::Null).unwrap()[0];
    assert_eq!(net0["machine"], "godwit-1.0");
    assert_eq!(query_hex(&net0["offered"]), hex_field(&line, "offered"));
    assert_eq!(query_hex(&net0["acked"]), hex_field(&line, "acked"));
    assert_eq!(query_hex(&net0["required"]), query_hex(&net0["offered"]));
    // godwit-1.0 does not offer USO.
    assert_eq!(query_hex(&net0["offered"]) & (7 << 54), 0, "{net0}");
    let machines = qmp.execute("query-machines", Value::Null).unwrap();
    let current: Vec<&Value> = machines
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["is-current"] == true)
        .collect();
    assert_eq!(current.len(), 1);
    assert_eq!(current[0]["name"], "godwit-1.0");
    qmp.execute("quit", Value::Null).unwrap();
    assert_eq!(vm.wait_exit(Duration::from_secs(10)).0.code(), Some(0));
}

#[test]
fn machine_listing_and_help() {
    for args in [&["machines"][..], &["run", "--machine", "help"][..]] {
        let out = run_godwit(args, BOOT);
        assert_eq!(out.code(), Some(0), "{out:?}");
        assert!(
            out.stdout.contains("godwit-1.2 (alias 'godwit', default)"),
            "{out:?}"
        );
        assert!(
            out.stdout.contains("godwit-1.0")
                && out.stdout.contains("adds: UDP segmentation offload"),
            "{out:?}"
        );
    }
    let out = run_godwit(&["run", "--machine", "godwit-1.0,help"], BOOT);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(
        out.stdout.contains("host_tso4=on (bit 11)") && !out.stdout.contains("host_uso"),
        "{out:?}"
    );
    assert!(out.stdout.contains("queue size: 256"), "{out:?}");
}

#[test]
fn probe_reports_peer_capabilities() {
    let host = NetHost::new(true, 76);
    let out = run_godwit_in(
        Some(&host.ns),
        &["probe", "--net", &format!("tap,ifname={}", host.tap)],
        BOOT,
    );
    assert_eq!(out.code(), Some(0), "{out:?}");
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["vnet_hdr"], true);
    assert!(
        v["machine_types"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["supported"] == true),
        "{v}"
    );
    let out = run_godwit_in(
        Some(&host.ns),
        &[
            "probe",
            "--net",
            &format!("tap,ifname={},vnet_hdr=off", host.tap),
        ],
        BOOT,
    );
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["vnet_hdr"], false);
    assert!(
        v["lacks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["name"] == "host_uso"),
        "{v}"
    );
    assert!(
        v["machine_types"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["supported"] == false),
        "{v}"
    );
}

#[test]
fn bad_machine_and_property_input_lists_the_valid_choices() {
    let out = run_godwit(&["run", "--machine", "pc-q35-8.1"], BOOT);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.contains(
            "unknown machine type 'pc-q35-8.1'; valid: godwit, godwit-1.2, godwit-1.1, godwit-1.0"
        ),
        "{out:?}"
    );
    let out = run_godwit(&["run", "--net", "tap,ifname=x0,frobnicate=on"], BOOT);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.contains("unknown property 'frobnicate'") && out.stderr.contains("host_uso"),
        "{out:?}"
    );
    let out = run_godwit(&["run", "--net", "tap,ifname=x0,guest_csum=off"], BOOT);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.contains("guest_csum=off conflicts with guest_"),
        "{out:?}"
    );
    let out = run_godwit(
        &["run", "--net", "tap,ifname=x0,host_tso4=off,host_tso6=off"],
        BOOT,
    );
    assert!(
        out.stderr
            .contains("host_ecn=on conflicts with host_tso4/host_tso6=off"),
        "{out:?}"
    );
    let out = run_godwit(&["run", "--net", "tap,ifname=x0,strict=maybe"], BOOT);
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("strict=maybe is not valid"), "{out:?}");
    let out = run_godwit(&["run", "--machine", "godwit-9.9,help"], BOOT);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("valid: godwit"), "{out:?}");
}

/// godwit-1.2 (the default) has 2 queue pairs: a single-queue TAP is
/// refused, naming the queue count, and each remedy, pasted, starts the VM
/// (strict=off with a migration blocker).
#[test]
fn single_queue_tap_is_refused_naming_the_queue_count_and_each_remedy_works() {
    let host = NetHost::single_queue(true, 77);
    let net = host.tap_net("");
    let out = run_godwit_in(Some(&host.ns), &["run", "--net", &net], BOOT);
    assert_eq!(out.code(), Some(4), "strict refusal: {out:?}");
    let err = &out.stderr;
    assert!(
        err.contains("lacks queue pairs that machine type godwit-1.2 requires, and strict=on")
            && err.contains("2 queue pairs required, the peer carries 1")
            && err.contains("single-queue TAP"),
        "{err}"
    );
    assert!(
        !out.stdout.contains("godwit-test-guest"),
        "no vCPU ran: {out:?}"
    );

    let remedy = remedy_line(err, 1).expect("remedy 1");
    let spec = remedy.strip_prefix("--net ").expect("a --net line");
    assert_eq!(spec, format!("{net},queues=1"));
    let out = run_report(&host, "godwit", spec);
    assert_eq!(out.code(), Some(0), "remedy 1: {spec}: {out:?}");

    let remedy = remedy_line(err, 2).expect("remedy 2");
    assert_eq!(remedy, "--machine godwit-1.1");
    let out = run_report(&host, "godwit-1.1", &net);
    assert_eq!(out.code(), Some(0), "remedy 2: {out:?}");

    let remedy = remedy_line(err, 3).expect("remedy 3");
    let spec = remedy.strip_prefix("--net ").expect("a --net line");
    assert!(spec.ends_with("strict=off"), "{spec}");
    let dir = TempDir::new("mqoff");
    let socket = dir.join("api.sock");
    let cmdline = serve_cmdline(1000, &host.guest_ip_param());
    let mut vm = spawn_serving(Some(&host.ns), &[], spec, &cmdline, Some(&socket));
    vm.wait_line("serve: ready", BOOT);
    let mut qmp = qmp_connect(&socket);
    let migrate = qmp.execute("query-migrate", Value::Null).unwrap();
    let reason = migrate["blocked-reasons"][0].as_str().unwrap().to_string();
    assert!(
        reason.contains("strict=off") && reason.contains("1 of the 2 queue pairs"),
        "{migrate}"
    );
    let net0 = &qmp.execute("query-net", Value::Null).unwrap()[0];
    assert_eq!(net0["queue_pairs"]["required"], 2, "{net0}");
    assert_eq!(net0["queue_pairs"]["offered"], 1, "{net0}");
    assert_eq!(net0["peer"]["max_queue_pairs"], 1, "{net0}");
    host.assert_ping(&host.guest_ip(), 1, "the guest answers on its one pair");
    qmp.execute("quit", Value::Null).unwrap();
    assert_eq!(vm.wait_exit(Duration::from_secs(10)).0.code(), Some(0));

    // probe says which machine types the TAP carries, and why not.
    let out = run_godwit_in(Some(&host.ns), &["probe", "--net", &net], BOOT);
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        (v["multi_queue"].as_bool(), v["max_queue_pairs"].as_u64()),
        (Some(false), Some(1))
    );
    let fits: Vec<(String, bool)> = v["machine_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_string(),
                m["supported"] == true,
            )
        })
        .collect();
    assert_eq!(fits[0], ("godwit-1.2".to_string(), false), "{v}");
    assert_eq!(fits[1], ("godwit-1.1".to_string(), true), "{v}");
}
