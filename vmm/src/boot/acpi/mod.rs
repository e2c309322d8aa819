//! ACPI tables, how a stock kernel (built without MP-table support, with
//! virtio-mmio found only through ACPI) learns its CPUs, its interrupt
//! controllers and its devices: RSDP, XSDT, a hardware-reduced FADT, the
//! MADT and a DSDT with COM1, the pvpanic device and every virtio-mmio
//! device (`LNRO0005`). They sit in the BIOS area just below the MP table,
//! where Linux also finds the RSDP by scanning, and the zero page names the
//! RSDP directly.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use godwit_devices::i8042::I8042_BASE;
use godwit_devices::pvpanic::{PVPANIC_ACPI_HID, PVPANIC_LEN, PVPANIC_PORT};
use godwit_devices::serial::{COM1_BASE, COM1_IRQ, COM1_LEN};
use godwit_devices::GuestMemory;

use crate::boot::mptable::IOAPIC_ID;
use crate::vstate::layout::{IOAPIC_ADDR, LAPIC_ADDR, MAX_VCPUS, MPTABLE_START};

/// Where the tables start: 16-byte aligned inside 0xe0000-0xfffff, the range
/// Linux scans for the RSDP, and reserved in the e820 map.
pub const ACPI_START: u64 = 0xe0000;
/// The tables must end before the MP table.
const ACPI_END: u64 = MPTABLE_START;

const OEM_ID: [u8; 6] = *b"GODWIT";
const OEM_TABLE_ID: [u8; 8] = *b"GODWITVM";
const OEM_REVISION: u32 = 1;
const TABLE_ALIGN: u64 = 16;

/// MADT `flags`: the machine also has dual 8259s (KVM's in-kernel PIC).
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_HEADER_LEN: u32 = 44;
const MADT_INT_SRC_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
/// MPS INTI flags: edge triggered, active high.
const MPS_INTI_EDGE_HIGH: u16 = 0b0101;
/// IA-PC boot architecture flags: no VGA, no CMOS RTC.
const IAPC_NO_VGA: u16 = 1 << 2;
const IAPC_NO_CMOS_RTC: u16 = 1 << 5;
/// The i8042 command that resets the machine, for the FADT reset register.
const I8042_RESET_VALUE: u8 = 0xfe;
const I8042_COMMAND_PORT: u64 = I8042_BASE as u64 + 4;
/// A virtio-mmio device's register window.
pub const VIRTIO_MMIO_WINDOW: u32 = 0x1000;
/// The ACPI hardware ID Linux's virtio_mmio driver matches.
pub const VIRTIO_MMIO_HID: &str = "LNRO0005";
/// ISA IRQs are 0-15; above, a GSI needs no override.
const ISA_IRQS: u32 = 16;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables describe 1 to {MAX_VCPUS} CPUs, not {0}")]
    CpuCount(u8),
    #[error("the ACPI tables need {needed} bytes but only {available} fit between {ACPI_START:#x} and the MP table: use fewer vCPUs or devices")]
    TooLarge { needed: u64, available: u64 },
    #[error("cannot write the ACPI table {signature} into guest memory at {addr:#x}: {source}")]
    Write {
        signature: String,
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// A virtio-mmio device as the DSDT describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    pub base: u64,
    pub irq: u32,
}

/// One built table: its signature, guest address and bytes.
#[derive(Clone, Debug)]
pub struct Table {
    pub signature: String,
    pub addr: u64,
    pub bytes: Vec<u8>,
}

/// The tables of a VM with `num_cpus` vCPUs and `virtio` devices, placed
/// from [`ACPI_START`]; the RSDP comes first.
pub fn build(num_cpus: u8, virtio: &[VirtioMmioDevice]) -> Result<Vec<Table>, AcpiError> {
    if num_cpus == 0 || num_cpus > MAX_VCPUS {
        return Err(AcpiError::CpuCount(num_cpus));
    }
    let align = |addr: u64| addr.div_ceil(TABLE_ALIGN) * TABLE_ALIGN;
    let rsdp_addr = ACPI_START;
    let dsdt = dsdt(virtio);
    let dsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    let fadt = to_bytes(&fadt(dsdt_addr));
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64);
    let madt = madt(num_cpus, virtio);
    let madt_addr = align(fadt_addr + fadt.len() as u64);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = to_bytes(&xsdt);
    let xsdt_addr = align(madt_addr + madt.len() as u64);
    let end = xsdt_addr + xsdt.len() as u64;
    if end > ACPI_END {
        return Err(AcpiError::TooLarge {
            needed: end - ACPI_START,
            available: ACPI_END - ACPI_START,
        });
    }
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    let table = |signature: &str, addr, bytes| Table {
        signature: signature.to_string(),
        addr,
        bytes,
    };
    Ok(vec![
        table("RSDP", rsdp_addr, rsdp),
        table("DSDT", dsdt_addr, dsdt),
        table("FACP", fadt_addr, fadt),
        table("APIC", madt_addr, madt),
        table("XSDT", xsdt_addr, xsdt),
    ])
}

/// Writes the tables into guest memory; returns the RSDP's address.
pub fn setup(
    memory: &GuestMemory,
    num_cpus: u8,
    virtio: &[VirtioMmioDevice],
) -> Result<u64, AcpiError> {
    let tables = build(num_cpus, virtio)?;
    for t in &tables {
        memory
            .write_slice(&t.bytes, GuestAddress(t.addr))
            .map_err(|source| AcpiError::Write {
                signature: t.signature.clone(),
                addr: t.addr,
                source,
            })?;
    }
    Ok(ACPI_START)
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// Hardware-reduced: no PM timer, GPE or SCI hardware to emulate. Reset
/// goes through the i8042, as `reboot=k` does.
fn fadt(dsdt_addr: u64) -> acpi_tables::fadt::FADT {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = (IAPC_NO_VGA | IAPC_NO_CMOS_RTC).into();
    fadt.reset_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        I8042_COMMAND_PORT,
    );
    fadt.reset_value = I8042_RESET_VALUE;
    fadt.finalize()
}

/// One local APIC per vCPU (APIC ID = vCPU index, as the MP table and
/// KVM's vCPU IDs have it), the IOAPIC with GSIs from 0, identity overrides
/// for the ISA IRQs in use (IRQ 0, COM1, virtio devices below 16) that say
/// they are edge-triggered active-high, and LINT1 as NMI on every CPU.
fn madt(num_cpus: u8, virtio: &[VirtioMmioDevice]) -> Vec<u8> {
    let mut sdt = Sdt::new(
        *b"APIC",
        MADT_HEADER_LEN,
        5,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    sdt.write_u32(36, LAPIC_ADDR);
    sdt.write_u32(40, MADT_PCAT_COMPAT);
    for cpu in 0..num_cpus {
        sdt.append_slice(&to_bytes(&ProcessorLocalApic::new(
            cpu,
            cpu,
            EnabledStatus::Enabled,
        )));
    }
    sdt.append_slice(&to_bytes(&IoApic::new(IOAPIC_ID, IOAPIC_ADDR, 0)));
    let mut isa_irqs = vec![0, COM1_IRQ];
    isa_irqs.extend(virtio.iter().map(|d| d.irq).filter(|irq| *irq < ISA_IRQS));
    isa_irqs.sort_unstable();
    isa_irqs.dedup();
    for irq in isa_irqs {
        let mut entry = vec![MADT_INT_SRC_OVERRIDE, 10, 0, irq as u8];
        entry.extend_from_slice(&irq.to_le_bytes());
        entry.extend_from_slice(&MPS_INTI_EDGE_HIGH.to_le_bytes());
        sdt.append_slice(&entry);
    }
    // Processor UID 0xff: every processor; LINT1.
    let mut nmi = vec![MADT_LOCAL_APIC_NMI, 6, 0xff];
    nmi.extend_from_slice(&MPS_INTI_EDGE_HIGH.to_le_bytes());
    nmi.push(1);
    sdt.append_slice(&nmi);
    sdt.as_slice().to_vec()
}

/// `\_SB` with COM1 (PNP0501), the pvpanic device (QEMU0001) and one
/// LNRO0005 device per virtio-mmio window.
fn dsdt(virtio: &[VirtioMmioDevice]) -> Vec<u8> {
    let com1_io = aml::IO::new(COM1_BASE, COM1_BASE, 1, COM1_LEN as u8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let com1_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let com1_crs = aml::Name::new("_CRS".into(), &com1_crs);
    let com1 = aml::Device::new("COM1".into(), vec![&com1_hid, &com1_uid, &com1_crs]);

    let pvpanic_io = aml::IO::new(PVPANIC_PORT, PVPANIC_PORT, 1, PVPANIC_LEN as u8);
    let pvpanic_crs = aml::ResourceTemplate::new(vec![&pvpanic_io]);
    let pvpanic_hid = aml::Name::new("_HID".into(), &PVPANIC_ACPI_HID);
    let pvpanic_crs = aml::Name::new("_CRS".into(), &pvpanic_crs);
    let pvpanic = aml::Device::new("PEVT".into(), vec![&pvpanic_hid, &pvpanic_crs]);

    let virtio_aml: Vec<Vec<u8>> = virtio
        .iter()
        .enumerate()
        .map(|(index, dev)| virtio_device(index, dev))
        .collect();
    let virtio_raw: Vec<RawAml> = virtio_aml.iter().map(|b| RawAml(b)).collect();

    let mut children: Vec<&dyn Aml> = vec![&com1, &pvpanic];
    children.extend(virtio_raw.iter().map(|r| r as &dyn Aml));
    let sb = aml::Scope::new("_SB_".into(), children);

    let mut sdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sdt.append_slice(&to_bytes(&sb));
    sdt.as_slice().to_vec()
}

/// AML already encoded (a device built in a helper whose parts are gone).
struct RawAml<'a>(&'a [u8]);

impl Aml for RawAml<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(self.0);
    }
}

fn virtio_device(index: usize, dev: &VirtioMmioDevice) -> Vec<u8> {
    let hid = aml::Name::new("_HID".into(), &VIRTIO_MMIO_HID);
    let uid_value = index as u32;
    let uid = aml::Name::new("_UID".into(), &uid_value);
    let window = aml::Memory32Fixed::new(true, dev.base as u32, VIRTIO_MMIO_WINDOW);
    let irq = aml::Interrupt::new(true, true, false, false, dev.irq);
    let crs = aml::ResourceTemplate::new(vec![&window, &irq]);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let name = format!("V{index:03X}");
    to_bytes(&aml::Device::new(
        name.as_str().into(),
        vec![&hid, &uid, &crs],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    fn devices(n: usize) -> Vec<VirtioMmioDevice> {
        (0..n)
            .map(|i| {
                let (base, irq) = crate::devices::net::placement::slot(i);
                VirtioMmioDevice { base, irq }
            })
            .collect()
    }

    #[test]
    fn tables_checksum_link_and_fit() {
        for (cpus, nets) in [(1u8, 0usize), (2, 1), (MAX_VCPUS, 19)] {
            let tables = build(cpus, &devices(nets)).unwrap();
            let rsdp = &tables[0].bytes;
            assert_eq!(&rsdp[..8], b"RSD PTR ");
            assert_eq!(sum(&rsdp[..20]), 0);
            assert_eq!(sum(rsdp), 0);
            let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
            let by_addr = |a: u64| tables.iter().find(|t| t.addr == a).unwrap();
            let xsdt = by_addr(xsdt_addr);
            assert_eq!(xsdt.signature, "XSDT");
            for t in &tables[1..] {
                let len = u32::from_le_bytes(t.bytes[4..8].try_into().unwrap()) as usize;
                assert_eq!(len, t.bytes.len(), "{}", t.signature);
                assert_eq!(sum(&t.bytes), 0, "{} checksum", t.signature);
                assert_eq!(&t.bytes[..4], t.signature.as_bytes());
                assert_eq!(t.addr % TABLE_ALIGN, 0);
                assert!(t.addr + t.bytes.len() as u64 <= ACPI_END);
            }
            let madt = tables.iter().find(|t| t.signature == "APIC").unwrap();
            let (mut off, mut lapics) = (MADT_HEADER_LEN as usize, 0);
            while off < madt.bytes.len() {
                if madt.bytes[off] == 0 {
                    assert_eq!(madt.bytes[off + 3], lapics as u8, "APIC ID = vCPU index");
                    lapics += 1;
                }
                off += usize::from(madt.bytes[off + 1]);
            }
            assert_eq!(off, madt.bytes.len());
            assert_eq!(lapics, usize::from(cpus));
            let dsdt = tables.iter().find(|t| t.signature == "DSDT").unwrap();
            let hits = dsdt
                .bytes
                .windows(VIRTIO_MMIO_HID.len())
                .filter(|w| *w == VIRTIO_MMIO_HID.as_bytes())
                .count();
            assert_eq!(hits, nets);
        }
        assert!(build(0, &[]).is_err());
    }
}
