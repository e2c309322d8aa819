//! The commands of a running VM: one typed [`Command`] per request, parsed
//! with its arguments before anything runs, and the dispatch over it.
//!
//! This is the only part of the API that knows the VM; the protocol, the
//! framing and the server below it know nothing about machines, snapshots or
//! migration. The operations themselves live with the VM ([`VmHandle`]),
//! snapshots and migration; here they are only called and their results
//! turned into QMP replies.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use std::os::fd::{AsRawFd, IntoRawFd};

use super::{ApiError, ApiServer, CommandHandler, DescriptorError, EventSender, QmpError, Session};
use crate::abi::machine_types::{self, MachineType};
use crate::config::net_spec::{NetSpec, NetSpecError, PeerSpec};
use crate::devices::net::NetDevice;
use crate::machine::services::{EventSink, Service};
use crate::machine::{Machine, RunState, VmHandle};
use crate::planning::host_caps::{self, PeerKind};
use crate::planning::planner::{self, PlanError, VmDevice, VmView};

/// `snapshot-save` arguments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotSaveArgs {
    /// Directory the snapshot is written to.
    pub dir: PathBuf,
}

/// `cont` arguments.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContArgs {
    /// Resumes a VM in postmigrate: the operator's word that the
    /// destination does not run the guest.
    #[serde(default)]
    pub force: bool,
}

/// `migrate` arguments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateArgs {
    /// Where the destination listens, e.g. `unix:/run/dst.sock`.
    pub uri: String,
}

/// `migrate-set-parameters` arguments; absent members keep their value.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MigrateParametersArgs {
    /// The longest the guest may stay stopped, in ms.
    pub downtime_limit: Option<u64>,
    /// Bytes per second; 0 means no limit.
    pub max_bandwidth: Option<u64>,
    /// Pre-copy rounds before giving up on convergence (at least 1).
    pub max_rounds: Option<u32>,
    /// TLS credentials directory for `tls:` URIs; "" clears it.
    pub tls_creds: Option<String>,
    /// Name the destination's certificate must carry; "" means the URI's host.
    pub tls_hostname: Option<String>,
    /// Auto-converge's first throttle, 1 to 99 percent.
    pub cpu_throttle_initial: Option<u32>,
    /// Auto-converge's step, 1 to 99 percent.
    pub cpu_throttle_increment: Option<u32>,
    /// With the multifd capability: extra connections for the pages, 1 to
    /// 16.
    pub multifd_channels: Option<u16>,
}

/// A migration capability, as QEMU names it.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Capability {
    /// Throttle the vCPUs while pre-copy does not converge.
    AutoConverge,
    /// Send pages over `multifd-channels` extra connections.
    Multifd,
}

/// One entry of `migrate-set-capabilities` / `query-migrate-capabilities`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilityState {
    pub capability: Capability,
    pub state: bool,
}

/// `migrate-set-capabilities` arguments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateCapabilitiesArgs {
    pub capabilities: Vec<CapabilityState>,
}

/// `query-host-caps` arguments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostCapsArgs {
    /// `--net` specs of peers to probe.
    #[serde(default)]
    pub net: Vec<String>,
    /// Host name to put in the report.
    pub name: Option<String>,
}

/// `plan` arguments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanArgs {
    /// Host-caps reports of the candidate hosts.
    pub hosts: Vec<Value>,
    /// Plan for this VM (where it can migrate) rather than a new one.
    #[serde(default)]
    pub vm: bool,
    /// Peer kinds of a new VM's devices.
    #[serde(default)]
    pub devices: Vec<String>,
}

qmp_commands! {
    /// A request to a running VM, parsed and checked before it runs.
    #[derive(Debug)]
    pub enum Command {
        "query-version" => QueryVersion,
        "query-status" => QueryStatus,
        "stop" => Stop,
        "cont" => Cont(ContArgs),
        "quit" => Quit,
        "query-net" => QueryNet,
        "query-machines" => QueryMachines,
        "query-migrate" => QueryMigrate,
        "snapshot-save" => SnapshotSave(SnapshotSaveArgs),
        "migrate" => Migrate(MigrateArgs),
        "migrate_cancel" => MigrateCancel,
        "migrate-set-parameters" => MigrateSetParameters(MigrateParametersArgs),
        "query-migrate-parameters" => QueryMigrateParameters,
        "migrate-set-capabilities" => MigrateSetCapabilities(MigrateCapabilitiesArgs),
        "query-migrate-capabilities" => QueryMigrateCapabilities,
        "query-host-caps" => QueryHostCaps(HostCapsArgs),
        "plan" => Plan(PlanArgs),
    }
}

/// Why a command failed. Converted to a QMP error only for the reply.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// `stop` while an operation holds the VM.
    #[error(transparent)]
    Busy(#[from] crate::machine::Busy),
    /// `cont` refused.
    #[error(transparent)]
    Cont(#[from] crate::machine::ContError),
    /// `snapshot-save` failed.
    #[error(transparent)]
    Snapshot(#[from] crate::persist::snapshot::SnapshotError),
    /// `migrate` was refused.
    #[error(transparent)]
    Migrate(#[from] crate::migration::MigrateError),
    /// `migrate-set-parameters` with `max-rounds` 0.
    #[error("Parameter 'max-rounds' must be at least 1")]
    ZeroRounds,
    /// A throttle parameter outside 1..=99.
    #[error("Parameter '{param}' expects a percentage from 1 to 99, not {value}")]
    ThrottleRange { param: &'static str, value: u32 },
    /// `multifd-channels` outside 1..=MAX_CHANNELS.
    #[error("Parameter 'multifd-channels' expects a value from 1 to {max}, not {value}")]
    ChannelsRange { value: u16, max: u16 },
    /// `tls-creds` names a directory whose source credentials cannot be
    /// loaded.
    #[error("Parameter 'tls-creds' is unusable: {0}")]
    TlsCreds(#[source] crate::migration::TlsError),
    /// Capabilities change while a migration runs.
    #[error("migration capabilities cannot change while a migration runs")]
    CapabilitiesBusy,
    /// `plan` failed.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// `plan` with both `vm` and `devices`.
    #[error("Parameter 'devices' applies to a new VM, not with 'vm': true")]
    DevicesWithVm,
    /// `plan` with an unknown peer kind.
    #[error(
        "Parameter 'devices[{index}]' does not accept value '{value}': use tap, vhost-user or \
         vhost-net"
    )]
    UnknownPeerKind {
        /// Position in `devices`.
        index: usize,
        /// The kind given.
        value: String,
    },
    /// A `query-host-caps` net spec that does not parse.
    #[error("Parameter 'net[{index}]': {source}")]
    NetSpec {
        /// Position in `net`.
        index: usize,
        /// Why it does not parse.
        #[source]
        source: NetSpecError,
    },
    /// `query-host-caps` with `fd=N`: the number would name one of godwit's
    /// own descriptors, which probing would wrap and then close.
    #[error(
        "Parameter 'net[{index}]': fd={number} is not accepted over the API: a descriptor \
         number there names one of godwit's own files (KVM, guest memory, a running TAP), \
         which the probe would take over and close; pass the TAP's descriptor with SCM_RIGHTS \
         and 'getfd', then give fd=NAME, or name the TAP with ifname="
    )]
    DescriptorInArguments {
        /// Position in `net`.
        index: usize,
        /// The number given.
        number: String,
    },
    /// `fd=NAME` naming no descriptor of this connection.
    #[error("Parameter 'net[{index}]': {source}; pass it with SCM_RIGHTS and 'getfd' first")]
    Descriptor {
        /// Position in `net`.
        index: usize,
        /// What the session said.
        #[source]
        source: DescriptorError,
    },
    /// `query-host-caps` with a vhost-user `server=on`: probing would
    /// replace whatever socket is at the path.
    #[error(
        "Parameter 'net[{index}]': server=on is not accepted over the API: the probe would \
         create a socket at {} and remove any socket already there; probe a backend that \
         listens itself (server=off), or run 'godwit host-caps' on the host",
        socket.display()
    )]
    ServerInArguments {
        /// Position in `net`.
        index: usize,
        /// The socket path given.
        socket: PathBuf,
    },
    /// A reply that could not be encoded as JSON.
    #[error(
        "internal error: cannot encode the reply of '{command}': {source}; see the godwit log"
    )]
    Encode {
        /// The command.
        command: &'static str,
        /// What serde_json said.
        #[source]
        source: serde_json::Error,
    },
}

impl From<CommandError> for QmpError {
    fn from(err: CommandError) -> Self {
        QmpError::generic(err.to_string())
    }
}

fn encode<T: serde::Serialize>(command: &'static str, value: T) -> Result<Value, CommandError> {
    serde_json::to_value(value).map_err(|source| CommandError::Encode { command, source })
}

/// The QMP commands of a running VM.
pub(crate) struct VmCommands {
    vm: Arc<VmHandle>,
}

impl CommandHandler for VmCommands {
    type Command = Command;

    fn execute(&self, command: Command, session: &mut Session) -> Result<Value, QmpError> {
        self.run(command, session).map_err(QmpError::from)
    }
}

impl VmCommands {
    fn run(&self, command: Command, session: &mut Session) -> Result<Value, CommandError> {
        let vm = &self.vm;
        let name = command.name();
        Ok(match command {
            Command::QueryVersion => super::version_info(),
            Command::QueryStatus => {
                let state = vm.run_state();
                json!({"running": state == RunState::Running, "status": state.as_str(), "singlestep": false})
            }
            Command::Stop => {
                vm.stop()?;
                json!({})
            }
            Command::Cont(args) => {
                let postmigrate = vm.run_state() == RunState::PostMigrate;
                vm.cont(args.force)?;
                if postmigrate {
                    json!({"warning": "resumed from postmigrate on the operator's word: the operator takes responsibility that the destination does not run this guest"})
                } else {
                    json!({})
                }
            }
            Command::Quit => {
                // Waits for a snapshot being written, and for a cancelled
                // migration to end, so that none is cut off half-way.
                vm.quit();
                json!({})
            }
            Command::QueryNet => Value::Array(vm.nets.iter().map(NetDevice::query).collect()),
            Command::QueryMachines => query_machines(Some(vm.machine)),
            Command::QueryMigrate => {
                let mut info = encode(name, vm.migration.info())?;
                if let Value::Object(o) = &mut info {
                    o.insert("blocked-reasons".into(), json!(vm.blockers()));
                }
                info
            }
            Command::SnapshotSave(args) => {
                encode(name, crate::persist::snapshot::save(vm, &args.dir)?)?
            }
            Command::Migrate(args) => {
                crate::migration::start(vm, &args.uri, vm.event_sender())?;
                json!({})
            }
            Command::MigrateCancel => {
                vm.migration.cancel();
                json!({})
            }
            Command::MigrateSetParameters(args) => {
                set_migration_parameters(vm, &args)?;
                json!({})
            }
            Command::MigrateSetCapabilities(args) => {
                if vm
                    .migration
                    .running
                    .load(std::sync::atomic::Ordering::SeqCst)
                {
                    return Err(CommandError::CapabilitiesBusy);
                }
                let mut params = vm
                    .migration
                    .params
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                for c in &args.capabilities {
                    match c.capability {
                        Capability::AutoConverge => params.auto_converge = c.state,
                        Capability::Multifd => params.multifd = c.state,
                    }
                }
                json!({})
            }
            Command::QueryMigrateCapabilities => {
                let (auto_converge, multifd) = {
                    let p = vm
                        .migration
                        .params
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    (p.auto_converge, p.multifd)
                };
                encode(
                    name,
                    [
                        CapabilityState {
                            capability: Capability::AutoConverge,
                            state: auto_converge,
                        },
                        CapabilityState {
                            capability: Capability::Multifd,
                            state: multifd,
                        },
                    ],
                )?
            }
            Command::QueryMigrateParameters => {
                let params = vm
                    .migration
                    .params
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                encode(name, params)?
            }
            Command::QueryHostCaps(args) => query_host_caps(&args, session)?,
            Command::Plan(args) => plan(vm, &args)?,
        })
    }
}

fn set_migration_parameters(
    vm: &VmHandle,
    args: &MigrateParametersArgs,
) -> Result<(), CommandError> {
    if args.max_rounds == Some(0) {
        return Err(CommandError::ZeroRounds);
    }
    for (param, value) in [
        ("cpu-throttle-initial", args.cpu_throttle_initial),
        ("cpu-throttle-increment", args.cpu_throttle_increment),
    ] {
        if let Some(value) = value.filter(|v| !(1..=99).contains(v)) {
            return Err(CommandError::ThrottleRange { param, value });
        }
    }
    let max = godwit_migration::protocol::MAX_CHANNELS;
    if let Some(value) = args.multifd_channels.filter(|v| !(1..=max).contains(v)) {
        return Err(CommandError::ChannelsRange { value, max });
    }
    // Loaded before anything changes: a directory that cannot serve leaves
    // the parameters as they were.
    let tls_client = match args.tls_creds.as_deref() {
        Some("") | None => None,
        Some(dir) => Some(
            crate::migration::ClientCreds::load(std::path::Path::new(dir))
                .map_err(CommandError::TlsCreds)?,
        ),
    };
    let mut params = vm
        .migration
        .params
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(n) = args.multifd_channels {
        params.multifd_channels = n;
    }
    if let Some(d) = args.downtime_limit {
        params.downtime_limit_ms = d;
    }
    if let Some(b) = args.max_bandwidth {
        params.max_bandwidth = b;
    }
    if let Some(r) = args.max_rounds {
        params.max_rounds = r;
    }
    if let Some(dir) = &args.tls_creds {
        params.tls_creds.clone_from(dir);
        params.tls_client = tls_client;
    }
    if let Some(name) = &args.tls_hostname {
        params.tls_hostname.clone_from(name);
    }
    if let Some(p) = args.cpu_throttle_initial {
        params.cpu_throttle_initial = p;
    }
    if let Some(p) = args.cpu_throttle_increment {
        params.cpu_throttle_increment = p;
    }
    Ok(())
}

/// A `query-host-caps` spec, refused when probing it would touch anything
/// but the peer it names. `fd=NAME` takes the descriptor the client named
/// with `getfd` out of `session`: the probe owns (and closes) it.
pub(super) fn host_caps_spec(
    index: usize,
    text: &str,
    session: &mut Session,
) -> Result<NetSpec, CommandError> {
    let mut descriptor = None;
    let mut items = Vec::new();
    for item in text.split(',') {
        match item.strip_prefix("fd=") {
            Some(number) if number.starts_with(|c: char| c.is_ascii_digit() || c == '-') => {
                return Err(CommandError::DescriptorInArguments {
                    index,
                    number: number.to_string(),
                })
            }
            Some(name) => {
                let fd = session
                    .take_fd(name)
                    .map_err(|source| CommandError::Descriptor { index, source })?;
                items.push(format!("fd={}", fd.as_raw_fd()));
                descriptor = Some(fd);
            }
            None => items.push(item.to_string()),
        }
    }
    let spec = items
        .join(",")
        .parse::<NetSpec>()
        .map_err(|source| CommandError::NetSpec { index, source })?;
    if let PeerSpec::VhostUser {
        server: true,
        socket,
        ..
    } = &spec.peer
    {
        return Err(CommandError::ServerInArguments {
            index,
            socket: socket.clone(),
        });
    }
    // The spec now carries the number; opening the TAP takes ownership.
    if let Some(fd) = descriptor {
        let _ = fd.into_raw_fd();
    }
    Ok(spec)
}

/// `query-host-caps`: probes the peers the specs name on this host.
fn query_host_caps(args: &HostCapsArgs, session: &mut Session) -> Result<Value, CommandError> {
    let specs = args
        .net
        .iter()
        .enumerate()
        .map(|(index, text)| host_caps_spec(index, text, session))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(host_caps::collect(&specs, args.name.as_deref()).to_json())
}

/// This VM as the planner sees it (`plan` with `vm: true`).
fn vm_view(handle: &VmHandle) -> VmView {
    let devices = handle
        .nets
        .iter()
        .map(|n| {
            let interface = n.interface();
            let dev = n
                .device
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            VmDevice {
                id: n.id.clone(),
                kind: PeerKind::parse(n.peer.kind).unwrap_or(PeerKind::Tap),
                offered: dev.offered_features(),
                acked: dev.acked_features(),
                interface,
            }
        })
        .collect();
    VmView {
        source: "this VM".into(),
        machine: handle.machine.name.to_string(),
        devices,
        blockers: handle.blockers(),
        // What its vCPUs have, as a snapshot of it would record: after a
        // restore or a migration, not necessarily this host's table.
        cpuid: Some(handle.guest_cpuid.clone()).filter(|c| !c.is_empty()),
    }
}

/// `plan`: where a new VM's devices (or this VM) can run.
fn plan(vm: &VmHandle, args: &PlanArgs) -> Result<Value, CommandError> {
    let hosts = planner::hosts_from_values(&args.hosts)?;
    if args.vm {
        if !args.devices.is_empty() {
            return Err(CommandError::DevicesWithVm);
        }
        let plan = planner::plan_vm(&hosts, &vm_view(vm))?;
        return encode("plan", plan);
    }
    let kinds = args
        .devices
        .iter()
        .enumerate()
        .map(|(index, value)| {
            PeerKind::parse(value).ok_or_else(|| CommandError::UnknownPeerKind {
                index,
                value: value.clone(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    encode("plan", planner::plan(&hosts, &kinds)?)
}

/// QMP `query-machines`: every type with its resolved virtio-net ABI.
pub fn query_machines(current: Option<&MachineType>) -> Value {
    let newest = machine_types::newest().name;
    Value::Array(
        machine_types::MACHINE_TYPES
            .iter()
            .rev()
            .map(|m| {
                let mut v = serde_json::to_value(m.resolved()).unwrap_or(Value::Null);
                if let Value::Object(o) = &mut v {
                    o.insert("is-default".into(), json!(m.name == newest));
                    if m.name == newest {
                        o.insert("alias".into(), json!(machine_types::ALIAS));
                    }
                    if let Some(c) = current {
                        o.insert("is-current".into(), json!(c.name == m.name));
                    }
                }
                v
            })
            .collect(),
    )
}

/// Serves the API of `machine` on a Unix socket at `path`; the server stops
/// when the machine's run ends.
pub fn serve(machine: &mut Machine, path: &Path) -> Result<(), ApiError> {
    let vm = machine.handle();
    let events = EventSender::new();
    vm.api_events.attach(Arc::new(events.clone()));
    let server = ApiServer::start_with_events(path, Arc::new(VmCommands { vm }), events)?;
    machine.attach_service(Box::new(server));
    Ok(())
}

impl EventSink for EventSender {
    fn emit(&self, name: &str, data: Value) {
        EventSender::emit(self, name, data);
    }
}

impl Service for ApiServer {
    fn shutdown(&mut self) {
        ApiServer::shutdown(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::CommandSet;

    fn parse_err(name: &str, args: &str) -> String {
        match Command::parse(name, args) {
            Err(err) => err.to_string(),
            Ok(other) => panic!("{name} {args}: parsed as {other:?}"),
        }
    }

    #[test]
    fn every_name_parses_to_its_own_variant() {
        for name in Command::NAMES {
            let args = match *name {
                "snapshot-save" => r#"{"dir": "/tmp/x"}"#,
                "migrate" => r#"{"uri": "unix:/tmp/x"}"#,
                "plan" => r#"{"hosts": []}"#,
                "migrate-set-capabilities" => r#"{"capabilities": []}"#,
                _ => "{}",
            };
            let command = Command::parse(name, args)
                .unwrap_or_else(|e| panic!("{name}: {e}"))
                .unwrap_or_else(|| panic!("{name}: not found"));
            assert_eq!(command.name(), *name);
        }
    }

    #[test]
    fn capabilities_are_qemus_names() {
        let Some(Command::MigrateSetCapabilities(args)) = Command::parse(
            "migrate-set-capabilities",
            r#"{"capabilities": [{"capability": "auto-converge", "state": true}]}"#,
        )
        .unwrap() else {
            panic!("not parsed");
        };
        assert_eq!(args.capabilities[0].capability, Capability::AutoConverge);
        assert!(args.capabilities[0].state);
        let Some(Command::MigrateSetCapabilities(args)) = Command::parse(
            "migrate-set-capabilities",
            r#"{"capabilities": [{"capability": "multifd", "state": true}]}"#,
        )
        .unwrap() else {
            panic!("not parsed");
        };
        assert_eq!(args.capabilities[0].capability, Capability::Multifd);
        let Some(Command::MigrateSetParameters(args)) =
            Command::parse("migrate-set-parameters", r#"{"multifd-channels": 4}"#).unwrap()
        else {
            panic!("not parsed");
        };
        assert_eq!(args.multifd_channels, Some(4));
        assert!(Command::parse(
            "migrate-set-capabilities",
            r#"{"capabilities": [{"capability": "x-frobnicate", "state": true}]}"#,
        )
        .is_err());
    }

    #[test]
    fn unknown_command_is_not_parsed() {
        assert!(Command::parse("frobnicate", "{}").unwrap().is_none());
        // QMP's own commands belong to the protocol layer.
        assert!(Command::parse("qmp_capabilities", "{}").unwrap().is_none());
    }

    #[test]
    fn missing_argument_is_named() {
        assert_eq!(
            parse_err("snapshot-save", "{}"),
            "Parameter 'dir' is missing"
        );
        assert_eq!(
            parse_err("plan", r#"{"vm": true}"#),
            "Parameter 'hosts' is missing"
        );
    }

    #[test]
    fn wrong_type_names_the_field() {
        assert_eq!(
            parse_err("migrate", r#"{"uri": 5}"#),
            "Invalid parameter type for 'uri': expected a string, got integer `5`"
        );
        assert_eq!(
            parse_err("migrate-set-parameters", r#"{"max-rounds": "many"}"#),
            "Invalid parameter type for 'max-rounds': expected u32, got string \"many\""
        );
        assert_eq!(
            parse_err("query-host-caps", r#"{"net": ["tap,ifname=t0", 7]}"#),
            "Invalid parameter type for 'net[1]': expected a string, got integer `7`"
        );
        assert_eq!(
            parse_err("plan", r#"{"hosts": [], "vm": "yes"}"#),
            "Invalid parameter type for 'vm': expected a boolean, got string \"yes\""
        );
    }

    #[test]
    fn unknown_field_is_refused() {
        assert_eq!(
            parse_err("snapshot-save", r#"{"dir": "/tmp/x", "compress": true}"#),
            "Parameter 'compress' is unexpected"
        );
        assert_eq!(
            parse_err("stop", r#"{"now": 1}"#),
            "Parameter 'now' is unexpected"
        );
        assert_eq!(
            parse_err("migrate-set-parameters", r#"{"downtime_limit": 1}"#),
            "Parameter 'downtime_limit' is unexpected"
        );
    }

    #[test]
    fn host_caps_refuses_descriptors_and_server_sockets() {
        let mut session = Session::default();
        let mut err = |text: &str| {
            host_caps_spec(0, text, &mut session)
                .expect_err(text)
                .to_string()
        };
        assert!(err("tap,fd=3").contains("fd=3 is not accepted over the API"));
        assert!(err("tap,fd=-1").contains("fd=-1 is not accepted"));
        assert_eq!(
            err("tap,fd=net0"),
            "Parameter 'net[0]': File descriptor named 'net0' not found; pass it with \
             SCM_RIGHTS and 'getfd' first"
        );
        let msg = err("vhost-user,socket=/run/x.sock,server=on");
        assert!(msg.contains("server=on is not accepted"), "{msg}");
        assert!(msg.contains("/run/x.sock"), "{msg}");
        assert!(host_caps_spec(0, "tap,ifname=gw0", &mut session).is_ok());
        assert!(host_caps_spec(0, "vhost-user,socket=/run/x.sock", &mut session).is_ok());
    }
}
