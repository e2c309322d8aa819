//! Save and restore against the real KVM: vCPUs are created and their state
//! read and written, but never run.

use godwit_migration::format::{Container, ContainerWriter, FormatError};
use kvm_bindings::{
    kvm_clock_data, kvm_msr_entry, Msrs, KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC,
    KVM_MP_STATE_HALTED, KVM_MP_STATE_UNINITIALIZED, KVM_VCPUEVENT_VALID_NMI_PENDING,
};

use super::vcpu::{check_cpuid, host_cpuid, msr_name, MsrEntry, VCPU_SECTION};
use super::vm::{ClockRestore, VM_SECTION};
use super::*;
use crate::vstate::memory::{GuestRam, MIB};
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::{open_kvm, Vm};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_TSC_DEADLINE: u32 = 0x6e0;
const NUM_VCPUS: u8 = 2;
/// Word offsets in the XSAVE area: XMM3 in the legacy area, XSTATE_BV in
/// the XSAVE header.
const XMM3: usize = (160 + 3 * 16) / 4;
const XSTATE_BV: usize = 512 / 4;

fn xmm3_words() -> [u32; 4] {
    let b = b"godwit-xmm3-test";
    std::array::from_fn(|i| {
        u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
    })
}

struct TestVm {
    vm: Vm,
    vcpus: Vec<Vcpu>,
    // Dropped after the VM.
    ram: GuestRam,
}

fn new_vm() -> TestVm {
    vm_with_ram(GuestRam::new(16 * MIB).unwrap())
}

fn vm_with_ram(ram: GuestRam) -> TestVm {
    let kvm = open_kvm().unwrap();
    let vm = Vm::new(kvm, &ram.memory).unwrap();
    let vcpus = (0..NUM_VCPUS)
        .map(|id| vm.create_vcpu(id, NUM_VCPUS).unwrap())
        .collect();
    TestVm { vm, vcpus, ram }
}

fn set_msrs(fd: &kvm_ioctls::VcpuFd, msrs: &[(u32, u64)]) {
    for &(index, data) in msrs {
        let list = Msrs::from_entries(&[kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(
            fd.set_msrs(&list).unwrap(),
            1,
            "KVM refused {} = {data:#x}",
            msr_name(index)
        );
    }
}

fn lapic_write(lapic: &mut kvm_bindings::kvm_lapic_state, reg: usize, value: u32) {
    for (i, b) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[reg + i] = b as _;
    }
}

const DISTINCT_MSRS: &[(u32, u64)] = &[
    (0x174, 0x10),                        // SYSENTER_CS
    (0x175, 0xffff_8880_0012_3000),       // SYSENTER_ESP
    (0x176, 0xffff_ffff_8100_1000),       // SYSENTER_EIP
    (0xc000_0081, 0x0023_0010_0000_0000), // STAR
    (0xc000_0082, 0xffff_ffff_8160_0000), // LSTAR
    (0xc000_0083, 0xffff_ffff_8160_1000), // CSTAR
    (0xc000_0084, 0x4_7700),              // SYSCALL_MASK
    (0xc000_0102, 0xffff_8880_0000_1000), // KERNEL_GS_BASE
    (0x277, 0x0007_0106_0007_0406),       // PAT
    (0x2ff, 0xc06),                       // MTRRdefType
    (0x200, 0x6),                         // MTRRphysBase0
    (0x201, 0xf_ff00_0800),               // MTRRphysMask0
    (0x4b56_4d01, 0x5001),                // KVM_SYSTEM_TIME_NEW, enabled
    (0x4b56_4d00, 0x6000),                // KVM_WALL_CLOCK_NEW
];

/// Gives vCPU 0 and the VM values no fresh VM has.
fn make_distinctive(t: &TestVm) {
    let fd = &t.vcpus[0].fd;
    let regs = kvm_bindings::kvm_regs {
        rax: 0x1122_3344_5566_7788,
        rbx: 0x99aa_bbcc_ddee_ff00,
        rsp: 0x8ff0,
        rip: 0x10_0123,
        rflags: 0x246,
        r15: 0xf15,
        ..Default::default()
    };
    fd.set_regs(&regs).unwrap();
    let sregs = crate::boot::regs::long_mode_sregs(fd.get_sregs().unwrap());
    fd.set_sregs(&sregs).unwrap();
    // FPU state goes in through XSAVE with its XSTATE_BV bits: KVM_SET_FPU
    // alone leaves XSTATE_BV clear on a vCPU that never ran, and XSAVE then
    // reports the init state.
    let caps = KvmCaps::probe(&t.vm.kvm, &t.vm.fd).unwrap();
    assert!(caps.xsave && caps.xsave2_size <= 4096);
    let mut xsave = fd.get_xsave().unwrap();
    xsave.region[0] = (xsave.region[0] & !0xffff) | 0x27f; // FCW
    xsave.region[6] = 0x7f80; // MXCSR
    xsave.region[XMM3..XMM3 + 4].copy_from_slice(&xmm3_words());
    xsave.region[XSTATE_BV] |= 0x3; // x87 and SSE state present
                                    // SAFETY: this host's KVM takes at most 4096 bytes of XSAVE state
                                    // (checked above), the size of kvm_xsave.
    unsafe { fd.set_xsave(&xsave) }.unwrap();
    let mut xcrs = fd.get_xcrs().unwrap();
    xcrs.nr_xcrs = 1;
    xcrs.xcrs[0].xcr = 0;
    xcrs.xcrs[0].value = 0x3;
    fd.set_xcrs(&xcrs).unwrap();
    let mut dregs = fd.get_debug_regs().unwrap();
    dregs.db = [0x1000, 0x2000, 0, 0xdead_0000];
    dregs.dr7 = 0x405;
    fd.set_debug_regs(&dregs).unwrap();
    let mut lapic = fd.get_lapic().unwrap();
    lapic_write(&mut lapic, 0x80, 0x20); // TPR
    lapic_write(&mut lapic, 0xf0, 0x1ff); // SPIV: enabled, vector 0xff
    lapic_write(&mut lapic, 0x320, 0xec | (2 << 17)); // LVTT: TSC deadline
    fd.set_lapic(&lapic).unwrap();
    set_msrs(fd, DISTINCT_MSRS);
    set_msrs(fd, &[(MSR_IA32_TSC, 0x1_0000_0000)]);
    // Far in the future, so the timer never fires during the test.
    set_msrs(fd, &[(MSR_TSC_DEADLINE, 0x7000_0000_0000_0000)]);
    let mut events = fd.get_vcpu_events().unwrap();
    events.nmi.pending = 1;
    events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING;
    fd.set_vcpu_events(&events).unwrap();
    fd.set_mp_state(kvm_bindings::kvm_mp_state {
        mp_state: KVM_MP_STATE_HALTED,
    })
    .unwrap();

    let vm = &t.vm.fd;
    let mut pit = vm.get_pit2().unwrap();
    pit.channels[0].count = 0x2e9b;
    pit.channels[0].mode = 2;
    pit.channels[0].rw_mode = 3;
    vm.set_pit2(&pit).unwrap();
    let mut ioapic = kvm_bindings::kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    vm.get_irqchip(&mut ioapic).unwrap();
    // Serial IRQ 4 unmasked to vector 0x24, and the IOAPIC ID.
    // SAFETY: KVM_GET_IRQCHIP filled the union for KVM_IRQCHIP_IOAPIC, so
    // `ioapic` is its initialised member, made only of integers.
    let mut state = unsafe { ioapic.chip.ioapic };
    state.redirtbl[4].bits = 0x24;
    state.id = 2 << 24;
    ioapic.chip.ioapic = state;
    vm.set_irqchip(&ioapic).unwrap();
    vm.set_clock(&kvm_clock_data {
        clock: 5_000_000_000,
        ..Default::default()
    })
    .unwrap();
}

struct Saved {
    vm: VmState,
    vcpus: Vec<VcpuState>,
}

fn save_all(t: &TestVm) -> Saved {
    let caps = KvmCaps::probe(&t.vm.kvm, &t.vm.fd).unwrap();
    let vcpus: Vec<_> = t
        .vcpus
        .iter()
        .map(|v| VcpuState::save(&v.fd, u32::from(v.id), &caps).unwrap())
        .collect();
    let mut needed = Vec::new();
    for v in &vcpus {
        needed.extend(v.needed_caps());
    }
    let vm = VmState::save(&t.vm.fd, &needed).unwrap();
    Saved { vm, vcpus }
}

fn restore_all(saved: &Saved, clock: ClockRestore) -> TestVm {
    restore_into(new_vm(), saved, clock)
}

fn restore_into(t: TestVm, saved: &Saved, clock: ClockRestore) -> TestVm {
    saved.vm.check_host(&t.vm.fd).unwrap();
    let host = host_cpuid(&t.vm.kvm, NUM_VCPUS).unwrap();
    for v in &saved.vcpus {
        check_cpuid(v, &host).unwrap();
    }
    let caps = KvmCaps::probe(&t.vm.kvm, &t.vm.fd).unwrap();
    saved.vm.restore(&t.vm.fd, &caps, clock).unwrap();
    for (v, fd) in saved.vcpus.iter().zip(&t.vcpus) {
        v.restore(&fd.fd, &caps).unwrap();
    }
    t
}

fn msr(state: &VcpuState, index: u32) -> Option<u64> {
    state.msrs.iter().find(|m| m.index == index).map(|m| m.data)
}

/// The state with the values that move with time cleared: TSC, the PIT's
/// load timestamps and kvmclock, which are checked on their own.
fn timeless(s: &Saved) -> (VmState, Vec<VcpuState>) {
    let mut vm = s.vm.clone();
    for c in vm.pit.0.channels.iter_mut() {
        c.count_load_time = 0;
    }
    vm.clock.0 = kvm_clock_data::default();
    // The PIT keeps raising IRQ0 while the VM exists, so the PICs' request
    // registers depend on when the state is read (seen under heavy load).
    for pic in [&mut vm.pic_master.0, &mut vm.pic_slave.0] {
        // SAFETY: chip_id 0 and 1 are the PICs, whose state is the `pic`
        // member of the union; every bit pattern of it is a valid u8 set.
        let state = unsafe { &mut pic.chip.pic };
        state.irr = 0;
        state.last_irr = 0;
    }
    let vcpus = s
        .vcpus
        .iter()
        .map(|v| {
            let mut v = v.clone();
            v.msrs.retain(|m| m.index != MSR_IA32_TSC);
            v
        })
        .collect();
    (vm, vcpus)
}

fn container(saved: &Saved) -> Vec<u8> {
    let mut w = ContainerWriter::new("godwit-test").unwrap();
    w.add(&VM_SECTION, 0, &saved.vm).unwrap();
    for v in &saved.vcpus {
        w.add(&VCPU_SECTION, v.id, v).unwrap();
    }
    w.to_bytes()
}

#[test]
fn host_caps_are_probed() {
    let t = new_vm();
    let caps = KvmCaps::probe(&t.vm.kvm, &t.vm.fd).unwrap();
    assert!(caps.irqchip && caps.pit2 && caps.adjust_clock && caps.mp_state);
    for m in [MSR_IA32_TSC, 0x4b56_4d01, 0xc000_0082, 0x2ff, 0x277] {
        assert!(caps.msrs_to_save.contains(&m), "{} not saved", msr_name(m));
    }
    assert!(!caps
        .msrs_to_save
        .iter()
        .any(|&m| (0x480..=0x492).contains(&m)));
    let (read, refused) = vcpu::read_msrs(&t.vcpus[0].fd, &caps.msrs_to_save).unwrap();
    assert_eq!(read.len() + refused.len(), caps.msrs_to_save.len());
    eprintln!(
        "KVM here: {} MSRs saved, refused: [{}]; XSAVE2 size {}, TSC control {}",
        read.len(),
        refused
            .iter()
            .map(|&i| msr_name(i))
            .collect::<Vec<_>>()
            .join(", "),
        caps.xsave2_size,
        caps.tsc_control
    );
}

#[test]
fn save_restore_save_gives_the_same_state() {
    let original = new_vm();
    make_distinctive(&original);
    let first = save_all(&original);

    // The distinctive values were captured.
    let v0 = &first.vcpus[0];
    assert_eq!(v0.regs.0.rax, 0x1122_3344_5566_7788);
    assert_eq!(v0.mp_state.0.mp_state, KVM_MP_STATE_HALTED);
    assert_eq!(
        first.vcpus[1].mp_state.0.mp_state,
        KVM_MP_STATE_UNINITIALIZED
    );
    assert_eq!(v0.events.0.nmi.pending, 1);
    assert_eq!(v0.debugregs.0.db[3], 0xdead_0000);
    for &(index, data) in DISTINCT_MSRS {
        assert_eq!(msr(v0, index), Some(data), "{}", msr_name(index));
    }
    assert_eq!(msr(v0, MSR_TSC_DEADLINE), Some(0x7000_0000_0000_0000));
    assert_eq!(v0.cpuid, first.vcpus[0].cpuid);
    assert!(!v0.cpuid.is_empty());

    // Through the container and back, as a snapshot file would carry it.
    let bytes = container(&first);
    let c = Container::from_bytes(bytes, &[VM_SECTION, VCPU_SECTION]).unwrap();
    let decoded = Saved {
        vm: c.section(&VM_SECTION, 0).unwrap(),
        vcpus: c
            .instances(&VCPU_SECTION)
            .into_iter()
            .map(|i| c.section(&VCPU_SECTION, i).unwrap())
            .collect(),
    };
    assert_eq!(decoded.vm, first.vm);
    assert_eq!(decoded.vcpus, first.vcpus);

    let restored = restore_all(&decoded, ClockRestore::Continue);
    let clock_after_restore = restored.vm.fd.get_clock().unwrap().clock;
    let second = save_all(&restored);

    let (vm1, vcpus1) = timeless(&first);
    let (vm2, vcpus2) = timeless(&second);
    for (a, b) in vcpus1.iter().zip(&vcpus2) {
        assert_eq!(a.msrs, b.msrs, "vCPU {} MSRs", a.id);
        assert_eq!(a, b, "vCPU {}", a.id);
    }
    assert_eq!(vm1, vm2);

    // The guest's TSC continues from where it was.
    let tsc = |s: &Saved| msr(&s.vcpus[0], MSR_IA32_TSC).unwrap();
    assert!(tsc(&second) >= tsc(&first));
    // kvmclock continues: not reset to 0, at most a little later.
    let saved_clock = first.vm.clock.0.clock;
    assert!(saved_clock >= 5_000_000_000);
    assert!(
        (saved_clock..saved_clock + 2_000_000_000).contains(&clock_after_restore),
        "kvmclock was {saved_clock} when saved and {clock_after_restore} after restore"
    );
    // The FPU registers came through XSAVE.
    let xsave = restored.vcpus[0].fd.get_xsave().unwrap();
    assert_eq!(xsave.region[XMM3..XMM3 + 4], xmm3_words());
    assert_eq!(xsave.region[6], 0x7f80);
    assert_eq!(xsave.region[0] & 0xffff, 0x27f);
}

#[test]
fn kvmclock_can_advance_by_wall_clock_time() {
    let original = new_vm();
    make_distinctive(&original);
    let saved = save_all(&original);
    let caps = KvmCaps::probe(&original.vm.kvm, &original.vm.fd).unwrap();
    let target = new_vm();
    let result = saved
        .vm
        .restore(&target.vm.fd, &caps, ClockRestore::AdvanceByWallClock);
    if saved.vm.clock.0.flags & KVM_CLOCK_REALTIME == 0 {
        assert!(matches!(result, Err(StateError::NoRealtime)), "{result:?}");
        return;
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    let advanced = saved
        .vm
        .restore(&target.vm.fd, &caps, ClockRestore::AdvanceByWallClock);
    advanced.unwrap();
    let now = target.vm.fd.get_clock().unwrap().clock;
    assert!(now >= saved.vm.clock.0.clock + 100_000_000, "{now}");
}

#[test]
fn restore_names_what_this_host_lacks() {
    let original = new_vm();
    make_distinctive(&original);
    let saved = save_all(&original);
    let target = new_vm();
    let caps = KvmCaps::probe(&target.vm.kvm, &target.vm.fd).unwrap();
    let fd = &target.vcpus[0].fd;

    let no_xcrs = KvmCaps {
        xcrs: false,
        ..caps.clone()
    };
    let err = saved.vcpus[0].restore(fd, &no_xcrs).unwrap_err();
    assert!(
        err.to_string().starts_with(
            "this host's KVM lacks KVM_CAP_XCRS, which the saved state needs for XCR0"
        ),
        "{err}"
    );

    let mut bogus = saved.vcpus[0].clone();
    bogus.msrs.push(MsrEntry {
        index: 0xdead_beef,
        data: 1,
    });
    let err = bogus.restore(fd, &caps).unwrap_err();
    assert!(
        matches!(
            err,
            StateError::MsrRefused {
                vcpu: 0,
                index: 0xdead_beef,
                ..
            }
        ),
        "{err}"
    );

    let mut big = saved.vcpus[0].clone();
    let xsave = big.xsave.as_mut().unwrap();
    xsave.0.resize(caps.xsave2_size.max(4096) + 64, 0xff);
    let err = big.restore(fd, &caps).unwrap_err();
    assert!(matches!(err, StateError::XsaveTooLarge { .. }), "{err}");

    if let Some(khz) = saved.vcpus[0].tsc_khz {
        let mut fast = saved.vcpus[0].clone();
        fast.tsc_khz = Some(khz * 2);
        let no_scaling = KvmCaps {
            tsc_control: false,
            ..caps.clone()
        };
        let err = fast.restore(fd, &no_scaling).unwrap_err();
        assert!(matches!(err, StateError::TscFrequency { .. }), "{err}");
    }

    let mut avx512 = saved.vcpus[1].clone();
    let leaf7 = avx512
        .cpuid
        .iter_mut()
        .find(|e| e.function == 7 && e.index == 0)
        .unwrap();
    leaf7.ebx = u32::MAX;
    let host = host_cpuid(&target.vm.kvm, NUM_VCPUS).unwrap();
    check_cpuid(&saved.vcpus[1], &host).unwrap();
    let err = check_cpuid(&avx512, &host).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with(
            "vCPU 1's CPUID does not fit this host: leaf 0x7 sub-leaf 0 EBX: the guest was shown"
        ),
        "{msg}"
    );
}

#[test]
fn saved_state_with_a_wrong_sized_blob_is_refused() {
    let original = new_vm();
    let saved = save_all(&original);
    let mut json = serde_json::to_value(&saved.vcpus[0]).unwrap();
    let regs = json["regs"].as_str().unwrap().to_string();
    json["regs"] = serde_json::Value::String(regs[..regs.len() - 2].to_string());
    let mut w = ContainerWriter::new("godwit-test").unwrap();
    w.add(&VCPU_SECTION, 0, &json).unwrap();
    let c = Container::from_bytes(w.to_bytes(), &[VCPU_SECTION]).unwrap();
    let err = c.section::<VcpuState>(&VCPU_SECTION, 0).unwrap_err();
    assert!(matches!(err, FormatError::Payload { .. }));
    assert!(
        err.to_string()
            .contains("kvm_regs has 143 bytes, expected 144"),
        "{err}"
    );
}

#[test]
fn a_snapshot_in_two_files_restores_memory_and_state() {
    use godwit_migration::memory_file::{self, MEMORY_SECTION};
    use vm_memory::bitmap::AtomicBitmap;
    use vm_memory::{Bytes, GuestAddress};

    let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
    let (state_path, memory_path) = (dir.as_path().join("state"), dir.as_path().join("memory"));
    let original = new_vm();
    make_distinctive(&original);
    let pattern: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8 | 1).collect();
    original
        .ram
        .memory
        .write_slice(&pattern, GuestAddress(0x20_0000))
        .unwrap();

    // Save: vCPUs, VM, memory, then the state file that names the memory.
    let saved = save_all(&original);
    let memory = memory_file::save(&original.ram.memory, &memory_path).unwrap();
    // The pattern, and the page KVM wrote the wall clock to.
    assert_eq!(memory.data_bytes, pattern.len() as u64 + 4096);
    let mut w = ContainerWriter::new("godwit-test").unwrap();
    w.add(&VM_SECTION, 0, &saved.vm).unwrap();
    for v in &saved.vcpus {
        w.add(&VCPU_SECTION, v.id, v).unwrap();
    }
    w.add(&MEMORY_SECTION, 0, &memory.info).unwrap();
    w.write_file(&state_path).unwrap();
    drop(original);

    // Restore: read and check everything, map memory, build the VM.
    let c = Container::read_file(&state_path, &[VM_SECTION, VCPU_SECTION, MEMORY_SECTION]).unwrap();
    let info: memory_file::MemoryFileInfo = c.section(&MEMORY_SECTION, 0).unwrap();
    let back = Saved {
        vm: c.section(&VM_SECTION, 0).unwrap(),
        vcpus: c
            .instances(&VCPU_SECTION)
            .into_iter()
            .map(|i| c.section(&VCPU_SECTION, i).unwrap())
            .collect(),
    };
    let mapped = memory_file::map_private::<AtomicBitmap>(&memory_path, &info).unwrap();
    let ram = GuestRam {
        memory: mapped.memory,
        file: mapped.file,
        size: info.ram_size,
    };
    let restored = restore_into(vm_with_ram(ram), &back, ClockRestore::Continue);
    let mut out = vec![0u8; pattern.len()];
    restored
        .ram
        .memory
        .read_slice(&mut out, GuestAddress(0x20_0000))
        .unwrap();
    assert!(out == pattern);
    let again = save_all(&restored);
    // XSAVE round trips are asserted by the other state tests; here the
    // pairing of memory file and state is what is checked. Under heavy host
    // load, PVM was seen reporting a never-run restored vCPU's x87/SSE control
    // words at their reset values, which would make this test flaky.
    let without_xsave = |s: &Saved| {
        let (vm, mut vcpus) = timeless(s);
        for v in vcpus.iter_mut() {
            v.xsave = None;
        }
        (vm, vcpus)
    };
    assert_eq!(without_xsave(&saved), without_xsave(&again));
}

/// A blob's text is the hex of kvm-bindings' own byte serialization, so
/// state written before blobs took their bytes straight from the structure
/// reads the same, and the text reads back to the same structure.
#[test]
fn blob_text_is_kvm_bindings_bytes_in_hex() {
    let mut regs = kvm_bindings::kvm_regs {
        rax: 0x0123_4567_89ab_cdef,
        rip: 0xfff0,
        rflags: 2,
        ..Default::default()
    };
    regs.r15 = u64::MAX;
    let through_serde: Vec<u8> = serde_json::from_value::<Vec<u8>>(
        serde_json::to_value(regs).expect("kvm-bindings serializes kvm_regs"),
    )
    .expect("as a byte sequence");
    let text = serde_json::to_value(Blob(regs)).expect("a blob serializes");
    let digits = text.as_str().expect("as a string");
    assert_eq!(
        digits.len(),
        2 * std::mem::size_of::<kvm_bindings::kvm_regs>()
    );
    assert_eq!(unhex(digits), Some(through_serde));
    assert!(digits.starts_with("efcdab8967452301"), "{digits}");
    let back: Blob<kvm_bindings::kvm_regs> = serde_json::from_value(text).expect("reads back");
    assert_eq!(back, Blob(regs));
    assert_eq!(unhex("0aFf"), Some(vec![0x0a, 0xff]));
    assert_eq!(unhex("0g"), None);
    assert_eq!(unhex("abc"), None);
}
