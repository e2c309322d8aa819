//! Debian's own cloud kernel (linux-image-cloud-amd64, which has no MP-table
//! support and finds virtio-mmio devices only through ACPI) under godwit,
//! without `acpi=off`. resources/install-deps.sh puts it in
//! $GODWIT_CACHE/debian-cloud-kernel (default /var/cache/godwit).
//!
//! Where KVM emulates guest code (no vmx/svm), the kernel gets through its
//! ACPI and CPU discovery and stops at the `int3` self-test of its
//! alternatives code, which the emulator cannot run: the first test reads
//! the console up to there. With hardware KVM the second test boots it to an
//! initramfs whose /init loads virtio_mmio and virtio_net and finds the NIC.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use godwit_tests::netns::NetHost;
use godwit_tests::{run_godwit, run_godwit_in, TempDir};

/// The kernel reaches these lines in ~10 s of emulation and stops after
/// ~80 s (200 s on a loaded 2-core machine); the deadline leaves room.
const EMULATED_TIMEOUT: &str = "480s";
const EMULATED_DEADLINE: Duration = Duration::from_secs(540);
const HARDWARE_DEADLINE: Duration = Duration::from_secs(120);

use godwit_tests::host_support::{hardware_virtualisation, not_run};
use godwit_tests::linux_guest::kernel_dir;

fn acpi_problems(console: &str) -> Vec<&str> {
    console
        .lines()
        .filter(|l| {
            let lower = l.to_ascii_lowercase();
            lower.contains("acpi")
                && ["error", "bug", "fail", "warning", "not found"]
                    .iter()
                    .any(|w| lower.contains(w))
        })
        .collect()
}

#[test]
fn debian_cloud_kernel_finds_its_cpus_and_apics_through_acpi() {
    let vmlinux = kernel_dir().join("vmlinux").display().to_string();
    let out = run_godwit(
        &[
            "run",
            "--kernel",
            &vmlinux,
            "--vcpus",
            "2",
            "--memory",
            "512M",
            "--timeout",
            EMULATED_TIMEOUT,
            "--cmdline",
            // clearcpuid hides CX16 and XSAVE, which the emulator lacks.
            "console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=1 pci=off clearcpuid=141,154",
        ],
        EMULATED_DEADLINE,
    );
    let console = &out.stdout;
    for want in [
        "ACPI: RSDP 0x00000000000E0000 000024 (v02 GODWIT)",
        "ACPI: XSDT 0x",
        "ACPI: FACP 0x",
        "ACPI: DSDT 0x",
        "ACPI: APIC 0x",
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        "smpboot: Allowing 2 CPUs",
    ] {
        assert!(console.contains(want), "no '{want}': {out:?}");
    }
    assert!(
        !console.contains("APIC: switched to apic NOOP"),
        "the kernel found no local APIC: {out:?}"
    );
    let problems = acpi_problems(console);
    assert!(problems.is_empty(), "ACPI problems {problems:?}: {out:?}");
    match out.code() {
        // Emulated: the alternatives self-test's int3.
        Some(3) => assert!(out.stderr.contains("could not emulate"), "{out:?}"),
        // Hardware KVM: no root filesystem, panic=1 resets through the i8042.
        Some(0) => assert!(console.contains("Kernel panic"), "{out:?}"),
        _ => panic!("unexpected end: {out:?}"),
    }
}

/// /init: mounts devtmpfs and sysfs, loads the virtio-mmio and virtio-net
/// modules, lists the network interfaces and reboots (godwit exits 0).
const INIT_C: &str = r#"
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

static const char *mods[] = {"virtio_ring", "virtio", "virtio_mmio", "failover",
                             "net_failover", "virtio_net"};

int main(void)
{
	mkdir("/dev", 0755);
	mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
	int con = open("/dev/console", O_WRONLY);
	if (con >= 0) { dup2(con, 1); dup2(con, 2); }
	mkdir("/sys", 0755);
	mount("sysfs", "/sys", "sysfs", 0, NULL);
	for (unsigned i = 0; i < sizeof(mods) / sizeof(mods[0]); i++) {
		char path[64];
		snprintf(path, sizeof(path), "/%s.ko", mods[i]);
		int fd = open(path, O_RDONLY);
		long rc = fd < 0 ? -1 : syscall(SYS_finit_module, fd, "", 0);
		printf("godwit-initramfs: %s %s\n", rc == 0 ? "loaded" : "failed to load", mods[i]);
	}
	usleep(500000);
	DIR *d = opendir("/sys/class/net");
	struct dirent *e;
	while (d && (e = readdir(d)))
		if (e->d_name[0] != '.' && strcmp(e->d_name, "lo") != 0)
			printf("godwit-initramfs: net %s\n", e->d_name);
	printf("godwit-initramfs: done\n");
	fflush(stdout);
	sync();
	reboot(RB_AUTOBOOT);
	return 0;
}
"#;

const MODULES: [&str; 6] = [
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_mmio.ko",
    "kernel/net/core/failover.ko",
    "kernel/drivers/net/net_failover.ko",
    "kernel/drivers/net/virtio_net.ko",
];

/// One file of a `newc` cpio archive, as the kernel unpacks an initramfs.
fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
    let name_z = format!("{name}\0");
    write!(
        out,
        "070701{ino:08X}{mode:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
        0, 0, 1, 0, data.len(), 0, 0, 0, 0, name_z.len(), 0
    )
    .unwrap();
    out.extend_from_slice(name_z.as_bytes());
    out.resize(out.len().next_multiple_of(4), 0);
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(4), 0);
}

fn build_initramfs(dir: &Path, modules_dir: &Path) -> PathBuf {
    let src = dir.join("init.c");
    std::fs::write(&src, INIT_C).unwrap();
    let init = dir.join("init");
    let cc = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&init)
        .arg(&src)
        .output()
        .expect("run gcc");
    assert!(
        cc.status.success(),
        "building /init: {}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let mut cpio = Vec::new();
    cpio_entry(
        &mut cpio,
        1,
        "init",
        0o100755,
        &std::fs::read(&init).unwrap(),
    );
    for (i, module) in MODULES.iter().enumerate() {
        let path = modules_dir.join(module);
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        cpio_entry(&mut cpio, 2 + i as u32, &name, 0o100644, &data);
    }
    cpio_entry(&mut cpio, 0, "TRAILER!!!", 0, &[]);
    let image = dir.join("initramfs.cpio");
    std::fs::write(&image, cpio).unwrap();
    image
}

#[test]
fn debian_cloud_kernel_boots_to_its_initramfs_and_finds_the_nic_with_hardware_kvm() {
    if !hardware_virtualisation() {
        not_run(
            "debian_cloud_kernel_boots_to_its_initramfs_and_finds_the_nic_with_hardware_kvm",
            "this CPU has no vmx/svm flag, so KVM emulates guest code and the kernel stops at its int3 self-test (the test above covers ACPI up to there)",
        );
        return;
    }
    let kdir = kernel_dir();
    let modules_dir = std::fs::read_dir(kdir.join("root/lib/modules"))
        .expect("the kernel's modules")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .next()
        .expect("a modules directory");
    let tmp = TempDir::new("linux-initramfs");
    let initrd = build_initramfs(tmp.path(), &modules_dir);
    let host = NetHost::new(true, 91);
    let net = host.tap_net("");
    let bzimage = kdir.join("bzImage").display().to_string();
    let initrd = initrd.display().to_string();
    let out = run_godwit_in(
        Some(&host.ns),
        &[
            "run",
            "--kernel",
            &bzimage,
            "--initrd",
            &initrd,
            "--vcpus",
            "2",
            "--memory",
            "512M",
            "--net",
            &net,
            "--timeout",
            "90s",
            "--cmdline",
            "console=ttyS0 reboot=k panic=1 pci=off",
        ],
        HARDWARE_DEADLINE,
    );
    let console = &out.stdout;
    assert_eq!(out.code(), Some(0), "{out:?}");
    for want in [
        "smpboot: Allowing 2 CPUs",
        "Run /init as init process",
        "godwit-initramfs: loaded virtio_mmio",
        "godwit-initramfs: loaded virtio_net",
        "godwit-initramfs: net eth0",
        "godwit-initramfs: done",
    ] {
        assert!(console.contains(want), "no '{want}': {out:?}");
    }
    let problems = acpi_problems(console);
    assert!(problems.is_empty(), "ACPI problems {problems:?}: {out:?}");
}
