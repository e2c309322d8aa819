//! `godwit net-backend` as a process on a namespace's TAP, its output read
//! line by line; killed on drop.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use crate::godwit_command;
use crate::netns::{wait_for_path, NetHost};
use crate::process::signal;

pub struct NetBackend {
    child: Child,
    lines: Receiver<String>,
    pub seen: Vec<String>,
}

impl NetBackend {
    /// Starts it on `host`'s TAP with `socket` and `extra` arguments, logging
    /// at info level, and waits until it is ready (and, unless `--client`,
    /// listening).
    pub fn start(host: &NetHost, socket: &Path, extra: &[&str]) -> NetBackend {
        Self::start_in(&host.ns, &host.tap, socket, extra)
    }

    /// Like [`NetBackend::start`], on TAP `tap` of namespace `ns` (a host
    /// of [`crate::TwoHosts`]: `gwtap0`).
    pub fn start_in(ns: &str, tap: &str, socket: &Path, extra: &[&str]) -> NetBackend {
        let socket_s = socket.to_str().expect("socket path is UTF-8");
        let mut args = vec!["net-backend", "--socket", socket_s, "--tap", tap];
        args.extend_from_slice(extra);
        let mut child = godwit_command(Some(ns), &args)
            // GODWIT_BACKEND_LOG=debug shows the backend's requests when
            // a test fails.
            .env(
                "GODWIT_LOG",
                std::env::var("GODWIT_BACKEND_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn godwit net-backend");
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx2.send(l);
            }
        });
        let mut b = NetBackend {
            child,
            lines,
            seen: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        b.wait_line("net-backend: ready", Duration::from_secs(10));
        if !extra.contains(&"--client") {
            wait_for_path(
                socket,
                deadline.saturating_duration_since(Instant::now()),
                "godwit net-backend",
            );
        }
        b
    }

    /// The first new output line that contains `needle`; fails the test with
    /// the output so far when none comes within `timeout`.
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
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
                    "godwit net-backend printed no line containing {needle:?} within {timeout:?}; output so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Every line printed so far (those not yet read included), for a
    /// failure message.
    pub fn output(&mut self) -> String {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        self.seen.join("\n")
    }

    pub fn kill9(&mut self) {
        signal(&self.child, libc::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for NetBackend {
    fn drop(&mut self) {
        self.kill9();
    }
}
