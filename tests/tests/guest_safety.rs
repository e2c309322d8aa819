//! The embedded test guest must run under KVM's instruction emulator, which
//! cannot execute SSE/AVX/MMX/x87 instructions, `cmpxchg16b` or the
//! `xsave`/`fxsave` family (see resources/guest/README.md). Disassemble the
//! guest actually embedded in godwit (`godwit_vmm::boot::test_guest::TEST_GUEST_ELF`)
//! and fail on any such instruction, listing every offending line. The one
//! exception is the deliberate crash of `godwit.crash=sse`, excused by symbol
//! name (`DELIBERATE_SSE_SYMBOL`) and instruction.

use std::path::Path;
use std::process::Command;

use godwit_tests::TempDir;
use godwit_vmm::boot::test_guest::TEST_GUEST_ELF;

/// The one deliberate exception: `godwit.crash=sse` makes the guest execute a
/// single SSE instruction so that godwit's tests can check how an emulation
/// failure is reported (resources/guest/crash_insn.S). It is allowed only in
/// this function, only this instruction, and exactly once; the guest never
/// calls it unless asked to crash.
const DELIBERATE_SSE_SYMBOL: &str = "crash_sse_movd_xmm0";
const DELIBERATE_SSE_INSN: &str = "movd %eax,%xmm0";

/// Mnemonics (after prefixes) the emulator cannot run, exact match.
const BAD_MNEMONICS: &[&str] = &[
    "cmpxchg16b",
    // MXCSR / MMX state
    "ldmxcsr",
    "stmxcsr",
    "vldmxcsr",
    "vstmxcsr",
    "emms",
    "femms",
    // SSE/SSE2 instructions that use no vector register
    "lfence",
    "mfence",
    "sfence",
    "movnti",
    "maskmovq",
    "clflushopt",
    // SSE4.2 / ABM / BMI: not in the emulator (lzcnt/tzcnt would even run as bsr/bsf)
    "crc32b",
    "crc32w",
    "crc32l",
    "crc32q",
    "popcnt",
    "lzcnt",
    "tzcnt",
    // VEX-encoded general-register instructions (BMI1/BMI2): the emulator decodes no VEX
    "andn",
    "bextr",
    "blsi",
    "blsmsk",
    "blsr",
    "bzhi",
    "mulx",
    "pdep",
    "pext",
    "rorx",
    "sarx",
    "shlx",
    "shrx",
];

/// Mnemonic prefixes that are never emulator-safe.
const BAD_MNEMONIC_PREFIXES: &[&str] = &[
    "xsave", "xrstor", "fxsave", "fxrstor", "prefetch", "vzero", "aes", "sha1", "sha256", "pclmul",
];

/// Instruction prefixes objdump prints before the mnemonic.
const PREFIXES: &[&str] = &[
    "lock", "rep", "repz", "repe", "repnz", "repne", "data16", "data32", "addr16", "addr32", "cs",
    "ds", "es", "ss", "fs", "gs", "notrack", "bnd", "xacquire", "xrelease", "rex", "rex.w",
    "rex.r", "rex.x", "rex.b", "{vex}", "{vex3}", "{evex}",
];

/// Why `insn` (objdump's instruction text, no address or bytes) is unsafe, if it is.
fn unsafe_reason(insn: &str) -> Option<&'static str> {
    let insn = insn.trim();
    if insn.starts_with("(bad)") {
        return Some("undecodable bytes in executable code");
    }
    let mut words = insn.split_whitespace().peekable();
    while let Some(w) = words.peek() {
        if PREFIXES.contains(w) || w.starts_with("rex.") {
            words.next();
        } else {
            break;
        }
    }
    let mnemonic = words.next().unwrap_or("");
    let operands: String = words.collect::<Vec<_>>().join(" ");
    let operands = operands.split('#').next().unwrap_or(""); // drop "# 0x..." comments

    if operands.contains("%xmm") || operands.contains("%ymm") || operands.contains("%zmm") {
        return Some("uses an SSE/AVX vector register");
    }
    if operands.contains("%mm") {
        return Some("uses an MMX register");
    }
    if operands.contains("%st") {
        return Some("uses an x87 register");
    }
    if has_mask_register(operands) {
        return Some("uses an AVX-512 mask register");
    }
    if mnemonic == "(bad)" {
        return Some("undecodable bytes in executable code");
    }
    if BAD_MNEMONICS.contains(&mnemonic) {
        return Some("instruction the KVM emulator cannot execute");
    }
    if BAD_MNEMONIC_PREFIXES
        .iter()
        .any(|p| mnemonic.starts_with(p))
    {
        return Some("instruction the KVM emulator cannot execute");
    }
    if mnemonic.starts_with('f') {
        return Some("x87 instruction"); // the rest of the f* mnemonics are all x87
    }
    None
}

fn has_mask_register(operands: &str) -> bool {
    operands.match_indices("%k").any(|(i, _)| {
        operands[i + 2..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

fn objdump(args: &[&str], file: &Path) -> String {
    let out = match Command::new("objdump").args(args).arg(file).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "objdump not found: install binutils (Debian: apt-get install binutils) to check the test guest"
        ),
        Err(e) => panic!("running objdump: {e}"),
    };
    assert!(
        out.status.success(),
        "objdump {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("objdump output is UTF-8")
}

struct Disassembly {
    instructions: usize,
    offending: Vec<String>,
    symbols: Vec<String>,
    /// Unsafe instructions found in DELIBERATE_SSE_SYMBOL, as objdump printed them.
    deliberate: Vec<String>,
}

/// objdump's instruction text with runs of blanks collapsed ("movd   %eax,%xmm0").
fn normalize(insn: &str) -> String {
    insn.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Scan objdump -d output ("  addr:\tinsn" lines, "<sym>:" headers).
fn scan(listing: &str, what: &str) -> Disassembly {
    let mut d = Disassembly {
        instructions: 0,
        offending: Vec::new(),
        symbols: Vec::new(),
        deliberate: Vec::new(),
    };
    let mut func = String::from("?");
    for line in listing.lines() {
        if let Some(sym) = line
            .strip_suffix(">:")
            .and_then(|l| l.split_once(" <"))
            .map(|(_, s)| s)
        {
            func = sym.to_string();
            d.symbols.push(func.clone());
            continue;
        }
        let Some((addr, insn)) = line.split_once(":\t") else {
            continue;
        };
        if addr.trim().is_empty() || !addr.trim().chars().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        d.instructions += 1;
        if let Some(reason) = unsafe_reason(insn) {
            if func == DELIBERATE_SSE_SYMBOL {
                d.deliberate.push(normalize(insn));
                continue;
            }
            d.offending.push(format!(
                "{what} <{func}> {}: {}   <- {reason}",
                addr.trim(),
                insn.trim()
            ));
        }
    }
    d
}

fn write_guest(dir: &TempDir) -> std::path::PathBuf {
    assert!(
        TEST_GUEST_ELF.starts_with(b"\x7fELF"),
        "TEST_GUEST_ELF is not an ELF file"
    );
    let path = dir.join("godwit-test-guest.elf");
    std::fs::write(&path, TEST_GUEST_ELF).expect("write the guest ELF");
    path
}

fn symbol_addr(symtab: &str, name: &str) -> u64 {
    symtab
        .lines()
        .find(|l| l.split_whitespace().last() == Some(name))
        .and_then(|l| u64::from_str_radix(l.split_whitespace().next()?, 16).ok())
        .unwrap_or_else(|| {
            panic!("symbol {name} not found in the test guest (resources/guest/trampoline.S)")
        })
}

#[test]
fn embedded_guest_has_no_instructions_the_emulator_cannot_run() {
    let dir = TempDir::new("guest-safety");
    let elf = write_guest(&dir);

    // All executable sections, as 64-bit code.
    let d = scan(&objdump(&["-d", "--no-show-raw-insn", "-w"], &elf), "text");
    assert!(
        d.symbols.iter().any(|s| s == "kmain") && d.instructions > 100,
        "objdump found no real code in the guest ({} instructions, symbols {:?})",
        d.instructions,
        d.symbols
    );
    let mut offending = d.offending;
    // The deliberate crash instruction: present, alone, and exactly the one allowed.
    assert!(
        d.symbols.iter().any(|s| s == DELIBERATE_SSE_SYMBOL),
        "symbol {DELIBERATE_SSE_SYMBOL} (godwit.crash=sse) not found in the test guest"
    );
    assert_eq!(
        d.deliberate,
        vec![DELIBERATE_SSE_INSN.to_string()],
        "{DELIBERATE_SSE_SYMBOL} may contain exactly one unsafe instruction, `{DELIBERATE_SSE_INSN}`"
    );

    // The AP trampoline is copied out of .rodata and runs in three modes;
    // disassemble each part in its own mode.
    let symtab = objdump(&["-t"], &elf);
    let parts = [
        ("trampoline_start", "tr_pm32", "i8086"),
        ("tr_pm32", "tr_lm64", "i386"),
        ("tr_lm64", "tr_gdt", "x86-64"),
    ];
    let mut tramp_insns = 0;
    for (from, to, mode) in parts {
        let (start, stop) = (symbol_addr(&symtab, from), symbol_addr(&symtab, to));
        assert!(start < stop, "{from}..{to} is empty");
        let listing = objdump(
            &[
                "-D",
                "--no-show-raw-insn",
                "-w",
                "-j",
                ".rodata",
                "-M",
                mode,
                &format!("--start-address={start:#x}"),
                &format!("--stop-address={stop:#x}"),
            ],
            &elf,
        );
        let t = scan(&listing, &format!("trampoline ({mode})"));
        tramp_insns += t.instructions;
        offending.extend(t.offending);
    }
    assert!(
        tramp_insns > 10,
        "disassembled only {tramp_insns} trampoline instructions"
    );

    assert!(
        offending.is_empty(),
        "the test guest contains {} instruction(s) KVM's emulator cannot execute \
         (build flags in resources/guest/Makefile must keep gcc to general registers):\n{}",
        offending.len(),
        offending.join("\n")
    );
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// The guest ELF follows the boot contract: ELF64 x86-64 executable, PT_LOAD
/// segments at p_paddr == p_vaddr between 1 MiB and 1 GiB, entry in an
/// executable segment.
#[test]
fn embedded_guest_elf_layout_matches_the_boot_contract() {
    let b = TEST_GUEST_ELF;
    assert!(b.len() > 64 && b.starts_with(b"\x7fELF"), "not an ELF file");
    assert_eq!(b[4], 2, "not ELF64");
    assert_eq!(b[5], 1, "not little-endian");
    assert_eq!(u16_at(b, 16), 2, "e_type is not ET_EXEC");
    assert_eq!(u16_at(b, 18), 62, "e_machine is not x86-64");
    let entry = u64_at(b, 24);
    let phoff = u64_at(b, 32) as usize;
    let phentsize = u16_at(b, 54) as usize;
    let phnum = u16_at(b, 56) as usize;
    assert!(
        phentsize >= 56 && phoff + phnum * phentsize <= b.len(),
        "bad program headers"
    );

    let mut loads = 0;
    let mut entry_ok = false;
    for i in 0..phnum {
        let ph = &b[phoff + i * phentsize..];
        if u32_at(ph, 0) != 1 {
            continue; // not PT_LOAD
        }
        loads += 1;
        let flags = u32_at(ph, 4);
        let (offset, vaddr, paddr) = (u64_at(ph, 8), u64_at(ph, 16), u64_at(ph, 24));
        let (filesz, memsz) = (u64_at(ph, 32), u64_at(ph, 40));
        assert_eq!(
            paddr, vaddr,
            "PT_LOAD {i}: p_paddr {paddr:#x} != p_vaddr {vaddr:#x}"
        );
        assert!(
            paddr >= 0x100000,
            "PT_LOAD {i} at {paddr:#x} is below 1 MiB"
        );
        assert!(
            paddr + memsz <= 1 << 30,
            "PT_LOAD {i} ends above the first GiB"
        );
        assert!(
            filesz <= memsz && offset + filesz <= b.len() as u64,
            "PT_LOAD {i} sizes"
        );
        if flags & 1 != 0 && (paddr..paddr + memsz).contains(&entry) {
            entry_ok = true;
        }
    }
    assert!(loads > 0, "no PT_LOAD segments");
    assert!(
        entry_ok,
        "entry {entry:#x} is not inside an executable PT_LOAD segment"
    );
}

/// The deliberate SSE instruction is excused only inside its own symbol.
#[test]
fn scanner_excuses_the_deliberate_sse_instruction_only_in_its_symbol() {
    let listing = "\
0000000000100000 <crash_sse_movd_xmm0>:
  100000:\tmovd   %eax,%xmm0
  100004:\tud2
0000000000100010 <other>:
  100010:\tmovd   %eax,%xmm0
";
    let d = scan(listing, "text");
    assert_eq!(d.deliberate, vec![DELIBERATE_SSE_INSN.to_string()]);
    assert_eq!(d.offending.len(), 1, "{:?}", d.offending);
    assert!(d.offending[0].contains("<other>"), "{:?}", d.offending);
}

/// The scanner itself must catch what it is meant to catch.
#[test]
fn scanner_flags_unsafe_instructions_and_passes_integer_code() {
    for bad in [
        "movaps %xmm0,0x10(%rsp)",
        "pxor   %xmm1,%xmm1",
        "vmovdqu %ymm0,(%rdi)",
        "vpxord %zmm1,%zmm1,%zmm1",
        "movq   %mm0,%rax",
        "kmovw  %k1,%eax",
        "lock cmpxchg16b (%rdi)",
        "movd   %eax,%xmm0",
        "xsave  (%rdi)",
        "xsaveopt64 (%rsi)",
        "xrstors (%rdi)",
        "fxsave64 (%rdi)",
        "fxrstor (%rdi)",
        "ldmxcsr 0x4(%rsp)",
        "stmxcsr (%rsp)",
        "vzeroupper",
        "mfence",
        "prefetchnta (%rax)",
        "fldt   (%rax)",
        "fstp   %st(1)",
        "(bad)",
        "tzcnt  %eax,%eax",
        "shlx   %rax,%rbx,%rcx",
        "aesenc %xmm1,%xmm0",
    ] {
        assert!(unsafe_reason(bad).is_some(), "not flagged: {bad}");
    }
    for good in [
        "mov    %rax,%rbx",
        "lock xadd %eax,0x10804",
        "xchg   %eax,0x100(%rip)        # 0x103000 <boot_claimed>",
        "rep stos %rax,%es:(%rdi)",
        "cmpxchg %ecx,(%rdx)",
        "out    %al,(%dx)",
        "cpuid",
        "wrmsr",
        "lretq",
        "lgdtl  0xc0",
        "call   *%rax",
        "movzbl (%rdi),%eax",
        "cs nopw 0x0(%rax,%rax,1)",
        "pause",
        "hlt",
    ] {
        assert_eq!(unsafe_reason(good), None, "wrongly flagged: {good}");
    }
}
