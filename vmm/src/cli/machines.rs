//! `godwit machines`: the machine types, the alias, and what each adds.

use crate::abi::machine_types;

pub fn execute() -> Result<u8, super::Error> {
    super::print_out(&machine_types::help_text())?;
    Ok(super::EXIT_SUCCESS)
}
