//! Shared helpers for godwit's end-to-end tests and benchmarks: find the
//! `godwit` binary, run it with a deadline, follow its serial console, and
//! talk to its management API. The modules hold the rest of what more than
//! one test needs: network namespaces and hosts ([`netns`]), the test
//! guest's command lines and console lines ([`guest`]), UDP traffic
//! ([`udp`]), live-migration waits ([`migrate`]), the guest's memory
//! checker ([`verify`]), TLS credentials ([`tls_creds`]) and helper processes such as DPDK testpmd
//! ([`process`]).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

pub use godwit_vmm::api::QmpClient;

pub mod guest;
pub mod host_support;
pub mod linux_guest;
pub mod migrate;
pub mod net_backend;
pub mod netns;
pub mod process;
pub mod tls_creds;
pub mod udp;
pub mod verify;

pub use guest::{heartbeat, hex_field, remedy_line, serve_cmdline, BOOT};
pub use netns::{in_netns, sh, wait_listening, NetHost, TwoHosts};
pub use udp::{udp_echo, EchoClient};

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
    lines: Receiver<ConsoleLine>,
    pub seen: Vec<String>,
    /// Whether the last line in `seen` is one the console's output ended in
    /// the middle of.
    cut: bool,
    stderr: Receiver<String>,
}

/// A console line as the reader thread found it.
struct ConsoleLine {
    text: String,
    /// False for output that ended before the line's newline.
    terminated: bool,
}

/// Sends `output`'s lines, newline removed, until it ends. The last one is
/// marked when output ends in the middle of it; bytes that are not UTF-8 are
/// replaced, not the end of reading.
fn read_console(output: impl Read, lines: mpsc::Sender<ConsoleLine>) {
    let mut output = BufReader::new(output);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match output.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let terminated = buf.last() == Some(&b'\n');
        if terminated {
            buf.pop();
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
        }
        let text = String::from_utf8_lossy(&buf).into_owned();
        if lines.send(ConsoleLine { text, terminated }).is_err() {
            return;
        }
    }
}

impl RunningVm {
    pub fn spawn(args: &[&str]) -> Self {
        Self::spawn_cmd(godwit_command(None, args))
    }

    /// Runs godwit inside network namespace `ns`.
    pub fn spawn_in(ns: &str, args: &[&str]) -> Self {
        Self::spawn_cmd(godwit_command(Some(ns), args))
    }

    /// [`RunningVm::spawn_in`] (or outside any namespace) with `env` added
    /// to godwit's environment (test hooks).
    pub fn spawn_env(ns: Option<&str>, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = godwit_command(ns, args);
        cmd.envs(env.iter().copied());
        Self::spawn_cmd(cmd)
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
        std::thread::spawn(move || read_console(stdout, tx));
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
            cut: false,
            stderr,
        }
    }

    /// Keeps a line the reader sent; returns its text.
    fn record(&mut self, line: ConsoleLine) -> String {
        self.cut = !line.terminated;
        self.seen.push(line.text.clone());
        line.text
    }

    /// Waits up to `timeout` for the console's output to end (the process
    /// has exited or is about to); returns what it printed after its last
    /// newline: the start of a line that a pause cut, which the VM going on
    /// from this one completes. Empty when the output ended with a whole line.
    pub fn cut_line(&mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.record(line);
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "the console's output did not end within {timeout:?}; console:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
        if self.cut {
            self.seen.last().cloned().unwrap_or_default()
        } else {
            String::new()
        }
    }

    /// The console lines printed whole so far: `seen` without a last line
    /// that output ended in the middle of.
    pub fn complete_lines(&self) -> &[String] {
        &self.seen[..self.seen.len() - usize::from(self.cut)]
    }

    /// Waits for a console line that contains `needle`; returns it.
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> String {
        if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        self.wait_new(
            |l| l.contains(needle),
            timeout,
            &format!("containing {needle:?}"),
        )
    }

    /// Waits for a console line that starts with `prefix`, among lines not
    /// yet seen; returns it.
    pub fn wait_prefix(&mut self, prefix: &str, timeout: Duration) -> String {
        self.wait_new(
            |l| l.starts_with(prefix),
            timeout,
            &format!("new, starting with {prefix:?}"),
        )
    }

    /// Waits for a console line that contains `needle`, among lines not yet
    /// seen; returns it.
    pub fn wait_new_line(&mut self, needle: &str, timeout: Duration) -> String {
        self.wait_new(
            |l| l.contains(needle),
            timeout,
            &format!("new, containing {needle:?}"),
        )
    }

    /// The first console line not yet seen that `pick` accepts; fails the
    /// test, naming the line as `what` and showing the console, when none
    /// arrives within `timeout`.
    fn wait_new(&mut self, pick: impl Fn(&str) -> bool, timeout: Duration, what: &str) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = self.lines.recv_timeout(left) else {
                panic!(
                    "no console line {what} within {timeout:?}; console so far:\n{}",
                    self.seen.join("\n")
                );
            };
            let line = self.record(line);
            if pick(&line) {
                return line;
            }
        }
    }

    /// The next console line, if one arrives within `timeout`.
    pub fn try_line(&mut self, timeout: Duration) -> Option<String> {
        let line = self.lines.recv_timeout(timeout).ok()?;
        Some(self.record(line))
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
                    self.record(line);
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
