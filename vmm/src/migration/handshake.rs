//! What the source tells the destination about the VM (`Hello`) and what it
//! checks of the destination's reply.

use std::sync::PoisonError;

use godwit_migration::cpu_compat::check_cpuid as cpuid_incompatibilities;
use godwit_migration::format::FORMAT_VERSION;
use godwit_migration::protocol::{DeviceOffer, Hello, HelloReply};

use super::KVM_CAPS_CHECKED;
use crate::devices::net::NetDevice;
use crate::machine::VmHandle;
use crate::vstate::memory::ram_ranges;
use crate::vstate::vm::Vm;

pub(super) fn present_caps(vm: &Vm) -> Vec<String> {
    KVM_CAPS_CHECKED
        .iter()
        .filter(|c| vm.fd.check_extension(c.cap()))
        .map(|c| c.name().to_string())
        .collect()
}

pub(super) fn device_offer(net: &NetDevice) -> DeviceOffer {
    let dev = net.device.lock().unwrap_or_else(PoisonError::into_inner);
    DeviceOffer {
        id: net.id.clone(),
        kind: "virtio-net".into(),
        peer_kind: net.peer.kind.to_string(),
        offered: dev.offered_features(),
        acked: dev.acked_features(),
        queue_sizes: godwit_devices::virtio::VirtioDevice::queue_max_sizes(&*dev).to_vec(),
        queue_pairs: net.decision.queue_pairs,
        interface: dev.interface(),
    }
}

pub(super) fn hello_of(handle: &VmHandle) -> Hello {
    let vcpus = handle.vcpus.count() as u8;
    Hello {
        godwit_version: env!("CARGO_PKG_VERSION").to_string(),
        format_version: FORMAT_VERSION,
        machine_type: handle.machine.name.to_string(),
        memory_size: handle.ram.size,
        vcpus,
        memory_layout: ram_ranges(handle.ram.size)
            .iter()
            .map(|r| (r.guest_addr, r.size))
            .collect(),
        devices: handle.nets.iter().map(device_offer).collect(),
        // The guest's own table: after a restore or an incoming migration
        // it is the one it came with, which may lack features this host
        // has; a destination need carry only what the guest uses.
        cpuid: handle.guest_cpuid.clone(),
        kvm_caps: present_caps(&handle.vm),
        multifd: None,
    }
}

/// What the source checks of the destination's reply.
pub(super) fn check_destination(hello: &Hello, reply: &HelloReply) -> Vec<String> {
    let mut problems = Vec::new();
    if !reply.machine_types.contains(&hello.machine_type) {
        problems.push(format!(
            "the destination's godwit {} does not know machine type {} (it knows {})",
            reply.godwit_version,
            hello.machine_type,
            reply.machine_types.join(", ")
        ));
    }
    for dev in &hello.devices {
        match reply.devices.iter().find(|d| d.id == dev.id) {
            None => problems.push(format!("{}: the destination has no peer for it", dev.id)),
            Some(peer) => {
                let missing = dev.offered & !peer.supported;
                if missing != 0 {
                    problems.push(format!(
                        "{}: the destination's peer ({}) lacks {} that the guest was offered",
                        dev.id,
                        peer.peer,
                        godwit_devices::virtio::net::features::names(missing)
                    ));
                }
                if dev.queue_pairs > peer.max_queue_pairs {
                    problems.push(format!(
                        "{}: the guest was offered {} queue pairs but the destination's peer ({}) carries {}",
                        dev.id, dev.queue_pairs, peer.peer, peer.max_queue_pairs
                    ));
                }
            }
        }
    }
    for inc in cpuid_incompatibilities(&hello.cpuid, &reply.host_cpuid) {
        problems.push(format!("CPUID: {inc}"));
    }
    problems
}
