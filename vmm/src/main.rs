//! The `godwit` command: parses the command line, runs the subcommand
//! (`godwit_vmm::cli`), and turns its outcome into the exit status.

use std::process::ExitCode;

use clap::Parser;

use godwit_vmm::cli::{self, Cli};

fn main() -> ExitCode {
    let args = Cli::parse();
    cli::init_logging();
    match args.command.execute() {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            cli::report_error(&e);
            ExitCode::from(e.exit_status())
        }
    }
}
