//! `godwit plan`: exit status 0 when a plan exists for every device (or the
//! VM can migrate to every host), 5 when not, 1 on bad input. With `--vm`
//! on an API socket, the VM's answers are fetched here and handed to the
//! planner as plain data.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Serialize;
use serde_json::{json, Value};

use crate::api::{ClientError, QmpClient};
use crate::planning::host_caps::PeerKind;
use crate::planning::planner::{
    self, read_hosts, render_plan, render_vm_plan, vm_from_query, vm_from_snapshot, PlanError,
    VmInputError, VmView,
};

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// Host reports written by `godwit host-caps` on each host.
    #[arg(value_name = "HOST.json", required = true)]
    pub hosts: Vec<PathBuf>,
    /// Judge an existing VM instead: its API socket (a running VM) or a
    /// snapshot directory.
    #[arg(long, value_name = "API-SOCKET|SNAPSHOT-DIR")]
    pub vm: Option<PathBuf>,
    /// The new VM's network devices by peer kind (tap, vhost-user,
    /// vhost-net), in order; repeatable. Default: one per kind every host has.
    #[arg(long = "device", value_name = "KIND", conflicts_with = "vm")]
    pub devices: Vec<PeerKind>,
    /// Print the answer as JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Why `godwit plan` could not answer.
#[derive(Debug, thiserror::Error)]
pub enum PlanCliError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Vm(#[from] VmInputError),
    #[error("cannot read the VM from {source_desc}: {source}")]
    Api {
        source_desc: String,
        #[source]
        source: ClientError,
    },
    #[error("cannot read the VM from {source_desc}: {command}: {source}")]
    ApiCommand {
        source_desc: String,
        command: &'static str,
        #[source]
        source: ClientError,
    },
}

/// A running VM, through its API socket (`query-net`, `query-migrate`).
fn vm_from_api(socket: &Path) -> Result<VmView, PlanCliError> {
    let source_desc = format!("API socket {}", socket.display());
    let mut client = QmpClient::connect(socket, Duration::from_secs(10)).map_err(|source| {
        PlanCliError::Api {
            source_desc: source_desc.clone(),
            source,
        }
    })?;
    let mut ask = |command: &'static str| {
        client
            .execute(command, Value::Null)
            .map_err(|source| PlanCliError::ApiCommand {
                source_desc: source_desc.clone(),
                command,
                source,
            })
    };
    let nets = ask("query-net")?;
    let migrate = ask("query-migrate")?;
    Ok(vm_from_query(&source_desc, &nets, &migrate)?)
}

/// The answer as JSON (what `--json` prints).
fn to_json<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or_else(|e| json!({"error": e.to_string()}))
}

/// The exit status, the JSON and the text of the answer.
fn answer(args: &PlanArgs) -> Result<(u8, Value, String), PlanCliError> {
    let hosts = read_hosts(&args.hosts)?;
    Ok(match &args.vm {
        Some(path) => {
            let vm = if path.is_dir() {
                vm_from_snapshot(path)?
            } else {
                vm_from_api(path)?
            };
            let p = planner::plan_vm(&hosts, &vm)?;
            (p.exit_code(), to_json(&p), render_vm_plan(&p))
        }
        None => {
            let p = planner::plan(&hosts, &args.devices)?;
            (p.exit_code(), to_json(&p), render_plan(&p))
        }
    })
}

pub fn execute(args: &PlanArgs) -> Result<u8, super::Error> {
    let (code, json, text) = answer(args)?;
    if args.json {
        super::print_out(&format!("{json:#}\n"))?;
    } else {
        super::print_out(&text)?;
    }
    Ok(code)
}
