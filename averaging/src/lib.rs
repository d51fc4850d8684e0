//! `colony-averaging` is Colony's averaging engine: it averages tensors among a group of unreliable peers.
//!
//! - [`tensor`]: named tensors laid out in one flat `f32` buffer ([`tensor::TensorLayout`]) and the schema
//!   hash that decides who may average together.
//! - [`codec`]: compression codecs for parts and the policies that choose them.
//! - [`partition`]: cutting the flat buffer into parts and assigning them to reducers.
//! - [`balance`]: load balancing: how much of the vector each peer reduces, from their bandwidths.
//! - [`reducer`]: the sans-IO part reducer (weighted, in order, banning failed senders).
//! - [`aggregation`]: how a reducer combines the copies of a part: the weighted mean or CenteredClip.
//! - [`allreduce`]: the fault-tolerant butterfly all-reduce over transport streams.
//! - [`matchmaking`]: the pure matchmaking state machine and Moshpit group keys.
//! - [`state_transfer`]: donors serving their state and receivers downloading it in chunks.
//! - [`net`]: how the engine reaches peers ([`net::Connector`]) and a stand-alone [`net::Endpoint`].
//!
//! The crate depends on no actor framework and no GPU: its cores are pure (time and randomness passed in)
//! and its runners are plain tokio tasks over [`colony_transports`] streams. The `colony` runtime drives it.

pub mod aggregation;
pub mod allreduce;
pub mod balance;
pub mod codec;
pub mod matchmaking;
pub mod net;
pub mod partition;
pub mod reducer;
pub mod state_transfer;
pub mod tensor;
