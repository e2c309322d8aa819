//! Shared helpers for godwit's end-to-end tests and benchmarks: find the
//! `godwit` binary, run it with a deadline, follow its serial console, and
//! talk to its management API.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

pub use godwit_vmm::api::QmpClient;

/// The `godwit` binary of the same build profile as the running test.
pub fn godwit_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    let mut dir = exe.parent().expect("test dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("godwit");
    assert!(
        bin.exists(),
        "{} does not exist: build it first (`make test` does)",
        bin.display()
    );
    bin
}

/// A fresh directory under /tmp, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path =
            std::env::temp_dir().join(format!("godwit-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The result of a godwit run that ended by itself.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
    pub fn has_line(&self, line: &str) -> bool {
        self.stdout.lines().any(|l| l.trim_end() == line)
    }
}

impl std::fmt::Debug for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "status: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// `godwit ARGS`, inside network namespace `ns` when given.
pub fn godwit_command(ns: Option<&str>, args: &[&str]) -> Command {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(godwit_bin());
            c
        }
        None => Command::new(godwit_bin()),
    };
    cmd.args(args);
    cmd
}

/// Runs `godwit ARGS` with stdin closed and kills it after `deadline`.
pub fn run_godwit(args: &[&str], deadline: Duration) -> Finished {
    run_godwit_in(None, args, deadline)
}

/// Like [`run_godwit`], inside network namespace `ns` when given.
pub fn run_godwit_in(ns: Option<&str>, args: &[&str], deadline: Duration) -> Finished {
    let child = godwit_command(ns, args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn godwit");
    wait_with_deadline(child, deadline)
}

pub fn wait_with_deadline(mut child: Child, deadline: Duration) -> Finished {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if start.elapsed() > deadline => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("collect output");
                panic!(
                    "godwit did not finish within {deadline:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("waiting for godwit: {e}"),
        }
    }
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().expect("collect output");
    Finished {
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// A godwit process whose console is read line by line as it runs.
pub struct RunningVm {
    child: Option<Child>,
    lines: Receiver<String>,
    pub seen: Vec<String>,
    stderr: Receiver<String>,
}

impl RunningVm {
    pub fn spawn(args: &[&str]) -> Self {
        Self::spawn_cmd(godwit_command(None, args))
    }

    /// Runs godwit inside network namespace `ns`.
    pub fn spawn_in(ns: &str, args: &[&str]) -> Self {
        Self::spawn_cmd(godwit_command(Some(ns), args))
    }

    fn spawn_cmd(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn godwit");
        let stdout = child.stdout.take().expect("stdout");
        let stderr_pipe = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (etx, stderr) = mpsc::channel();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = BufReader::new(stderr_pipe).read_to_string(&mut s);
            let _ = etx.send(s);
        });
        RunningVm {
            child: Some(child),
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    /// Waits for a console line that contains `needle`; returns it.
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no console line containing {needle:?} within {timeout:?}; console so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits for a console line that starts with `prefix`, among lines not
    /// yet seen; returns it.
    pub fn wait_prefix(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no new console line starting with {prefix:?} within {timeout:?}; console so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// The next console line, if one arrives within `timeout`.
    pub fn try_line(&mut self, timeout: Duration) -> Option<String> {
        let line = self.lines.recv_timeout(timeout).ok()?;
        self.seen.push(line.clone());
        Some(line)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Waits for the process to end by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> (ExitStatus, String) {
        let mut child = self.child.take().expect("process already reaped");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(line);
                }
                let err = self
                    .stderr
                    .recv_timeout(Duration::from_secs(5))
                    .unwrap_or_default();
                return (status, err);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "godwit did not exit within {timeout:?}; console:\n{}",
                    self.seen.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Connects to a VM's API socket, retrying while godwit starts.
pub fn qmp_connect(socket: &Path) -> QmpClient {
    QmpClient::connect_retry(socket, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", socket.display()))
}

/// The repository's resources/ directory.
pub fn resources_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources")
}

fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}{}",
        std::process::id() % 100_000,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
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
    /// is 10.<subnet>.0.0/24 with the host at .1.
    pub fn new(vnet_hdr: bool, subnet: u8) -> Self {
        let ns = format!("gwt{}", unique_suffix());
        let tap = "gwtap0".to_string();
        let host_ip = format!("10.{subnet}.0.1");
        let status = Command::new(resources_dir().join("netns.sh"))
            .args([
                "up",
                &ns,
                &tap,
                &format!("{host_ip}/24"),
                if vnet_hdr { "vnet_hdr" } else { "plain" },
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

    /// The kernel `ip=` parameter for a guest on this host.
    pub fn guest_ip_param(&self) -> String {
        format!("ip={}::{}:255.255.255.0", self.guest_ip(), self.host_ip)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(args)
            .output()
            .expect("ip netns exec")
    }

    /// Runs `f` on a thread that entered this namespace (sockets it opens
    /// live there).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.ns);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            use std::os::fd::AsRawFd;
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
        .join()
        .expect("namespace thread")
    }
}

impl Drop for NetHost {
    fn drop(&mut self) {
        let _ = Command::new(resources_dir().join("netns.sh"))
            .args(["down", &self.ns])
            .status();
    }
}

/// Sends `count` UDP datagrams (sizes cycling through `sizes`) to an echo
/// server, at most `window` unanswered at a time, and returns how many came
/// back with the same payload.
pub fn udp_echo(
    target: &str,
    count: usize,
    sizes: &[usize],
    window: usize,
    timeout: Duration,
) -> usize {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind UDP");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut sent: std::collections::HashMap<u32, Vec<u8>> = std::collections::HashMap::new();
    let (mut next, mut ok) = (0usize, 0usize);
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65536];
    while (ok < count) && Instant::now() < deadline {
        while next < count && sent.len() < window {
            let size = sizes[next % sizes.len()].max(4);
            let mut payload: Vec<u8> = (0..size).map(|i| (i as u8) ^ (next as u8)).collect();
            payload[..4].copy_from_slice(&(next as u32).to_le_bytes());
            sock.send_to(&payload, target).expect("send");
            sent.insert(next as u32, payload);
            next += 1;
        }
        match sock.recv_from(&mut buf) {
            Ok((n, _)) if n >= 4 => {
                let seq = u32::from_le_bytes(buf[..4].try_into().unwrap());
                if sent.get(&seq).is_some_and(|p| p.as_slice() == &buf[..n]) {
                    sent.remove(&seq);
                    ok += 1;
                }
            }
            Ok(_) => {}
            Err(_) => {
                // Lost or still in flight: resend what is outstanding.
                for (_, p) in sent.iter() {
                    let _ = sock.send_to(p, target);
                }
            }
        }
    }
    ok
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
        let mode = |v: bool| if v { "vnet_hdr" } else { "plain" };
        let status = Command::new(resources_dir().join("twohosts.sh"))
            .args([
                "up",
                &prefix,
                &subnet.to_string(),
                mode(vnet_hdr_a),
                mode(vnet_hdr_b),
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
    pub fn addr_b(&self) -> String {
        format!("10.{}.0.12", self.subnet)
    }
    pub fn guest_ip(&self) -> String {
        format!("10.{}.0.2", self.subnet)
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
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{ns}");
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns on a valid namespace fd only changes this
            // test-owned thread's network namespace.
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
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        let _ = Command::new(resources_dir().join("twohosts.sh"))
            .args(["down", &self.prefix])
            .status();
    }
}

/// A client that keeps sending UDP echo requests (one every `every`) until
/// told to stop, counting replies, with the time of each reply.
pub struct EchoClient {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<(u64, Vec<Instant>)>>,
}

impl EchoClient {
    pub fn start(ns: &str, target: String, every: Duration) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let handle = TwoHosts::run_in(ns, move || {
            let sock = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
            sock.set_read_timeout(Some(every)).unwrap();
            let (mut sent, mut replies) = (0u64, Vec::new());
            let mut buf = [0u8; 2048];
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = sock.send_to(&sent.to_le_bytes(), &target);
                sent += 1;
                while let Ok((n, _)) = sock.recv_from(&mut buf) {
                    if n == 8 {
                        replies.push(Instant::now());
                    }
                }
            }
            (sent, replies)
        });
        EchoClient {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops; returns (requests sent, reply times).
    pub fn finish(mut self) -> (u64, Vec<Instant>) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.handle
            .take()
            .expect("running")
            .join()
            .expect("echo client")
    }
}
