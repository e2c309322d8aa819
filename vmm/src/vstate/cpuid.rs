//! The CPUID a vCPU shows its guest: what KVM supports on this host, made to
//! describe a virtual machine (hypervisor bit, KVM signature) with a topology
//! of one thread per core and every vCPU in one package.

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
pub const LEAF_HYPERVISOR: u32 = 0x4000_0000;

const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;
/// "KVMKVMKVM\0\0\0" as EBX, ECX, EDX.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;

/// What the host offers that the filter needs to know.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostCaps {
    pub tsc_deadline_timer: bool,
}

/// Bits needed to hold `count` distinct IDs.
fn id_shift(count: u32) -> u32 {
    count.max(1).next_power_of_two().trailing_zeros()
}

/// Rewrites the entries KVM_GET_SUPPORTED_CPUID returned for vCPU `vcpu_id`
/// of `num_vcpus`.
pub fn filter(entries: &mut [kvm_cpuid_entry2], vcpu_id: u8, num_vcpus: u8, host: HostCaps) {
    let apic_id = u32::from(vcpu_id);
    let cpus = u32::from(num_vcpus);
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((cpus & 0xff) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if host.tsc_deadline_timer {
                    e.ecx |= ECX_TSC_DEADLINE;
                } else {
                    e.ecx &= !ECX_TSC_DEADLINE;
                }
                if cpus > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                if e.eax & 0x1f == 0 {
                    continue; // no more caches
                }
                let cache_level = (e.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { cpus - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((cpus - 1) << 26);
            }
            LEAF_PMU => {
                // No virtual PMU: counters under nested virtualisation are
                // neither reliable nor migratable.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = apic_id;
                let level = e.index;
                match level {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (TOPOLOGY_LEVEL_SMT << 8) | level;
                    }
                    1 => {
                        e.eax = id_shift(cpus);
                        e.ebx = cpus;
                        e.ecx = (TOPOLOGY_LEVEL_CORE << 8) | level;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = level;
                    }
                }
            }
            LEAF_HYPERVISOR => {
                e.eax = e.eax.max(KVM_CPUID_FEATURES);
                [e.ebx, e.ecx, e.edx] = KVM_SIGNATURE;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0x7fff_ffff,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    fn find(e: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *e.iter().find(|x| x.function == f && x.index == i).unwrap()
    }

    #[test]
    fn describes_a_virtual_machine_per_vcpu() {
        let mut e = vec![
            entry(LEAF_FEATURES, 0),
            entry(LEAF_CACHE_PARAMS, 0),
            entry(LEAF_PMU, 0),
            entry(LEAF_TOPOLOGY, 0),
            entry(LEAF_TOPOLOGY, 1),
            entry(LEAF_TOPOLOGY, 2),
            entry(LEAF_HYPERVISOR, 0),
        ];
        e[1].eax = (3 << 5) | 3; // an L3 unified cache
        filter(
            &mut e,
            2,
            3,
            HostCaps {
                tsc_deadline_timer: false,
            },
        );
        let f = find(&e, LEAF_FEATURES, 0);
        assert_eq!(f.ebx >> 24, 2, "initial APIC ID");
        assert_eq!((f.ebx >> 16) & 0xff, 3, "logical processors");
        assert_ne!(f.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(f.ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(f.edx & EDX_HTT, 0);
        let c = find(&e, LEAF_CACHE_PARAMS, 0);
        assert_eq!(c.eax >> 26, 2, "cores per package - 1");
        assert_eq!((c.eax >> 14) & 0xfff, 2, "L3 shared by all");
        assert_eq!(find(&e, LEAF_PMU, 0).eax, 0);
        let smt = find(&e, LEAF_TOPOLOGY, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8, smt.edx), (0, 1, 1, 2));
        let core = find(&e, LEAF_TOPOLOGY, 1);
        assert_eq!((core.eax, core.ebx, core.ecx >> 8, core.edx), (2, 3, 2, 2));
        let end = find(&e, LEAF_TOPOLOGY, 2);
        assert_eq!((end.ebx, end.ecx >> 8), (0, 0));
        let h = find(&e, LEAF_HYPERVISOR, 0);
        let mut sig = Vec::new();
        for r in [h.ebx, h.ecx, h.edx] {
            sig.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&sig, b"KVMKVMKVM\0\0\0");
    }

    #[test]
    fn single_vcpu_has_no_htt_and_tsc_deadline_follows_host() {
        let mut e = vec![entry(LEAF_FEATURES, 0)];
        filter(
            &mut e,
            0,
            1,
            HostCaps {
                tsc_deadline_timer: true,
            },
        );
        assert_eq!(e[0].edx & EDX_HTT, 0);
        assert_ne!(e[0].ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!(id_shift(1), 0);
        assert_eq!(id_shift(2), 1);
        assert_eq!(id_shift(5), 3);
    }
}
