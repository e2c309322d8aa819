//! `godwit acpi-dump DIR` (hidden): writes the ACPI tables a VM with these
//! vCPUs and virtio-mmio devices gets, one `SIG.dat` file per table, for
//! `iasl -d` and for looking at them without booting anything.

use std::path::PathBuf;

use clap::Args;

use crate::boot::acpi::{self, AcpiError, VirtioMmioDevice};
use crate::devices::net::placement;

#[derive(Args)]
pub struct AcpiDumpArgs {
    /// Directory to write the tables into (created if missing).
    dir: PathBuf,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u8,
    /// Number of virtio-mmio network devices, placed as `--net` places them.
    #[arg(long, value_name = "N", default_value_t = 0)]
    nets: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum AcpiDumpError {
    #[error(transparent)]
    Tables(#[from] AcpiError),
    #[error("at most {max} network devices have an IRQ, not {asked}")]
    TooManyNets { asked: usize, max: usize },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub fn execute(args: &AcpiDumpArgs) -> Result<u8, super::Error> {
    if args.nets > placement::max_devices() {
        return Err(AcpiDumpError::TooManyNets {
            asked: args.nets,
            max: placement::max_devices(),
        }
        .into());
    }
    let devices: Vec<VirtioMmioDevice> = (0..args.nets)
        .map(|i| {
            let (base, irq) = placement::slot(i);
            VirtioMmioDevice { base, irq }
        })
        .collect();
    let tables = acpi::build(args.vcpus, &devices).map_err(AcpiDumpError::from)?;
    let write_err = |path: &PathBuf| {
        let path = path.clone();
        move |source| AcpiDumpError::Write { path, source }
    };
    std::fs::create_dir_all(&args.dir).map_err(write_err(&args.dir))?;
    for t in &tables {
        let path = args.dir.join(format!("{}.dat", t.signature.to_lowercase()));
        std::fs::write(&path, &t.bytes).map_err(write_err(&path))?;
        super::print_out(&format!(
            "{} {:#x} {}\n",
            t.signature,
            t.addr,
            path.display()
        ))?;
    }
    Ok(super::EXIT_SUCCESS)
}
