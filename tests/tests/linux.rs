//! Boots a real Linux bzImage with hardware KVM: Debian's cloud kernel as
//! resources/install-deps.sh unpacked it, or the kernel GODWIT_LINUX_KERNEL
//! names (bzImage or vmlinux).
//!
//! KVM on godwit's development machines emulates every guest instruction and
//! rejects SSE/xsave, so a stock kernel cannot boot there in useful time:
//! there the test says why it did not run (tests/linux_acpi.rs follows the
//! same kernel as far as the emulator takes it).

use std::path::PathBuf;
use std::time::Duration;

use godwit_tests::host_support::{hardware_virtualisation, not_run};
use godwit_tests::linux_guest::DebianKernel;
use godwit_tests::run_godwit;

#[test]
fn boots_a_real_linux_kernel_with_hardware_kvm() {
    if !hardware_virtualisation() {
        not_run(
            "boots_a_real_linux_kernel_with_hardware_kvm",
            "this CPU has no vmx/svm flag, so KVM emulates guest code and a stock kernel cannot boot in useful time",
        );
        return;
    }
    let kernel = std::env::var_os("GODWIT_LINUX_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| DebianKernel::from_cache().vmlinuz);
    let kernel = kernel.to_string_lossy().into_owned();
    // panic=-1 reboots at once on panic (through the i8042 with reboot=k),
    // so a kernel without a root filesystem ends the run by itself.
    let out = run_godwit(
        &[
            "run",
            "--kernel",
            &kernel,
            "--vcpus",
            "2",
            "--memory",
            "512M",
            "--cmdline",
            "console=ttyS0 reboot=k panic=-1 pci=off",
        ],
        Duration::from_secs(120),
    );
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("Linux version"), "{out:?}");
    assert!(
        out.stdout.contains("smp: Brought up 1 node, 2 CPUs"),
        "the kernel should find both vCPUs through ACPI's MADT: {out:?}"
    );
}
