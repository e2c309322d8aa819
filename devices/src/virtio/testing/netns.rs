//! [`NetNs`]: a network namespace for a test, deleted when dropped.

use std::io;
use std::os::fd::AsRawFd;
use std::process::Command;

use super::random_u64;

/// A network namespace created for a test, deleted when dropped.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

fn run(cmd: &mut Command) -> io::Result<String> {
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl NetNs {
    /// Creates `gw-test-<tag>-<random>` with `ip netns add` (needs root).
    pub fn new(tag: &str) -> io::Result<NetNs> {
        let name = format!("gw-test-{tag}-{:08x}", random_u64() as u32);
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <ns> <args>`; returns its output.
    pub fn ip(&self, args: &[&str]) -> io::Result<String> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Runs `f` on a thread that entered the namespace: sockets and TAPs it
    /// creates live there (and stay usable from any thread).
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        let path = format!("/run/netns/{}", self.name);
        let ns = std::fs::File::open(&path)?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns with a namespace fd and CLONE_NEWNET only
                // changes this (scoped, short-lived) thread's namespace.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the thread inside the namespace panicked")))
        })
    }

    /// Writes a sysctl inside the namespace (`net.ipv4.ip_forward` style key).
    pub fn sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.enter(|| std::fs::write(&path, value))?
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = run(Command::new("ip").args(["netns", "del", &self.name])) {
            tracing::warn!("cannot delete test namespace {}: {e}", self.name);
        }
    }
}
