//! virtio-net over kernel vhost-net (a TAP plus `/dev/vhost-net`). Hosts
//! whose kernel lacks vhost-net (the development machines: no
//! CONFIG_VHOST_NET, no modules) cannot run the datapath tests; those print
//! why they did not run. Start-up without `/dev/vhost-net` is tested there.

use std::path::Path;
use std::time::Duration;

use serde_json::json;

use godwit_tests::guest::spawn_serving;
use godwit_tests::udp::sizes_up_to_mtu;
use godwit_tests::{qmp_connect, run_godwit_in, serve_cmdline, udp_echo, NetHost, TempDir, BOOT};
const VHOST_NET: &str = "/dev/vhost-net";

fn have_vhost_net() -> bool {
    Path::new(VHOST_NET).exists()
}

/// Without `/dev/vhost-net`, start-up fails with a message that says so
/// and offers the userspace datapath.
#[test]
fn start_without_dev_vhost_net_fails_and_offers_tap() {
    if have_vhost_net() {
        eprintln!("skipped: {VHOST_NET} exists on this host; this test checks hosts without it");
        return;
    }
    let host = NetHost::new(true, 101);
    let net = format!("vhost-net,ifname={}", host.tap);
    let out = run_godwit_in(Some(&host.ns), &["run", "--net", &net], BOOT);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr
            .contains("needs /dev/vhost-net, which this host does not have")
            && out.stderr.contains(&format!(
                "use the userspace datapath instead: --net tap,ifname={}",
                host.tap
            )),
        "{}",
        out.stderr
    );
}

/// The datapath in the kernel: ping and UDP echo between the namespace and
/// the guest, the ABI decided from `/dev/vhost-net`'s ring features and the
/// TAP's offloads.
#[test]
fn ping_and_udp_echo_through_kernel_vhost_net() {
    if !have_vhost_net() {
        eprintln!(
            "skipped: {VHOST_NET} does not exist on this host (kernel built without CONFIG_VHOST_NET, or the vhost_net module not loaded), so kernel vhost-net cannot be exercised here"
        );
        return;
    }
    let host = NetHost::new(true, 102);
    let dir = TempDir::new("vhost-net");
    let api = dir.join("api.sock");
    let net = format!("vhost-net,ifname={}", host.tap);
    let cmdline = serve_cmdline(1000, &host.guest_ip_param());
    let mut vm = spawn_serving(Some(&host.ns), &[], &net, &cmdline, Some(&api));
    host.assert_ping(&host.guest_ip(), 3, "ping through kernel vhost-net");
    let target = host.guest_echo();
    let sizes = sizes_up_to_mtu(500);
    let echoed = host.run(move || udp_echo(&target, 500, &sizes, 16, Duration::from_secs(60)));
    assert_eq!(echoed, 500);
    let mut q = qmp_connect(&api);
    let netq = q.execute("query-net", json!({})).unwrap();
    assert_eq!(netq[0]["peer"]["kind"], "vhost-net", "{netq:#}");
    let _ = q.execute("quit", json!({}));
    vm.wait_exit(Duration::from_secs(20));
}
