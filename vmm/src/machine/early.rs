//! KVM's part of a start, on a thread of its own from the moment the
//! command line is checked.
//!
//! Opening /dev/kvm, KVM_CREATE_VM and, for a boot, registering guest RAM
//! and creating the irqchip take about a millisecond here, most of it in
//! the kernel. Meanwhile the main thread starts the signal thread and
//! installs its system-call filter (0.3 ms of kernel time on its own), so a
//! start no longer does the two one after the other. The thread works only
//! from the command line and reads no snapshot, stream or peer, so it runs
//! without a filter, like the allocator priming it also does
//! (`seccomp::PrimeWhenDropped`); [`Early::join`] waits until it has ended,
//! and every start joins it before it reads any such input: no unconfined
//! thread is alive by then. It is started after the termination signals
//! were blocked, so it never takes one.

use std::thread::JoinHandle;

use super::BuildError;
use crate::seccomp;
use crate::vstate::memory::GuestRam;
use crate::vstate::vm::{self, Vm, VmError};

type Job<T> = Box<dyn FnOnce() -> Result<T, BuildError> + Send>;

/// Work started early; [`Early::join`] returns its outcome.
pub struct Early<T> {
    state: State<T>,
}

enum State<T> {
    Running(JoinHandle<Result<T, BuildError>>),
    /// No thread could be started: the work happens at `join`.
    Deferred(Job<T>),
}

impl<T: Send + 'static> Early<T> {
    /// `job` is cloned into the thread, so that it is still at hand when no
    /// thread can be started.
    fn start<F>(job: F) -> Self
    where
        F: FnOnce() -> Result<T, BuildError> + Clone + Send + 'static,
    {
        let thread_job = job.clone();
        let state = match std::thread::Builder::new()
            .name("vm-create".into())
            .spawn(move || {
                // The first thread started, so it primes the allocator too
                // (saving a thread of its own for that), once its job is done
                // or while it unwinds from a panic.
                let _prime = seccomp::PrimeWhenDropped;
                thread_job()
            }) {
            Ok(handle) => State::Running(handle),
            Err(e) => {
                tracing::debug!("no thread for creating the VM ({e}): it is created in turn");
                seccomp::prime_allocator_on_a_thread();
                State::Deferred(Box::new(job))
            }
        };
        Early { state }
    }

    /// Waits for the work, and for its thread to end, and returns what it
    /// made.
    pub fn join(self) -> Result<T, BuildError> {
        match self.state {
            State::Running(handle) => handle
                .join()
                .map_err(|_| BuildError::from(VmError::CreatorPanicked))?,
            State::Deferred(job) => job(),
        }
    }
}

/// A boot's VM, ready for its vCPUs: guest RAM of `memory` bytes
/// registered, the in-kernel irqchip and PIT made (in that order: see
/// [`Vm::map_memory_and_create_irqchip`]), and KVM's supported CPUID read.
/// All of it on one thread: a second one found no free core sooner.
/// `vcpus` is checked against KVM's limit first (and returned as checked),
/// as a boot reports it before the memory size.
pub fn boot_vm(memory: u64, vcpus: u32) -> Early<(Vm, GuestRam, u8)> {
    Early::start(move || {
        let kvm = vm::open_kvm()?;
        let num_vcpus = vm::check_vcpus(&kvm, vcpus)?;
        let vm = Vm::create(kvm)?;
        let ram = GuestRam::new(memory)?;
        vm.map_memory_and_create_irqchip(&ram.memory)?;
        vm.supported_cpuid()?;
        vm.create_pit()?;
        Ok((vm, ram, num_vcpus))
    })
}

/// The VM alone, for a start whose guest memory comes from its input, with
/// the KVM capabilities restoring its state will ask for; with `cpuid`,
/// KVM's supported CPUID is read too (an incoming migration has the time
/// while it waits for its source).
pub fn bare_vm(cpuid: bool) -> Early<Vm> {
    Early::start(move || {
        let vm = vm::open_kvm().and_then(Vm::create)?;
        // A failure here is reported where the capabilities are needed.
        let _ = vm.kvm_caps();
        if cpuid {
            vm.supported_cpuid()?;
        }
        Ok(vm)
    })
}
