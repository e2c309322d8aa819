//! Boots a real Linux kernel when one is given and the host can run it.
//!
//! KVM on godwit's development machines emulates every guest instruction and
//! rejects SSE/xsave, so a stock kernel cannot boot there in useful time.
//! This test runs when GODWIT_LINUX_KERNEL names a kernel (bzImage or
//! vmlinux) and the CPU has hardware virtualisation (vmx or svm); otherwise
//! it prints why it did not run.

use std::time::Duration;

use godwit_tests::run_godwit;

fn hardware_virtualisation() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}

#[test]
fn boots_a_real_linux_kernel_when_available() {
    let Some(kernel) = std::env::var_os("GODWIT_LINUX_KERNEL") else {
        println!(
            "not run: set GODWIT_LINUX_KERNEL to a bzImage or vmlinux to boot a real Linux kernel"
        );
        return;
    };
    if !hardware_virtualisation() {
        println!(
            "not run: this CPU has no vmx/svm flag, so KVM emulates guest code and a stock kernel cannot boot in useful time"
        );
        return;
    }
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
            "console=ttyS0 reboot=k panic=-1 pci=off acpi=off",
        ],
        Duration::from_secs(120),
    );
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("Linux version"), "{out:?}");
    assert!(
        out.stdout.contains("smp: Brought up 1 node, 2 CPUs"),
        "the kernel should find both vCPUs through the MP table: {out:?}"
    );
}
