//! A training peer in one call: the transport for an address, membership with the optimizer's protocols and
//! record schemas, and the [`CollaborativeOptimizer`]. What a trainer (or the demo) needs to join a run.

use std::sync::Arc;
use std::time::Duration;

use colony_averaging::tensor::TensorInfo;
use colony_transports::quic::{QuicConfig, QuicTransport};
use colony_transports::tcp::{TcpConfig, TcpTransport};
use colony_transports::{Address, Keypair, Scheme, Transport};

use crate::membership::{Membership, MembershipConfig};
use crate::optimizer::{CollaborativeOptimizer, CollaborativeOptions, OptimizerServices};
use crate::records::Schemas;

/// The transport that serves addresses of `scheme` (tcp or quic), authenticated as `keypair`.
pub fn transport_for(scheme: Scheme, keypair: &Keypair) -> Result<Arc<dyn Transport>, String> {
    Ok(match scheme {
        Scheme::Tcp => Arc::new(TcpTransport::new(keypair.clone(), TcpConfig::default())),
        Scheme::Quic => Arc::new(QuicTransport::new(keypair.clone(), QuicConfig::default())),
        Scheme::Mem => {
            return Err("mem:// addresses exist only inside one process; use tcp:// or quic://".into());
        }
    })
}

/// Record schemas of a peer that trains or relays for trainers (progress, matchmaking).
pub fn training_schemas() -> Schemas {
    let mut schemas = Schemas::default();
    OptimizerServices::register_schemas(&mut schemas);
    schemas
}

/// A peer of a run: its membership and its optimizer.
pub struct TrainingPeer {
    /// Membership (the caller leaves or shuts it down after the optimizer).
    pub membership: Membership,
    /// The optimizer.
    pub optimizer: CollaborativeOptimizer,
}

/// Starts a peer: membership per `config` (over `transport`, or the one for `config.listen`'s scheme, or
/// for the first initial peer's when it does not listen) with the optimizer's protocols, then the
/// optimizer for `tensors` starting at `initial_params`. Must run inside a tokio runtime.
pub async fn start_training_peer(
    config: MembershipConfig,
    keypair: Keypair,
    transport: Option<Arc<dyn Transport>>,
    tensors: Vec<TensorInfo>,
    initial_params: &[f32],
    options: CollaborativeOptions,
) -> Result<TrainingPeer, String> {
    let transport = match transport {
        Some(transport) => transport,
        None => {
            let scheme = config
                .listen
                .as_ref()
                .or(config.initial_peers.first())
                .map(Address::scheme)
                .ok_or("a peer that does not listen needs an initial peer")?;
            transport_for(scheme, &keypair)?
        }
    };
    let services = OptimizerServices::new(options.next_chunk_timeout().max(Duration::from_secs(1)));
    let membership = Membership::start_with(config, Arc::new(keypair), transport, training_schemas(), |router| {
        services.register(router)
    })
    .await
    .map_err(|e| e.to_string())?;
    let optimizer = CollaborativeOptimizer::start(&membership, &services, tensors, initial_params, options)
        .map_err(|e| e.to_string());
    match optimizer {
        Ok(optimizer) => Ok(TrainingPeer { membership, optimizer }),
        Err(error) => {
            membership.shutdown();
            Err(error)
        }
    }
}
