//! godwit's own vhost-user backend (`godwit net-backend`) as the tests run
//! it: on a host's TAP, killed on drop.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::godwit_command;

/// A `godwit net-backend` process serving `socket` on TAP `gwtap0`.
pub struct NetBackend(Child);

impl NetBackend {
    /// Starts it in namespace `ns` and waits for its socket.
    pub fn start(ns: &str, socket: &Path) -> Self {
        let child = godwit_command(
            Some(ns),
            &[
                "net-backend",
                "--socket",
                socket.to_str().expect("socket path is UTF-8"),
                "--tap",
                "gwtap0",
            ],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start godwit net-backend");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "{} never appeared",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        NetBackend(child)
    }
}

impl Drop for NetBackend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
