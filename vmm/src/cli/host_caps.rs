//! `godwit host-caps`: prints (or writes) this host's capability report.
//! Peers that cannot be probed are entries with an error, not a failure;
//! exit status 1 only when the report cannot be written.

use std::path::PathBuf;

use clap::Args;

use crate::config::net_spec::NetSpec;
use crate::planning::host_caps::collect;

#[derive(Args, Debug)]
pub struct HostCapsArgs {
    /// A peer to probe, as given to `godwit run --net`: tap,ifname=NAME[,vnet_hdr=off],
    /// vhost-user,socket=PATH[,server=on][,interface=NAME], vhost-net,ifname=NAME.
    /// Repeatable. Without a tap spec a temporary TAP is created, probed and removed.
    #[arg(long, value_name = "SPEC")]
    pub net: Vec<NetSpec>,
    /// The host's name in plans (default: the hostname).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Write the report to this file instead of standard output.
    #[arg(long, value_name = "PATH")]
    pub output: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum HostCapsError {
    #[error("cannot encode the report: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("cannot write {}: {source}", path.display())]
    WriteFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub fn execute(args: &HostCapsArgs) -> Result<u8, super::Error> {
    let report = collect(&args.net, args.name.as_deref());
    let text = serde_json::to_string_pretty(&report).map_err(HostCapsError::Encode)? + "\n";
    match &args.output {
        Some(path) => std::fs::write(path, &text).map_err(|source| HostCapsError::WriteFile {
            path: path.clone(),
            source,
        })?,
        None => super::print_out(&text)?,
    }
    Ok(super::EXIT_SUCCESS)
}
