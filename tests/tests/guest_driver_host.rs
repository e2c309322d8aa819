//! The test guest's virtio-net driver and network stack, compiled for the
//! host under ASan/UBSan against a fake virtio device (resources/guest/
//! hosttest): misbehaving devices, announce, needs-reset, event index, the
//! UDP burst. Emulated KVM makes these cases slow or impossible to provoke
//! in a real guest.

use std::process::Command;

#[test]
fn guest_driver_scenarios_pass_under_sanitizers() {
    let out_dir = godwit_tests::TempDir::new("hosttest");
    let guest = godwit_tests::resources_dir().join("guest");
    let out = Command::new("make")
        .args(["-s", "-C"])
        .arg(&guest)
        .arg(format!("O={}", out_dir.path().display()))
        .arg("hosttest")
        .output()
        .expect("run make (install make and gcc)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "host scenarios failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("0 scenario(s) failed"),
        "{stdout}\n{stderr}"
    );
}
