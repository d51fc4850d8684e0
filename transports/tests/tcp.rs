//! The TCP transport (plain and with TLS) against the conformance suite, plus the signed handshake's
//! refusals: bad signatures, replayed signatures, impostors, strangers that do not speak Colony, and
//! dialers that never finish their handshake.

mod support;

use std::sync::Arc;
use std::time::Duration;

use colony_transports::handshake::{self, HELLO_LEN, Hello, Role};
use colony_transports::tcp::{TcpConfig, TcpTransport};
use colony_transports::{Keypair, Transport, TransportError};
use support::{Setup, bounded};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn transport(keypair: Keypair, config: TcpConfig) -> Arc<dyn Transport> {
    Arc::new(TcpTransport::new(keypair, config))
}

fn setup() -> Setup {
    Setup {
        server: transport(Keypair::generate(), TcpConfig::default()),
        client: transport(Keypair::generate(), TcpConfig::default()),
        listen: "tcp://127.0.0.1:0".parse().unwrap(),
    }
}

conformance_tests!(setup);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_is_observed() {
    support::close_is_observed(setup()).await
}

mod with_tls {
    use super::*;

    fn setup() -> Setup {
        let config = TcpConfig {
            tls: true,
            ..TcpConfig::default()
        };
        Setup {
            server: transport(Keypair::generate(), config.clone()),
            client: transport(Keypair::generate(), config),
            listen: "tcp://127.0.0.1:0".parse().unwrap(),
        }
    }

    conformance_tests!(setup);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn close_is_observed() {
        support::close_is_observed(setup()).await
    }
}

/// Connects a raw socket to a fresh listener and returns it with the listener.
async fn raw_dial(config: TcpConfig) -> (colony_transports::Listener, Arc<dyn Transport>, TcpStream) {
    let server = transport(Keypair::generate(), config);
    let listener = server.listen(&"tcp://127.0.0.1:0".parse().unwrap()).await.unwrap();
    let socket = TcpStream::connect(listener.local_address().location()).await.unwrap();
    (listener, server, socket)
}

async fn read_hello(socket: &mut TcpStream) -> Hello {
    let mut bytes = [0u8; HELLO_LEN];
    socket.read_exact(&mut bytes).await.unwrap();
    Hello::decode(&bytes).unwrap()
}

/// The listener closes the socket; reading ends (EOF or reset) instead of hanging.
async fn assert_closed_by_listener(socket: &mut TcpStream) {
    let mut rest = Vec::new();
    let _ = bounded("the listener closing the socket", socket.read_to_end(&mut rest)).await;
}

async fn wait_refused(listener: &colony_transports::Listener, count: u64) {
    support::wait_until("the refusal to be counted", || listener.refused_handshakes() >= count).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_signed_by_another_key_is_refused() {
    let (listener, _server, mut socket) = raw_dial(TcpConfig::default()).await;
    let claimed = Keypair::generate();
    let actual_signer = Keypair::generate();
    let ours = Hello::new(claimed.peer_id());
    socket.write_all(&ours.encode()).await.unwrap();
    let theirs = read_hello(&mut socket).await;
    let forged = actual_signer.sign(&handshake::transcript(Role::Dialer, &ours, &theirs, &[0; 32]));
    socket.write_all(&forged).await.unwrap();
    assert_closed_by_listener(&mut socket).await;
    wait_refused(&listener, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_signature_is_refused() {
    let keypair = Keypair::generate();
    let (mut listener, _server, mut socket) = raw_dial(TcpConfig::default()).await;
    // A genuine session, recorded.
    let hello = Hello::new(keypair.peer_id());
    socket.write_all(&hello.encode()).await.unwrap();
    let theirs = read_hello(&mut socket).await;
    let signature = keypair.sign(&handshake::transcript(Role::Dialer, &hello, &theirs, &[0; 32]));
    socket.write_all(&signature).await.unwrap();
    let accepted = bounded("the genuine session", listener.accept()).await.unwrap();
    assert_eq!(accepted.remote_peer(), keypair.peer_id());

    // The same bytes replayed on a new connection: the listener's fresh nonce makes the signature invalid.
    let mut replay = TcpStream::connect(listener.local_address().location()).await.unwrap();
    replay.write_all(&hello.encode()).await.unwrap();
    let fresh = read_hello(&mut replay).await;
    assert_ne!(fresh.nonce, theirs.nonce);
    replay.write_all(&signature).await.unwrap();
    assert_closed_by_listener(&mut replay).await;
    wait_refused(&listener, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_with_a_bad_signature_is_refused_by_the_dialer() {
    let raw = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("tcp://{}", raw.local_addr().unwrap()).parse().unwrap();
    let impostor = tokio::spawn(async move {
        let (mut socket, _) = raw.accept().await.unwrap();
        let victim = Keypair::generate();
        let ours = Hello::new(victim.peer_id());
        socket.write_all(&ours.encode()).await.unwrap();
        let mut theirs = [0u8; HELLO_LEN];
        socket.read_exact(&mut theirs).await.unwrap();
        socket.write_all(&[7u8; 64]).await.unwrap();
        let mut rest = Vec::new();
        let _ = socket.read_to_end(&mut rest).await;
    });
    let client = transport(Keypair::generate(), TcpConfig::default());
    let err = bounded("dial", client.dial(&address)).await.unwrap_err();
    assert!(
        matches!(&err, TransportError::Authentication { reason, .. } if reason.contains("does not match the key it claims")),
        "{err}"
    );
    impostor.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_is_not_colony_is_refused() {
    let raw = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address: colony_transports::Address = format!("tcp://{}", raw.local_addr().unwrap()).parse().unwrap();
    let stranger = tokio::spawn(async move {
        let (mut socket, _) = raw.accept().await.unwrap();
        let reply = [b'x'; 80];
        socket.write_all(&reply).await.unwrap();
        let mut rest = Vec::new();
        let _ = socket.read_to_end(&mut rest).await;
    });
    let client = transport(Keypair::generate(), TcpConfig::default());
    let err = bounded("dial", client.dial(&address)).await.unwrap_err();
    assert!(err.to_string().contains("does not speak Colony"), "{err}");
    stranger.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialer_claiming_the_listeners_identity_is_refused() {
    let server_key = Keypair::generate();
    let server = transport(server_key.clone(), TcpConfig::default());
    let listener = server.listen(&"tcp://127.0.0.1:0".parse().unwrap()).await.unwrap();
    let twin = transport(server_key, TcpConfig::default());
    let err = bounded("dial", twin.dial(&listener.local_address())).await.unwrap_err();
    assert!(err.to_string().contains("own identity"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_dialer_does_not_block_others() {
    let config = TcpConfig {
        handshake_timeout: Duration::from_millis(300),
        ..TcpConfig::default()
    };
    let (mut listener, server, mut silent) = raw_dial(config).await;
    // While the silent socket holds a handshake open, an honest peer still gets in.
    let honest = transport(Keypair::generate(), TcpConfig::default());
    let address = listener.local_address();
    let (dialed, accepted) = bounded("honest dial", async {
        tokio::join!(honest.dial(&address), listener.accept())
    })
    .await;
    assert!(dialed.is_ok() && accepted.is_ok());
    assert_eq!(accepted.unwrap().remote_peer(), honest.local_peer());
    // The silent one is dropped after the handshake timeout.
    assert_closed_by_listener(&mut silent).await;
    wait_refused(&listener, 1).await;
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_the_limit_are_refused() {
    let server = transport(
        Keypair::generate(),
        TcpConfig {
            max_incoming_streams: 2,
            ..TcpConfig::default()
        },
    );
    let client = transport(Keypair::generate(), TcpConfig::default());
    let linked = support::link(&Setup {
        server,
        client,
        listen: "tcp://127.0.0.1:0".parse().unwrap(),
    })
    .await;
    let mut kept = Vec::new();
    for _ in 0..2 {
        let (mut send, recv) = linked.client.open_stream().await.unwrap();
        send.write_all(b"x").await.unwrap();
        kept.push((
            send,
            recv,
            bounded("accept", linked.server.accept_stream()).await.unwrap(),
        ));
    }
    let (mut send, mut recv) = linked.client.open_stream().await.unwrap();
    let _ = send.write_all(b"x").await;
    let err = bounded("refusal", recv.read_chunk(16)).await.unwrap_err();
    assert!(err.to_string().contains("too many open streams"), "{err}");
    // Closing one makes room again.
    drop(kept.pop());
    let (mut send, _recv) = linked.client.open_stream().await.unwrap();
    send.write_all(b"y").await.unwrap();
    let (_s, mut r) = bounded("accept after room", linked.server.accept_stream())
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    r.read_exact(&mut byte).await.unwrap();
    assert_eq!(&byte, b"y");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_emulation_wraps_tcp() {
    let emulator = colony_transports::emulation::LinkEmulator::new();
    let latency = Duration::from_millis(100);
    emulator.set_default_link(colony_transports::emulation::LinkConfig {
        latency,
        ..Default::default()
    });
    let setup = Setup {
        server: emulator.wrap(transport(Keypair::generate(), TcpConfig::default())),
        client: emulator.wrap(transport(Keypair::generate(), TcpConfig::default())),
        listen: "tcp://127.0.0.1:0".parse().unwrap(),
    };
    let linked = support::link(&setup).await;
    let serving = tokio::spawn(support::test_router().serve(linked.server.clone()));
    let mut times = Vec::new();
    for _ in 0..9 {
        let started = std::time::Instant::now();
        let (_, _): (String, bytes::Bytes) = colony_transports::rpc::call(
            &linked.client,
            &support::echo_protocol(),
            &"ping".to_string(),
            bytes::Bytes::new(),
            support::WAIT,
            &Default::default(),
        )
        .await
        .unwrap();
        times.push(started.elapsed());
    }
    times.sort();
    let median = times[times.len() / 2];
    assert!(
        median >= 2 * latency && median <= (2 * latency).mul_f64(1.1),
        "{median:?}"
    );
    emulator.kill(setup.server.local_peer());
    assert_eq!(
        bounded("kill", linked.client.closed()).await,
        colony_transports::CloseReason::Killed
    );
    serving.abort();
}
