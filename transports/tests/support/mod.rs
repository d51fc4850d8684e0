//! The conformance suite every transport must pass, and helpers shared by the transport tests.
//!
//! A transport test file builds two transports and a listen address, then calls these functions. Every
//! wait is bounded; nothing synchronises on sleeps.

#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use colony_transports::error::{CloseReason, StreamError, TransportError};
use colony_transports::rpc::{InboundLimits, Router, StreamConfig, call};
use colony_transports::wire::{FrameKind, FrameLimits, ProtocolId, WireError, encode_preamble, read_frame};
use colony_transports::{Address, Connection, Keypair, Listener, Transport};

/// Upper bound for any single wait in these tests.
pub const WAIT: Duration = Duration::from_secs(30);

/// Fails the test if `future` takes longer than [`WAIT`].
pub async fn bounded<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {WAIT:?}"))
}

/// Polls `condition` until it holds, failing the test after [`WAIT`].
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    bounded(what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

/// Two transports of one kind and an address the first can listen on.
pub struct Setup {
    pub server: Arc<dyn Transport>,
    pub client: Arc<dyn Transport>,
    pub listen: Address,
}

/// A listener on the server, and both ends of one connection.
pub struct Linked {
    pub listener: Listener,
    pub client: Connection,
    pub server: Connection,
}

/// Listens on the server transport, dials it from the client, and accepts.
pub async fn link(setup: &Setup) -> Linked {
    let mut listener = setup.server.listen(&setup.listen).await.expect("listen");
    let address = listener.local_address();
    assert_eq!(
        address.peer(),
        Some(setup.server.local_peer()),
        "the listen address names the listener"
    );
    let (client, server) = bounded("dial and accept", async {
        tokio::join!(setup.client.dial(&address), listener.accept())
    })
    .await;
    let (client, server) = (client.expect("dial"), server.expect("accept"));
    assert_eq!(client.remote_peer(), setup.server.local_peer());
    assert_eq!(server.remote_peer(), setup.client.local_peer());
    Linked {
        listener,
        client,
        server,
    }
}

pub fn echo_protocol() -> ProtocolId {
    ProtocolId::new("echo", 1).unwrap()
}

pub fn checksum_protocol() -> ProtocolId {
    ProtocolId::new("checksum", 1).unwrap()
}

/// A router serving `echo` (returns the request and payload) and `checksum` (returns the payload's length
/// and FNV-1a hash). Its per-peer limits are far above what the suite opens: these tests are about the
/// transports (the router's limits have tests of their own).
pub fn test_router() -> Arc<Router> {
    let mut router = Router::with_config(StreamConfig {
        open_timeout: Duration::from_secs(5),
        message_timeout: Duration::from_secs(20),
        inbound: InboundLimits {
            max_streams_per_peer: 1 << 20,
            streams_per_sec: 1e9,
            stream_burst: 1 << 30,
            ..InboundLimits::default()
        },
        ..Default::default()
    });
    router.rpc(echo_protocol(), |_peer, request: String, payload: Bytes| async move {
        Ok((request, payload))
    });
    router.rpc(
        checksum_protocol(),
        |_peer, _request: String, payload: Bytes| async move {
            Ok((format!("{}:{:016x}", payload.len(), fnv1a(&payload)), Bytes::new()))
        },
    );
    Arc::new(router)
}

pub fn fnv1a(data: &[u8]) -> u64 {
    // Eight bytes at a time: the 64 MiB test hashes fast enough in debug builds.
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut chunks = data.chunks_exact(8);
    for chunk in &mut chunks {
        hash ^= u64::from_le_bytes(chunk.try_into().unwrap());
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    for &byte in chunks.remainder() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Deterministic non-trivial bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Request/response round trips, one after another and concurrently.
pub async fn request_response(setup: Setup) {
    let linked = link(&setup).await;
    let serving = tokio::spawn(test_router().serve(linked.server.clone()));
    let config = StreamConfig::default();
    for i in 0..20 {
        let request = format!("request {i}");
        let (reply, payload): (String, Bytes) = call(
            &linked.client,
            &echo_protocol(),
            &request,
            Bytes::from(vec![i as u8; i]),
            WAIT,
            &config,
        )
        .await
        .unwrap();
        assert_eq!(reply, request);
        assert_eq!(payload, Bytes::from(vec![i as u8; i]));
    }
    let calls = (0..50).map(|i| {
        let conn = linked.client.clone();
        async move {
            let request = format!("concurrent {i}");
            let (reply, _): (String, Bytes) = call(
                &conn,
                &echo_protocol(),
                &request,
                Bytes::new(),
                WAIT,
                &StreamConfig::default(),
            )
            .await
            .unwrap();
            assert_eq!(reply, request);
        }
    });
    bounded("concurrent calls", futures_join_all(calls)).await;
    serving.abort();
}

/// A 64 MiB payload arrives intact, through a frame (at the default frame limit) and through a raw stream.
pub async fn large_payload(setup: Setup) {
    let linked = link(&setup).await;
    let serving = tokio::spawn(test_router().serve(linked.server.clone()));
    let data = Bytes::from(pattern(64 << 20, 7));
    let expected = format!("{}:{:016x}", data.len(), fnv1a(&data));
    let (reply, _): (String, Bytes) = call(
        &linked.client,
        &checksum_protocol(),
        &String::new(),
        data.clone(),
        WAIT,
        &StreamConfig::default(),
    )
    .await
    .unwrap();
    assert_eq!(reply, expected);
    serving.abort();

    // Raw stream, written in 1 MiB chunks, read back in whatever chunks arrive.
    let receiver = {
        let server = linked.server.clone();
        tokio::spawn(async move {
            let (_send, mut recv) = server.accept_stream().await.unwrap();
            recv.read_to_end(128 << 20).await.unwrap()
        })
    };
    let (mut send, _recv) = linked.client.open_stream().await.unwrap();
    for chunk in data.chunks(1 << 20) {
        send.write_chunk(data.slice_ref(chunk)).await.unwrap();
    }
    send.finish().await.unwrap();
    let received = bounded("64 MiB on a raw stream", receiver).await.unwrap();
    assert_eq!(received.len(), data.len());
    assert!(received == data, "payload differs");
}

/// 1,000 streams open at once on one connection, each echoed.
pub async fn many_concurrent_streams(setup: Setup) {
    let linked = link(&setup).await;
    let serving = tokio::spawn(test_router().serve(linked.server.clone()));
    // Open every stream before any response is read, so that all 1,000 are open together.
    let mut opened = Vec::new();
    for i in 0..1000u32 {
        let (mut send, recv) =
            colony_transports::rpc::open::<String>(&linked.client, &echo_protocol(), &StreamConfig::default())
                .await
                .unwrap();
        send.send(&format!("stream {i}"), Bytes::from(i.to_le_bytes().to_vec()))
            .await
            .unwrap();
        opened.push((i, send, recv));
    }
    let checks = opened.into_iter().map(|(i, mut send, mut recv)| async move {
        send.finish().await.unwrap();
        let (reply, payload) = recv.recv_required("echo").await.unwrap();
        assert_eq!(reply, format!("stream {i}"));
        assert_eq!(&payload[..], &i.to_le_bytes());
    });
    bounded("1,000 concurrent streams", futures_join_all(checks)).await;
    serving.abort();
}

/// Datagrams both ways, of every size up to the limit the connection reports at the time of sending; one
/// byte more is refused with an error naming the limit.
pub async fn datagrams(setup: Setup) {
    let linked = link(&setup).await;
    for (from, to) in [(&linked.client, &linked.server), (&linked.server, &linked.client)] {
        for len in [1, 1000] {
            let message = Bytes::from(pattern(len, len as u64));
            assert_eq!(exchange_datagram(from, to, &message).await, message);
        }
        // A datagram above any transport's limit (UDP carries at most 65,507 bytes) is refused, naming the
        // limit. (Over QUIC the limit follows path MTU discovery and may rise while the test runs, so
        // "limit + 1" would race with it.)
        let err = from.send_datagram(Bytes::from(vec![0; 70_000])).unwrap_err();
        assert!(
            matches!(err, StreamError::DatagramTooLarge { len: 70_000, limit } if limit < 70_000),
            "{err}"
        );
        let limit = from.max_datagram_size().expect("datagrams are supported");
        assert!(limit >= 1000, "limit {limit}");
        let largest = Bytes::from(pattern(limit, 5));
        let received = exchange_datagram(from, to, &largest).await;
        assert!(received == largest, "the largest datagram arrives intact");
    }
}

/// Closing is seen by both sides with the reason, and reads and writes pending on either side fail with it
/// instead of hanging. (Over QUIC, give the closing side a small `send_window`: see `tests/quic.rs`.)
pub async fn close_is_observed(setup: Setup) {
    let linked = link(&setup).await;
    let (mut client_send, mut client_recv) = linked.client.open_stream().await.unwrap();
    client_send.write_all(b"hello").await.unwrap();
    let (_server_send, mut server_recv) = bounded("accept", linked.server.accept_stream()).await.unwrap();
    let mut hello = [0u8; 5];
    bounded("hello", server_recv.read_exact(&mut hello)).await.unwrap();

    // Reads that wait for data nobody sends, and writes (on streams of their own, which nobody reads) that
    // end up waiting for flow-control credit.
    let client_read = tokio::spawn(async move { client_recv.read_chunk(1024).await });
    let server_read = tokio::spawn(async move { server_recv.read_chunk(1024).await });
    let (client_write, server_write) = (
        tokio::spawn(write_until_error(linked.client.clone())),
        tokio::spawn(write_until_error(linked.server.clone())),
    );
    let (client_accept, server_accept) = {
        let (client, server) = (linked.client.clone(), linked.server.clone());
        // Each side opens one stream (the writer's), so the second accept on each side waits.
        (
            tokio::spawn(async move {
                let _first = client.accept_stream().await?;
                client.accept_stream().await.map(|_| ())
            }),
            tokio::spawn(async move {
                let _first = server.accept_stream().await?;
                server.accept_stream().await.map(|_| ())
            }),
        )
    };
    tokio::task::yield_now().await;

    linked.client.close("test is over");
    let local = CloseReason::Local("test is over".into());
    let remote = CloseReason::Remote("test is over".into());
    assert_eq!(bounded("local close", linked.client.closed()).await, local);
    assert_eq!(bounded("remote close", linked.server.closed()).await, remote);
    assert_eq!(linked.client.close_reason(), Some(local.clone()));
    assert_eq!(linked.server.close_reason(), Some(remote.clone()));
    let closed = |reason: &CloseReason| StreamError::ConnectionClosed(reason.clone());
    assert_eq!(bounded("client read", client_read).await.unwrap(), Err(closed(&local)));
    assert_eq!(bounded("server read", server_read).await.unwrap(), Err(closed(&remote)));
    assert_eq!(bounded("client write", client_write).await.unwrap(), closed(&local));
    assert_eq!(bounded("server write", server_write).await.unwrap(), closed(&remote));
    assert_eq!(
        bounded("client accept", client_accept).await.unwrap(),
        Err(closed(&local))
    );
    assert_eq!(
        bounded("server accept", server_accept).await.unwrap(),
        Err(closed(&remote))
    );
    assert_eq!(linked.client.open_stream().await.err(), Some(closed(&local)));
    assert_eq!(linked.server.open_stream().await.err(), Some(closed(&remote)));
    assert_eq!(client_send.write_all(b"late").await, Err(closed(&local)));
}

/// Opens a stream on `conn` and writes to it until that fails; returns the error.
pub async fn write_until_error(conn: Connection) -> StreamError {
    let mut send = match conn.open_stream().await {
        Ok((send, _recv)) => send,
        Err(err) => return err,
    };
    let block = Bytes::from(vec![0u8; 1 << 20]);
    loop {
        if let Err(err) = send.write_chunk(block.clone()).await {
            return err;
        }
    }
}

/// Sends `message` until it arrives (datagrams are best effort) and returns what arrived.
pub async fn exchange_datagram(from: &Connection, to: &Connection, message: &Bytes) -> Bytes {
    bounded("a datagram", async {
        loop {
            from.send_datagram(message.clone()).unwrap();
            // A copy resent earlier may arrive late; only this message counts.
            if let Ok(datagram) = tokio::time::timeout(Duration::from_millis(200), to.recv_datagram()).await
                && datagram.as_ref() == Ok(message)
            {
                break datagram.unwrap();
            }
        }
    })
    .await
}

/// Streams opened from many tasks at once all arrive, and the connection stays open.
pub async fn concurrent_opens(setup: Setup) {
    let linked = link(&setup).await;
    let (tasks, per_task) = (8usize, 100usize);
    let accepting = {
        let server = linked.server.clone();
        tokio::spawn(async move {
            let mut kept = Vec::with_capacity(tasks * per_task);
            for _ in 0..tasks * per_task {
                let (send, mut recv) = server.accept_stream().await.expect("accept");
                let mut byte = [0u8; 1];
                recv.read_exact(&mut byte).await.expect("the first byte");
                kept.push((send, recv));
            }
            kept.len()
        })
    };
    let openers = (0..tasks).map(|_| {
        let client = linked.client.clone();
        async move {
            let mut kept = Vec::with_capacity(per_task);
            for _ in 0..per_task {
                let (mut send, recv) = client.open_stream().await.expect("open");
                send.write_all(b"x").await.expect("write");
                kept.push((send, recv));
                tokio::task::yield_now().await;
            }
            // Keep the streams open until every one was accepted.
            std::future::pending::<()>().await;
            drop(kept);
        }
    });
    let mut set = tokio::task::JoinSet::new();
    for opener in openers {
        set.spawn(opener);
    }
    assert_eq!(
        bounded("accepting every stream", accepting).await.unwrap(),
        tasks * per_task
    );
    assert!(linked.client.close_reason().is_none() && linked.server.close_reason().is_none());
    set.abort_all();
}

/// Dropping every handle closes the connection for the other side too.
pub async fn drop_closes(setup: Setup) {
    let linked = link(&setup).await;
    let server = linked.server.clone();
    drop(linked.client);
    bounded("remote sees the drop", server.closed()).await;
}

/// A dialer requiring another peer id is refused with an authentication error naming both.
pub async fn wrong_expected_peer(setup: Setup) {
    let listener = setup.server.listen(&setup.listen).await.unwrap();
    let stranger = Keypair::generate().peer_id();
    let address = listener.local_address().without_peer().with_peer(stranger);
    let err = bounded("dial", setup.client.dial(&address)).await.unwrap_err();
    match err {
        TransportError::UnexpectedPeer { expected, actual, .. } => {
            assert_eq!(expected, stranger);
            assert_eq!(actual, setup.server.local_peer());
        }
        other => panic!("expected UnexpectedPeer, got {other}"),
    }
}

/// Opens a raw stream, writes `bytes`, and returns the error the router sends back. Meanwhile a healthy
/// call on another stream of the same connection must succeed, and the connection stays open.
pub async fn bad_stream(linked: &Linked, bytes: Vec<u8>, finish: bool) -> String {
    let (mut send, mut recv) = linked.client.open_stream().await.unwrap();
    send.write_all(&bytes).await.unwrap();
    if finish {
        send.finish().await.unwrap();
    }
    let frame = bounded("the error frame", read_frame(&mut recv, &FrameLimits::default())).await;
    let message = match frame.map(|f| f.map(|f| f.into_result())) {
        Ok(Some(Err(WireError::Remote(message)))) => message,
        other => panic!("expected an error frame, got {other:?}"),
    };
    let (reply, _): (String, Bytes) = call(
        &linked.client,
        &echo_protocol(),
        &"still serving".to_string(),
        Bytes::new(),
        WAIT,
        &StreamConfig::default(),
    )
    .await
    .expect("other streams keep working");
    assert_eq!(reply, "still serving");
    assert!(linked.client.close_reason().is_none(), "the connection stays open");
    message
}

/// Bytes of an open frame for `protocol`.
pub fn open_frame(protocol: &str) -> Vec<u8> {
    let header = colony_transports::wire::WireMessage::encode(&colony_transports::wire::OpenHeader {
        protocol: protocol.to_owned(),
    })
    .unwrap();
    let mut out = encode_preamble(FrameKind::Open, header.len() as u32, 0).to_vec();
    out.extend_from_slice(&header);
    out
}

/// Kinds of hostile input a stream can start with.
#[derive(Debug, Clone, Copy)]
pub enum BadInput {
    RandomBytes,
    TruncatedFrame,
    HugeLengthPrefix,
    InvalidRkyv,
    UnknownProtocol,
    WrongProtocolVersion,
    WrongWireVersion,
    InvalidProtocolId,
}

/// A stream opening with `kind` is closed with an error that says what was wrong; the connection and its
/// other streams keep working, and the router counts the failure.
pub async fn bad_input(setup: Setup, kind: BadInput) {
    let linked = link(&setup).await;
    let router = test_router();
    let stats = router.stats();
    let serving = tokio::spawn(router.serve(linked.server.clone()));
    let (bytes, finish, expected): (Vec<u8>, bool, &[&str]) = match kind {
        BadInput::RandomBytes => (pattern(4096, 99), true, &["wire version"]),
        BadInput::TruncatedFrame => {
            let mut truncated = open_frame("/colony/echo/1");
            truncated.truncate(truncated.len() - 3);
            (truncated, true, &["ended after"])
        }
        BadInput::HugeLengthPrefix => {
            let mut huge = encode_preamble(FrameKind::Open, 0, 0).to_vec();
            huge[0..8].copy_from_slice(&(4u64 << 30).to_le_bytes());
            (huge, false, &["4294967296 bytes exceeds the limit"])
        }
        BadInput::InvalidRkyv => {
            let mut invalid = encode_preamble(FrameKind::Open, 8, 0).to_vec();
            invalid.extend_from_slice(&[0xc3, 0x28, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
            (invalid, false, &["invalid", "OpenHeader"])
        }
        BadInput::UnknownProtocol => (
            open_frame("/colony/no-such-protocol/1"),
            false,
            &["unknown protocol /colony/no-such-protocol/1", "/colony/echo/1"],
        ),
        BadInput::WrongProtocolVersion => (
            open_frame("/colony/echo/2"),
            false,
            &["offered version 2", "supports version 1"],
        ),
        BadInput::WrongWireVersion => {
            let mut wrong = open_frame("/colony/echo/1");
            wrong[8] = 42;
            (wrong, false, &["wire version 42", "speaks wire version 1"])
        }
        BadInput::InvalidProtocolId => (open_frame("not a protocol id"), false, &["invalid protocol id"]),
    };
    let message = bad_stream(&linked, bytes, finish).await;
    for needle in expected {
        assert!(
            message.contains(needle),
            "{kind:?}: '{message}' does not say '{needle}'"
        );
    }
    assert_eq!(stats.streams_failed.load(std::sync::atomic::Ordering::Relaxed), 1);
    serving.abort();
}

/// Awaits all futures concurrently (a tiny `join_all`, to keep the dependency list short).
pub async fn futures_join_all<F: Future<Output = ()> + Send + 'static>(futures: impl IntoIterator<Item = F>) {
    let mut set = tokio::task::JoinSet::new();
    for future in futures {
        set.spawn(future);
    }
    while let Some(result) = set.join_next().await {
        result.expect("task panicked");
    }
}

/// Declares the conformance suite as tests, for a function `fn() -> Setup`. The close test
/// ([`close_is_observed`]) is declared by each transport's file, since QUIC needs its own configuration.
#[macro_export]
macro_rules! conformance_tests {
    ($setup:path) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn request_response() {
            support::request_response($setup()).await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn large_payload() {
            support::large_payload($setup()).await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn many_concurrent_streams() {
            support::many_concurrent_streams($setup()).await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn concurrent_opens() {
            support::concurrent_opens($setup()).await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn datagrams() {
            support::datagrams($setup()).await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn drop_closes() {
            support::drop_closes($setup()).await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn wrong_expected_peer() {
            support::wrong_expected_peer($setup()).await
        }

        mod bad_input {
            use super::*;
            use support::BadInput;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn random_bytes() {
                support::bad_input($setup(), BadInput::RandomBytes).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn truncated_frame() {
                support::bad_input($setup(), BadInput::TruncatedFrame).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn huge_length_prefix() {
                support::bad_input($setup(), BadInput::HugeLengthPrefix).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn invalid_rkyv() {
                support::bad_input($setup(), BadInput::InvalidRkyv).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn unknown_protocol() {
                support::bad_input($setup(), BadInput::UnknownProtocol).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn wrong_protocol_version() {
                support::bad_input($setup(), BadInput::WrongProtocolVersion).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn wrong_wire_version() {
                support::bad_input($setup(), BadInput::WrongWireVersion).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn invalid_protocol_id() {
                support::bad_input($setup(), BadInput::InvalidProtocolId).await
            }
        }
    };
}
