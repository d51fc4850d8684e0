//! `colony` will be Colony's runtime: the actors (membership, progress tracking, matchmaking, gradient
//! accumulation and averaging, state averaging, the optimizer and offload), the replicated record store, the
//! configuration, the `CollaborativeOptimizer` handle that a trainer calls, and the `colony` command-line
//! tool. It is the only crate that depends on the actor framework.
//!
//! Built so far: [`records`], the pure core of the replicated record store (storage rules, signatures,
//! typed values, limits). The membership actor that disseminates records comes next.

pub mod actors;
pub mod averager;
pub mod membership;
pub mod records;
