//! godwit's vhost-user backend under a standard frontend and a real Linux
//! driver: Debian's QEMU (TCG, `-netdev vhost-user` with `virtio-net-pci`)
//! boots Debian's cloud kernel with an initramfs of busybox and the
//! kernel's virtio modules; `godwit net-backend` serves the device's rings
//! on a TAP in a namespace the test creates. The guest and the namespace
//! ping each other, the guest sends a TCP stream through the TAP, and the
//! features the Linux driver negotiated are checked against what the
//! backend was told.

use std::io::Read;
use std::net::TcpListener;
use std::time::Duration;

use godwit_tests::linux_guest::{initramfs, DebianKernel, Qemu};
use godwit_tests::net_backend::NetBackend;
use godwit_tests::{NetHost, TempDir};

/// The virtio-net driver and what it needs; the rest comes from the
/// modules' own dependencies.
const MODULES: [&str; 2] = ["virtio_pci", "virtio_net"];
/// Bytes the guest sends over TCP (many TSO frames).
const STREAM: usize = 1 << 20;
/// TCG boots to the initramfs in a few seconds; this is for a loaded
/// machine.
const BOOT: Duration = Duration::from_secs(180);

/// Feature bits the Linux driver and godwit's backend (org.godwit.net.v2)
/// both have, all carried by the backend: they must be negotiated.
const DATAPATH: [(u32, &str); 14] = [
    (0, "csum"),
    (1, "guest_csum"),
    (7, "guest_tso4"),
    (8, "guest_tso6"),
    (9, "guest_ecn"),
    (10, "guest_ufo"),
    (11, "host_tso4"),
    (12, "host_tso6"),
    (13, "host_ecn"),
    (14, "host_ufo"),
    (15, "mrg_rxbuf"),
    (28, "indirect_desc"),
    (29, "event_idx"),
    (32, "version_1"),
];
const F_LOG_ALL: u64 = 1 << 26;
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
const PROTOCOL_F_CONFIG: u64 = 1 << 9;
const PROTOCOL_F_GODWIT_INTERFACE: u64 = 1 << 60;

/// The hex number after `key` in a log line (which may carry ANSI colours).
fn hex_after(line: &str, key: &str) -> u64 {
    let at = line
        .find(key)
        .unwrap_or_else(|| panic!("no {key:?} in {line:?}"));
    let digits: String = line[at + key.len()..]
        .chars()
        .take_while(char::is_ascii_hexdigit)
        .collect();
    u64::from_str_radix(&digits, 16).unwrap_or_else(|e| panic!("{key:?} in {line:?}: {e}"))
}

/// /sys/class/net/*/device/features: one character per bit, bit 0 first.
fn sysfs_features(s: &str) -> u64 {
    s.chars()
        .enumerate()
        .filter(|(_, c)| *c == '1')
        .map(|(i, _)| 1u64 << i)
        .fold(0, |a, b| a | b)
}

#[test]
fn linux_virtio_net_under_qemu_works_through_godwits_backend() {
    let kernel = DebianKernel::from_cache();
    let host = NetHost::new(true, 143);
    let guest_ip = host.guest_ip();
    let dir = TempDir::new("qemu-frontend");
    let socket = dir.join("vu.sock");
    let mut backend = NetBackend::start(&host, &socket, &[]);

    // Something to receive the guest's TCP stream, in the namespace.
    let listen_addr = format!("{}:5001", host.host_ip);
    let (bound_tx, bound) = std::sync::mpsc::channel();
    let receiver = host.spawn(move || {
        let listener = TcpListener::bind(&listen_addr).expect("bind the stream receiver");
        let _ = bound_tx.send(());
        let (mut conn, _) = listener.accept().expect("the guest connects");
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0;
        loop {
            match conn.read(&mut buf) {
                Ok(0) => break total,
                Ok(n) => total += n,
                Err(e) => panic!("receiving the guest's stream after {total} bytes: {e}"),
            }
        }
    });

    bound
        .recv_timeout(Duration::from_secs(10))
        .expect("the stream receiver listens");

    let script = format!(
        "ip link set lo up\n\
         ip link set eth0 up\n\
         ip addr add {guest_ip}/24 dev eth0\n\
         echo \"GW-FEATURES $(cat /sys/class/net/eth0/device/features)\"\n\
         if ping -c 3 -W 5 {host_ip}; then echo GW-PING-OK; else echo GW-PING-FAILED; fi\n\
         head -c {STREAM} /dev/zero | nc {host_ip} 5001 && echo GW-STREAM-SENT\n\
         echo GW-WAITING\n\
         sleep 300\n",
        host_ip = host.host_ip
    );
    let modules = kernel.modules_in_load_order(&MODULES);
    let initrd = dir.join("initrd.cpio");
    std::fs::write(&initrd, initramfs(&modules, &script)).unwrap();

    let args: Vec<String> = [
        "-machine",
        "q35,accel=tcg",
        "-m",
        "512",
        "-object",
        "memory-backend-memfd,id=mem,size=512M,share=on",
        "-numa",
        "node,memdev=mem",
        "-chardev",
        &format!("socket,id=c0,path={}", socket.display()),
        "-netdev",
        "vhost-user,id=n0,chardev=c0",
        // vectors=0: QEMU 7.2 with TCG and vhost-user crashes in its MSI-X
        // code; romfile=: no iPXE, the kernel is given directly.
        "-device",
        "virtio-net-pci,netdev=n0,vectors=0,romfile=,mac=52:54:00:12:34:56",
        "-kernel",
        kernel.vmlinuz.to_str().unwrap(),
        "-initrd",
        initrd.to_str().unwrap(),
        "-append",
        "console=ttyS0 panic=-1 loglevel=4",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut qemu = Qemu::spawn(&args);

    let features_line = qemu.wait_line("GW-FEATURES", BOOT);
    let bits = features_line
        .rsplit(' ')
        .next()
        .filter(|s| !s.is_empty() && s.chars().all(|c| c == '0' || c == '1'))
        .unwrap_or_else(|| {
            panic!(
                "the guest has no virtio-net device eth0; console:\n{}",
                qemu.seen.join("\n")
            )
        });
    let guest = sysfs_features(bits);
    let ping = qemu.wait_line("GW-PING-", Duration::from_secs(60));
    assert!(
        ping.contains("GW-PING-OK"),
        "the guest cannot ping {} through godwit's backend; console:\n{}\nbackend:\n{}",
        host.host_ip,
        qemu.seen.join("\n"),
        backend.seen.join("\n")
    );
    qemu.wait_line("GW-STREAM-SENT", Duration::from_secs(120));
    let received = receiver.join().expect("stream receiver");
    assert_eq!(received, STREAM, "the guest's TCP stream arrived whole");
    qemu.wait_line("GW-WAITING", Duration::from_secs(30));
    host.assert_ping(&guest_ip, 3, "the namespace pings the Linux guest");
    assert!(
        !qemu.seen.iter().any(|l| l.contains("GW-INSMOD-FAILED")),
        "a module did not load: {}",
        qemu.seen.join("\n")
    );

    // What the backend was told: a plain vhost-user session.
    let protocol = hex_after(
        &backend.wait_line("the frontend set protocol features", Duration::from_secs(5)),
        "protocol features 0x",
    );
    assert_eq!(
        protocol & (PROTOCOL_F_CONFIG | PROTOCOL_F_GODWIT_INTERFACE),
        0,
        "QEMU's virtio-net negotiates neither CONFIG nor godwit's extension: {protocol:#x}"
    );
    let acked_line = backend.wait_line("the frontend acked features", Duration::from_secs(5));
    let acked = hex_after(&acked_line, "acked features 0x");
    let offered = hex_after(&acked_line, " of 0x");
    assert_eq!(acked & !offered, 0, "acked {acked:#x} of {offered:#x}");
    assert_ne!(acked & F_PROTOCOL_FEATURES, 0, "{acked:#x}");
    // Everything the backend serves was negotiated by the Linux driver...
    let transport = F_PROTOCOL_FEATURES | F_LOG_ALL;
    assert_eq!(
        acked & !transport & !guest,
        0,
        "the backend was told of features the driver did not negotiate: backend {acked:#x}, driver {guest:#x}"
    );
    // ...and the data path runs with the offloads both sides have.
    for (bit, name) in DATAPATH {
        assert_ne!(
            guest & (1 << bit),
            0,
            "the driver did not negotiate {name}: {guest:#x}"
        );
        assert_ne!(
            acked & (1 << bit),
            0,
            "the backend was not told {name}: {acked:#x}"
        );
    }
    // One session, not ended by a refused request.
    assert!(
        !backend.seen.iter().any(|l| l.contains("the session ended")),
        "{}",
        backend.seen.join("\n")
    );
}
