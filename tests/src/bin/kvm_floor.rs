//! `godwit-kvm-floor`: the least a KVM VMM must do before its first guest
//! instruction, as the floor of the boot benchmark (`godwit-bench boot`).
//!
//! It opens /dev/kvm, creates a VM, backs `--memory MIB` of guest RAM with
//! a memfd mapped shared (as godwit does) and registers it as one memory
//! slot, creates the in-kernel irqchip and one vCPU, points the vCPU at two
//! bytes of real-mode code (`out 0xf4, al`), logs `vCPUs released` on stderr
//! (the line the benchmark times, at the same point godwit logs it: right
//! before the first KVM_RUN) and enters KVM_RUN once. It exits 0 when the
//! guest's port write comes back as a KVM_EXIT_IO.
//!
//! Nothing else: no CPUID set-up, no PIT, no devices, no threads.

use std::io::Write;
use std::process::ExitCode;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};

/// Guest-physical address of the code.
const CODE_ADDR: u64 = 0x1000;
/// `mov al, 0` ; `out 0xf4, al`.
const CODE: [u8; 4] = [0xb0, 0x00, 0xe6, 0xf4];

fn run(mib: u64) -> Result<(), String> {
    let size = mib << 20;
    let kvm = Kvm::new().map_err(|e| format!("open /dev/kvm: {e}"))?;
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    // SAFETY: memfd_create takes a NUL-terminated name and flags; the
    // returned fd (checked below) is owned by this process.
    let fd = unsafe { libc::memfd_create(c"kvm-floor".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fd is the memfd just created.
    if unsafe { libc::ftruncate(fd, size as libc::off_t) } != 0 {
        return Err(format!("ftruncate: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a new shared mapping of the memfd, `size` bytes long; nothing
    // else maps that range.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
            fd,
            0,
        )
    };
    if host == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: CODE_ADDR + CODE.len() is inside the mapping of `size` bytes
    // (at least 1 MiB), which this process owns.
    unsafe {
        std::ptr::copy_nonoverlapping(
            CODE.as_ptr(),
            host.cast::<u8>().add(CODE_ADDR as usize),
            CODE.len(),
        );
    }
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: size,
        userspace_addr: host as u64,
    };
    // SAFETY: the mapping lives until the process exits, after the VM.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
    vm.create_irq_chip()
        .map_err(|e| format!("KVM_CREATE_IRQCHIP: {e}"))?;
    let mut vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    let mut regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    regs.rip = CODE_ADDR;
    regs.rflags = 2;
    vcpu.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
    let _ = writeln!(std::io::stderr(), "vCPUs released");
    match vcpu.run().map_err(|e| format!("KVM_RUN: {e}"))? {
        VcpuExit::IoOut(0xf4, _) => Ok(()),
        other => Err(format!("unexpected exit {other:?}")),
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut mib = 128;
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--memory", Some(v)) => match v.trim_end_matches(['M', 'm']).parse() {
                Ok(m) if m >= 1 => mib = m,
                _ => {
                    eprintln!("--memory takes a size in MiB, e.g. 128M");
                    return ExitCode::from(2);
                }
            },
            _ => {
                eprintln!("usage: godwit-kvm-floor [--memory MIB]");
                return ExitCode::from(2);
            }
        }
    }
    match run(mib) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("godwit-kvm-floor: {e}");
            ExitCode::FAILURE
        }
    }
}
