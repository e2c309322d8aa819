//! Host capability reports and the migration planner: recorded reports
//! (tests/fixtures/host-caps: a full-offload TAP host, a TAP host without
//! USO, a host with only a DPDK-like vhost-user backend, a host whose
//! backend lists a newer interface version, one whose backend only knows
//! v1), reports taken live on this machine and inside namespace hosts, the
//! planned line started strictly on each host's real peer, a planned VM
//! migrating both ways between hosts whose TAPs differ, and `plan --vm`
//! against a running VM and a snapshot.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use godwit_devices::net::tap::TapOffloads;
use godwit_devices::virtio::net::features;
use godwit_tests::migrate::wait_migration;
use godwit_tests::{
    godwit_command, heartbeat, qmp_connect, run_godwit, run_godwit_in, wait_listening, Finished,
    NetHost, QmpClient, RunningVm, TempDir, TwoHosts,
};
use godwit_vmm::abi::machine_types::{bits_of, resolve, MACHINE_TYPES};
use godwit_vmm::planning::host_caps::{
    self, backend_offer, parse_report, HostReport, PeerKind, PeerStatus, Probe,
};

const BOOT: Duration = Duration::from_secs(60);
const PORT: u16 = 4444;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/host-caps")
}

fn fixture(name: &str) -> String {
    fixtures()
        .join(format!("{name}.json"))
        .display()
        .to_string()
}

fn read_fixture(name: &str) -> HostReport {
    let path = fixture(name);
    let text = std::fs::read_to_string(&path).unwrap();
    parse_report(&text, &path).unwrap_or_else(|e| panic!("{e}"))
}

fn plan(args: &[&str]) -> Finished {
    let mut all = vec!["plan"];
    all.extend_from_slice(args);
    run_godwit(&all, Duration::from_secs(30))
}

fn plan_json(args: &[&str]) -> (Option<i32>, Value) {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = plan(&all);
    let v: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    (out.code(), v)
}

fn names(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .map(|n| n.as_str().unwrap_or("").to_string())
        .collect()
}

/// Every recorded report reads cleanly, and its supported sets are what the
/// feature model computes from its own raw probe data.
#[test]
fn fixtures_parse_and_agree_with_the_feature_model() {
    let mut count = 0;
    for entry in std::fs::read_dir(fixtures()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("invalid-") {
            continue;
        }
        count += 1;
        let text = std::fs::read_to_string(&path).unwrap();
        let r = parse_report(&text, &name).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.schema, "godwit-host-caps/1");
        // The reader keeps what the file says (round trip).
        let again = parse_report(&serde_json::to_string(&r).unwrap(), &name).unwrap();
        assert_eq!(again, r, "{name}");
        for p in r.peers.iter().filter(|p| p.status == PeerStatus::Ok) {
            let recorded = p.supported.as_ref().unwrap().bits();
            let computed = match &p.probe {
                Probe::Tap(t) => {
                    godwit_vmm::devices::net::tap_support("t", t.offloads.as_ref().unwrap())
                        .supported
                }
                Probe::VhostUser(u) => {
                    let f = u64::from_str_radix(&u.features.as_ref().unwrap()[2..], 16).unwrap();
                    godwit_vmm::devices::net::vhost_user_support(
                        &u.socket,
                        &backend_offer(f, 0, u.queue_num),
                    )
                    .supported
                }
                Probe::VhostNet(v) => {
                    let f = features::parse_hex(v.features.as_ref().unwrap()).unwrap();
                    let tap = v.tap.as_ref().unwrap().offloads.unwrap();
                    godwit_vmm::devices::net::vhost_net_support("t", &tap, f, None).supported
                }
            };
            assert_eq!(recorded, computed, "{name}: {}", p.name);
            for l in &p.lacks {
                assert_eq!(
                    recorded & (1 << l.bit),
                    0,
                    "{name}: {} lacks {}",
                    p.name,
                    l.name
                );
            }
        }
    }
    assert!(count >= 5, "{count} fixtures");
    let nouso = read_fixture("tap-no-uso");
    let tap = nouso.peer(PeerKind::Tap, 0).unwrap();
    assert_eq!(
        tap.supported.as_ref().unwrap().bits() & bits_of(&["guest_uso4", "host_uso"]),
        0
    );
    let dpdk = read_fixture("dpdk-only");
    assert_eq!(
        dpdk.peer(PeerKind::Tap, 0).unwrap().status,
        PeerStatus::Error
    );
    let vu = dpdk.peer(PeerKind::VhostUser, 0).unwrap();
    assert!(vu.migration_blocker.is_none());
    let newer = read_fixture("newer-interfaces");
    match &newer.peer(PeerKind::VhostUser, 0).unwrap().probe {
        Probe::VhostUser(u) => {
            let i = u.interface.as_ref().unwrap();
            assert_eq!(i.latest, "org.godwit.net.v3");
            assert_eq!(i.supported.len(), 3);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn full_tap_and_no_uso_hosts_plan_the_newest_type_without_uso() {
    let (a, b) = (fixture("full-tap"), fixture("tap-no-uso"));
    let out = plan(&[&a, &b]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let first = out.stdout.lines().next().unwrap();
    assert_eq!(
        first,
        "--machine godwit-1.1 --net tap,ifname=gwtap0,strict=on,guest_uso4=off,guest_uso6=off,host_uso=off"
    );
    assert!(
        out.stdout.contains("lacking on tap-no-uso")
            && out.stdout.contains("a kernel whose TAP accepts USO"),
        "{}",
        out.stdout
    );
    let (code, v) = plan_json(&[&a, &b]);
    assert_eq!(code, Some(0));
    assert_eq!(v["schema"], "godwit-plan/1");
    assert_eq!(v["ok"], true);
    assert_eq!(v["machine"], "godwit-1.1");
    let d = &v["devices"][0];
    assert_eq!(d["kind"], "tap");
    assert_eq!(
        names(&d["overrides"]),
        ["guest_uso4", "guest_uso6", "host_uso"]
    );
    assert_eq!(
        names(&d["properties"]),
        [
            "strict=on",
            "guest_uso4=off",
            "guest_uso6=off",
            "host_uso=off"
        ]
    );
    assert_eq!(d["no_override_machine"], "godwit-1.0");
    for l in d["left_out"].as_array().unwrap() {
        let hosts: Vec<&str> = l["lacking_on"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["host"].as_str().unwrap())
            .collect();
        assert_eq!(hosts.len(), 1, "{l}");
        assert!(hosts[0].starts_with("tap-no-uso ("), "{l}");
    }
    // The tap-no-uso host's older CPU is the one to start on.
    assert_eq!(v["cpu"]["distinct_cpus"], 2);
    let start: Vec<String> = names(&v["cpu"]["start_on"]);
    assert!(
        start.len() == 1 && start[0].starts_with("tap-no-uso"),
        "{start:?}"
    );
    // Only one host has kernel vhost-net: no such device by default.
    assert!(v["notes"]
        .to_string()
        .contains("no vhost-net device planned"));
    let (code, v) = plan_json(&["--device", "vhost-net", &a, &b]);
    assert_eq!(code, Some(5));
    let b0 = &v["devices"][0]["blockers"][0];
    assert!(b0["host"].as_str().unwrap().starts_with("full-tap"), "{b0}");
    assert!(
        b0["would_change"]
            .as_str()
            .unwrap()
            .contains("CONFIG_VHOST_NET"),
        "{b0}"
    );
}

#[test]
fn a_dpdk_only_host_has_no_common_abi_with_a_tap_host() {
    let (a, b) = (fixture("full-tap"), fixture("dpdk-only"));
    let out = plan(&[&a, &b]);
    assert_eq!(
        out.code(),
        Some(5),
        "no common ABI has its own status: {out:?}"
    );
    assert!(
        out.stdout.starts_with("no common ABI over 2 host(s)"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("tun driver"), "{}", out.stdout);
    let (code, v) = plan_json(&["--device", "vhost-user", &a, &b]);
    assert_eq!(code, Some(5));
    assert_eq!(v["ok"], false);
    assert!(v["command_line"].is_null());
    let blk = &v["devices"][0]["blockers"];
    assert_eq!(blk.as_array().unwrap().len(), 1, "{blk}");
    assert!(blk[0]["host"].as_str().unwrap().starts_with("full-tap"));
    assert!(blk[0]["problem"]
        .as_str()
        .unwrap()
        .contains("no vhost-user peer"));
    assert!(blk[0]["would_change"]
        .as_str()
        .unwrap()
        .contains("--net vhost-user,socket=PATH"));
}

#[test]
fn vhost_user_plans_follow_backends_and_interface_versions() {
    // DPDK and a godwit backend: no pin (DPDK lacks the extension), host
    // TSO and USO left out, host_ecn with them, one line per host.
    let (code, v) = plan_json(&[
        &fixture("dpdk-only"),
        &fixture("newer-interfaces"),
        "--device",
        "vhost-user",
    ]);
    assert_eq!(code, Some(0), "{v:#}");
    let d = &v["devices"][0];
    assert!(d["interface"].is_null());
    assert_eq!(
        names(&d["overrides"]),
        [
            "host_tso4",
            "host_tso6",
            "host_ecn",
            "guest_uso4",
            "guest_uso6",
            "host_uso"
        ]
    );
    assert!(d["notes"][0]
        .as_str()
        .unwrap()
        .contains("lacks godwit's interface-version extension"));
    let lines = v["host_command_lines"].as_array().unwrap();
    assert_eq!(lines.len(), 2, "sockets differ: {v:#}");
    assert!(lines[0]["command_line"]
        .as_str()
        .unwrap()
        .contains("vhost-user,socket=/run/dpdk/vhost0.sock,strict=on,host_tso4=off"));
    let host_tso4 = &d["left_out"][0];
    assert!(host_tso4["lacking_on"][0]["would_change"]
        .as_str()
        .unwrap()
        .contains("another backend interface version"));
    // The backend with the newer list and one that only knows v1: v1 is
    // pinned, USO left out, and what would change is a backend listing v2.
    let (code, v) = plan_json(&[
        &fixture("newer-interfaces"),
        &fixture("backend-v1"),
        "--device",
        "vhost-user",
    ]);
    assert_eq!(code, Some(0));
    let d = &v["devices"][0];
    assert_eq!(d["interface"], "org.godwit.net.v1");
    assert_eq!(
        names(&d["overrides"]),
        ["guest_uso4", "guest_uso6", "host_uso"]
    );
    assert_eq!(
        v["command_line"],
        "--machine godwit-1.1 --net vhost-user,socket=/run/godwit/net0.sock,strict=on,interface=org.godwit.net.v1,guest_uso4=off,guest_uso6=off,host_uso=off"
    );
    let newer = &d["left_out"][0]["lacking_on"][0];
    assert!(newer["host"]
        .as_str()
        .unwrap()
        .starts_with("newer-interfaces"));
    assert!(
        newer["why"]
            .as_str()
            .unwrap()
            .contains("interface org.godwit.net.v1")
            && newer["would_change"]
                .as_str()
                .unwrap()
                .contains("a backend that lists org.godwit.net.v2"),
        "{newer}"
    );
    // Alone, the newer backend is pinned to the version it presents (its
    // features come from its record: this godwit does not know v3).
    let (code, v) = plan_json(&[&fixture("newer-interfaces"), "--device", "vhost-user"]);
    assert_eq!(code, Some(0));
    assert_eq!(v["devices"][0]["interface"], "org.godwit.net.v3");
    assert_eq!(v["devices"][0]["overrides"], json!([]));
}

#[test]
fn malformed_and_future_reports_name_the_file_and_the_field() {
    let future = fixture("invalid-future-version");
    let out = plan(&[&fixture("full-tap"), &future]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.contains(&format!("{future}: field `schema`"))
            && out.stderr.contains("godwit-host-caps/2")
            && out.stderr.contains("newer than"),
        "{}",
        out.stderr
    );
    let bad = fixture("invalid-bad-field");
    let out = plan(&[&bad]);
    assert_eq!(out.code(), Some(1));
    assert!(
        out.stderr.contains(&format!(
            "{bad}: field `peers[0].supported.hex`: 'all of them' is not a hex number of up to 32 digits"
        )),
        "{}",
        out.stderr
    );
    // Edits of a good report, one field at a time.
    let dir = TempDir::new("plan-bad");
    let good: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("full-tap")).unwrap()).unwrap();
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "/host/name",
            json!(false),
            "field `host.name`: invalid type: boolean `false`, expected a string",
        ),
        (
            "/peers/0/status",
            json!("fine"),
            "field `peers[0].status`: 'fine' is not one of ok, error, absent",
        ),
        (
            "/peers/0/probe/offloads/csum",
            json!(1),
            "field `peers[0].probe.offloads.csum`: invalid type: integer `1`, expected a boolean",
        ),
        (
            "/godwit/machine_types",
            json!("godwit-1.1"),
            "field `godwit.machine_types`: invalid type: string \"godwit-1.1\", expected a sequence",
        ),
        (
            "/cpuid/entries/3",
            json!("7:0:0:zz:0:0:0"),
            "field `cpuid.entries[3]`: '7:0:0:zz:0:0:0' is not a CPUID entry",
        ),
        (
            "/cpuid/entries/4",
            json!({"function": 7}),
            "field `cpuid.entries[4]`: invalid type: map, expected a string",
        ),
    ];
    for (pointer, value, needle) in cases {
        let mut v = good.clone();
        *v.pointer_mut(pointer).unwrap() = value;
        let path = dir.join("h.json");
        std::fs::write(&path, v.to_string()).unwrap();
        let p = path.display().to_string();
        let out = plan(&[&p]);
        assert_eq!(out.code(), Some(1), "{pointer}: {out:?}");
        assert!(
            out.stderr.contains(&format!("{p}: {needle}")),
            "{pointer}: {}",
            out.stderr
        );
    }
    let path = dir.join("trunc.json");
    std::fs::write(&path, "{\"schema\": \"godwit-host-caps/1\", ").unwrap();
    let out = plan(&[path.to_str().unwrap()]);
    assert_eq!(out.code(), Some(1));
    assert!(
        out.stderr.contains("trunc.json: not valid JSON"),
        "{}",
        out.stderr
    );
    let out = plan(&[dir.join("missing.json").to_str().unwrap()]);
    assert_eq!(out.code(), Some(1));
    assert!(
        out.stderr.contains("missing.json: cannot read"),
        "{}",
        out.stderr
    );
}

/// `godwit host-caps` on this machine: PVM KVM, a temporary TAP (removed
/// afterwards), no /dev/vhost-net.
#[test]
fn live_report_of_this_machine() {
    let out = run_godwit(&["host-caps", "--name", "this"], Duration::from_secs(30));
    assert_eq!(out.code(), Some(0), "{out:?}");
    let r = parse_report(&out.stdout, "stdout").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.host.name, "this");
    assert_eq!(
        r.godwit.machine_types,
        MACHINE_TYPES.iter().map(|m| m.name).collect::<Vec<_>>()
    );
    assert!(r.kvm.available, "{:?}", r.kvm);
    assert_eq!(r.kvm.api_version, Some(12));
    assert_eq!(r.kvm.capabilities.get("KVM_CAP_IRQCHIP"), Some(&true));
    assert!(r.cpuid.available && r.cpuid.entries.len() > 5);
    assert!(r.cpuid.vendor.is_some() && r.cpuid.features.iter().any(|f| f == "lm"));
    let tap = r.peer(PeerKind::Tap, 0).unwrap();
    assert_eq!(tap.status, PeerStatus::Ok, "{tap:?}");
    assert!(tap.spec.is_none());
    let Probe::Tap(t) = &tap.probe else {
        panic!("{tap:?}")
    };
    assert!(t.temporary);
    // This kernel (6.18) accepts every offload, USO and UDP tunnel GSO
    // included.
    assert_eq!(t.offloads, Some(TapOffloads::all()));
    let newest = resolve("godwit").unwrap().net_features();
    assert_eq!(tap.supported.as_ref().unwrap().bits() & newest, newest);
    let gone = std::process::Command::new("ip")
        .args(["link", "show", t.ifname.as_deref().unwrap()])
        .output()
        .unwrap();
    assert!(!gone.status.success(), "the temporary TAP was removed");
    let vn = r.peer(PeerKind::VhostNet, 0).unwrap();
    if Path::new("/dev/vhost-net").exists() {
        assert_eq!(vn.status, PeerStatus::Ok, "{vn:?}");
    } else {
        assert_eq!(vn.status, PeerStatus::Absent);
        assert!(vn
            .error
            .as_deref()
            .unwrap()
            .contains("/dev/vhost-net does not exist"));
    }
    // A socket nobody serves is an entry with an error, not a failure.
    let out = run_godwit(
        &[
            "host-caps",
            "--net",
            "vhost-user,socket=/nonexistent/vu.sock",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(out.code(), Some(0), "{out:?}");
    let r = parse_report(&out.stdout, "stdout").unwrap();
    let vu = r.peer(PeerKind::VhostUser, 0).unwrap();
    assert_eq!(vu.status, PeerStatus::Error);
    assert!(vu
        .error
        .as_deref()
        .unwrap()
        .contains("no socket at /nonexistent/vu.sock"));
    // Planning this host alone: its full ABI, nothing left out.
    let dir = TempDir::new("plan-live");
    let path = dir.join("this.json");
    std::fs::write(&path, &out.stdout).unwrap();
    let (code, v) = plan_json(&[path.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{v:#}");
    assert_eq!(v["machine"], resolve("godwit").unwrap().name);
    assert_eq!(v["devices"][0]["overrides"], json!([]));
    assert_eq!(
        v["command_line"],
        format!(
            "--machine {} --net tap,ifname=TAPNAME,strict=on",
            resolve("godwit").unwrap().name
        )
    );
}

/// Takes a host's report inside its namespace.
fn live_report(ns: &str, name: &str, spec: &str, out: &Path) {
    let r = run_godwit_in(
        Some(ns),
        &[
            "host-caps",
            "--name",
            name,
            "--net",
            spec,
            "--output",
            out.to_str().unwrap(),
        ],
        Duration::from_secs(30),
    );
    assert_eq!(r.code(), Some(0), "{r:?}");
}

/// The `--machine ... --net ...` line for `host` from a JSON plan.
fn line_for(plan: &Value, host: &str) -> String {
    plan["host_command_lines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| {
            l["host"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{host} ("))
        })
        .map(|l| l["command_line"].as_str().unwrap().to_string())
        .unwrap_or_else(|| plan["command_line"].as_str().unwrap().to_string())
}

fn net_of(line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words.iter().position(|w| *w == "--net").unwrap();
    words[i + 1].to_string()
}

/// The planned line, pasted on each host's real TAP, starts with strict on;
/// the machine type's defaults do not (on the TAP without vnet header).
#[test]
fn the_planned_line_starts_strictly_on_each_hosts_peer() {
    let full = NetHost::new(true, 141);
    let plain = NetHost::new(false, 142);
    let dir = TempDir::new("plan-start");
    let (ra, rb) = (dir.join("full.json"), dir.join("plain.json"));
    live_report(&full.ns, "full", &format!("tap,ifname={}", full.tap), &ra);
    live_report(
        &plain.ns,
        "plain",
        &format!("tap,ifname={},vnet_hdr=off", plain.tap),
        &rb,
    );
    let (code, v) = plan_json(&[ra.to_str().unwrap(), rb.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{v:#}");
    let offered = features::parse_hex(v["devices"][0]["offered"]["hex"].as_str().unwrap()).unwrap();
    assert_eq!(
        offered & bits_of(&["csum", "guest_csum", "host_tso4", "guest_uso4"]),
        0
    );
    for (host, name) in [(&full, "full"), (&plain, "plain")] {
        let line = line_for(&v, name);
        let net = net_of(&line);
        assert!(net.contains("strict=on"), "{line}");
        if name == "plain" {
            assert!(net.contains("vnet_hdr=off"), "{line}");
        }
        let mut args: Vec<&str> = vec!["run"];
        args.extend(line.split_whitespace());
        args.extend(["--cmdline", "console=ttyS0 reboot=k"]);
        let out = run_godwit_in(Some(&host.ns), &args, BOOT);
        assert_eq!(out.code(), Some(0), "{name}: {line}: {out:?}");
        assert!(
            !out.stderr.contains("dropping"),
            "{name}: nothing dropped: {out:?}"
        );
    }
    // Without the plan's overrides, strict refuses the plain host's TAP.
    let out = run_godwit_in(
        Some(&plain.ns),
        &[
            "run",
            "--machine",
            v["machine"].as_str().unwrap(),
            "--net",
            &format!("tap,ifname={},vnet_hdr=off", plain.tap),
        ],
        BOOT,
    );
    assert_eq!(out.code(), Some(4), "{out:?}");
    // The recorded full-offload / no-USO plan starts on a real TAP too.
    let out = plan(&[&fixture("full-tap"), &fixture("tap-no-uso")]);
    let line = out.stdout.lines().next().unwrap().to_string();
    let mut args: Vec<&str> = vec!["run"];
    args.extend(line.split_whitespace());
    args.extend(["--cmdline", "console=ttyS0 reboot=k"]);
    let out = run_godwit_in(Some(&full.ns), &args, BOOT);
    assert_eq!(out.code(), Some(0), "{line}: {out:?}");
}

/// Migrates from `src` (API `qmp`) to a destination already listening at
/// `uri`; returns the source's last heartbeat.
fn migrate(src: &mut RunningVm, qmp: &mut QmpClient, uri: &str) -> u64 {
    qmp.execute("migrate", json!({ "uri": uri })).unwrap();
    let info = wait_migration(qmp, Duration::from_secs(120));
    assert_eq!(info["status"], "completed", "{info}");
    let (status, stderr) = src.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "source: {stderr}");
    src.seen
        .iter()
        .rev()
        .find(|l| l.starts_with("heartbeat "))
        .map(|l| heartbeat(l))
        .unwrap()
}

/// Hosts whose peers differ (A: TAP with vnet header, B: without): their
/// live reports give an offload-free plan; a VM started from it on A
/// migrates to B and back, counting on.
#[test]
fn a_planned_vm_migrates_both_ways_between_hosts_whose_peers_differ() {
    let hosts = TwoHosts::new(143, true, false);
    let dir = TempDir::new("plan-mig");
    let (ra, rb) = (dir.join("a.json"), dir.join("b.json"));
    live_report(&hosts.ns_a(), "a", "tap,ifname=gwtap0", &ra);
    live_report(&hosts.ns_b(), "b", "tap,ifname=gwtap0,vnet_hdr=off", &rb);
    let reports = [ra.to_str().unwrap(), rb.to_str().unwrap()];
    let (code, v) = plan_json(&reports);
    assert_eq!(code, Some(0), "{v:#}");
    let offered = &v["devices"][0]["offered"]["names"];
    for n in ["csum", "guest_csum", "host_tso4", "guest_uso4"] {
        assert!(
            !names(offered).contains(&n.to_string()),
            "{n} offered: {v:#}"
        );
    }
    let (line_a, line_b) = (line_for(&v, "a"), line_for(&v, "b"));
    assert!(
        net_of(&line_b).starts_with("tap,ifname=gwtap0,vnet_hdr=off,strict=on,"),
        "{line_b}"
    );

    // The VM, started on A from the plan.
    let cmdline = format!(
        "console=ttyS0 reboot=k godwit.mode=serve godwit.heartbeat_ms=200 {}",
        hosts.guest_ip_param()
    );
    let api_a = dir.join("a.sock");
    let mut args: Vec<&str> = vec!["run"];
    args.extend(line_a.split_whitespace());
    args.extend([
        "--api-socket",
        api_a.to_str().unwrap(),
        "--cmdline",
        &cmdline,
    ]);
    let mut on_a = RunningVm::spawn_in(&hosts.ns_a(), &args);
    on_a.wait_line("serve: ready", BOOT);
    on_a.wait_prefix("heartbeat ", BOOT);
    let mut qmp_a = qmp_connect(&api_a);
    let net = qmp_a.execute("query-net", Value::Null).unwrap();
    assert_eq!(net[0]["strict"], true, "{net}");
    assert_eq!(net[0]["peer"]["vnet_hdr"], true, "{net}");

    // The planner agrees that it can move to both hosts (its live state).
    let mut vm_args = vec!["--vm", api_a.to_str().unwrap()];
    vm_args.extend(reports);
    let out = plan(&vm_args);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(
        out.stdout.contains("b (") && out.stdout.contains("can migrate"),
        "{}",
        out.stdout
    );

    // A -> B.
    let api_b = dir.join("b.sock");
    let uri_b = format!("tcp:{}:{PORT}", hosts.addr_b());
    let mut on_b = RunningVm::spawn_in(
        &hosts.ns_b(),
        &[
            "run",
            "--incoming",
            &uri_b,
            "--net",
            &net_of(&line_b),
            "--api-socket",
            api_b.to_str().unwrap(),
        ],
    );
    wait_listening(&hosts.ns_b(), PORT);
    let last_a = migrate(&mut on_a, &mut qmp_a, &uri_b);
    let first_b = heartbeat(&on_b.wait_prefix("heartbeat ", Duration::from_secs(20)));
    assert_eq!(first_b, last_a + 1, "the guest counts on on B");
    on_b.wait_prefix(
        &format!("heartbeat {}", first_b + 2),
        Duration::from_secs(20),
    );
    let mut qmp_b = qmp_connect(&api_b);
    let net = qmp_b.execute("query-net", Value::Null).unwrap();
    assert_eq!(
        net[0]["peer"]["vnet_hdr"], false,
        "B's TAP has no vnet header: {net}"
    );
    assert_eq!(net[0]["strict"], true, "{net}");

    // B -> A: a new destination on A.
    let api_a2 = dir.join("a2.sock");
    let addr_a = format!("10.{}.0.11", hosts.subnet);
    let uri_a = format!("tcp:{addr_a}:{PORT}");
    let mut back = RunningVm::spawn_in(
        &hosts.ns_a(),
        &[
            "run",
            "--incoming",
            &uri_a,
            "--net",
            &net_of(&line_a),
            "--api-socket",
            api_a2.to_str().unwrap(),
        ],
    );
    wait_listening(&hosts.ns_a(), PORT);
    let last_b = migrate(&mut on_b, &mut qmp_b, &uri_a);
    let again = heartbeat(&back.wait_prefix("heartbeat ", Duration::from_secs(20)));
    assert_eq!(again, last_b + 1, "the guest counts on back on A");
    back.wait_prefix(&format!("heartbeat {}", again + 2), Duration::from_secs(20));
    let mut qmp = qmp_connect(&api_a2);
    qmp.execute("quit", Value::Null).unwrap();
    assert_eq!(back.wait_exit(Duration::from_secs(10)).0.code(), Some(0));
}

/// A copy of a recorded report with this machine's CPUID (the fixtures
/// were recorded on another CPU), optionally without one CPU feature.
fn with_live_cpuid(name: &str, live: &Value, drop_feature: bool, dir: &TempDir) -> String {
    let mut v: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(name)).unwrap()).unwrap();
    v["cpuid"] = live["cpuid"].clone();
    if drop_feature {
        // Leaf 1 ECX, the highest feature bit this CPU has (not bit 31,
        // the hypervisor bit every KVM guest sees, nor bit 27, OSXSAVE,
        // which follows the guest's CR4).
        let entries = v["cpuid"]["entries"].as_array_mut().unwrap();
        let slot = entries
            .iter_mut()
            .find(|e| e.as_str().unwrap().starts_with("00000001:"))
            .unwrap();
        let mut e = host_caps::parse_cpuid_entry(slot.as_str().unwrap()).unwrap();
        let ecx = e.ecx & !(1 << 31 | 1 << 27);
        let top = 31 - ecx.leading_zeros();
        e.ecx &= !(1 << top);
        *slot = json!(host_caps::cpuid_entry_text(&e));
    }
    let path = dir.join(&format!("{name}.json"));
    std::fs::write(&path, v.to_string()).unwrap();
    path.display().to_string()
}

/// `plan --vm` on a running VM (through its API) and on its snapshot: the
/// guest acked USO, a host without it cannot take the VM; the snapshot's
/// vCPUs are compared with each host's CPUID too. The API answers the same.
#[test]
fn plan_vm_judges_a_running_vm_and_its_snapshot() {
    let host = NetHost::new(true, 144);
    let dir = TempDir::new("plan-vm");
    let live = dir.join("live.json");
    live_report(&host.ns, "here", &format!("tap,ifname={}", host.tap), &live);
    let live_v: Value = serde_json::from_str(&std::fs::read_to_string(&live).unwrap()).unwrap();
    let nouso = with_live_cpuid("tap-no-uso", &live_v, false, &dir);
    let api = dir.join("vm.sock");
    let cmdline = format!(
        "console=ttyS0 reboot=k godwit.mode=serve godwit.heartbeat_ms=200 {}",
        host.guest_ip_param()
    );
    // godwit-1.1: the machine type the tap-no-uso report's godwit runs
    // (its USO lacks are what this test is about).
    let mut vm = RunningVm::spawn_in(
        &host.ns,
        &[
            "run",
            "--machine",
            "godwit-1.1",
            "--net",
            &format!("tap,ifname={}", host.tap),
            "--api-socket",
            api.to_str().unwrap(),
            "--cmdline",
            &cmdline,
        ],
    );
    vm.wait_line("serve: ready", BOOT);
    let live_s = live.display().to_string();
    let (code, v) = plan_json(&["--vm", api.to_str().unwrap(), &live_s, &nouso]);
    assert_eq!(code, Some(5), "{v:#}");
    assert_eq!(v["hosts"][0]["can_migrate"], true, "{v:#}");
    assert_eq!(v["hosts"][1]["can_migrate"], false);
    let reasons = v["hosts"][1]["reasons"].as_array().unwrap();
    // Acked first, then offered only; guest_uso4 is acked, host_uso not.
    assert_eq!(reasons[0]["feature"], "guest_uso4", "{v:#}");
    assert_eq!(reasons[0]["acked"], true);
    assert!(reasons[0]["problem"]
        .as_str()
        .unwrap()
        .contains("uses it now"));
    let host_uso = reasons.iter().find(|r| r["feature"] == "host_uso").unwrap();
    assert_eq!(host_uso["acked"], false);
    assert!(host_uso["would_change"].as_str().unwrap().contains("USO"));
    assert_eq!(v["vm"]["cpuid_checked"], false);
    let text = plan(&["--vm", api.to_str().unwrap(), &live_s, &nouso]).stdout;
    assert!(
        text.contains("here (") && text.contains(": can migrate"),
        "{text}"
    );
    assert!(
        text.contains("tap-no-uso (") && text.contains("cannot migrate"),
        "{text}"
    );

    // The same through the API, with the reports as objects.
    let mut qmp = qmp_connect(&api);
    let reports: Vec<Value> = [&live_s, &nouso]
        .iter()
        .map(|p| serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap())
        .collect();
    let api_v = qmp
        .execute("plan", json!({"hosts": reports, "vm": true}))
        .unwrap();
    assert_eq!(api_v["ok"], false);
    assert_eq!(api_v["hosts"][1]["reasons"][0]["feature"], "guest_uso4");
    assert_eq!(api_v["vm"]["cpuid_checked"], true);
    let fresh = qmp.execute("plan", json!({"hosts": reports})).unwrap();
    assert_eq!(
        fresh["devices"][0]["overrides"],
        json!(["guest_uso4", "guest_uso6", "host_uso"])
    );
    let err = qmp
        .execute("plan", json!({"hosts": [{"schema": "godwit-host-caps/9"}]}))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("hosts[0]: field `schema`") && err.contains("newer"),
        "{err}"
    );
    let caps = qmp
        .execute("query-host-caps", json!({"name": "api"}))
        .unwrap();
    let r = host_caps::report_from_value(&caps, "query-host-caps").unwrap();
    assert_eq!(r.host.name, "api");
    assert_eq!(r.peer(PeerKind::Tap, 0).unwrap().status, PeerStatus::Ok);
    let err = qmp
        .execute("query-host-caps", json!({"net": ["slirp"]}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("net[0]") && err.contains("slirp"), "{err}");

    // Its snapshot: the same verdicts, and CPUID compared per host.
    let snap = dir.join("snap");
    qmp.execute("snapshot-save", json!({"dir": snap})).unwrap();
    qmp.execute("quit", Value::Null).unwrap();
    assert_eq!(vm.wait_exit(Duration::from_secs(10)).0.code(), Some(0));
    let older_cpu = with_live_cpuid("full-tap", &live_v, true, &dir);
    let (code, v) = plan_json(&["--vm", snap.to_str().unwrap(), &live_s, &nouso, &older_cpu]);
    assert_eq!(code, Some(5), "{v:#}");
    assert_eq!(v["vm"]["cpuid_checked"], true);
    assert_eq!(v["vm"]["machine"], "godwit-1.1");
    assert_eq!(v["hosts"][0]["can_migrate"], true, "{v:#}");
    assert_eq!(v["hosts"][1]["reasons"][0]["feature"], "guest_uso4");
    let cpu = &v["hosts"][2];
    assert_eq!(cpu["can_migrate"], false);
    assert!(
        cpu["reasons"][0]["problem"]
            .as_str()
            .unwrap()
            .starts_with("CPUID: leaf 0x1"),
        "{cpu}"
    );
    // Bad VM sources are input errors.
    let out = plan(&["--vm", dir.join("nothing").to_str().unwrap(), &live_s]);
    assert_eq!(out.code(), Some(1));
    assert!(
        out.stderr.contains("cannot read the VM from API socket"),
        "{}",
        out.stderr
    );
}

/// `godwit plan` refuses to run without reports.
#[test]
fn plan_needs_reports() {
    let out = godwit_command(None, &["plan"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

fn kill(child: &mut std::process::Child, signal: libc::c_int) {
    // SAFETY: kill(2) on the pid of a child this test spawned and has not
    // reaped yet.
    unsafe {
        libc::kill(child.id() as libc::pid_t, signal);
    }
}

/// A backend process (`godwit net-backend` or DPDK testpmd), stopped on drop.
struct BackendProcess {
    child: std::process::Child,
    stop: libc::c_int,
}

impl BackendProcess {
    fn wait_socket(self, socket: &Path) -> Self {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "the backend made no socket {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self
    }

    /// `godwit net-backend` on `host`'s TAP.
    fn godwit(host: &NetHost, socket: &Path, extra: &[&str]) -> Self {
        let mut args = vec![
            "net-backend",
            "--socket",
            socket.to_str().unwrap(),
            "--tap",
            &host.tap,
        ];
        args.extend_from_slice(extra);
        let child = godwit_command(Some(&host.ns), &args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn godwit net-backend");
        BackendProcess {
            child,
            stop: libc::SIGKILL,
        }
        .wait_socket(socket)
    }

    /// DPDK testpmd with one vhost-user port looped back.
    fn testpmd(socket: &Path) -> Self {
        let child = std::process::Command::new("dpdk-testpmd")
            .args(["--no-pci", "--no-huge", "--no-shconf", "-m", "512"])
            .args([
                "--vdev",
                &format!("net_vhost0,iface={},queues=1", socket.display()),
            ])
            .args([
                "--",
                "--forward-mode=io",
                "--total-num-mbufs=2048",
                "--stats-period",
                "60",
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("dpdk-testpmd is not installed: apt-get install -y dpdk-dev (.ci/run does)");
        BackendProcess {
            child,
            stop: libc::SIGINT,
        }
        .wait_socket(socket)
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        kill(&mut self.child, self.stop);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reports probed live from real vhost-user backends (godwit's own, one
/// presenting v1 by default, and DPDK testpmd), their plans, and each
/// host's planned line started strictly on its backend.
#[test]
fn live_vhost_user_reports_plan_lines_that_start_on_each_backend() {
    let host_a = NetHost::new(true, 145);
    let host_b = NetHost::new(true, 146);
    let dir = TempDir::new("plan-vu");
    let (sock_a, sock_b, sock_d) = (dir.join("a.sock"), dir.join("b.sock"), dir.join("d.sock"));
    let _a = BackendProcess::godwit(&host_a, &sock_a, &[]);
    let _b = BackendProcess::godwit(&host_b, &sock_b, &["--interface", "org.godwit.net.v1"]);
    let _d = BackendProcess::testpmd(&sock_d);
    let (ra, rb, rd) = (dir.join("a.json"), dir.join("b.json"), dir.join("d.json"));
    let spec = |s: &Path| format!("vhost-user,socket={}", s.display());
    live_report(&host_a.ns, "a", &spec(&sock_a), &ra);
    live_report(&host_b.ns, "b", &spec(&sock_b), &rb);
    let out = run_godwit(
        &[
            "host-caps",
            "--name",
            "dpdk",
            "--net",
            &spec(&sock_d),
            "--output",
            rd.to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    assert_eq!(out.code(), Some(0), "{out:?}");

    let read = |p: &Path| parse_report(&std::fs::read_to_string(p).unwrap(), "r").unwrap();
    let (a, b, d) = (read(&ra), read(&rb), read(&rd));
    for (r, active) in [(&a, "org.godwit.net.v2"), (&b, "org.godwit.net.v1")] {
        let p = r.peer(PeerKind::VhostUser, 0).unwrap();
        assert_eq!(p.status, PeerStatus::Ok, "{p:?}");
        assert!(p.migration_blocker.is_none(), "{p:?}");
        let Probe::VhostUser(u) = &p.probe else {
            panic!()
        };
        let i = u
            .interface
            .as_ref()
            .expect("godwit's backend has the extension");
        assert_eq!(i.active, active);
        assert_eq!(i.supported, ["org.godwit.net.v1", "org.godwit.net.v2"]);
    }
    let p = d.peer(PeerKind::VhostUser, 0).unwrap();
    assert_eq!(p.status, PeerStatus::Ok, "{p:?}");
    let Probe::VhostUser(u) = &p.probe else {
        panic!()
    };
    assert_eq!(
        u.features.as_deref(),
        Some("0x0000000d7c66e7cb"),
        "DPDK 22.11's GET_FEATURES"
    );
    assert_eq!(u.queue_num, Some(128));
    assert!(u.interface.is_none());

    // godwit's backends: the newest version both list is pinned; of
    // godwit-1.2 the tunnel bits are left out (vhost-user carries no bit
    // above 63) and mq (these backends serve one queue pair), which leaves
    // godwit-1.1's ABI.
    let (code, v) = plan_json(&[
        "--device",
        "vhost-user",
        ra.to_str().unwrap(),
        rb.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{v:#}");
    assert_eq!(v["devices"][0]["interface"], "org.godwit.net.v2");
    assert_eq!(
        v["devices"][0]["overrides"],
        json!([
            "mq",
            "guest_tunnel",
            "guest_tunnel_csum",
            "host_tunnel",
            "host_tunnel_csum"
        ])
    );
    // With DPDK: no pin, host TSO and USO off (and mq: a's backend serves
    // one pair).
    let (code, vd) = plan_json(&[
        "--device",
        "vhost-user",
        ra.to_str().unwrap(),
        rd.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{vd:#}");
    assert!(vd["devices"][0]["interface"].is_null());
    assert_eq!(
        names(&vd["devices"][0]["overrides"]),
        [
            "host_tso4",
            "host_tso6",
            "host_ecn",
            "mq",
            "guest_uso4",
            "guest_uso6",
            "host_uso",
            "guest_tunnel",
            "guest_tunnel_csum",
            "host_tunnel",
            "host_tunnel_csum"
        ]
    );
    let start = |ns: Option<&str>, line: &str| {
        assert!(net_of(line).contains("strict=on"), "{line}");
        let mut args: Vec<&str> = vec!["run"];
        args.extend(line.split_whitespace());
        args.extend(["--cmdline", "console=ttyS0 reboot=k"]);
        let out = run_godwit_in(ns, &args, BOOT);
        assert_eq!(out.code(), Some(0), "{line}: {out:?}");
    };
    start(Some(&host_a.ns), &line_for(&v, "a"));
    // b's backend presents v1 by default: the pin gives the VM v2.
    start(Some(&host_b.ns), &line_for(&v, "b"));
    start(Some(&host_a.ns), &line_for(&vd, "a"));
    start(None, &line_for(&vd, "dpdk"));
}
