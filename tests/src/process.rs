//! Helper processes next to godwit: signalling and stopping them, and DPDK
//! testpmd as a vhost-user peer.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Sends `signal` to a child that has not been reaped yet.
pub fn signal(child: &Child, signal: libc::c_int) {
    // SAFETY: kill(2) on the pid of a child this process spawned and has
    // not reaped, so the pid still names that child.
    unsafe { libc::kill(child.id() as libc::pid_t, signal) };
}

/// Stops a child with `stop` (SIGINT lets testpmd release its socket),
/// waits up to `grace` for it to exit, then kills it.
pub fn stop_child(child: &mut Child, stop: libc::c_int, grace: Duration) {
    signal(child, stop);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The features of machine type godwit-1.1 that DPDK testpmd 22.11's
/// vhost-user port does not offer, in feature-table order: what strict=off
/// drops on it.
pub const TESTPMD_LACKS_OF_GODWIT_1_1: [&str; 6] = [
    "host_tso4",
    "host_tso6",
    "host_ecn",
    "guest_uso4",
    "guest_uso6",
    "host_uso",
];

/// DPDK testpmd (Debian's dpdk-dev) with a vhost-user port on `socket`,
/// forwarding `io`, with its output discarded. `client`: testpmd connects
/// to `socket` instead of listening. With a namespace it runs there and
/// adds a `net_tap` port `dtap0` to forward to.
pub fn testpmd_command(ns: Option<&str>, socket: &Path, client: bool) -> Command {
    testpmd_command_with_queues(ns, socket, client, 1)
}

/// [`testpmd_command`] with `queues` queue pairs on the vhost-user port
/// (`queues=N`, which its GET_QUEUE_NUM answers) and as many receive and
/// transmit queues on each port, forwarded queue to queue.
pub fn testpmd_command_with_queues(
    ns: Option<&str>,
    socket: &Path,
    client: bool,
    queues: u16,
) -> Command {
    const BIN: &str = "dpdk-testpmd";
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, BIN]);
            c
        }
        None => Command::new(BIN),
    };
    cmd.args(["--no-pci", "--no-huge", "--no-shconf", "-m", "512"]);
    cmd.args([
        "--vdev",
        &format!(
            "net_vhost0,iface={},queues={queues}{}",
            socket.display(),
            if client { ",client=1" } else { "" }
        ),
    ]);
    if ns.is_some() {
        cmd.args(["--vdev", "net_tap0,iface=dtap0"]);
    }
    cmd.arg("--");
    if queues > 1 {
        cmd.args([format!("--rxq={queues}"), format!("--txq={queues}")]);
    }
    cmd.args([
        "--forward-mode=io",
        "--total-num-mbufs=2048",
        "--stats-period",
        "60",
    ]);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}
