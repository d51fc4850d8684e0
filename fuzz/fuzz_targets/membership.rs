//! Fuzzes the membership messages: SWIM packets and the join protocol. The input is tried as:
//!
//! - a SWIM header followed by members, with `MemberCodec` and with `CachingCodec` (which must read exactly
//!   what `MemberCodec` reads, from its cache too);
//! - a join request's member identity (`join::decode_id`) and a join response's member list
//!   (`join::decode_members`), and the join headers (`join::JoinRequest`, `join::JoinResponse`);
//! - a whole SWIM packet handed to a SWIM instance as the membership actor hands it (`Foca::handle_data`
//!   with Colony's codec, record broadcasts and packet size), when it starts with a peer id as the actor
//!   requires; the instance runs as peer 0 and knows peers 1 and 2.
//!
//! Invariants: decoded identities, headers and members re-encode and decode to themselves; the caching
//! codec agrees with the plain one; accepted identities have a finite, non-negative bandwidth and an
//! address that names the member's peer; every packet the instance sends in reply decodes and fits its
//! packet size; every member it then lists has an identity that round-trips.

#![no_main]

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use colony::membership::MemberId;
use colony::membership::broadcast::RecordBroadcasts;
use colony::membership::identity::{CachingCodec, MemberCodec};
use colony::membership::join::{self, JoinRequest, JoinResponse, MAX_JOIN_MEMBERS};
use colony::records::RecordStore;
use colony::records::replica::{PublishLimits, Replica};
use colony_fuzz::{NOW, PACKET_SIZE, RUN_ID, aligned, schemas, swim_config, swim_id};
use colony_transports::PeerId;
use colony_transports::identity::PEER_ID_LEN;
use colony_transports::wire::WireMessage;
use foca::{AccumulatingRuntime, Codec, Foca, Header, Member, State};
use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;
use rand::rngs::StdRng;

/// Members read after a header at most.
const MAX_MEMBERS: usize = 128;

fuzz_target!(|data: &[u8]| {
    let header_decodes = check_codecs(data);
    check_join(data);
    // The actor passes on only packets that start with a peer id; SWIM refuses at once (and changes
    // nothing) a packet whose header does not decode, so only the others are worth a SWIM instance.
    if header_decodes
        && data
            .get(..PEER_ID_LEN)
            .is_some_and(|bytes| PeerId::try_from_slice(bytes).is_ok())
    {
        check_swim(data);
    }
});

fn check_id(id: &MemberId) {
    assert!(id.bandwidth_mbps.is_finite() && id.bandwidth_mbps >= 0.0);
    if let Some(address) = &id.address {
        assert_eq!(
            address.peer(),
            Some(id.peer),
            "an address naming another peer was accepted"
        );
    }
    let again = join::decode_id(&join::encode_id(id)).expect("an encoded identity decodes");
    assert_eq!(&again, id, "an identity changed on a round trip");
}

fn check_header(header: &Header<MemberId>) {
    check_id(&header.src);
    check_id(&header.dst);
    let mut bytes = Vec::new();
    MemberCodec
        .encode_header(header, &mut bytes)
        .expect("a header encodes into a Vec");
    let mut slice = &bytes[..];
    assert_eq!(
        &MemberCodec
            .decode_header(&mut slice)
            .expect("re-encoded header decodes"),
        header
    );
    assert!(slice.is_empty(), "a re-encoded header left bytes unread");
}

fn check_member(member: &Member<MemberId>) {
    check_id(member.id());
    let mut bytes = Vec::new();
    MemberCodec
        .encode_member(member, &mut bytes)
        .expect("a member encodes into a Vec");
    assert_eq!(
        &MemberCodec
            .decode_member(&bytes[..])
            .expect("re-encoded member decodes"),
        member
    );
}

/// A header and the members after it, with both codecs. Returns whether the header decodes.
fn check_codecs(data: &[u8]) -> bool {
    let mut plain = data;
    let mut cached = data;
    let mut caching = CachingCodec::default();
    let header = MemberCodec.decode_header(&mut plain);
    assert_eq!(
        caching.decode_header(&mut cached),
        header,
        "the caching codec read another header"
    );
    assert_eq!(plain.len(), cached.len(), "the codecs read different lengths");
    // Again, now from the caching codec's cache.
    let mut again = data;
    assert_eq!(
        caching.decode_header(&mut again),
        header,
        "the caching codec's cache changed a header"
    );
    assert_eq!(again.len(), plain.len());
    let Ok(header) = header else { return false };
    check_header(&header);
    for _ in 0..MAX_MEMBERS {
        if plain.is_empty() {
            break;
        }
        let member = MemberCodec.decode_member(&mut plain);
        let cached_member = caching.decode_member(&mut cached);
        assert_eq!(cached_member, member, "the caching codec read another member");
        assert_eq!(plain.len(), cached.len());
        match member {
            Ok(member) => check_member(&member),
            Err(_) => break,
        }
    }
    true
}

fn check_join(data: &[u8]) {
    if let Ok(id) = join::decode_id(data) {
        check_id(&id);
    }
    if let Ok(members) = join::decode_members(data) {
        assert!(members.len() <= MAX_JOIN_MEMBERS);
        members.iter().for_each(check_member);
        assert_eq!(join::decode_members(&join::encode_members(&members)), Ok(members));
    }
    let bytes = aligned(data);
    if let Ok(request) = JoinRequest::access_archived(&bytes).and_then(JoinRequest::decode_archived) {
        let again = request.encode().expect("a join request re-encodes");
        let back = JoinRequest::access_archived(&again)
            .and_then(JoinRequest::decode_archived)
            .expect("decodes");
        assert_eq!(back.run_id, request.run_id);
        assert_eq!(back.member, request.member);
        assert_eq!(back.time.to_bits(), request.time.to_bits());
        if let Ok(id) = join::decode_id(&request.member) {
            check_id(&id);
        }
    }
    if let Ok(response) = JoinResponse::access_archived(&bytes).and_then(JoinResponse::decode_archived) {
        let again = response.encode().expect("a join response re-encodes");
        let back = JoinResponse::access_archived(&again)
            .and_then(JoinResponse::decode_archived)
            .expect("decodes");
        assert_eq!(
            (back.outcome, &back.message, &back.member),
            (response.outcome, &response.message, &response.member)
        );
        assert_eq!(back.time.to_bits(), response.time.to_bits());
    }
}

/// The packet through a SWIM instance, as the membership actor handles a datagram.
fn check_swim(data: &[u8]) {
    let replica = Arc::new(Replica::new(
        RecordStore::new(RUN_ID, Default::default(), schemas()),
        Arc::new(|| NOW),
        PublishLimits::default(),
    ));
    let fresh = Arc::new(AtomicBool::new(false));
    let mut swim = Foca::with_custom_broadcast(
        swim_id(0),
        swim_config(),
        StdRng::seed_from_u64(0),
        CachingCodec::default(),
        RecordBroadcasts::new(replica.clone(), fresh),
    );
    let mut runtime = AccumulatingRuntime::new();
    let known = [1, 2].map(|n| Member::new(swim_id(n), 0, State::Alive));
    swim.apply_many(known.into_iter(), false, &mut runtime)
        .expect("known members are applied");
    while runtime.to_send().is_some() || runtime.to_notify().is_some() || runtime.to_schedule().is_some() {}

    let _ = swim.handle_data(data, &mut runtime);

    while let Some((_, packet)) = runtime.to_send() {
        assert!(packet.len() <= PACKET_SIZE, "a packet of {} bytes", packet.len());
        let mut slice = &packet[..];
        let header = MemberCodec
            .decode_header(&mut slice)
            .expect("an outgoing packet decodes");
        // Peer 0, possibly under a later generation: a packet that declares it down makes it rejoin with a
        // renewed identity (`MemberId::renew`), as the membership actor does after a false suspicion.
        let me = swim_id(0);
        assert_eq!(header.src.peer, me.peer);
        assert!(header.src.generation >= me.generation, "{:?}", header.src);
        assert_eq!(
            (header.src.role, &header.src.address, header.src.bandwidth_mbps),
            (me.role, &me.address, me.bandwidth_mbps)
        );
        check_header(&header);
    }
    for member in swim.iter_members() {
        check_id(member.id());
    }
    assert!(replica.len() <= data.len(), "more records than bytes");
}
