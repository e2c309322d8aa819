//! What godwit reports when KVM cannot emulate a guest instruction: the
//! bytes at RIP, so that a user can tell which instruction it was.

use std::time::Duration;

#[test]
fn an_emulation_failure_reports_the_bytes_at_rip() {
    // godwit.crash=sse executes `movd %eax,%xmm0` (66 0f 6e c0), which
    // KVM's emulator cannot run.
    let out = godwit_tests::run_godwit(
        &[
            "run",
            "--cmdline",
            "console=ttyS0 reboot=k godwit.crash=sse",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(out.code(), Some(3), "{out:?}");
    assert!(out.stderr.contains("(bytes: 66 0f 6e c0"), "{out:?}");
}
