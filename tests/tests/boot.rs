//! Boots the built-in test guest on real KVM and checks its serial report and
//! godwit's exit status; checks that bad input gets one clear line.

use std::time::Duration;

use godwit_tests::{run_godwit, TempDir};

const DEADLINE: Duration = Duration::from_secs(60);

fn boot(vcpus: u32, memory: &str) -> godwit_tests::Finished {
    let v = vcpus.to_string();
    run_godwit(
        &[
            "run", "--vcpus", &v, "--memory", memory, "--serial", "stdio",
        ],
        DEADLINE,
    )
}

fn assert_clean_report(out: &godwit_tests::Finished, vcpus: u32) {
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.has_line("godwit-test-guest: booting"), "{out:?}");
    assert!(
        out.has_line("zero-page: boot_flag=0xaa55 header=HdrS ok"),
        "{out:?}"
    );
    assert!(out.has_line(&format!("mptable: {vcpus} cpus")), "{out:?}");
    assert!(out.has_line("cpu 0: bsp apic_id=0"), "{out:?}");
    for cpu in 1..vcpus {
        assert!(
            out.stdout
                .lines()
                .any(|l| l.ends_with(&format!("online apic_id={cpu}"))),
            "vCPU {cpu} did not report: {out:?}"
        );
    }
    assert!(
        out.has_line(&format!("smp: {vcpus} of {vcpus} cpus online")),
        "{out:?}"
    );
    assert!(out.has_line("godwit-test-guest: checks passed"), "{out:?}");
    assert!(!out.stdout.contains("check failed"), "{out:?}");
    assert!(out.has_line("godwit-test-guest: poweroff"), "{out:?}");
}

#[test]
fn boots_test_guest_with_one_vcpu() {
    let out = boot(1, "128M");
    assert_clean_report(&out, 1);
    let cmdline = out
        .stdout
        .lines()
        .find(|l| l.starts_with("cmdline: "))
        .expect("cmdline line");
    assert!(
        cmdline.contains("console=ttyS0") && cmdline.contains("reboot=k"),
        "{cmdline}"
    );
    // 128 MiB less the EBDA and BIOS area hole below 1 MiB.
    assert!(out.has_line("e820: usable 130687 KiB"), "{out:?}");
}

#[test]
fn boots_test_guest_with_two_vcpus() {
    assert_clean_report(&boot(2, "128M"), 2);
}

#[test]
fn boots_test_guest_with_four_vcpus_and_memory_above_4g() {
    let out = boot(4, "5G");
    assert_clean_report(&out, 4);
    assert!(
        out.has_line("e820: [0x100000-0xc0000000) usable"),
        "{out:?}"
    );
    assert!(
        out.has_line("e820: [0x100000000-0x180000000) usable"),
        "{out:?}"
    );
}

#[test]
fn command_line_reaches_the_guest() {
    let out = run_godwit(
        &[
            "run",
            "--cmdline",
            "console=ttyS0 reboot=k godwit.marker=42",
        ],
        DEADLINE,
    );
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(
        out.has_line("cmdline: console=ttyS0 reboot=k godwit.marker=42"),
        "{out:?}"
    );
}

#[test]
fn serial_to_file_and_null() {
    let dir = TempDir::new("serial");
    let path = dir.join("console.log");
    let spec = format!("file:{}", path.display());
    let out = run_godwit(&["run", "--serial", &spec], DEADLINE);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let log = std::fs::read_to_string(&path).expect("console log");
    assert!(log.contains("godwit-test-guest: checks passed"), "{log}");

    let out = run_godwit(&["run", "--serial", "null"], DEADLINE);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
}

#[test]
fn boots_the_same_guest_from_a_kernel_file() {
    let dir = TempDir::new("kernel");
    let path = dir.join("guest.elf");
    std::fs::write(&path, godwit_vmm::boot::test_guest::TEST_GUEST_ELF).unwrap();
    let out = run_godwit(
        &["run", "--kernel", path.to_str().unwrap(), "--vcpus", "2"],
        DEADLINE,
    );
    assert_clean_report(&out, 2);
}

/// Each bad input: non-zero status, one `godwit: error:` line naming the
/// problem, no panic or backtrace.
fn assert_refused(args: &[&str], code: i32, needle: &str) {
    let out = run_godwit(args, DEADLINE);
    assert_eq!(out.code(), Some(code), "{args:?}: {out:?}");
    assert!(
        out.stderr.contains(needle),
        "{args:?}: expected {needle:?} in {out:?}"
    );
    assert!(!out.stderr.contains("panicked"), "{out:?}");
    assert!(!out.stderr.contains("RUST_BACKTRACE"), "{out:?}");
    assert!(out.stdout.is_empty(), "no guest output expected: {out:?}");
}

#[test]
fn bad_input_is_refused_with_one_clear_line() {
    let dir = TempDir::new("bad");
    let junk = dir.join("junk");
    std::fs::write(&junk, b"this is not a kernel").unwrap();
    let junk = junk.to_str().unwrap();
    let huge = dir.join("huge.elf");
    std::fs::write(&huge, godwit_vmm::boot::test_guest::TEST_GUEST_ELF).unwrap();

    assert_refused(
        &["run", "--vcpus", "0"],
        1,
        "--vcpus 0: a VM needs at least one vCPU",
    );
    assert_refused(
        &["run", "--vcpus", "255"],
        1,
        "--vcpus 255 is more than 254",
    );
    assert_refused(
        &["run", "--vcpus", "many"],
        2,
        "invalid value 'many' for '--vcpus",
    );
    assert_refused(&["run", "--memory", "12X"], 2, "invalid size '12X'");
    assert_refused(&["run", "--memory", "1.5G"], 2, "invalid size '1.5G'");
    assert_refused(&["run", "--memory", "1M"], 1, "too small");
    assert_refused(&["run", "--memory", "100T"], 1, "more than this host has");
    assert_refused(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        1,
        "cannot open kernel /nonexistent/vmlinux",
    );
    assert_refused(&["run", "--kernel", junk], 1, "is not a Linux kernel");
    assert_refused(&["run", "--kernel", "/"], 1, "not a Linux kernel");
    assert_refused(
        &["run", "--initrd", "/nonexistent/initrd"],
        1,
        "cannot read initrd /nonexistent/initrd",
    );
    assert_refused(
        &["run", "--serial", "tcp:1234"],
        2,
        "invalid serial 'tcp:1234'",
    );
    assert_refused(
        &["run", "--serial", "file:/nonexistent/dir/log"],
        1,
        "cannot open serial output file",
    );
    let long = "x".repeat(5000);
    assert_refused(
        &["run", "--cmdline", &long],
        1,
        "kernel command line is 5000 bytes",
    );
    assert_refused(
        &["run", "--frobnicate"],
        2,
        "unexpected argument '--frobnicate'",
    );
}

#[test]
fn missing_kvm_is_explained() {
    // In a private mount namespace, an empty /dev hides /dev/kvm: the message
    // a user without KVM sees, without touching the host.
    let bin = godwit_tests::godwit_bin();
    let script = format!("mount -t tmpfs none /dev && exec {} run", bin.display());
    let out = std::process::Command::new("unshare")
        .args(["--mount", "sh", "-c", &script])
        .output()
        .expect("unshare (util-linux) runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("/dev/kvm does not exist"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_broken_stderr_does_not_stop_the_vm() {
    // Logging from a vCPU thread into a full stderr once killed that thread
    // and left godwit waiting forever.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let child = std::process::Command::new(godwit_tests::godwit_bin())
        .args(["run", "--serial", "null"])
        .env("GODWIT_LOG", "debug")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(full)
        .spawn()
        .expect("spawn godwit");
    let out = godwit_tests::wait_with_deadline(child, DEADLINE);
    assert_eq!(out.code(), Some(0), "{out:?}");
}
