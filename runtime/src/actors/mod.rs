//! The runtime's actors, one file each, named after the actor. Each is a thin shell around a pure core
//! (in this crate or in `colony-averaging`): it feeds the core messages, timer ticks and bytes, and
//! carries out what the core asks for.
//!
//! - [`matchmaker`]: finds groups of peers to average with, over membership's records and connections.
//! - [`progress_tracker`]: publishes this peer's training progress and estimates the swarm's (samples,
//!   rate, when the epoch is due).

pub mod matchmaker;
pub mod progress_tracker;
