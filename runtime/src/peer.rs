//! A training peer in one call: the transport for an address, membership with the optimizer's protocols and
//! record schemas, and the [`CollaborativeOptimizer`]. What a trainer (or the demo) needs to join a run.

use std::sync::Arc;
use std::time::Duration;

use colony_averaging::tensor::TensorInfo;
use colony_transports::quic::{QuicConfig, QuicTransport};
use colony_transports::tcp::{TcpConfig, TcpTransport};
use colony_transports::{Address, Keypair, Scheme, Transport};

use crate::membership::{Membership, MembershipConfig, Role};
use crate::optimizer::run_schema::{self, RunSchema};
use crate::optimizer::{CollaborativeOptimizer, CollaborativeOptions, OptimizerServices, RoundReport, RoundResult};
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

/// Starts an auxiliary peer: a member that holds no model and reduces parts of the gradient rounds for the
/// trainers (Hivemind's CPU-only helpers). It joins per `config` (its role becomes auxiliary; it must
/// listen), waits up to `schema_timeout` for a trainer and asks it for the run's gradient schema (tensors,
/// codecs, part size, target batch size), then starts an optimizer with `options` made auxiliary and
/// fitted to that schema (`options` gives the timings; its optimizer rule, target, compression, statistics
/// and extra tensors are replaced). Drive it with [`CollaborativeOptimizer::step_auxiliary`] in a loop.
pub async fn start_auxiliary_peer(
    mut config: MembershipConfig,
    keypair: Keypair,
    transport: Option<Arc<dyn Transport>>,
    mut options: CollaborativeOptions,
    schema_timeout: Duration,
) -> Result<(TrainingPeer, RunSchema), String> {
    let listen = config
        .listen
        .clone()
        .ok_or("an auxiliary peer reduces for others, so it must listen: give it a listen address")?;
    config.role = Role::Auxiliary;
    let transport = match transport {
        Some(transport) => transport,
        None => transport_for(listen.scheme(), &keypair)?,
    };
    let services = OptimizerServices::new(options.next_chunk_timeout().max(Duration::from_secs(1)));
    let membership = Membership::start_with(config, Arc::new(keypair), transport, training_schemas(), |router| {
        services.register(router)
    })
    .await
    .map_err(|e| e.to_string())?;
    let schema = match fetch_schema(&membership, schema_timeout).await {
        Ok(schema) => schema,
        Err(error) => {
            membership.shutdown();
            return Err(error);
        }
    };
    options.auxiliary = true;
    options.client_mode = None;
    options.batch_size_per_step = None;
    options.use_local_updates = false;
    options.target_batch_size = schema.target_batch_size;
    options.part_size_bytes = schema.part_size_bytes;
    options.grad_compression = schema.codec_policy();
    let values: usize = schema.tensors.iter().map(|t| t.shape.iter().product::<usize>()).sum();
    // It never steps and joins no state round: an optimizer of the model's size without statistics.
    options.optimizer = colony_offload::OptimizerConfig::sgd(0.0, 0.0, values);
    options.average_opt_statistics.clear();
    options.extra_tensors.clear();
    let optimizer = CollaborativeOptimizer::start(
        &membership,
        &services,
        schema.tensors.clone(),
        &vec![0.0; values],
        options,
    )
    .map_err(|e| e.to_string());
    match optimizer {
        Ok(optimizer) => Ok((TrainingPeer { membership, optimizer }, schema)),
        Err(error) => {
            membership.shutdown();
            Err(error)
        }
    }
}

/// Asks the trainers among the members for the run's schema until one answers or `timeout` passes.
async fn fetch_schema(membership: &Membership, timeout: Duration) -> Result<RunSchema, String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let connector = membership.connector();
    let mut last = "no trainer is a member yet".to_string();
    loop {
        let trainers: Vec<_> = membership
            .members()
            .into_iter()
            .filter(|m| matches!(m.role, Role::Trainer | Role::Client))
            .map(|m| m.peer)
            .collect();
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if !trainers.is_empty() {
            match run_schema::fetch(connector.as_ref(), &trainers, left.min(Duration::from_secs(10))).await {
                Ok(schema) => return Ok(schema),
                Err(error) => last = error,
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("no run schema within {timeout:?}: {last}"));
        }
        tokio::time::sleep(Duration::from_millis(200).min(left)).await;
    }
}

/// Drives an auxiliary peer until `stop` resolves: [`CollaborativeOptimizer::step_auxiliary`] every `poll`
/// (it returns at once when no round is due), handing each finished round to `on_round`. Returns the rounds
/// reduced and failed.
pub async fn run_auxiliary(
    optimizer: &mut CollaborativeOptimizer,
    poll: Duration,
    stop: impl std::future::Future<Output = ()>,
    mut on_round: impl FnMut(&RoundReport),
) -> (u64, u64) {
    let (mut reduced, mut failed) = (0u64, 0u64);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            outcome = optimizer.step_auxiliary() => match outcome {
                Ok(outcome) => {
                    for round in &outcome.rounds {
                        match &round.result {
                            RoundResult::Averaged { .. } => reduced += 1,
                            RoundResult::Failed { .. } => failed += 1,
                        }
                        on_round(round);
                    }
                }
                Err(error) => {
                    tracing::error!("the auxiliary optimizer stopped: {error}");
                    break;
                }
            },
        }
        tokio::select! {
            () = &mut stop => break,
            () = tokio::time::sleep(poll) => {}
        }
    }
    (reduced, failed)
}
