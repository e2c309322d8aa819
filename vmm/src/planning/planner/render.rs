//! The answers as text: a plan's ready line first, then `#` comments; a
//! VM's verdict per host.

use super::command_line::{SOCKET_PLACEHOLDER, TAP_PLACEHOLDER};
use super::existing_vm::VmPlan;
use super::new_vm::{DevicePlan, Plan};

fn group_left_out(d: &DevicePlan) -> Vec<String> {
    // One line per distinct set of reasons: a TAP without vnet header
    // explains a dozen features at once.
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for l in &d.left_out {
        let mut why: Vec<String> = l
            .lacking_on
            .iter()
            .map(|h| {
                format!(
                    "lacking on {}: {} ({}); would change: {}",
                    h.host, h.peer, h.why, h.would_change
                )
            })
            .collect();
        if !l.depends_on.is_empty() {
            why.push(format!("needs {}, left out", l.depends_on.join(" or ")));
        }
        let key = why.join("; ");
        let item = format!("{} (bit {})", l.name, l.bit);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, items)) => items.push(item),
            None => groups.push((key, vec![item])),
        }
    }
    groups
        .into_iter()
        .map(|(why, items)| format!("{}: {why}", items.join(", ")))
        .collect()
}

/// The plan as text: the ready line first, then `#` comments.
pub fn render_plan(p: &Plan) -> String {
    let mut out = String::new();
    let hosts: Vec<String> = p
        .hosts
        .iter()
        .map(|h| format!("{} ({})", h.name, h.file))
        .collect();
    if let Some(line) = &p.command_line {
        out.push_str(line);
        out.push('\n');
        out.push_str(&format!(
            "# plan over {} host(s): {}\n",
            p.hosts.len(),
            hosts.join(", ")
        ));
        for l in &p.host_command_lines {
            out.push_str(&format!("# on {}: {}\n", l.host, l.command_line));
        }
        if line.contains(TAP_PLACEHOLDER) || line.contains(SOCKET_PLACEHOLDER) {
            out.push_str(&format!("# replace {TAP_PLACEHOLDER} / {SOCKET_PLACEHOLDER} with each host's own TAP / socket (the reports name none, or different ones)\n"));
        }
    } else {
        out.push_str(&format!(
            "no common ABI over {} host(s): {}\n",
            p.hosts.len(),
            hosts.join(", ")
        ));
    }
    let c = if p.ok { "# " } else { "  " };
    if let Some(m) = &p.machine {
        out.push_str(&format!(
            "{c}machine type {m}: the newest every host's godwit runs\n"
        ));
    }
    for n in &p.machine_notes {
        out.push_str(&format!("{c}{n}\n"));
    }
    for b in &p.blockers {
        out.push_str(&format!(
            "{c}blocked: {}; would change: {}\n",
            b.problem, b.would_change
        ));
    }
    for d in &p.devices {
        let head = match &d.interface {
            Some(i) => format!("{} ({}, interface {i})", d.id, d.kind),
            None => format!("{} ({})", d.id, d.kind),
        };
        if !d.ok {
            out.push_str(&format!("{c}{head}: no common ABI:\n"));
            for b in &d.blockers {
                let host = b.host.clone().unwrap_or_else(|| "every host".into());
                out.push_str(&format!(
                    "{c}  - {host}: {}; would change: {}\n",
                    b.problem, b.would_change
                ));
            }
        } else {
            if let Some(o) = &d.offered {
                out.push_str(&format!(
                    "{c}{head}: the guest is offered {}\n",
                    o.names.join(",")
                ));
            }
            if d.left_out.is_empty() {
                out.push_str(&format!("{c}{head}: nothing left out\n"));
            } else {
                out.push_str(&format!("{c}{head}: left out ({}):\n", d.left_out.len()));
                for line in group_left_out(d) {
                    out.push_str(&format!("{c}  - {line}\n"));
                }
                match &d.no_override_machine {
                    Some(m) => out.push_str(&format!(
                        "{c}{head}: machine type {m} fits every host without overrides (the same ABI or less)\n"
                    )),
                    None => out.push_str(&format!(
                        "{c}{head}: no machine type fits every host without overrides\n"
                    )),
                }
            }
        }
        for n in &d.notes {
            out.push_str(&format!("{c}{}: {n}\n", d.id));
        }
    }
    if p.cpu.checked {
        out.push_str(&format!(
            "{c}CPU: {} distinct CPUID table(s); a VM started on {} can move to every other host\n",
            p.cpu.distinct_cpus,
            if p.cpu.start_on.is_empty() {
                "none of them".to_string()
            } else {
                p.cpu.start_on.join(", ")
            }
        ));
    }
    for n in p.cpu.notes.iter().chain(&p.notes) {
        out.push_str(&format!("{c}{n}\n"));
    }
    out
}

pub fn render_vm_plan(p: &VmPlan) -> String {
    let mut out = format!(
        "VM from {}: machine type {}, {} network device(s)\n",
        p.vm.source,
        p.vm.machine,
        p.vm.devices.len()
    );
    for d in &p.vm.devices {
        out.push_str(&format!(
            "  {} ({}): offered {}; acked {}\n",
            d.id,
            d.kind,
            d.offered.names.join(","),
            if d.acked.names.is_empty() {
                "nothing (the driver has not negotiated yet)".to_string()
            } else {
                d.acked.names.join(",")
            }
        ));
    }
    for h in &p.hosts {
        if h.can_migrate {
            out.push_str(&format!("{}: can migrate\n", h.host));
        } else {
            out.push_str(&format!("{}: cannot migrate:\n", h.host));
            for r in &h.reasons {
                let dev = r
                    .device
                    .as_deref()
                    .map(|d| format!("{d}: "))
                    .unwrap_or_default();
                out.push_str(&format!("  - {dev}{}", r.problem));
                if let Some(w) = &r.would_change {
                    out.push_str(&format!("; would change: {w}"));
                }
                out.push('\n');
            }
        }
        for n in &h.notes {
            out.push_str(&format!("  ({n})\n"));
        }
    }
    out
}
