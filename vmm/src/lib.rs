//! godwit's virtual machine monitor, by subsystem:
//!
//! - [`config`] — what a VM is made of (`VmConfig`, `--net` specs).
//! - [`vstate`] — KVM VM, vCPUs, guest RAM, CPUID, layout, saved VM/vCPU state.
//! - [`boot`] — Linux boot protocol, MP table, the built-in test guest.
//! - [`abi`] — machine types and the strict check of a network peer.
//! - [`devices`] — virtio-net devices and their peers (TAP, vhost-user, vhost-net).
//! - [`machine`] — a running VM, its run state and operations.
//! - [`run`] — starting a VM: boot, restore or incoming migration.
//! - [`persist`] — snapshots.
//! - [`migration`] — live migration, source and destination.
//! - [`planning`] — host capability reports and the planner.
//! - [`api`] — the QMP-style management API.
//! - [`cli`] — the `godwit` command's subcommands.
//! - [`seccomp`] — the system-call filter of each thread.
//! - [`signals`] — SIGTERM / SIGINT and the files removed on them.

pub mod abi;
pub mod api;
pub mod boot;
pub mod cli;
pub mod config;
pub mod devices;
pub mod machine;
pub mod migration;
pub mod persist;
pub mod planning;
pub mod run;
pub mod seccomp;
pub mod signals;
pub mod vstate;
