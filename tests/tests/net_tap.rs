//! virtio-net over a TAP peer, end to end: the test guest's own driver on
//! real KVM, a real TAP in a namespace the test creates and removes, and
//! real packets from the namespace's kernel stack.

use std::time::Duration;

use godwit_tests::guest::spawn_serving;
use godwit_tests::udp::sizes_up_to_mtu;
use godwit_tests::{hex_field, serve_cmdline, sh, udp_echo, NetHost, RunningVm, BOOT};

/// Features a TAP without vnet header cannot carry (the strict remedy).
const NO_OFFLOADS: &str = "csum=off,guest_csum=off,guest_tso4=off,guest_tso6=off,guest_ecn=off,guest_ufo=off,host_tso4=off,host_tso6=off,host_ecn=off,host_ufo=off,guest_uso4=off,guest_uso6=off,host_uso=off,guest_tunnel=off,guest_tunnel_csum=off,host_tunnel=off,host_tunnel_csum=off";

fn serve(host: &NetHost, net: &str, extra_cmdline: &str) -> RunningVm {
    let cmdline = serve_cmdline(1000, &format!("{} {extra_cmdline}", host.guest_ip_param()));
    spawn_serving(Some(&host.ns), &[], net, &cmdline, None)
}

fn arp_ping_and_udp_echo(vnet_hdr: bool, subnet: u8) {
    let host = NetHost::new(vnet_hdr, subnet);
    let net = if vnet_hdr {
        format!("tap,ifname={}", host.tap)
    } else {
        format!("tap,ifname={},vnet_hdr=off,{NO_OFFLOADS}", host.tap)
    };
    let mut vm = serve(&host, &net, "");
    let link = vm.wait_line("virtio-net0: mac=", BOOT);
    assert!(link.contains("link=up"), "{link}");

    host.assert_ping(&host.guest_ip(), 3, "ping failed");
    // ARP resolved the guest's MAC.
    let neigh = host.exec(&["ip", "neigh", "show", &host.guest_ip()]);
    let neigh = String::from_utf8_lossy(&neigh.stdout).to_string();
    assert!(neigh.contains("52:54:00:12:34:56"), "{neigh}");

    // IP packets of 64 to 1500 bytes (the MTU): UDP payloads of 36 to 1472.
    let target = host.guest_echo();
    let sizes = sizes_up_to_mtu(1000);
    let echoed = host.run(move || udp_echo(&target, 1000, &sizes, 16, Duration::from_secs(90)));
    assert_eq!(
        echoed, 1000,
        "UDP echo of 1000 datagrams, IP packets of 64..1500 bytes"
    );
}

#[test]
fn arp_ping_and_udp_echo_with_vnet_hdr() {
    arp_ping_and_udp_echo(true, 61);
}

#[test]
fn arp_ping_and_udp_echo_without_vnet_hdr() {
    arp_ping_and_udp_echo(false, 62);
}

/// The guest sends UDP with a partial checksum (it acked csum); the packets
/// leave the host namespace through a veth whose checksum offload is off,
/// so the kernel completes the checksum in software, and a second namespace
/// receives them on a socket, which drops any datagram with a bad checksum.
/// The guest counts the echoes that come back.
#[test]
fn partial_checksums_from_the_guest_arrive_valid() {
    let host = NetHost::new(true, 63);
    let peer_ns = format!("{}p", host.ns);
    sh(&format!("ip netns add {peer_ns}"));
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
        }
    }
    let _cleanup = Cleanup(peer_ns.clone());
    let ns = &host.ns;
    sh(&format!(
        "ip -n {ns} link add gwv0 type veth peer name gwv1 netns {peer_ns}"
    ));
    sh(&format!(
        "ip -n {ns} addr add 10.64.0.1/24 dev gwv0 && ip -n {ns} link set gwv0 up"
    ));
    sh(&format!("ip -n {peer_ns} addr add 10.64.0.2/24 dev gwv1 && ip -n {peer_ns} link set gwv1 up && ip -n {peer_ns} link set lo up"));
    sh(&format!(
        "ip -n {peer_ns} route add 10.63.0.0/24 via 10.64.0.1"
    ));
    sh(&format!(
        "ip netns exec {ns} sysctl -qw net.ipv4.ip_forward=1"
    ));
    // Software checksums on the way out of the host namespace.
    sh(&format!(
        "ip netns exec {ns} ethtool -K gwv0 tx off >/dev/null"
    ));

    // UDP echo server in the peer namespace.
    let (tx, rx) = std::sync::mpsc::channel();
    let server = godwit_tests::in_netns(&peer_ns, move || {
        let sock = std::net::UdpSocket::bind("10.64.0.2:9000").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        tx.send(()).unwrap();
        let mut buf = [0u8; 2048];
        let mut n = 0;
        while let Ok((len, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..len], from);
            n += 1;
            if n == 50 {
                break;
            }
        }
        n
    });
    rx.recv().unwrap();
    let mut vm = serve(
        &host,
        &format!("tap,ifname={}", host.tap),
        "godwit.udp_burst=10.64.0.2:9000:50:512",
    );
    let acked = hex_field(&vm.wait_line("virtio-net0: base=", BOOT), "acked");
    assert_ne!(acked & 1, 0, "the guest acked csum: {acked:#x}");
    let burst = vm.wait_line("udp-burst:", Duration::from_secs(60));
    assert_eq!(burst.trim(), "udp-burst: sent 50 received 50", "{burst}");
    assert_eq!(server.join().unwrap(), 50);
}

/// A host-side send larger than the MTU, segmented by the kernel only later
/// (UDP_SEGMENT), reaches a guest that acked guest_uso4 as one large frame
/// spread over mergeable rx buffers.
#[test]
fn large_receive_through_mergeable_buffers() {
    let host = NetHost::new(true, 65);
    let mut vm = serve(&host, &format!("tap,ifname={}", host.tap), "");
    let line = vm.wait_line("virtio-net0: base=", BOOT);
    let acked = hex_field(&line, "acked");
    assert_ne!(acked & (1 << 54), 0, "guest_uso4 acked: {line}");
    assert_ne!(acked & (1 << 15), 0, "mrg_rxbuf acked: {line}");
    host.assert_ping(&host.guest_ip(), 1, "ping before the large receive");
    let target = host.guest_echo();
    host.run(move || {
        use std::os::fd::AsRawFd;
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let gso: libc::c_int = 1400;
        // SAFETY: UDP_SEGMENT takes an int option value; the pointer and
        // length describe `gso`.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_UDP,
                libc::UDP_SEGMENT,
                &gso as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        assert_eq!(rc, 0, "UDP_SEGMENT: {}", std::io::Error::last_os_error());
        sock.send_to(&[0x5au8; 4000], &target).unwrap();
    });
    let large = vm.wait_line("rx-large:", Duration::from_secs(30));
    assert!(
        large.contains("len=") && large.contains("gso_size=1400"),
        "{large}"
    );
    let buffers: u32 = large
        .split("buffers=")
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        buffers >= 2,
        "one frame over several mergeable buffers: {large}"
    );
}

/// Opens TAP `name` in the host's namespace without IFF_VNET_HDR, as a
/// management layer might, and returns the fd for godwit to inherit.
fn open_plain_tap(host: &NetHost, name: &str) -> std::os::fd::OwnedFd {
    let name = name.to_string();
    host.run(move || {
        use std::os::fd::{FromRawFd, OwnedFd};
        // SAFETY: plain open(2) of the TUN clone device; the fd is owned below.
        let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR) };
        assert!(fd >= 0);
        // SAFETY: fd was just opened and is owned by nothing else.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut ifr = [0u8; 40];
        ifr[..name.len()].copy_from_slice(name.as_bytes());
        let flags: u16 = (libc::IFF_TAP | libc::IFF_NO_PI) as u16;
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads a struct ifreq (40 bytes) from the pointer.
        let rc = unsafe { libc::ioctl(fd, 0x400454ca, ifr.as_mut_ptr()) };
        assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        owned
    })
}

/// Spawns godwit with `fd` inherited as descriptor 3.
pub fn run_with_fd(
    host: &NetHost,
    fd: &std::os::fd::OwnedFd,
    args: &[&str],
) -> godwit_tests::Finished {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let raw = fd.as_raw_fd();
    let mut cmd = godwit_tests::godwit_command(Some(&host.ns), args);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // SAFETY: dup2 is async-signal-safe; it only rearranges the child's fds.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    godwit_tests::wait_with_deadline(cmd.spawn().expect("spawn godwit"), BOOT)
}

#[test]
fn tap_errors_are_clear_at_start() {
    let host = NetHost::new(false, 66);
    // vnet_hdr=on on an inherited TAP fd opened without IFF_VNET_HDR.
    let plain = open_plain_tap(&host, "gwplain0");
    let out = run_with_fd(&host, &plain, &["run", "--net", "tap,fd=3,vnet_hdr=on"]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr
            .contains("was opened without IFF_VNET_HDR but vnet_hdr=on was requested"),
        "{out:?}"
    );
    // The same fd is fine with vnet_hdr=off and offloads off (it boots).
    let spec = format!("tap,fd=3,vnet_hdr=off,{NO_OFFLOADS}");
    let out = run_with_fd(&host, &plain, &["run", "--net", &spec]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    // An open fd that is not a TAP.
    // (Above fd 3, so that the child's dup2 onto fd 3 is a real one.)
    let not_a_tap = std::os::fd::OwnedFd::from(std::fs::File::open("/dev/null").unwrap())
        .try_clone()
        .unwrap();
    let out = run_with_fd(&host, &not_a_tap, &["run", "--net", "tap,fd=3"]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("fd 3 is not a TAP device"), "{out:?}");
    // godwit's own standard input, output and error are never a TAP.
    let out = godwit_tests::run_godwit(&["run", "--net", "tap,fd=0"], BOOT);
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(
        out.stderr.contains("standard input, output and error"),
        "{out:?}"
    );
    // A name taken by an interface that is not a TAP.
    let out = godwit_tests::run_godwit_in(Some(&host.ns), &["run", "--net", "tap,ifname=lo"], BOOT);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr
            .contains("\"lo\" already exists and is not a TAP"),
        "{out:?}"
    );
    // A name that is not a valid interface name.
    let out = godwit_tests::run_godwit(&["run", "--net", "tap,ifname=bad/name"], BOOT);
    assert_eq!(out.code(), Some(2), "{out:?}");
}

/// The default machine type's two queue pairs on a multi-queue TAP: the
/// test guest's driver puts both in use (VQ_PAIRS_SET), the kernel spreads
/// the namespace's flows over the TAP's two queues, and each pair carries
/// frames both ways (the guest answers on the pair a frame came in on), as
/// query-net's per-pair counters show.
#[test]
fn the_test_guest_uses_both_queue_pairs() {
    let host = NetHost::new(true, 67);
    let api = godwit_tests::TempDir::new("tap-mq");
    let api = api.join("api.sock");
    let cmdline = serve_cmdline(1000, &host.guest_ip_param());
    let mut vm = spawn_serving(
        Some(&host.ns),
        &[],
        &format!("tap,ifname={}", host.tap),
        &cmdline,
        Some(&api),
    );
    let pairs = vm.wait_line("virtio-net0: queue pairs=", BOOT);
    assert!(pairs.contains("queue pairs=2 of 2"), "{pairs}");
    // Sixteen flows (a socket each): all on one queue has odds of 1 in
    // 32768.
    let target = host.guest_echo();
    let sizes = sizes_up_to_mtu(4);
    let echoed = host.run(move || {
        (0..16)
            .map(|_| udp_echo(&target, 4, &sizes, 4, Duration::from_secs(30)))
            .sum::<usize>()
    });
    assert_eq!(echoed, 64, "UDP echo of sixteen flows");
    let mut q = godwit_tests::qmp_connect(&api);
    let net = q.execute("query-net", serde_json::Value::Null).unwrap()[0].clone();
    assert_eq!(net["queue_pairs"]["active"], 2, "{net:#}");
    let stats = net["queue_pairs"]["stats"]
        .as_array()
        .expect("per-pair stats");
    assert_eq!(stats.len(), 2, "{net:#}");
    for (pair, s) in stats.iter().enumerate() {
        assert!(
            s["rx_packets"].as_u64().unwrap() > 0 && s["tx_packets"].as_u64().unwrap() > 0,
            "pair {pair} carried nothing one way: {net:#}"
        );
    }
}
