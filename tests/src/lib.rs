//! `colony-tests` holds Colony's multi-peer integration tests and the benchmark binary
//! (`cargo run --release -p colony-tests --bin bench -- <suite> [--json]`); [`bench`] holds the suites.

pub mod bench;
pub mod processes;
