//! Runnable examples of BISTRO and the devnet harness behind `cargo run --example devnet`.

pub mod devnet;
pub mod hostile;
pub mod learning;
pub mod svg;
