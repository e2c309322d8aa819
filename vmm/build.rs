//! Builds the in-tree test guest (resources/guest) with gcc + make into
//! $OUT_DIR/godwit-test-guest.elf, which src/test_guest.rs embeds with
//! `include_bytes!`.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const GUEST_ELF: &str = "godwit-test-guest.elf";

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let guest_dir = manifest_dir.join("../resources/guest");
    let guest_dir = guest_dir.canonicalize().unwrap_or_else(|e| {
        panic!(
            "test guest sources not found at {}: {e}",
            guest_dir.display()
        )
    });

    // Rebuild when any guest source changes (or files are added/removed).
    println!("cargo:rerun-if-changed={}", guest_dir.display());
    rerun_for_files(&guest_dir);
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=GODWIT_GUEST_CC");
    println!("cargo:rerun-if-env-changed=MAKE");

    let make = env::var("MAKE").unwrap_or_else(|_| "make".to_string());
    let mut cmd = Command::new(&make);
    cmd.arg("-C")
        .arg(&guest_dir)
        .arg(format!("O={}", out_dir.display()));
    if let Ok(cc) = env::var("GODWIT_GUEST_CC") {
        cmd.arg(format!("GUEST_CC={cc}"));
    }
    // Share cargo's jobserver instead of whatever MAKEFLAGS the caller had.
    cmd.env_remove("MAKEFLAGS").env_remove("MFLAGS");
    if let Ok(flags) = env::var("CARGO_MAKEFLAGS") {
        cmd.env("MAKEFLAGS", flags);
    }

    let output = cmd.output().unwrap_or_else(|e| {
        panic!(
            "could not run `{make}` to build the test guest in {}: {e}\n\
             The guest needs GNU make and gcc (Debian: apt-get install build-essential).",
            guest_dir.display()
        )
    });
    if !output.status.success() {
        panic!(
            "building the test guest failed ({}): `{make} -C {} O={}`\n\
             --- stdout ---\n{}\n--- stderr ---\n{}\n\
             The guest needs GNU make and gcc for x86_64 (Debian: apt-get install build-essential); \
             set GODWIT_GUEST_CC to use another compiler.",
            output.status,
            guest_dir.display(),
            out_dir.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
    }

    let built = out_dir.join(GUEST_ELF);
    if !built.is_file() {
        panic!("test guest build did not produce {}", built.display());
    }
}

fn rerun_for_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for path in paths {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') && name != ".gitignore" {
            continue;
        }
        if path.is_dir() {
            if name == "build" {
                continue; // a local `make` without O=
            }
            rerun_for_files(&path);
        } else {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}
