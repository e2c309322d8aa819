//! How a VM ends: the events the vCPU threads and the management API send to
//! the VMM's main thread. Kept apart from `vm` and `vcpu` so that both can
//! name them without importing each other.

/// Why the VM ends, sent to the VMM's main thread.
#[derive(Debug)]
pub enum VmEvent {
    /// The guest reset or powered off the machine (i8042, reboot=k).
    GuestReset,
    /// A vCPU stopped on an error the guest cannot recover from.
    VcpuFailed(VcpuExitError),
    /// The management API asked godwit to quit.
    Quit,
    /// The guest now runs on a migration destination.
    Migrated,
    /// The guest wrote this value to the debug-exit port.
    DebugExit(u32),
    /// The guest reported a panic through pvpanic.
    GuestPanicked,
}

#[derive(Debug, thiserror::Error)]
pub enum VcpuExitError {
    #[error("vCPU {vcpu} triple-faulted (KVM_EXIT_SHUTDOWN) at RIP {rip:#x}: the guest kernel crashed during boot or reset without the i8042")]
    TripleFault { vcpu: u8, rip: u64 },
    #[error("vCPU {vcpu}: KVM could not emulate the instruction at RIP {rip:#x} (bytes: {bytes}); on hosts that emulate guest code (nested, PVM) SSE/AVX, cmpxchg16b and xsave fail")]
    EmulationFailure { vcpu: u8, rip: u64, bytes: String },
    #[error("vCPU {vcpu}: KVM internal error, suberror {suberror} at RIP {rip:#x}")]
    InternalError { vcpu: u8, suberror: u32, rip: u64 },
    #[error(
        "vCPU {vcpu}: KVM failed to enter the guest, hardware reason {reason:#x} at RIP {rip:#x}"
    )]
    FailEntry { vcpu: u8, reason: u64, rip: u64 },
    #[error("vCPU {vcpu}: unexpected KVM exit {exit} at RIP {rip:#x}")]
    Unexpected { vcpu: u8, exit: String, rip: u64 },
    #[error("vCPU {vcpu}: KVM_RUN failed: {source}")]
    Run { vcpu: u8, source: kvm_ioctls::Error },
    #[error("vCPU {vcpu}: the vCPU thread failed: {message}")]
    ThreadPanicked { vcpu: u8, message: String },
}
