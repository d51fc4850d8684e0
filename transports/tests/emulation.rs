//! Link emulation: configured latency and bandwidth are what a peer measures (within 10 %), losses follow
//! the configured rate, partitions stop traffic until healed, and killing a peer fails all its streams.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use colony_transports::Keypair;
use colony_transports::emulation::{LinkConfig, LinkEmulator};
use colony_transports::error::{CloseReason, TransportError};
use colony_transports::mem::MemHub;
use colony_transports::rpc::{StreamConfig, call};
use support::{Setup, bounded, echo_protocol, link, test_router};

fn emulated(link: LinkConfig) -> (LinkEmulator, Setup) {
    let emulator = LinkEmulator::new();
    emulator.set_default_link(link);
    let hub = MemHub::with_emulator(emulator.clone());
    let setup = Setup {
        server: hub.transport(&Keypair::generate()),
        client: hub.transport(&Keypair::generate()),
        listen: "mem://server".parse().unwrap(),
    };
    (emulator, setup)
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_is_what_was_configured() {
    let latency = Duration::from_millis(50);
    let (_emulator, setup) = emulated(LinkConfig {
        latency,
        ..Default::default()
    });
    let linked = link(&setup).await;
    let serving = tokio::spawn(test_router().serve(linked.server.clone()));
    let mut round_trips = Vec::new();
    for i in 0..15 {
        let started = Instant::now();
        let (_, _): (String, Bytes) = call(
            &linked.client,
            &echo_protocol(),
            &format!("{i}"),
            Bytes::new(),
            support::WAIT,
            &StreamConfig::default(),
        )
        .await
        .unwrap();
        round_trips.push(started.elapsed());
    }
    let measured = median(round_trips);
    let expected = 2 * latency;
    println!("round trip: configured {expected:?}, measured median {measured:?}");
    assert!(measured >= expected, "{measured:?} < {expected:?}");
    assert!(
        measured <= expected.mul_f64(1.1),
        "{measured:?} more than 10 % above {expected:?}"
    );
    serving.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_is_what_was_configured() {
    let rate = 8_000_000u64;
    let (_emulator, setup) = emulated(LinkConfig {
        bandwidth_bytes_per_sec: Some(rate),
        ..Default::default()
    });
    let linked = link(&setup).await;
    let total = 4_000_000usize;
    // Two streams share the link's bandwidth.
    let receiver = {
        let server = linked.server.clone();
        tokio::spawn(async move {
            let mut received = 0;
            for _ in 0..2 {
                let (_send, mut recv) = server.accept_stream().await.unwrap();
                received += recv.read_to_end(total).await.unwrap().len();
            }
            (received, Instant::now())
        })
    };
    let started = Instant::now();
    let senders: Vec<_> = (0..2)
        .map(|_| {
            let client = linked.client.clone();
            tokio::spawn(async move {
                let (mut send, _recv) = client.open_stream().await.unwrap();
                send.write_chunk(Bytes::from(vec![7u8; total / 2])).await.unwrap();
                send.finish().await.unwrap();
            })
        })
        .collect();
    for sender in senders {
        bounded("sending", sender).await.unwrap();
    }
    let (received, finished) = bounded("receiving", receiver).await.unwrap();
    assert_eq!(received, total);
    let measured = total as f64 / (finished - started).as_secs_f64();
    println!("throughput: configured {rate} B/s, measured {measured:.0} B/s");
    assert!(
        (measured - rate as f64).abs() <= 0.1 * rate as f64,
        "measured {measured:.0} B/s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagram_loss_follows_the_configured_rate() {
    let (emulator, setup) = emulated(LinkConfig {
        datagram_loss: 0.25,
        ..Default::default()
    });
    let linked = link(&setup).await;
    let sent = 2000u64;
    let drain = {
        let server = linked.server.clone();
        tokio::spawn(async move { while server.recv_datagram().await.is_ok() {} })
    };
    for i in 0..sent {
        linked
            .client
            .send_datagram(Bytes::from(i.to_le_bytes().to_vec()))
            .unwrap();
        if i % 64 == 0 {
            tokio::task::yield_now().await;
        }
    }
    // The loss is decided when a datagram is sent; wait until the emulator has accounted for all of them.
    let stats = emulator.stats();
    let accounted = || {
        stats.datagrams_lost.load(Ordering::Relaxed)
            + stats.datagrams_blocked.load(Ordering::Relaxed)
            + stats.datagrams_forwarded.load(Ordering::Relaxed)
    };
    support::wait_until("every datagram accounted for", || accounted() == sent).await;
    drain.abort();
    let (lost, received) = (
        stats.datagrams_lost.load(Ordering::Relaxed),
        stats.datagrams_forwarded.load(Ordering::Relaxed),
    );
    let loss = lost as f64 / sent as f64;
    println!("datagram loss: configured 0.25, measured {loss:.3} ({received} received)");
    assert!((loss - 0.25).abs() < 0.03, "loss {loss}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_stops_traffic_and_healing_restores_it() {
    let (emulator, setup) = emulated(LinkConfig::default());
    let linked = link(&setup).await;
    let (client_peer, server_peer) = (setup.client.local_peer(), setup.server.local_peer());
    let (mut send, _recv) = linked.client.open_stream().await.unwrap();
    send.write_all(b"before").await.unwrap();
    let (_server_send, mut server_recv) = bounded("accept", linked.server.accept_stream()).await.unwrap();
    let mut buf = [0u8; 6];
    bounded("before the partition", server_recv.read_exact(&mut buf))
        .await
        .unwrap();

    emulator.partition(&[client_peer], &[server_peer]);
    send.write_all(b"during").await.unwrap();
    linked.client.send_datagram(Bytes::from_static(b"lost")).unwrap();
    // Nothing crosses the partition.
    let attempt = tokio::time::timeout(Duration::from_millis(300), server_recv.read_exact(&mut buf)).await;
    assert!(attempt.is_err(), "data crossed the partition");
    let err = setup.client.dial(&linked.listener.local_address()).await.unwrap_err();
    assert!(matches!(err, TransportError::Unreachable { .. }), "{err}");
    assert!(emulator.stats().datagrams_blocked.load(Ordering::Relaxed) >= 1);

    emulator.heal();
    bounded("after healing", server_recv.read_exact(&mut buf))
        .await
        .unwrap();
    assert_eq!(&buf, b"during");
    let conn = bounded(
        "dial after healing",
        setup.client.dial(&linked.listener.local_address()),
    )
    .await;
    assert!(conn.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_peer_loses_every_stream_promptly() {
    let emulator = LinkEmulator::new();
    let hub = MemHub::with_emulator(emulator.clone());
    let victim = hub.transport(&Keypair::generate());
    let mut listener = victim.listen(&"mem://victim".parse().unwrap()).await.unwrap();
    let address = listener.local_address();
    let others: Vec<_> = (0..3).map(|_| hub.transport(&Keypair::generate())).collect();
    let mut pending = Vec::new();
    let mut connections = Vec::new();
    for other in &others {
        let (dialed, accepted) = tokio::join!(other.dial(&address), listener.accept());
        let (dialed, accepted) = (dialed.unwrap(), accepted.unwrap());
        for _ in 0..3 {
            let (mut send, mut recv) = dialed.open_stream().await.unwrap();
            send.write_all(b"x").await.unwrap();
            let (victim_send, mut victim_recv) = accepted.accept_stream().await.unwrap();
            let mut byte = [0u8; 1];
            victim_recv.read_exact(&mut byte).await.unwrap();
            // Both sides wait on a read that only the kill ends.
            pending.push(tokio::spawn(async move { (recv.read_chunk(16).await.is_err(), send) }));
            pending.push(tokio::spawn(async move {
                (victim_recv.read_chunk(16).await.is_err(), victim_send)
            }));
        }
        connections.push((dialed, accepted));
    }
    let killed_at = Instant::now();
    emulator.kill(victim.local_peer());
    for task in pending {
        let (failed, _) = bounded("a stream of the killed peer", task).await.unwrap();
        assert!(failed, "a pending read ended without an error");
    }
    let elapsed = killed_at.elapsed();
    println!("all 18 pending reads failed {elapsed:?} after the kill");
    assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
    for (dialed, accepted) in &connections {
        assert_eq!(bounded("closed", dialed.closed()).await, CloseReason::Killed);
        assert_eq!(bounded("closed", accepted.closed()).await, CloseReason::Killed);
    }
    let err = others[0].dial(&address).await.unwrap_err();
    assert!(matches!(err, TransportError::Unreachable { .. }), "{err}");
    emulator.revive(victim.local_peer());
    let (dialed, accepted) = tokio::join!(others[0].dial(&address), listener.accept());
    assert!(dialed.is_ok() && accepted.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_keeps_its_code_through_emulation() {
    let (_emulator, setup) = emulated(LinkConfig {
        latency: Duration::from_millis(5),
        ..Default::default()
    });
    let linked = link(&setup).await;
    let (mut send, _recv) = linked.client.open_stream().await.unwrap();
    send.write_all(b"x").await.unwrap();
    let (_server_send, mut server_recv) = bounded("accept", linked.server.accept_stream()).await.unwrap();
    let mut byte = [0u8; 1];
    bounded("first byte", server_recv.read_exact(&mut byte)).await.unwrap();
    send.reset(7);
    let err = bounded("the reset", server_recv.read_chunk(16)).await.unwrap_err();
    assert_eq!(err, colony_transports::StreamError::Reset(7));
}
