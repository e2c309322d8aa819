use serde_json::Value;

use godwit_devices::net::tap::TapOffloads;
use godwit_devices::virtio::net::features;
use godwit_migration::cpu_compat::CpuidEntry;

use super::probe::cpuid_info;
use super::*;
use crate::abi::machine_types::bits_of;

fn vhost_user_support(
    socket: &str,
    offered: u64,
    queue_num: Option<u64>,
) -> crate::abi::strict::PeerSupport {
    crate::devices::net::vhost_user_support(socket, &backend_offer(offered, 0, queue_num))
}

fn full_tap() -> TapOffloads {
    TapOffloads::all()
}

fn sample() -> HostReport {
    let support = crate::devices::net::tap_support("gwtap0", &full_tap());
    let tap = PeerEntry::from_support(
        PeerKind::Tap,
        Some("tap,ifname=gwtap0".into()),
        &support,
        None,
        Probe::Tap(TapProbe {
            temporary: false,
            ifname: Some("gwtap0".into()),
            tun_features: Some("0x7173".into()),
            offloads: Some(full_tap()),
        }),
    );
    let dpdk = vhost_user_entry(
        Some("vhost-user,socket=/run/dpdk.sock".into()),
        "/run/dpdk.sock",
        &VhostUserOffer {
            features: 0x0000_000d_7c66_e7cb,
            protocol_features: 0x10cbf,
            queue_num: Some(128),
            interface: None,
        },
    );
    HostReport {
        schema: schema_id(),
        host: HostInfo {
            name: "a".into(),
            kernel: Some("6.18.0".into()),
            taken_at: Some(1),
        },
        godwit: GodwitInfo {
            version: "0.1.0".into(),
            machine_types: vec!["godwit-1.0".into(), "godwit-1.1".into()],
            newest: "godwit-1.1".into(),
        },
        kvm: KvmInfo {
            available: true,
            error: None,
            api_version: Some(12),
            max_vcpus: Some(1024),
            recommended_vcpus: Some(2),
            capabilities: [("KVM_CAP_IRQCHIP".to_string(), true)]
                .into_iter()
                .collect(),
        },
        cpuid: cpuid_info(vec![CpuidEntry {
            function: 0,
            index: 0,
            flags: 0,
            eax: 0xd,
            ebx: u32::from_le_bytes(*b"Genu"),
            ecx: u32::from_le_bytes(*b"ntel"),
            edx: u32::from_le_bytes(*b"ineI"),
        }]),
        peers: vec![tap, dpdk],
    }
}

#[test]
fn reports_round_trip_through_the_reader() {
    let r = sample();
    assert_eq!(r.cpuid.vendor.as_deref(), Some("GenuineIntel"));
    let text = serde_json::to_string_pretty(&r).unwrap();
    assert_eq!(parse_report(&text, "x.json").unwrap(), r);
}

#[test]
fn dpdk_like_backend_lacks_host_tso_and_uso_but_keeps_frontend_features() {
    let s = vhost_user_support("b", 0x0000_000d_7c66_e7cb, Some(128));
    for n in ["host_tso4", "host_tso6", "guest_uso4", "host_uso"] {
        let f = features::by_name(n).unwrap();
        assert_eq!(s.supported & (1 << f.bit), 0, "{n}");
        assert!(s.why_not[&f.bit].contains("GET_FEATURES"), "{n}");
    }
    // Served by godwit's frontend, whatever the backend offers.
    for n in ["mac", "status", "ctrl_vq", "guest_announce", "mtu", "mq"] {
        assert_ne!(s.supported & bits_of(&[n]), 0, "{n}");
    }
    assert_ne!(
        s.supported & bits_of(&["csum", "guest_tso4", "host_ecn", "version_1"]),
        0
    );
    assert!(vhost_user_migration_blocker(0x0000_000d_7c66_e7cb, 0x10cbf).is_none());
    let b = vhost_user_migration_blocker(0x1, 0).unwrap();
    assert!(b.contains("LOG_ALL") && b.contains("LOG_SHMFD"), "{b}");
    // One queue: no queue pair.
    let one = vhost_user_support("b", u64::MAX, Some(1));
    assert_eq!(one.supported & bits_of(&["mq"]), 0);
}

#[test]
fn vhost_net_takes_ring_bits_from_the_kernel_and_packets_from_the_tap() {
    // Linux's VHOST_NET_FEATURES: NOTIFY_ON_EMPTY, LOG_ALL, ANY_LAYOUT
    // (= VHOST_NET_F_VIRTIO_NET_HDR), INDIRECT_DESC, EVENT_IDX,
    // MRG_RXBUF, VERSION_1, ACCESS_PLATFORM, RING_RESET.
    let kernel: godwit_devices::virtio::Features = [15u32, 24, 26, 27, 28, 29, 32, 33, 40]
        .iter()
        .fold(0, |a, b| a | (1 << b));
    let no_uso = TapOffloads {
        uso: false,
        ..full_tap()
    };
    let s = crate::devices::net::vhost_net_support("v", &no_uso, kernel, None);
    assert_ne!(
        s.supported & bits_of(&["mrg_rxbuf", "event_idx", "csum", "host_tso4"]),
        0
    );
    assert_eq!(s.supported & bits_of(&["host_uso"]), 0);
    assert!(s.why_not[&56].contains("USO"), "{}", s.why_not[&56]);
    let s = crate::devices::net::vhost_net_support("v", &full_tap(), 0, None);
    assert!(s.why_not[&32].contains("VHOST_GET_FEATURES"));
}

fn field_error(text: &str) -> (String, String) {
    let e = parse_report(text, "h.json").unwrap_err();
    (e.field().unwrap_or("").to_string(), e.to_string())
}

#[test]
fn malformed_reports_name_file_and_field() {
    let good = serde_json::to_value(sample()).unwrap();
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "schema",
            Box::new(|v| v["schema"] = Value::from("nonsense")),
            "not a host report schema",
        ),
        (
            "schema",
            Box::new(|v| {
                v.as_object_mut().unwrap().remove("schema");
            }),
            "missing",
        ),
        (
            "host.name",
            Box::new(|v| v["host"]["name"] = Value::from(7)),
            "invalid type: integer `7`, expected a string",
        ),
        (
            "godwit.machine_types",
            Box::new(|v| v["godwit"]["machine_types"] = Value::from(Vec::<String>::new())),
            "empty",
        ),
        (
            "peers[0].kind",
            Box::new(|v| v["peers"][0]["kind"] = Value::from("slirp")),
            "unknown peer kind 'slirp'",
        ),
        (
            "peers[1].supported.hex",
            Box::new(|v| v["peers"][1]["supported"]["hex"] = Value::from("12")),
            "not a hex number of up to 32 digits",
        ),
        (
            "peers[0].supported.names",
            Box::new(|v| {
                v["peers"][0]["supported"]["names"]
                    .as_array_mut()
                    .unwrap()
                    .remove(0);
            }),
            "do not list it",
        ),
        (
            "peers[0].probe.offloads.uso",
            Box::new(|v| v["peers"][0]["probe"]["offloads"]["uso"] = Value::from("yes")),
            "invalid type: string \"yes\", expected a boolean",
        ),
        (
            "peers[1].probe.queue_num",
            Box::new(|v| v["peers"][1]["probe"]["queue_num"] = Value::from(-1)),
            "invalid value: integer `-1`, expected u64",
        ),
        (
            "peers[0].lacks",
            Box::new(|v| v["peers"][0]["lacks"] = Value::from("none")),
            "invalid type: string \"none\", expected a sequence",
        ),
        (
            "peers[0].supported",
            Box::new(|v| v["peers"][0]["supported"] = Value::Null),
            "must say what it supports",
        ),
        (
            "peers[1].spec",
            Box::new(|v| v["peers"][1]["spec"] = Value::from("tap,ifname=x")),
            "a tap spec in a vhost-user peer",
        ),
        (
            "cpuid.entries[0]",
            Box::new(|v| v["cpuid"]["entries"][0] = Value::from("00000000:0:0:123456789:0:0:0")),
            "is not a CPUID entry function:index:flags",
        ),
        (
            "host.name",
            Box::new(|v| {
                v["host"].as_object_mut().unwrap().remove("name");
            }),
            "missing",
        ),
        (
            "peers[1].probe.socket",
            Box::new(|v| {
                v["peers"][1]["probe"]
                    .as_object_mut()
                    .unwrap()
                    .remove("socket");
            }),
            "missing",
        ),
        (
            "peers[0].lacks[0].bit",
            Box::new(|v| {
                v["peers"][0]["lacks"] = serde_json::json!([{"name": "x", "bit": 128, "why": "y"}])
            }),
            "bit 128 is not a feature bit",
        ),
        (
            "peers[0].error",
            Box::new(|v| v["peers"][0]["status"] = Value::from("absent")),
            "a peer with status \"absent\" must say why",
        ),
        (
            "peers",
            Box::new(|v| v["peers"] = Value::from(3)),
            "invalid type: integer `3`, expected a sequence",
        ),
    ];
    for (field, edit, needle) in cases {
        let mut v = good.clone();
        edit(&mut v);
        let (f, msg) = field_error(&v.to_string());
        assert_eq!(f, field, "{msg}");
        assert!(msg.starts_with("h.json: field `"), "{msg}");
        assert!(msg.contains(needle), "{field}: {msg}");
    }
    let e = parse_report("{\"schema\": ", "h.json")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("h.json: not valid JSON (line 1"), "{e}");
    // `null` reads like an absent member.
    let mut v = good.clone();
    v["peers"][0]["lacks"] = Value::Null;
    v["peers"][0]["probe"]["temporary"] = Value::Null;
    v["kvm"] = Value::Null;
    let r = report_from_value(&v, "h.json").unwrap();
    assert!(r.peers[0].lacks.is_empty());
    assert_eq!(r.kvm, KvmInfo::not_reported());
    let e = parse_report("[]", "h.json").unwrap_err().to_string();
    assert!(e.contains("expected an object, found an array"), "{e}");
}

#[test]
fn newer_schema_versions_are_refused_by_name() {
    let mut v = serde_json::to_value(sample()).unwrap();
    v["schema"] = Value::from("godwit-host-caps/2");
    // Even with fields this version would not understand.
    v["peers"] = Value::from("a format of the future");
    let e = report_from_value(&v, "future.json").unwrap_err();
    assert!(matches!(e, ReportError::Newer { .. }));
    let msg = e.to_string();
    assert!(
        msg.starts_with("future.json: field `schema`") && msg.contains("godwit-host-caps/2"),
        "{msg}"
    );
    v["schema"] = Value::from("godwit-host-caps/zero");
    assert_eq!(
        report_from_value(&v, "f").unwrap_err().field(),
        Some("schema")
    );
}
