//! Every ACPI table godwit builds passes through iasl (Debian's
//! acpica-tools): each table but the RSDP disassembles without an error,
//! and the RSDP equals what iasl compiles from the same fields (iasl
//! 20200925 cannot disassemble an RSDP from a binary file, not even one it
//! compiled itself).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use godwit_tests::{run_godwit, TempDir};

const TABLES: [&str; 4] = ["dsdt", "facp", "apic", "xsdt"];

fn iasl(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new("iasl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run iasl ({e}): install acpica-tools (resources/install-deps.sh)")
        })
}

fn dump(dir: &Path, vcpus: u8, nets: usize) {
    let out = run_godwit(
        &[
            "acpi-dump",
            &dir.display().to_string(),
            "--vcpus",
            &vcpus.to_string(),
            "--nets",
            &nets.to_string(),
        ],
        Duration::from_secs(30),
    );
    assert_eq!(out.code(), Some(0), "{out:?}");
}

fn assert_rsdp_is_what_iasl_compiles(dir: &Path) {
    let rsdp = std::fs::read(dir.join("rsdp.dat")).unwrap();
    assert_eq!(rsdp.len(), 36);
    let field = |range: std::ops::Range<usize>| {
        let mut b = [0u8; 8];
        b[..range.len()].copy_from_slice(&rsdp[range]);
        u64::from_le_bytes(b)
    };
    let source = format!(
        "[0008]                          Signature : \"RSD PTR \"\n\
         [0001]                           Checksum : 00\n\
         [0006]                             Oem ID : \"{}\"\n\
         [0001]                           Revision : {:02X}\n\
         [0004]                       RSDT Address : {:08X}\n\
         [0004]                             Length : {:08X}\n\
         [0008]                       XSDT Address : {:016X}\n\
         [0001]                  Extended Checksum : 00\n\
         [0003]                           Reserved : 000000\n",
        String::from_utf8_lossy(&rsdp[9..15]),
        rsdp[15],
        field(16..20),
        field(20..24),
        field(24..32),
    );
    std::fs::write(dir.join("ref.asl"), source).unwrap();
    let out = iasl(dir, &["ref.asl"]);
    assert!(
        out.status.success(),
        "iasl refused the RSDP's fields: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let compiled = std::fs::read(dir.join("ref.aml")).unwrap();
    assert_eq!(
        compiled, rsdp,
        "iasl computes other bytes (checksums) for the RSDP"
    );
}

#[test]
fn iasl_disassembles_every_table_without_errors() {
    for (vcpus, nets) in [(1u8, 0usize), (2, 1), (8, 3), (254, 19)] {
        let dir = TempDir::new("acpi");
        dump(dir.path(), vcpus, nets);
        for table in TABLES {
            let out = iasl(dir.path(), &["-d", &format!("{table}.dat")]);
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.status.success(),
                "{table} ({vcpus} vCPUs, {nets} NICs): {text}"
            );
            let dsl = std::fs::read_to_string(dir.join(&format!("{table}.dsl")))
                .unwrap_or_else(|e| panic!("{table}: no disassembly ({e}): {text}"));
            for bad in ["Error", "Warning", "**** ", "Invalid"] {
                assert!(
                    !text.contains(bad) && !dsl.contains(bad),
                    "{table} ({vcpus} vCPUs, {nets} NICs): iasl says {bad}: {text}\n{dsl}"
                );
            }
            if table == "apic" {
                let lapics = dsl.matches("[Processor Local APIC]").count();
                assert_eq!(lapics, usize::from(vcpus), "{dsl}");
                assert!(dsl.contains("[I/O APIC]"), "{dsl}");
                assert!(dsl.contains("[Interrupt Source Override]"), "{dsl}");
            }
            if table == "dsdt" {
                assert_eq!(dsl.matches("\"LNRO0005\"").count(), nets, "{dsl}");
                assert!(dsl.contains("\"QEMU0001\""), "{dsl}");
                assert!(dsl.contains("EisaId (\"PNP0501\")"), "{dsl}");
                for i in 0..nets {
                    let base = format!("0x{:08X}", 0xd000_0000u64 + i as u64 * 0x1000);
                    assert!(dsl.contains(&base), "device {i} window {base}: {dsl}");
                }
            }
            if table == "facp" {
                assert!(
                    dsl.contains("Hardware Reduced (V5) : 1"),
                    "the FADT should be hardware-reduced: {dsl}"
                );
            }
        }
        assert_rsdp_is_what_iasl_compiles(dir.path());
    }
}

#[test]
fn acpi_dump_refuses_impossible_machines() {
    let dir = TempDir::new("acpi-bad");
    let d = dir.path().display().to_string();
    for (vcpus, nets) in [("0", "0"), ("1", "20")] {
        let out = run_godwit(
            &["acpi-dump", &d, "--vcpus", vcpus, "--nets", nets],
            Duration::from_secs(30),
        );
        assert_eq!(out.code(), Some(1), "{out:?}");
        assert!(out.stderr.contains("godwit acpi-dump: error:"), "{out:?}");
    }
}
