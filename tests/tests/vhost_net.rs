//! virtio-net over kernel vhost-net (a TAP plus `/dev/vhost-net`). Hosts
//! whose kernel lacks vhost-net (the development machines: no
//! CONFIG_VHOST_NET, no modules) cannot run the datapath, snapshot and
//! migration tests; those say why they did not run. Start-up without
//! `/dev/vhost-net` is tested there.

use std::time::Duration;

use serde_json::json;

use godwit_tests::guest::spawn_serving;
use godwit_tests::host_support::{have_vhost_net, not_run, VHOST_NET};
use godwit_tests::migrate::{assert_heartbeat_continues, wait_migration};
use godwit_tests::udp::sizes_up_to_mtu;
use godwit_tests::verify::full_round_without_mismatch;
use godwit_tests::{
    qmp_connect, run_godwit_in, serve_cmdline, udp_echo, wait_listening, NetHost, RunningVm,
    TempDir, TwoHosts, BOOT,
};

/// Why the kernel datapath tests cannot run on a host without vhost-net.
const NO_VHOST_NET: &str = "/dev/vhost-net does not exist on this host (kernel built without CONFIG_VHOST_NET, or the vhost_net module not loaded), so kernel vhost-net cannot be exercised here";

/// Without `/dev/vhost-net`, start-up fails with a message that says so
/// and offers the userspace datapath.
#[test]
fn start_without_dev_vhost_net_fails_and_offers_tap() {
    if have_vhost_net() {
        not_run(
            "start_without_dev_vhost_net_fails_and_offers_tap",
            &format!("{VHOST_NET} exists on this host; this test checks hosts without it"),
        );
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
/// TAP's offloads; the default machine type's two queue pairs on the
/// multi-queue TAP (one `/dev/vhost-net` per pair), both in use.
#[test]
fn ping_and_udp_echo_through_kernel_vhost_net() {
    if !have_vhost_net() {
        not_run("ping_and_udp_echo_through_kernel_vhost_net", NO_VHOST_NET);
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
    assert_eq!(netq[0]["queue_pairs"]["offered"], 2, "{netq:#}");
    assert_eq!(netq[0]["queue_pairs"]["active"], 2, "{netq:#}");
    let _ = q.execute("quit", json!({}));
    vm.wait_exit(Duration::from_secs(20));
}

/// A vhost-net guest snapshotted and restored comes back as a vhost-net
/// device (not as a userspace TAP device), with its memory whole, and
/// answers on the same TAP.
#[test]
fn a_snapshot_of_a_vhost_net_guest_restores_as_vhost_net() {
    if !have_vhost_net() {
        not_run(
            "a_snapshot_of_a_vhost_net_guest_restores_as_vhost_net",
            NO_VHOST_NET,
        );
        return;
    }
    let host = NetHost::new(true, 103);
    let dir = TempDir::new("vhost-net-snap");
    let api = dir.join("api.sock");
    let snap = dir.join("snap");
    let net = format!("vhost-net,ifname={}", host.tap);
    let cmdline = serve_cmdline(200, &format!("{} godwit.verify=1M", host.guest_ip_param()));
    let mut vm = spawn_serving(Some(&host.ns), &[], &net, &cmdline, Some(&api));
    full_round_without_mismatch(&mut vm, "before the snapshot");
    let mut q = qmp_connect(&api);
    q.execute("snapshot-save", json!({ "dir": snap })).unwrap();
    let _ = q.execute("quit", json!({}));
    vm.wait_exit(Duration::from_secs(20));

    let restored_api = dir.join("restored.sock");
    let mut restored = RunningVm::spawn_in(
        &host.ns,
        &[
            "run",
            "--restore",
            snap.to_str().unwrap(),
            "--net",
            &net,
            "--api-socket",
            restored_api.to_str().unwrap(),
        ],
    );
    full_round_without_mismatch(&mut restored, "after the restore");
    let netq = qmp_connect(&restored_api)
        .execute("query-net", json!({}))
        .unwrap();
    assert_eq!(netq[0]["peer"]["kind"], "vhost-net", "{netq:#}");
    let target = host.guest_echo();
    let echoed = host.run(move || udp_echo(&target, 50, &[64, 1000], 4, Duration::from_secs(30)));
    assert_eq!(echoed, 50, "the restored guest answers through vhost-net");
}

/// A vhost-net guest migrates between two hosts with the pages the kernel
/// wrote (its LOG_ALL dirty log joins KVM's): the guest's own memory check
/// finds no mismatch on the destination, whose device is vhost-net too.
#[test]
fn a_vhost_net_guest_migrates_with_the_pages_the_kernel_wrote() {
    if !have_vhost_net() {
        not_run(
            "a_vhost_net_guest_migrates_with_the_pages_the_kernel_wrote",
            NO_VHOST_NET,
        );
        return;
    }
    const PORT: u16 = 4444;
    let hosts = TwoHosts::new(104, true, true);
    let dir = TempDir::new("vhost-net-mig");
    let api = dir.join("a.sock");
    let dst_api = dir.join("b.sock");
    let net = "vhost-net,ifname=gwtap0";
    let cmdline = serve_cmdline(200, &format!("{} godwit.verify=2M", hosts.guest_ip_param()));
    let mut src = spawn_serving(Some(&hosts.ns_a()), &[], net, &cmdline, Some(&api));
    full_round_without_mismatch(&mut src, "before the migration");
    let uri = format!("tcp:{}:{PORT}", hosts.addr_b());
    let mut dst = RunningVm::spawn_in(
        &hosts.ns_b(),
        &[
            "run",
            "--incoming",
            &uri,
            "--net",
            net,
            "--api-socket",
            dst_api.to_str().unwrap(),
        ],
    );
    wait_listening(&hosts.ns_b(), PORT);
    // Traffic through the kernel's datapath while pages are copied.
    let target = hosts.guest_echo();
    let traffic = TwoHosts::run_in(&hosts.ns_c(), move || {
        udp_echo(&target, 300, &[64, 1400], 8, Duration::from_secs(60))
    });
    let mut q = qmp_connect(&api);
    q.execute("migrate", json!({ "uri": uri })).unwrap();
    let info = wait_migration(&mut q, Duration::from_secs(120));
    assert_eq!(info["status"], "completed", "{info}");
    let (status, stderr) = src.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "source: {stderr}");
    assert_heartbeat_continues(&mut src, &mut dst);
    full_round_without_mismatch(&mut dst, "on the destination");
    let _ = traffic.join();
    let netq = qmp_connect(&dst_api)
        .execute("query-net", json!({}))
        .unwrap();
    assert_eq!(netq[0]["peer"]["kind"], "vhost-net", "{netq:#}");
}
