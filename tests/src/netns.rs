//! Network namespaces the tests create: one host with a TAP
//! (resources/netns.sh), two hosts and a client on one segment
//! (resources/twohosts.sh), and running code or commands inside them.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Output};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::resources_dir;

fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}{}",
        std::process::id() % 100_000,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn tap_mode(vnet_hdr: bool) -> &'static str {
    if vnet_hdr {
        "vnet_hdr"
    } else {
        "plain"
    }
}

/// Runs `f` on a new thread that entered network namespace `ns` (sockets it
/// opens live there).
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns on a valid namespace fd only changes this
        // (short-lived, test-owned) thread's network namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "setns into {path}: {}",
            std::io::Error::last_os_error()
        );
        f()
    })
}

/// Runs a shell command line; fails the test if it fails.
pub fn sh(cmd: &str) {
    let ok = Command::new("sh")
        .args(["-c", cmd])
        .status()
        .unwrap()
        .success();
    assert!(ok, "{cmd}");
}

/// Waits until something listens on TCP `port` in namespace `ns`.
pub fn wait_listening(ns: &str, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "ss", "-ltnH"])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).contains(&format!(":{port}")) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on port {port} in {ns}");
}

/// Waits until `path` exists (a socket a process creates); `what` names
/// the process in the failure.
pub fn wait_for_path(path: &Path, timeout: Duration, what: &str) {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{what}: no {} within {timeout:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A network namespace with a TAP for a guest and an address on it, made
/// by resources/netns.sh and removed (with everything in it) on drop.
pub struct NetHost {
    pub ns: String,
    pub tap: String,
    pub host_ip: String,
}

impl NetHost {
    /// `vnet_hdr`: whether the TAP is created with IFF_VNET_HDR. The subnet
    /// is 10.<subnet>.0.0/24 with the host at .1. The TAP is a multi-queue
    /// TAP (the default machine type has 2 queue pairs).
    pub fn new(vnet_hdr: bool, subnet: u8) -> Self {
        Self::with_tap(vnet_hdr, subnet, true)
    }

    /// As [`NetHost::new`] with a single-queue TAP (created without
    /// multi_queue): a peer of one queue pair.
    pub fn single_queue(vnet_hdr: bool, subnet: u8) -> Self {
        Self::with_tap(vnet_hdr, subnet, false)
    }

    fn with_tap(vnet_hdr: bool, subnet: u8, multi_queue: bool) -> Self {
        let ns = format!("gwt{}", unique_suffix());
        let tap = "gwtap0".to_string();
        let host_ip = format!("10.{subnet}.0.1");
        let status = Command::new(resources_dir().join("netns.sh"))
            .args([
                "up",
                &ns,
                &tap,
                &format!("{host_ip}/24"),
                tap_mode(vnet_hdr),
                if multi_queue { "multi" } else { "single" },
            ])
            .status()
            .expect("run resources/netns.sh");
        assert!(status.success(), "resources/netns.sh up {ns} failed");
        NetHost { ns, tap, host_ip }
    }

    /// The guest's address in this host's subnet.
    pub fn guest_ip(&self) -> String {
        self.host_ip.replacen(".0.1", ".0.2", 1)
    }

    /// The guest's UDP echo service (port 7).
    pub fn guest_echo(&self) -> String {
        format!("{}:7", self.guest_ip())
    }

    /// The kernel `ip=` parameter for a guest on this host.
    pub fn guest_ip_param(&self) -> String {
        format!("ip={}::{}:255.255.255.0", self.guest_ip(), self.host_ip)
    }

    /// `--net` for this host's TAP, with `props` (",vnet_hdr=off", ...).
    pub fn tap_net(&self, props: &str) -> String {
        format!("tap,ifname={}{props}", self.tap)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(args)
            .output()
            .expect("ip netns exec")
    }

    /// Pings `ip` `count` times from the namespace; fails the test, with
    /// ping's output and `what`, when no reply comes.
    pub fn assert_ping(&self, ip: &str, count: u32, what: &str) {
        let count = count.to_string();
        let ping = self.exec(&["ping", "-c", &count, "-W", "5", ip]);
        assert!(
            ping.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&ping.stdout)
        );
    }

    /// Runs `f` on a thread that entered this namespace (sockets it opens
    /// live there) and waits for it.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().expect("namespace thread")
    }

    /// Like [`NetHost::run`] without waiting.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        in_netns(&self.ns, f)
    }
}

impl Drop for NetHost {
    fn drop(&mut self) {
        let _ = Command::new(resources_dir().join("netns.sh"))
            .args(["down", &self.ns])
            .status();
    }
}

/// Two hosts and a client on one L2 segment (resources/twohosts.sh),
/// removed on drop. Host A is 10.<s>.0.11, B 10.<s>.0.12, the client
/// 10.<s>.0.100, the guest 10.<s>.0.2; each host's guest TAP is `gwtap0`.
pub struct TwoHosts {
    pub prefix: String,
    pub subnet: u8,
}

impl TwoHosts {
    pub fn new(subnet: u8, vnet_hdr_a: bool, vnet_hdr_b: bool) -> Self {
        let prefix = format!("gwm{}", unique_suffix());
        let status = Command::new(resources_dir().join("twohosts.sh"))
            .args([
                "up",
                &prefix,
                &subnet.to_string(),
                tap_mode(vnet_hdr_a),
                tap_mode(vnet_hdr_b),
            ])
            .status()
            .expect("run resources/twohosts.sh");
        assert!(status.success(), "resources/twohosts.sh up {prefix} failed");
        TwoHosts { prefix, subnet }
    }
    pub fn ns_a(&self) -> String {
        format!("{}-a", self.prefix)
    }
    pub fn ns_b(&self) -> String {
        format!("{}-b", self.prefix)
    }
    pub fn ns_c(&self) -> String {
        format!("{}-c", self.prefix)
    }
    pub fn addr_a(&self) -> String {
        format!("10.{}.0.11", self.subnet)
    }
    pub fn addr_b(&self) -> String {
        format!("10.{}.0.12", self.subnet)
    }
    pub fn guest_ip(&self) -> String {
        format!("10.{}.0.2", self.subnet)
    }
    /// The guest's UDP echo service (port 7).
    pub fn guest_echo(&self) -> String {
        format!("{}:7", self.guest_ip())
    }
    /// The guest's `ip=`: its gateway is the client.
    pub fn guest_ip_param(&self) -> String {
        format!(
            "ip={}::10.{}.0.100:255.255.255.0",
            self.guest_ip(),
            self.subnet
        )
    }
    /// Runs `f` on a thread inside namespace `ns`.
    pub fn run_in<T: Send + 'static>(
        ns: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        in_netns(ns, f)
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        let _ = Command::new(resources_dir().join("twohosts.sh"))
            .args(["down", &self.prefix])
            .status();
    }
}
