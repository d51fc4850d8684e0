//! `colony` will be Colony's runtime: the actors (membership, progress tracking, matchmaking, gradient
//! accumulation and averaging, state averaging, the optimizer and offload), the replicated record store, the
//! configuration, the `CollaborativeOptimizer` handle that a trainer calls, and the `colony` command-line
//! tool. It is the only crate that depends on the actor framework.
//!
//! Built so far: [`records`] (the replicated record store's rules, signatures, typed values, limits, and its
//! anti-entropy exchange), [`membership`] (SWIM with foca in an actor, joins, failure detection, gossip of
//! records), [`actors::matchmaker`] (groups for averaging, over the records) and [`averager`] (matchmaking,
//! load balancing and the all-reduce in one call). The collaborative optimizer comes next.

pub mod actors;
pub mod averager;
pub mod config;
pub mod membership;
pub mod optimizer;
pub mod peer;
pub mod progress;
pub mod records;
pub mod status;
pub mod telemetry;
