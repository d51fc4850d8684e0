//! `colony-examples`: the model and data that Colony's example trainers and the swarm demo train, and the
//! charts they draw.
//!
//! Colony averages flat `f32` buffers, so everything here is shaped for that:
//! - [`data`]: a deterministic synthetic classification task ([`data::generate`] from a [`data::DataSpec`])
//!   that every peer can regenerate from a seed, and a shuffled mini-batch iterator ([`data::Batches`]) that
//!   each peer seeds differently.
//! - [`model`]: an MLP classifier on candle's CPU backend ([`model::Mlp`]) whose parameters and gradients are
//!   single flat buffers laid out as [`model::Mlp::tensor_infos`] says.
//! - [`plot`]: loss curves as a PNG ([`plot::plot_loss_curves`]) that needs no system fonts.
//! - [`swarm`]: the flags of every Colony option and one peer's training loop with the collaborative
//!   optimizer, shared by the `demo` (four peers in one process) and `trainer` (one peer per process)
//!   binaries.
//!
//! This is the only crate of the workspace that depends on candle and plotters (DESIGN.md §2).

pub mod data;
pub mod model;
pub mod plot;
pub mod swarm;

pub use data::{Batches, DataSpec, Dataset, generate};
pub use model::{Evaluation, Mlp, MlpSpec};
pub use plot::{Series, plot_loss_curves};
