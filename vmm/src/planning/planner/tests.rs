use serde_json::json;

use godwit_devices::net::tap::TapOffloads;
use godwit_devices::virtio::net::features::{self, Features};

use super::new_vm::minimal_overrides;
use super::*;
use crate::abi::machine_types::{bits_of, resolve};
use crate::planning::host_caps::{
    self, hex64, FeatureSet, InterfaceInfo, PeerEntry, PeerKind, TapProbe, VhostUserOffer,
};

fn tap_offloads(vnet_hdr: bool, uso: bool) -> TapOffloads {
    TapOffloads {
        vnet_hdr,
        csum: vnet_hdr,
        tso4: vnet_hdr,
        tso6: vnet_hdr,
        tso_ecn: vnet_hdr,
        ufo: vnet_hdr,
        uso: vnet_hdr && uso,
        // Kernels with USO in these tests are new enough for tunnel GSO
        // too; `older_kernel` below lacks it.
        udp_tunnel: vnet_hdr && uso,
        udp_tunnel_csum: vnet_hdr && uso,
    }
}

fn tap_peer(spec: &str, caps: TapOffloads) -> PeerEntry {
    let support = crate::devices::net::tap_support("gwtap0", &caps);
    let v = serde_json::json!({
        "kind": "tap", "spec": spec, "name": support.name, "status": "ok",
        "supported": FeatureSet::of(support.supported),
        "lacks": support.why_not.iter().map(|(b, w)| json!({"name": features::name_of(*b), "bit": b, "why": w})).collect::<Vec<_>>(),
        "probe": TapProbe { temporary: false, ifname: Some("gwtap0".into()), tun_features: None, offloads: Some(caps) },
    });
    let wrapped = json!({"schema": "godwit-host-caps/1", "host": {"name": "x"}, "godwit": {"version": "0", "machine_types": ["godwit-1.0"]}, "peers": [v]});
    host_caps::report_from_value(&wrapped, "t")
        .unwrap()
        .peers
        .remove(0)
}

fn host(name: &str, machine_types: &[&str], peers: Vec<PeerEntry>) -> HostInput {
    let mut r = host_caps::report_from_value(
        &json!({"schema": "godwit-host-caps/1", "host": {"name": name}, "godwit": {"version": "0.1.0", "machine_types": machine_types}, "peers": []}),
        "t",
    )
    .unwrap();
    r.peers = peers;
    HostInput {
        file: format!("{name}.json"),
        report: r,
    }
}

const ALL: &[&str] = &["godwit-1.0", "godwit-1.1"];

#[test]
fn full_and_no_uso_hosts_plan_the_newest_type_without_uso() {
    let hosts = [
        host(
            "a",
            ALL,
            vec![tap_peer("tap,ifname=gwtap0", tap_offloads(true, true))],
        ),
        host(
            "b",
            ALL,
            vec![tap_peer("tap,ifname=gwtap0", tap_offloads(true, false))],
        ),
    ];
    let p = plan(&hosts, &[]).unwrap();
    assert!(p.ok, "{p:?}");
    assert_eq!(p.machine.as_deref(), Some("godwit-1.1"));
    let d = &p.devices[0];
    assert_eq!(d.overrides, ["guest_uso4", "guest_uso6", "host_uso"]);
    assert_eq!(
        p.command_line.as_deref(),
        Some("--machine godwit-1.1 --net tap,ifname=gwtap0,strict=on,guest_uso4=off,guest_uso6=off,host_uso=off")
    );
    assert!(p.host_command_lines.is_empty());
    assert_eq!(d.no_override_machine.as_deref(), Some("godwit-1.0"));
    for l in &d.left_out {
        assert_eq!(l.lacking_on.len(), 1, "{l:?}");
        assert_eq!(l.lacking_on[0].host, "b (b.json)");
        assert!(
            l.lacking_on[0].would_change.contains("Linux >= 6.2"),
            "{l:?}"
        );
    }
    assert_eq!(
        d.offered.as_ref().unwrap().bits(),
        resolve("godwit-1.0").unwrap().net_features()
    );
}

/// A host whose kernel predates UDP tunnel GSO (Linux < 6.17: its TAP
/// refuses TUN_F_UDP_TUNNEL_GSO, USO works) beside a current one: godwit-1.2
/// is planned with the four tunnel features left out, each naming the old
/// host and what would give it them.
#[test]
fn an_older_kernel_without_tunnel_gso_leaves_the_tunnel_features_out() {
    let older_kernel = TapOffloads {
        udp_tunnel: false,
        udp_tunnel_csum: false,
        ..tap_offloads(true, true)
    };
    let all = &["godwit-1.0", "godwit-1.1", "godwit-1.2"];
    // Multi-queue TAPs on both: only the tunnel features differ.
    let multi_queue = |caps| PeerEntry {
        max_queue_pairs: 2,
        ..tap_peer("tap,ifname=gwtap0", caps)
    };
    let hosts = [
        host("new", all, vec![multi_queue(tap_offloads(true, true))]),
        host("old", all, vec![multi_queue(older_kernel)]),
    ];
    let p = plan(&hosts, &[]).unwrap();
    assert!(p.ok, "{p:?}");
    assert_eq!(p.machine.as_deref(), Some("godwit-1.2"));
    let d = &p.devices[0];
    assert_eq!(
        d.overrides,
        [
            "guest_tunnel",
            "guest_tunnel_csum",
            "host_tunnel",
            "host_tunnel_csum"
        ]
    );
    assert_eq!(
        p.command_line.as_deref(),
        Some("--machine godwit-1.2 --net tap,ifname=gwtap0,strict=on,guest_tunnel=off,guest_tunnel_csum=off,host_tunnel=off,host_tunnel_csum=off")
    );
    assert_eq!(d.no_override_machine.as_deref(), Some("godwit-1.1"));
    assert_eq!(d.left_out.len(), 4, "{:?}", d.left_out);
    for l in &d.left_out {
        assert_eq!(l.lacking_on.len(), 1, "{l:?}");
        assert_eq!(l.lacking_on[0].host, "old (old.json)");
        assert!(
            l.lacking_on[0].would_change.contains("Linux >= 6.17"),
            "{l:?}"
        );
    }
    assert_eq!(
        d.offered.as_ref().unwrap().bits(),
        resolve("godwit-1.2").unwrap().net_features()
            & !crate::abi::machine_types::bits_of(features::groups::UDP_TUNNEL)
    );
    // Both hosts current: godwit-1.2 as it is.
    let hosts = [
        host(
            "new",
            all,
            vec![tap_peer("tap,ifname=gwtap0", tap_offloads(true, true))],
        ),
        host(
            "new2",
            all,
            vec![tap_peer("tap,ifname=gwtap0", tap_offloads(true, true))],
        ),
    ];
    let p = plan(&hosts, &[]).unwrap();
    assert!(p.ok && p.devices[0].overrides.is_empty(), "{p:?}");
    assert_eq!(
        p.devices[0].offered.as_ref().unwrap().bits(),
        resolve("godwit-1.2").unwrap().net_features()
    );
}

#[test]
fn plain_tap_host_gives_an_offload_free_plan_with_its_own_line() {
    let hosts = [
        host(
            "a",
            ALL,
            vec![tap_peer("tap,ifname=gwtap0", tap_offloads(true, true))],
        ),
        host(
            "b",
            ALL,
            vec![tap_peer(
                "tap,ifname=gwtap0,vnet_hdr=off",
                tap_offloads(false, false),
            )],
        ),
    ];
    let p = plan(&hosts, &[PeerKind::Tap]).unwrap();
    assert!(p.ok);
    let d = &p.devices[0];
    for n in [
        "csum",
        "guest_csum",
        "guest_tso4",
        "guest_ecn",
        "host_uso",
        "host_ecn",
    ] {
        assert!(d.overrides.iter().any(|o| o == n), "{n}: {:?}", d.overrides);
    }
    let offered = d.offered.as_ref().unwrap().bits();
    assert_eq!(offered & bits_of(&["csum", "guest_csum"]), 0);
    // guest_ecn is lacking on b and depends on the TSO bits.
    let ecn = d.left_out.iter().find(|l| l.name == "guest_ecn").unwrap();
    assert_eq!(ecn.depends_on, ["guest_tso4", "guest_tso6"]);
    assert!(ecn.lacking_on[0].would_change.contains("vnet_hdr=on"));
    assert_eq!(d.no_override_machine, None);
    let line = p.command_line.clone().unwrap();
    assert!(
        line.starts_with("--machine godwit-1.1 --net tap,ifname=gwtap0,strict=on,csum=off,"),
        "{line}"
    );
    assert_eq!(p.host_command_lines.len(), 1);
    assert!(p.host_command_lines[0]
        .command_line
        .contains("tap,ifname=gwtap0,vnet_hdr=off,strict=on,csum=off"));
    let text = render_plan(&p);
    assert!(text.starts_with(&format!("{line}\n")), "{text}");
    assert!(text.contains("# on b (b.json): --machine"), "{text}");
}

#[test]
fn missing_peers_and_old_godwits_block_with_remedies() {
    let hosts = [
        host(
            "a",
            ALL,
            vec![tap_peer("tap,ifname=gwtap0", tap_offloads(true, true))],
        ),
        host("old", &["godwit-1.0"], vec![]),
    ];
    let p = plan(&hosts, &[PeerKind::Tap]).unwrap();
    assert!(!p.ok);
    assert_eq!(p.exit_code(), EXIT_NO_COMMON_ABI);
    assert_eq!(p.machine.as_deref(), Some("godwit-1.0"));
    assert!(
        p.machine_notes
            .iter()
            .any(|n| n.contains("godwit-1.1 is not used: unknown to the godwit of old (old.json)")),
        "{:?}",
        p.machine_notes
    );
    let b = &p.devices[0].blockers[0];
    assert_eq!(b.host.as_deref(), Some("old (old.json)"));
    assert!(
        b.problem.contains("no tap peer") && b.would_change.contains("host-caps"),
        "{b:?}"
    );
    assert!(p.command_line.is_none());
    // Nothing common at all by default.
    let p = plan(&hosts, &[]).unwrap();
    assert!(!p.ok && !p.blockers.is_empty());
    assert!(render_plan(&p).starts_with("no common ABI over 2 host(s)"));
}

fn dpdk() -> PeerEntry {
    host_caps::vhost_user_entry(
        Some("vhost-user,socket=/run/vu.sock".into()),
        "/run/vu.sock",
        &VhostUserOffer {
            features: 0x0000_000d_7c66_e7cb,
            protocol_features: 0x10cbf,
            queue_num: Some(128),
            interface: None,
        },
    )
}

fn godwit_backend(active: &str, feats: Features, supported: &[&str]) -> PeerEntry {
    let feats = godwit_devices::virtio::low64(feats);
    host_caps::vhost_user_entry(
        Some("vhost-user,socket=/run/vu.sock".into()),
        "/run/vu.sock",
        &VhostUserOffer {
            features: feats | (1 << 26) | (1 << 30),
            protocol_features: 0x3 | (1 << 9) | (1 << 3),
            // Queue pairs (godwit's backend on one TAP queue).
            queue_num: Some(1),
            interface: Some(InterfaceInfo {
                active: active.into(),
                features: Some(hex64(feats)),
                pinned: false,
                latest: active.into(),
                supported: supported.iter().map(|s| s.to_string()).collect(),
                truncated: false,
            }),
        },
    )
}

#[test]
fn vhost_user_plans_pin_the_newest_common_interface_version() {
    let v1 = resolve("godwit-1.0").unwrap().net_features();
    let v2 = resolve("godwit-1.1").unwrap().net_features();
    let hosts = [
        host(
            "new",
            ALL,
            vec![godwit_backend(
                "org.godwit.net.v3",
                v2 | bits_of(&["ctrl_mac_addr"]),
                &[
                    "org.godwit.net.v1",
                    "org.godwit.net.v2",
                    "org.godwit.net.v3",
                ],
            )],
        ),
        host(
            "mid",
            ALL,
            vec![godwit_backend(
                "org.godwit.net.v2",
                v2,
                &["org.godwit.net.v1", "org.godwit.net.v2"],
            )],
        ),
    ];
    let p = plan(&hosts, &[PeerKind::VhostUser]).unwrap();
    assert!(p.ok, "{p:?}");
    let d = &p.devices[0];
    assert_eq!(d.interface.as_deref(), Some("org.godwit.net.v2"));
    assert!(d.overrides.is_empty(), "{:?}", d.overrides);
    assert!(p
        .command_line
        .as_deref()
        .unwrap()
        .ends_with("--net vhost-user,socket=/run/vu.sock,strict=on,interface=org.godwit.net.v2"));
    // A backend presenting v1 by default but listing v2: pinned to v2,
    // it presents v2, so nothing is left out.
    let hosts2 = [
        hosts[0].clone(),
        host(
            "v1default",
            ALL,
            vec![godwit_backend(
                "org.godwit.net.v1",
                v1,
                &["org.godwit.net.v1", "org.godwit.net.v2"],
            )],
        ),
    ];
    let p = plan(&hosts2, &[PeerKind::VhostUser]).unwrap();
    assert_eq!(p.devices[0].interface.as_deref(), Some("org.godwit.net.v2"));
    assert!(p.devices[0].overrides.is_empty(), "{:?}", p.devices[0]);
    // An old backend: v1 is pinned, USO left out, and the hint names v2.
    let hosts = [
        hosts[0].clone(),
        host(
            "old",
            ALL,
            vec![godwit_backend(
                "org.godwit.net.v1",
                v1,
                &["org.godwit.net.v1"],
            )],
        ),
    ];
    let p = plan(&hosts, &[PeerKind::VhostUser]).unwrap();
    let d = &p.devices[0];
    assert_eq!(d.interface.as_deref(), Some("org.godwit.net.v1"));
    assert_eq!(d.overrides, ["guest_uso4", "guest_uso6", "host_uso"]);
    // DPDK: no pin, host TSO and USO left out (and host_ecn with them).
    let hosts = [hosts[0].clone(), host("dpdk", ALL, vec![dpdk()])];
    let p = plan(&hosts, &[PeerKind::VhostUser]).unwrap();
    let d = &p.devices[0];
    assert!(p.ok && d.interface.is_none());
    assert!(
        d.notes[0].contains("lacks godwit's interface-version extension"),
        "{:?}",
        d.notes
    );
    assert_eq!(
        d.overrides,
        [
            "host_tso4",
            "host_tso6",
            "host_ecn",
            "guest_uso4",
            "guest_uso6",
            "host_uso"
        ]
    );
    let ecn = d.left_out.iter().find(|l| l.name == "host_ecn").unwrap();
    assert!(ecn.lacking_on.is_empty() && ecn.depends_on == ["host_tso4", "host_tso6"]);
    let tso = d.left_out.iter().find(|l| l.name == "host_tso4").unwrap();
    assert!(
        tso.lacking_on[0]
            .would_change
            .contains("one presenting interface version org.godwit.net.v1 (another backend interface version)"),
        "{tso:?}"
    );
}

#[test]
fn unlogged_backends_and_missing_version_1_block() {
    let mut e = dpdk();
    e.migration_blocker = host_caps::vhost_user_migration_blocker(0, 0);
    let hosts = [host("a", ALL, vec![e])];
    let p = plan(&hosts, &[PeerKind::VhostUser]).unwrap();
    assert!(!p.ok);
    assert!(p.devices[0].blockers[0].would_change.contains("LOG_SHMFD"));
    let no_v1 = host_caps::vhost_user_entry(
        None,
        "/s",
        &VhostUserOffer {
            features: 0x1 | (1 << 26),
            protocol_features: 2,
            queue_num: None,
            interface: None,
        },
    );
    let p = plan(&[host("a", ALL, vec![no_v1])], &[PeerKind::VhostUser]).unwrap();
    assert!(!p.ok);
    let b = &p.devices[0].blockers[0];
    assert!(
        b.problem.contains("version_1") && b.would_change.contains("offers version_1"),
        "{b:?}"
    );
}

/// Every set `o` of features to turn off such that the rest fits
/// `common` and keeps the spec's dependencies contains the planner's
/// set, so the planner's set is the unique smallest one.
#[test]
fn override_set_is_minimal_by_brute_force() {
    let universe = bits_of(&[
        "csum",
        "guest_csum",
        "guest_tso4",
        "guest_tso6",
        "guest_ecn",
        "host_tso4",
        "host_ecn",
        "ctrl_vq",
        "ctrl_rx",
        "guest_announce",
    ]);
    let ubits: Vec<u32> = bits(universe).collect();
    let subset = |mask: u32| {
        ubits
            .iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .fold(0, |a: Features, (_, b)| a | bit(*b))
    };
    let n = ubits.len() as u32;
    let requireds: Vec<Features> = (0..1u32 << n)
        .map(subset)
        .filter(|r| features::check_dependencies(*r).is_empty())
        .step_by(7)
        .collect();
    assert!(requireds.len() > 20);
    let mut checked = 0u64;
    for &required in &requireds {
        for c in (0..1u32 << n).step_by(3) {
            let common = subset(c);
            let planned = minimal_overrides(required, common);
            let rest = required & !planned;
            assert_eq!(rest & !common, 0);
            assert!(features::check_dependencies(rest).is_empty());
            let mut best = u32::MAX;
            for o in 0..1u32 << n {
                let o = subset(o) & required;
                let rest = required & !o;
                if rest & !common == 0 && features::check_dependencies(rest).is_empty() {
                    assert_eq!(
                        o & planned,
                        planned,
                        "a valid set without all of the planner's"
                    );
                    best = best.min(o.count_ones());
                }
                checked += 1;
            }
            assert_eq!(best, planned.count_ones());
        }
    }
    assert!(checked > 100_000);
}

#[test]
fn existing_vms_are_judged_by_offered_and_acked_features() {
    let m11 = resolve("godwit-1.1").unwrap().net_features();
    let vm = VmView {
        source: "test".into(),
        machine: "godwit-1.1".into(),
        devices: vec![VmDevice {
            id: "net0".into(),
            kind: PeerKind::Tap,
            offered: m11,
            acked: m11 & !bits_of(&["host_uso"]),
            interface: None,
        }],
        blockers: vec![],
        cpuid: None,
    };
    let hosts = [
        host(
            "full",
            ALL,
            vec![tap_peer("tap,ifname=gwtap0", tap_offloads(true, true))],
        ),
        host(
            "nouso",
            ALL,
            vec![tap_peer("tap,ifname=gwtap0", tap_offloads(true, false))],
        ),
        host(
            "old",
            &["godwit-1.0"],
            vec![tap_peer("tap,ifname=gwtap0", tap_offloads(true, true))],
        ),
    ];
    let p = plan_vm(&hosts, &vm).unwrap();
    assert!(!p.ok);
    assert!(p.hosts[0].can_migrate, "{:?}", p.hosts[0]);
    let r = &p.hosts[1].reasons;
    assert_eq!(r.len(), 3);
    // Acked ones first.
    assert_eq!(r[0].feature.as_deref(), Some("guest_uso4"));
    assert_eq!(r[0].acked, Some(true));
    assert!(r[0]
        .problem
        .contains("acked by the guest, which uses it now"));
    assert_eq!(r[2].feature.as_deref(), Some("host_uso"));
    assert_eq!(r[2].acked, Some(false));
    assert!(r[2].would_change.as_deref().unwrap().contains("USO"));
    assert!(p.hosts[2].reasons[0]
        .problem
        .contains("does not run machine type godwit-1.1"));
    let text = render_vm_plan(&p);
    assert!(text.contains("full (full.json): can migrate"), "{text}");
    assert!(
        text.contains("nouso (nouso.json): cannot migrate:"),
        "{text}"
    );
    // A pinned interface a backend does not list.
    let vm = VmView {
        devices: vec![VmDevice {
            id: "net0".into(),
            kind: PeerKind::VhostUser,
            offered: resolve("godwit-1.0").unwrap().net_features(),
            acked: 0,
            interface: Some("org.godwit.net.v2".into()),
        }],
        machine: "godwit-1.0".into(),
        ..vm
    };
    let v1 = resolve("godwit-1.0").unwrap().net_features();
    let hosts = [host(
        "old",
        ALL,
        vec![godwit_backend(
            "org.godwit.net.v1",
            v1,
            &["org.godwit.net.v1"],
        )],
    )];
    let p = plan_vm(&hosts, &vm).unwrap();
    let r = &p.hosts[0].reasons[0];
    assert!(
        r.problem.contains("interface version org.godwit.net.v2"),
        "{r:?}"
    );
    assert!(r
        .would_change
        .as_deref()
        .unwrap()
        .contains("another backend interface version"));
}

#[test]
fn query_net_answers_become_a_vm_view() {
    let nets = json!([{"id": "net0", "machine": "godwit-1.1", "peer": {"kind": "vhost-user"}, "interface": {"name": "org.godwit.net.v1"}, "blockers": ["x", "net0: y"], "offered": {"hex": "0x0000000000000001"}, "acked": {"hex": "0x0000000000000000"}}]);
    let v = vm_from_query("s", &nets, &json!({"blocked-reasons": ["x"]})).unwrap();
    assert_eq!(v.machine, "godwit-1.1");
    assert_eq!(v.devices[0].offered, 1);
    assert_eq!(v.blockers, ["x", "net0: y"]);
    assert_eq!(v.devices[0].interface.as_deref(), Some("org.godwit.net.v1"));
    let e = vm_from_query("s", &json!([{"id": "n"}]), &json!({})).unwrap_err();
    assert!(
        e.to_string()
            .contains("s: field `query-net[0].peer`: missing"),
        "{e}"
    );
    let mut bad = nets.clone();
    bad[0]["peer"]["kind"] = json!("slirp");
    let e = vm_from_query("s", &bad, &json!({}))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("field `query-net[0].peer.kind`: unknown peer kind 'slirp'"),
        "{e}"
    );
    let mut bad = nets.clone();
    bad[0]["offered"]["hex"] = json!("lots");
    let e = vm_from_query("s", &bad, &json!({}))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(
            "field `query-net[0].offered.hex`: 'lots' is not a hex number of up to 32 digits"
        ),
        "{e}"
    );
}
