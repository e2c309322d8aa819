//! The guest-visible network ABI: versioned machine types and the strict
//! check of a peer against what a machine type requires.

pub mod machine_types;
pub mod strict;
