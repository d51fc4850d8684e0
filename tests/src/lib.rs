//! `colony-tests` holds Colony's multi-peer integration tests, the benchmark binary
//! (`cargo run --release -p colony-tests --bin bench -- <suite> [--json]`; [`bench`] holds the suites) and the
//! chaos soak (`cargo run --release -p colony-tests --bin soak -- --minutes 10`; [`soak`]).

pub mod bench;
pub mod processes;
pub mod soak;
