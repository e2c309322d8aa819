//! What this host lacks that some tests need, and how such a test says that
//! it did not run.
//!
//! A test that needs hardware absent here returns early through
//! [`not_run`], which writes past libtest's output capture: `cargo test`
//! shows the reason even though the test counts as passed.

use std::io::Write;
use std::path::Path;

/// Kernel vhost-net's device node.
pub const VHOST_NET: &str = "/dev/vhost-net";

/// Whether the CPU offers hardware virtualisation (vmx or svm): without
/// it, KVM here emulates guest code and a stock kernel cannot boot in
/// useful time (shared/reference/platform.md).
pub fn hardware_virtualisation() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}

/// Whether kernel vhost-net can be opened on this host.
pub fn have_vhost_net() -> bool {
    Path::new(VHOST_NET).exists()
}

/// Says, on the process's real standard error (not captured by the test
/// harness), that test `test` did not run and why.
pub fn not_run(test: &str, why: &str) {
    let line = format!("NOT RUN {test}: {why}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}
