//! The body of every godwit fuzz target: one function per target, taking
//! the fuzzer's bytes. The libFuzzer binaries in `fuzz/fuzz_targets/` call
//! these, and so does the corpus replay test (`tests/tests/fuzz_corpus.rs`)
//! on stable Rust, so a regression input in `fuzz/corpus/<target>/` fails
//! `make test` without a nightly toolchain.
//!
//! A body returns normally for any input; a panic, a hang or an allocation
//! over the fuzzer's limit is a finding.

mod input;
mod mmio;
pub mod seeds;
mod state;
mod text;
mod vhost_user;
mod vhost_user_backend;
mod virtio_net;

pub use mmio::mmio_registers;
pub use state::{memory_header, migration_stream, snapshot_state};
pub use text::{api_line, host_caps, net_spec};
pub use vhost_user::{vhost_user_record, vhost_user_replies};
pub use vhost_user_backend::vhost_user_backend;
pub use virtio_net::virtio_net;

/// A fuzz target: its name (the binary in `fuzz/fuzz_targets/` and the
/// directory of its corpus) and its body.
pub struct Target {
    pub name: &'static str,
    pub body: fn(&[u8]),
}

/// Every target, in the order `make fuzz` runs them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "api_line",
        body: api_line,
    },
    Target {
        name: "net_spec",
        body: net_spec,
    },
    Target {
        name: "host_caps",
        body: host_caps,
    },
    Target {
        name: "migration_stream",
        body: migration_stream,
    },
    Target {
        name: "snapshot_state",
        body: snapshot_state,
    },
    Target {
        name: "memory_header",
        body: memory_header,
    },
    Target {
        name: "vhost_user_record",
        body: vhost_user_record,
    },
    Target {
        name: "vhost_user_replies",
        body: vhost_user_replies,
    },
    Target {
        name: "vhost_user_backend",
        body: vhost_user_backend,
    },
    Target {
        name: "mmio_registers",
        body: mmio_registers,
    },
    Target {
        name: "virtio_net",
        body: virtio_net,
    },
];
