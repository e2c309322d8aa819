//! Seed inputs for every target, made with godwit's own encoders (the
//! migration framing and page runs, the container writer, the interface
//! record, the mmio register layout). `fuzz/make-seeds.sh` writes them to
//! `fuzz/corpus/`, next to the seeds it takes from a running godwit (a
//! snapshot, a host-caps report).

use godwit_devices::vhost_user::conn::F_PROTOCOL_FEATURES;
use godwit_devices::vhost_user::interface::{self, InterfaceRecord, WINDOW_OFFSET, WINDOW_SIZE};
use godwit_devices::vhost_user::session::WANTED_PROTOCOL;
use godwit_devices::virtio::mmio::reg;
use godwit_devices::virtio::{
    feature, feature_word, status, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use godwit_migration::cpu_compat::CpuidEntry;
use godwit_migration::format::Container;
use godwit_migration::protocol::{
    encode_runs, write_json, write_message, DeviceOffer, DevicePeer, Hello, HelloReply, Kind,
    PageRun, Resumed, RoundEnd, PAGE_SIZE,
};
use godwit_vmm::persist::snapshot::KNOWN_SECTIONS;
use vhost::vhost_user::message::FrontendReq;

/// One seed: the target it is for, a file name, its bytes.
pub struct Seed {
    pub target: &'static str,
    pub name: String,
    pub bytes: Vec<u8>,
}

fn seed(target: &'static str, name: &str, bytes: Vec<u8>) -> Seed {
    Seed {
        target,
        name: name.to_string(),
        bytes,
    }
}

/// Every seed made here. `state` is a real `state.gws`, when there is one,
/// from which the snapshot target's structured seed is derived.
pub fn encoded(state: Option<&[u8]>) -> Vec<Seed> {
    let mut out = Vec::new();
    api(&mut out);
    net_specs(&mut out);
    migration(&mut out);
    if let Some(state) = state {
        if let Some(bytes) = structured_state(state) {
            out.push(seed("snapshot_state", "structured-real", bytes));
        }
    }
    record(&mut out);
    mmio(&mut out);
    virtio_net(&mut out);
    backend(&mut out);
    out
}

fn api(out: &mut Vec<Seed>) {
    let lines: &[(&str, &str)] = &[
        ("negotiate", r#"{"execute": "qmp_capabilities"}"#),
        (
            "every-command",
            concat!(
                r#"{"execute":"qmp_capabilities","arguments":{"enable":[]}}"#,
                "\n",
                r#"{"execute":"query-commands","id":1}"#,
                r#"{"execute":"query-status"} {"execute":"stop"}{"execute":"cont"}"#,
                "\n",
                r#"{"execute":"snapshot-save","arguments":{"dir":"/tmp/s"},"id":{"a":[1,2]}}"#,
                "\n",
                r#"{"execute":"migrate","arguments":{"uri":"unix:/run/m.sock"}}"#,
                "\n",
                r#"{"execute":"migrate-set-parameters","arguments":{"downtime-limit":300,"max-bandwidth":0,"max-rounds":5}}"#,
                "\n",
                r#"{"execute":"query-host-caps","arguments":{"net":["tap,ifname=tap0","tap,fd=net0","vhost-user,socket=/run/v.sock"],"name":"a"}}"#,
                "\n",
                r#"{"execute":"plan","arguments":{"hosts":[{"schema":"godwit-host-caps/1"}],"vm":true,"devices":["tap"]}}"#,
                "\n",
                r#"{"execute":"getfd","arguments":{"fdname":"net0"}}{"execute":"closefd","arguments":{"fdname":"net0"}}"#,
                "\n",
                r#"{"execute":"query-net"}{"execute":"query-machines"}{"execute":"query-migrate"}{"execute":"migrate_cancel"}{"execute":"query-migrate-parameters"}{"execute":"query-version"}{"execute":"quit"}"#,
                "\n"
            ),
        ),
        (
            "errors",
            "{\"execute\": 1}\n{\"a\" 1}\n[1,2]\n{\"execute\":\"stop\",\"arguments\":[]}\n\"x\" 12 true\n{\"execute\":\"snapshot-save\",\"arguments\":{\"dir\":1,\"x\":2}}\n",
        ),
    ];
    for (name, text) in lines {
        // Whole reads, already negotiated; and byte by byte from the start.
        for control in [0xff_u8, 0x00] {
            let mut bytes = vec![control];
            bytes.extend_from_slice(text.as_bytes());
            out.push(seed("api_line", &format!("{name}-{control:02x}"), bytes));
        }
    }
}

fn net_specs(out: &mut Vec<Seed>) {
    let specs = [
        "tap,ifname=tap0",
        "tap,fd=3,vnet_hdr=on",
        "tap,ifname=gw0,id=net0,mac=52:54:00:12:34:56,mtu=1500,strict=on,host_uso=off,csum=on",
        "vhost-user,socket=/run/dpdk.sock,server=off,interface=godwit-net-1",
        "vhost-net,ifname=tap1",
    ];
    for (i, spec) in specs.iter().enumerate() {
        out.push(seed(
            "net_spec",
            &format!("spec-{i}"),
            spec.as_bytes().to_vec(),
        ));
    }
}

fn cpuid() -> Vec<CpuidEntry> {
    vec![CpuidEntry {
        function: 1,
        index: 0,
        flags: 0,
        eax: 0x806f8,
        ebx: 0x800,
        ecx: 0xf6fa3203,
        edx: 0x178bfbff,
    }]
}

fn migration(out: &mut Vec<Seed>) {
    let hello = Hello {
        godwit_version: "0.1.0".into(),
        format_version: 1,
        machine_type: "godwit-1.1".into(),
        memory_size: 16 << 20,
        vcpus: 1,
        memory_layout: vec![(0, 16 << 20)],
        devices: vec![DeviceOffer {
            id: "net0".into(),
            kind: "virtio-net".into(),
            peer_kind: "tap".into(),
            offered: 0x1_0000_0020,
            acked: 0x1_0000_0020,
            queue_sizes: vec![256, 256],
            queue_pairs: 1,
            interface: None,
        }],
        cpuid: cpuid(),
        kvm_caps: vec!["KVM_CAP_ADJUST_CLOCK".into()],
        multifd: None,
    };
    let reply = HelloReply {
        accept: true,
        reasons: vec![],
        godwit_version: "0.1.0".into(),
        machine_types: vec!["godwit-1.0".into(), "godwit-1.1".into()],
        devices: vec![DevicePeer {
            id: "net0".into(),
            peer_kind: "tap".into(),
            peer: "tap0".into(),
            supported: 0x1_0000_0020,
            max_queue_pairs: 1,
        }],
        host_cpuid: cpuid(),
    };
    let page = vec![0xa5u8; PAGE_SIZE as usize];
    let mut stream = vec![0u8];
    let _ = write_json(&mut stream, Kind::Hello, &hello);
    let _ = write_json(&mut stream, Kind::HelloReply, &reply);
    let runs = [
        PageRun { gpa: 0, pages: 1 },
        PageRun {
            gpa: 0x10000,
            pages: 1,
        },
    ];
    let _ = write_message(
        &mut stream,
        Kind::Pages,
        &encode_runs(&runs, &[&page[..], &page[..]].concat()),
    );
    let zero = [PageRun {
        gpa: 0x2000,
        pages: 16,
    }];
    let _ = write_message(&mut stream, Kind::ZeroPages, &encode_runs(&zero, &[]));
    let _ = write_json(
        &mut stream,
        Kind::RoundEnd,
        &RoundEnd {
            round: 1,
            pages: 18,
        },
    );
    let _ = write_message(&mut stream, Kind::Complete, &[]);
    let _ = write_json(&mut stream, Kind::Resumed, &Resumed { restore_ms: 1.5 });
    let _ = write_message(&mut stream, Kind::Abort, b"stopped by the user");
    out.push(seed("migration_stream", "session", stream));

    // The structured form: kind index, length, payload.
    let mut structured = vec![1u8];
    let mut push = |index: u8, payload: &[u8]| {
        structured.push(index);
        structured.extend_from_slice(&(payload.len() as u16).to_le_bytes());
        structured.extend_from_slice(payload);
    };
    push(0, &serde_json::to_vec(&hello).unwrap_or_default());
    push(
        2,
        &encode_runs(
            &[PageRun {
                gpa: 0x3000,
                pages: 1,
            }],
            &page,
        ),
    );
    push(3, &encode_runs(&zero, &[]));
    push(4, br#"{"round":2,"pages":7}"#);
    push(9, b"unknown kind");
    out.push(seed("migration_stream", "structured", structured));
}

/// The structured snapshot seed: the sections of a real state file, each
/// as `kind index, instance, encoding, len u16, payload`.
fn structured_state(state: &[u8]) -> Option<Vec<u8>> {
    let container = Container::from_bytes(state.to_vec(), KNOWN_SECTIONS).ok()?;
    let machine = container.header().machine_type.clone();
    let mut out = vec![1u8, machine.len() as u8];
    out.extend_from_slice(machine.as_bytes());
    for (index, kind) in KNOWN_SECTIONS.iter().enumerate() {
        for instance in container.instances(kind) {
            let payload = container.raw_section(kind, instance).ok()?;
            let json = container
                .entry(kind, instance)
                .map(|e| e.encoding == 1)
                .unwrap_or(true);
            out.push(index as u8);
            out.push(instance as u8);
            out.push(u8::from(!json));
            out.extend_from_slice(&(payload.len() as u16).to_le_bytes());
            out.extend_from_slice(payload);
        }
    }
    Some(out)
}

fn latest_record(pinned: bool) -> InterfaceRecord {
    let latest = interface::latest();
    InterfaceRecord {
        active: latest.name.to_string(),
        pinned,
        latest: latest.name.to_string(),
        supported: interface::names().iter().map(|n| n.to_string()).collect(),
        truncated: false,
        values: latest.values(),
    }
}

fn record(out: &mut Vec<Seed>) {
    out.push(seed(
        "vhost_user_record",
        "latest",
        latest_record(true).encode(256),
    ));
    // A backend with godwit's extension, as the handshake reads it: without
    // a pin, and pinning the latest interface.
    for (control, pinned) in [(0u8, false), (1, true)] {
        let mut b = vec![control];
        let reply = |b: &mut Vec<u8>, request: FrontendReq, payload: &[u8]| {
            b.extend_from_slice(&u32::from(request).to_le_bytes());
            b.extend_from_slice(&0x5u32.to_le_bytes());
            b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            b.extend_from_slice(payload);
        };
        let window = |record: &InterfaceRecord| {
            let mut p = WINDOW_OFFSET.to_le_bytes().to_vec();
            p.extend_from_slice(&WINDOW_SIZE.to_le_bytes());
            p.extend_from_slice(&0u32.to_le_bytes());
            p.extend_from_slice(&record.encode(WINDOW_SIZE as usize));
            p
        };
        let values = interface::latest().values();
        let features = values.features | F_PROTOCOL_FEATURES;
        let protocol = WANTED_PROTOCOL;
        let ack = 0u64.to_le_bytes();
        reply(&mut b, FrontendReq::GET_FEATURES, &features.to_le_bytes());
        reply(
            &mut b,
            FrontendReq::GET_PROTOCOL_FEATURES,
            &protocol.to_le_bytes(),
        );
        // SET_PROTOCOL_FEATURES goes unacknowledged: REPLY_ACK starts after it.
        reply(&mut b, FrontendReq::GET_QUEUE_NUM, &2u64.to_le_bytes());
        reply(
            &mut b,
            FrontendReq::GET_CONFIG,
            &window(&latest_record(false)),
        );
        if pinned {
            reply(&mut b, FrontendReq::SET_CONFIG, &ack);
            reply(
                &mut b,
                FrontendReq::GET_CONFIG,
                &window(&latest_record(true)),
            );
        }
        reply(&mut b, FrontendReq::SET_OWNER, &ack);
        reply(&mut b, FrontendReq::GET_FEATURES, &features.to_le_bytes());
        let name = if pinned {
            "handshake-pinned"
        } else {
            "handshake"
        };
        out.push(seed("vhost_user_replies", name, b));
    }
}

/// A driver's initialisation of a device through the registers, queue 0
/// and 1 set up inside the fuzz target's memory, then a notify, an
/// interrupt acknowledgement, config reads and a reset.
fn mmio(out: &mut Vec<Seed>) {
    let mut ops = Vec::new();
    let write = |ops: &mut Vec<u8>, reg: u64, value: u64| {
        ops.push(0x10 | 1);
        ops.push((reg / 4) as u8);
        ops.extend_from_slice(&value.to_le_bytes());
    };
    let features = feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_RING_F_EVENT_IDX);
    write(&mut ops, reg::STATUS, u64::from(status::ACKNOWLEDGE));
    write(
        &mut ops,
        reg::STATUS,
        u64::from(status::ACKNOWLEDGE | status::DRIVER),
    );
    write(&mut ops, reg::DRIVER_FEATURES_SEL, 0);
    write(
        &mut ops,
        reg::DRIVER_FEATURES,
        u64::from(feature_word(features, 0)),
    );
    write(&mut ops, reg::DRIVER_FEATURES_SEL, 1);
    write(
        &mut ops,
        reg::DRIVER_FEATURES,
        u64::from(feature_word(features, 1)),
    );
    let ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    write(&mut ops, reg::STATUS, u64::from(ok));
    for q in 0..2u64 {
        let base = 0x1000 * (q + 1) * 4;
        write(&mut ops, reg::QUEUE_SEL, q);
        write(&mut ops, reg::QUEUE_NUM, 64);
        write(&mut ops, reg::QUEUE_DESC_LOW, base);
        write(&mut ops, reg::QUEUE_DESC_HIGH, 0);
        write(&mut ops, reg::QUEUE_DRIVER_LOW, base + 0x1000);
        write(&mut ops, reg::QUEUE_DRIVER_HIGH, 0);
        write(&mut ops, reg::QUEUE_DEVICE_LOW, base + 0x2000);
        write(&mut ops, reg::QUEUE_DEVICE_HIGH, 0);
        write(&mut ops, reg::QUEUE_READY, 1);
    }
    write(&mut ops, reg::STATUS, u64::from(ok | status::DRIVER_OK));
    write(&mut ops, reg::QUEUE_NOTIFY, 1);
    write(&mut ops, reg::INTERRUPT_ACK, 1);
    let read = |ops: &mut Vec<u8>, offset: u64, size_bits: u8| {
        ops.push(size_bits << 1);
        ops.extend_from_slice(&(offset as u16).to_le_bytes());
    };
    read(&mut ops, reg::INTERRUPT_STATUS, 0);
    read(&mut ops, 0x100, 4); // 8 bytes of configuration space
    read(&mut ops, 0x104, 2); // 1 byte
    read(&mut ops, reg::CONFIG_GENERATION, 0);
    write(&mut ops, reg::STATUS, 0);
    out.push(seed("mmio_registers", "init-and-reset", ops));
}

/// A descriptor as the virtio_net target reads it.
fn udp_frame() -> Vec<u8> {
    use std::net::Ipv4Addr;
    godwit_devices::virtio::testing::udp_frame(
        [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        [0x02, 0, 0, 0, 0, 1],
        Ipv4Addr::new(10, 0, 0, 2),
        Ipv4Addr::new(10, 0, 0, 1),
        4000,
        7,
        b"godwit fuzz seed",
        godwit_devices::virtio::testing::UdpCsum::Full,
    )
}

fn desc(out: &mut Vec<u8>, addr: u16, len: u16, flags: u8, next: u8) {
    out.extend_from_slice(&addr.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.push(flags);
    out.push(next);
}

/// A transmitted frame, two receive buffers and a frame from the peer to
/// fill them, and a control command (promiscuous mode on).
fn virtio_net(out: &mut Vec<Seed>) {
    const NEXT: u8 = 1;
    const WRITE: u8 = 2;
    let frame = udp_frame();
    let mut b = vec![0xc3u8]; // MRG_RXBUF, CTRL_VQ, CTRL_RX, vnet header
                              // Receive queue: two writable buffers.
    b.push(2);
    desc(&mut b, 0x6000, 2048, WRITE, 0);
    desc(&mut b, 0x7000, 2048, WRITE, 0);
    b.extend_from_slice(&[2, 0, 1]);
    // Transmit queue: header and frame in a chain.
    b.push(2);
    desc(&mut b, 0x4000, 12, NEXT, 1);
    desc(&mut b, 0x4010, frame.len() as u16, 0, 0);
    b.extend_from_slice(&[1, 0]);
    // Control queue: class and command, value, writable ack.
    b.push(3);
    desc(&mut b, 0x5000, 2, NEXT, 1);
    desc(&mut b, 0x5002, 1, NEXT, 2);
    desc(&mut b, 0x5010, 1, WRITE, 0);
    b.extend_from_slice(&[1, 0]);
    // Buffer contents from 0x4000.
    let mut data = vec![0u8; 0x1003];
    data[0x10..0x10 + frame.len()].copy_from_slice(&frame);
    data[0x1002] = 1; // VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC = 0, 0; value 1
    b.extend_from_slice(&(data.len() as u16).to_le_bytes());
    b.extend_from_slice(&data);
    // A frame from the peer, behind its virtio-net header.
    let mut rx = vec![0u8; 12];
    rx.extend_from_slice(&frame);
    b.extend_from_slice(&(rx.len() as u16).to_le_bytes());
    b.extend_from_slice(&rx);
    out.push(seed("virtio_net", "tx-rx-ctrl", b));
}

/// A frontend's session with the backend: the interface pinned and read
/// back, features acked, a memory table of 1 MiB at 0, both rings set up,
/// a frame transmitted (TX kick) and one received (TAP readable).
fn backend(out: &mut Vec<Seed>) {
    let latest = interface::latest();
    let frame = udp_frame();
    let mut b = vec![1u8]; // the TAP has a vnet header
    b.extend_from_slice(&[0, 0, latest.name.len() as u8]);
    b.extend_from_slice(latest.name.as_bytes());
    b.extend_from_slice(&[1, 0]);
    b.extend_from_slice(&(WINDOW_SIZE as u16).to_le_bytes());
    b.push(2);
    b.extend_from_slice(&(latest.values().features | 1 << 29).to_le_bytes());
    b.extend_from_slice(&[3, 0]);
    b.extend_from_slice(&[4, 1, 0, 0, 255]);
    let write = |b: &mut Vec<u8>, addr: u32, bytes: &[u8]| {
        b.push(8);
        b.extend_from_slice(&addr.to_le_bytes());
        b.push(bytes.len() as u8);
        b.extend_from_slice(bytes);
    };
    for (index, base) in [(0u8, 0x1000u32), (1, 0x2000)] {
        b.push(5);
        b.push(index);
        b.extend_from_slice(&16u16.to_le_bytes());
        for addr in [base, base + 0x400, base + 0x800] {
            b.extend_from_slice(&addr.to_le_bytes());
        }
        b.push(6); // ready, enabled
    }
    let raw_desc = |addr: u64, len: u32, flags: u16, next: u16| {
        let mut d = addr.to_le_bytes().to_vec();
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        d
    };
    // RX: one writable buffer; TX: header and frame.
    write(&mut b, 0x1000, &raw_desc(0x8000, 2048, 2, 0));
    write(&mut b, 0x1400, &[0, 0, 1, 0, 0, 0]);
    let mut tx = raw_desc(0x4000, 12, 1, 1);
    tx.extend_from_slice(&raw_desc(0x4010, frame.len() as u32, 0, 0));
    write(&mut b, 0x2000, &tx);
    write(&mut b, 0x2400, &[0, 0, 1, 0, 0, 0]);
    write(&mut b, 0x4010, &frame);
    b.extend_from_slice(&[6, 1]);
    let mut rx = vec![0u8; 12];
    rx.extend_from_slice(&frame);
    b.push(9);
    b.extend_from_slice(&(rx.len() as u16).to_le_bytes());
    b.extend_from_slice(&rx);
    b.extend_from_slice(&[6, 4]);
    out.push(seed("vhost_user_backend", "session", b));
}
