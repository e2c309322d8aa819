//! Planning migrations between hosts: what each host offers
//! ([`host_caps`]) and how to start a VM so it can move between them, or
//! whether an existing VM can ([`planner`]).

pub mod host_caps;
pub mod planner;
