//! The in-process transport against the conformance suite, plus its own limits.

mod support;

use colony_transports::Keypair;
use colony_transports::mem::MemHub;
use support::Setup;

fn setup() -> Setup {
    let hub = MemHub::new();
    Setup {
        server: hub.transport(&Keypair::generate()),
        client: hub.transport(&Keypair::generate()),
        listen: "mem://server".parse().unwrap(),
    }
}

conformance_tests!(setup);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_is_observed() {
    support::close_is_observed(setup()).await
}

#[tokio::test]
async fn listen_twice_on_one_name_is_refused() {
    let setup = setup();
    let _first = setup.server.listen(&setup.listen).await.unwrap();
    let err = setup.client.listen(&setup.listen).await.err().unwrap();
    assert!(err.to_string().contains("already in use"), "{err}");
}

#[tokio::test]
async fn dialing_nobody_fails_clearly() {
    let setup = setup();
    let err = setup.client.dial(&"mem://nobody".parse().unwrap()).await.unwrap_err();
    assert!(err.to_string().contains("nothing listens at mem://nobody"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_peers_on_one_hub() {
    let hub = MemHub::new();
    let hub_peer = hub.transport(&Keypair::generate());
    let mut listener = hub_peer.listen(&"mem://hub".parse().unwrap()).await.unwrap();
    let address = listener.local_address();
    let peers: Vec<_> = (0..300).map(|_| hub.transport(&Keypair::generate())).collect();
    let mut connections = Vec::new();
    for peer in &peers {
        let (dialed, accepted) = tokio::join!(peer.dial(&address), listener.accept());
        let (dialed, accepted) = (dialed.unwrap(), accepted.unwrap());
        assert_eq!(accepted.remote_peer(), peer.local_peer());
        connections.push((dialed, accepted));
    }
    for (dialed, accepted) in &connections {
        dialed.send_datagram(bytes::Bytes::from_static(b"ping")).unwrap();
        assert_eq!(
            support::bounded("datagram", accepted.recv_datagram()).await.unwrap(),
            &b"ping"[..]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_to_end_refuses_more_than_its_limit_and_stops_the_writer() {
    let linked = support::link(&setup()).await;
    let (mut send, _recv) = linked.client.open_stream().await.unwrap();
    send.write_all(&[1u8; 100]).await.unwrap();
    let (_server_send, mut server_recv) = support::bounded("accept", linked.server.accept_stream()).await.unwrap();
    let err = support::bounded("read", server_recv.read_to_end(64)).await.unwrap_err();
    assert_eq!(err, colony_transports::StreamError::TooLong { limit: 64 });
    let err = send.write_all(b"more").await.unwrap_err();
    assert!(matches!(err, colony_transports::StreamError::Stopped(_)), "{err}");
}
