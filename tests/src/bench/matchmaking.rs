//! `bench -- matchmaking`: how fast four peers that start looking together hold their group.
//!
//! Four peers (membership and a matchmaker each, `target_group_size` 4, default timings: the declared time
//! is `min_matchmaking_time` = 5 s away) run in this process on one transport: `mem` (the in-process hub,
//! no link emulation) or `tcp` over loopback. Each round, all four call `look_for_group` at the same
//! moment with `scheduled_start` = now; the time runs from that moment until the last of them returns its
//! group, and the round counts only if all four hold the same group. One warm-up round comes first; then
//! `repeat` rounds give the median and the 90th percentile.
//!
//! What the time covers: each peer signs and publishes its declaration, push gossip carries it to the
//! others, their record subscriptions wake their matchmakers, followers open join streams to the earliest
//! leader (after a redirection or two when they saw another leader first), and the leader sends the group.
//!
//! The bound is the goal, 20 ms. For scale, each case's note gives a request/response round trip on
//! the same transport (a one-message rpc on membership's router, median of 200), measured in the same run.
//! The rounds follow each other within milliseconds, far faster than a training run matches, so the record
//! publishing limits are raised above the defaults (5 updates per second per slot) that would throttle them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use colony::actors::matchmaker::{self, GroupRequest, Matchmaker, MatchmakingService};
use colony::membership::{Membership, MembershipConfig};
use colony::records::Schemas;
use colony::records::replica::PublishLimits;
use colony_averaging::matchmaking::MatchmakingConfig;
use colony_averaging::tensor::SchemaHash;
use colony_transports::mem::MemHub;
use colony_transports::rpc::{self, InboundLimits, StreamConfig};
use colony_transports::tcp::{TcpConfig, TcpTransport};
use colony_transports::wire::ProtocolId;
use colony_transports::{Address, Keypair, Transport};

use super::Measurement;

const SUITE: &str = "matchmaking";
const RUN: &str = "matchmaking-bench";
const PEERS: usize = 4;
/// The goal: four peers hold their group within 20 ms of starting to look.
const GOAL_MS: f64 = 20.0;
const LOOK_TIMEOUT: Duration = Duration::from_secs(10);
const CONVERGE_DEADLINE: Duration = Duration::from_secs(30);
const RTT_CALLS: usize = 200;

/// Runs the suite: `repeat` timed rounds per transport, for the case named `only` (`mem` or `tcp`; both
/// when `None`).
pub async fn run(repeat: usize, only: Option<&str>) -> anyhow::Result<Vec<Measurement>> {
    let cases: Vec<&str> = ["mem", "tcp"]
        .into_iter()
        .filter(|name| only.is_none_or(|only| only == *name))
        .collect();
    if cases.is_empty() {
        bail!("the matchmaking suite has the cases mem and tcp, not {only:?}");
    }
    let mut results = Vec::new();
    for case in cases {
        let swarm = Swarm::start(case)
            .await
            .with_context(|| format!("starting the {case} swarm"))?;
        let measured = swarm.measure(repeat).await.with_context(|| format!("case {case}"));
        swarm.shutdown();
        let (latencies, rtt_ms) = measured?;
        let note = format!(
            "{PEERS} peers, target {PEERS}, {repeat} rounds (best {:.2}, worst {:.2} ms); rpc round trip {rtt_ms:.3} ms",
            latencies[0],
            latencies[latencies.len() - 1],
        );
        for (name, value) in [
            ("median", percentile(&latencies, 0.5)),
            ("p90", percentile(&latencies, 0.9)),
        ] {
            results.push(
                Measurement::new(SUITE, format!("{case} {name}"), value, "ms", GOAL_MS)
                    .bound_case("issue goal")
                    .note(note.clone()),
            );
        }
    }
    Ok(results)
}

/// The value below which a fraction `q` of the sorted `values` lie (nearest rank).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

struct Peer {
    membership: Membership,
    matchmaker: Arc<Matchmaker>,
}

struct Swarm {
    peers: Vec<Peer>,
}

fn echo() -> ProtocolId {
    ProtocolId::new("bench-echo", 1).expect("a valid protocol name")
}

impl Swarm {
    async fn start(case: &str) -> anyhow::Result<Self> {
        let hub = MemHub::new();
        let mut peers: Vec<Peer> = Vec::new();
        for i in 0..PEERS {
            let keypair = Keypair::generate();
            let (transport, listen): (Arc<dyn Transport>, Address) = match case {
                "mem" => (hub.transport(&keypair), format!("mem://mm-bench-{i}").parse()?),
                _ => {
                    let copy = Keypair::from_pkcs8_der(&keypair.to_pkcs8_der()).map_err(anyhow::Error::msg)?;
                    (
                        Arc::new(TcpTransport::new(copy, TcpConfig::default())),
                        "tcp://127.0.0.1:0".parse()?,
                    )
                }
            };
            let mut config = MembershipConfig::new(RUN, Some(listen));
            config.initial_peers = peers.first().and_then(|p| p.membership.address()).into_iter().collect();
            config.publish_limits = PublishLimits {
                rate_per_sec: 10_000.0,
                burst: 10_000,
                peer_rate_per_sec: 100_000.0,
                peer_burst: 100_000,
                ..PublishLimits::default()
            };
            // Likewise the streams each follower opens to its leader, round after round.
            config.stream.inbound = InboundLimits {
                streams_per_sec: 1e6,
                stream_burst: 1_000_000,
                ..InboundLimits::default()
            };
            let mut schemas = Schemas::default();
            matchmaker::register_schema(&mut schemas);
            let service = MatchmakingService::new();
            let membership = Membership::start_with(config, Arc::new(keypair), transport, schemas, |router| {
                service.register(router);
                router.rpc(
                    echo(),
                    |_peer, message: u64, payload| async move { Ok((message, payload)) },
                );
            })
            .await?;
            let matchmaking = MatchmakingConfig {
                target_group_size: Some(PEERS),
                ..MatchmakingConfig::new("bench")
            };
            let matchmaker = Matchmaker::start(&membership, &service, matchmaking)?;
            peers.push(Peer {
                membership,
                matchmaker: Arc::new(matchmaker),
            });
        }
        let started = Instant::now();
        while !peers.iter().all(|p| p.membership.members().len() == PEERS - 1) {
            if started.elapsed() > CONVERGE_DEADLINE {
                bail!("the {PEERS} peers did not see each other within {CONVERGE_DEADLINE:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Self { peers })
    }

    /// `repeat` rounds after a warm-up: the sorted latencies in ms, and the median rpc round trip in ms.
    async fn measure(&self, repeat: usize) -> anyhow::Result<(Vec<f64>, f64)> {
        self.round().await.context("warm-up round")?;
        let mut latencies = Vec::with_capacity(repeat);
        for index in 0..repeat {
            let latency = self.round().await.with_context(|| format!("round {index}"))?;
            latencies.push(latency.as_secs_f64() * 1e3);
        }
        latencies.sort_by(f64::total_cmp);
        Ok((latencies, self.round_trip().await?))
    }

    /// One round: every peer looks at once; the time until the last holds the (same) group.
    async fn round(&self) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let tasks: Vec<_> = self
            .peers
            .iter()
            .map(|peer| {
                let matchmaker = peer.matchmaker.clone();
                let request = GroupRequest {
                    scheduled_start: Some(matchmaker.now()),
                    ..GroupRequest::new(SchemaHash([1; 32]), LOOK_TIMEOUT)
                };
                tokio::spawn(async move {
                    let group = matchmaker.look_for_group(request).await;
                    (group, start.elapsed())
                })
            })
            .collect();
        let mut slowest = Duration::ZERO;
        let mut group_id = None;
        for task in tasks {
            let (group, elapsed) = task.await?;
            let group = group?;
            if group.len() != PEERS || *group_id.get_or_insert(group.group_id) != group.group_id {
                bail!("the peers did not all hold one group of {PEERS}");
            }
            slowest = slowest.max(elapsed);
        }
        Ok(slowest)
    }

    /// The median of one-message request/response calls between two peers over their pool connection.
    async fn round_trip(&self) -> anyhow::Result<f64> {
        let conn = self.peers[0]
            .membership
            .connector()
            .connect(&self.peers[1].membership.local_peer())
            .await?;
        let config = StreamConfig::default();
        let mut times = Vec::with_capacity(RTT_CALLS);
        for i in 0..RTT_CALLS as u64 {
            let start = Instant::now();
            let (answer, _): (u64, Bytes) =
                rpc::call(&conn, &echo(), &i, Bytes::new(), Duration::from_secs(5), &config).await?;
            if answer != i {
                bail!("the echo answered {answer} to {i}");
            }
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        Ok(percentile(&times, 0.5))
    }

    fn shutdown(&self) {
        for peer in &self.peers {
            peer.matchmaker.shutdown();
            peer.membership.shutdown();
        }
    }
}
