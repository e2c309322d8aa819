//! `godwit probe --net SPEC`: what a network peer supports, without a VM.

use clap::Args;

use crate::config::net_spec::NetSpec;

#[derive(Args)]
pub struct ProbeArgs {
    /// The peer, as given to `godwit run --net`, e.g. tap,ifname=tap0.
    #[arg(long, value_name = "SPEC")]
    net: NetSpec,
}

pub fn execute(args: &ProbeArgs) -> Result<u8, super::Error> {
    let report = crate::devices::net::probe_report(&args.net)?;
    super::print_out(&format!("{report:#}\n"))?;
    Ok(super::EXIT_SUCCESS)
}
