//! Divert core behaviour on synthetic client segments.

use std::time::{Duration, Instant};

use etherparse::{PacketBuilder, TcpHeader};

use super::*;
use crate::policy::model::UidRange;
use crate::policy::{HttpAction, HttpPolicy, HttpRequestRule};

const CLIENT_V4: [u8; 4] = [10, 231, 0, 11];
const IMDS_V4: [u8; 4] = [169, 254, 169, 254];
const ISN: u32 = 0xffff_fff0; // close to wrapping, so sequence arithmetic is exercised
const SERVER_NEXT: u32 = 5000;

fn metadata_http() -> DivertPolicy {
    DivertPolicy::Http(HttpPolicy {
        requests: vec![
            HttpRequestRule {
                path_prefix: "/latest/meta-data/iam/".into(),
                uid: None,
                action: HttpAction::Reset,
            },
            HttpRequestRule {
                path_prefix: "/latest/meta-data/instance-id".into(),
                uid: None,
                action: HttpAction::Allow,
            },
            HttpRequestRule {
                path_prefix: "/admin".into(),
                uid: Some(UidRange { lo: 0, hi: 999 }),
                action: HttpAction::Allow,
            },
        ],
        default: HttpAction::Reset,
    })
}

struct Client {
    v6: bool,
    seq: u32,
}

impl Client {
    fn v4() -> Self {
        Client {
            v6: false,
            seq: ISN,
        }
    }
    fn v6() -> Self {
        Client { v6: true, seq: ISN }
    }

    fn packet(&self, seq: u32, syn: bool, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut h = TcpHeader::new(40000, 80, seq, 64000);
        h.syn = syn;
        h.fin = fin;
        if !syn {
            h.ack = true;
            h.acknowledgment_number = SERVER_NEXT;
        }
        let builder = if self.v6 {
            let src = "fd00:231::11"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets();
            let dst = "fd00:ec2::254"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets();
            PacketBuilder::ipv6(src, dst, 64)
        } else {
            PacketBuilder::ipv4(CLIENT_V4, IMDS_V4, 64)
        }
        .tcp_header(h);
        let mut out = Vec::new();
        builder.write(&mut out, payload).unwrap();
        out
    }

    /// The SYN; afterwards `seq` is the first data byte.
    fn syn(&mut self) -> Vec<u8> {
        let p = self.packet(self.seq, true, false, &[]);
        self.seq = self.seq.wrapping_add(1);
        p
    }

    /// A data segment at the current sequence number; advances it.
    fn data(&mut self, payload: &[u8]) -> Vec<u8> {
        let p = self.packet(self.seq, false, false, payload);
        self.seq = self.seq.wrapping_add(payload.len() as u32);
        p
    }
}

struct Harness {
    diverter: Diverter,
    policy: DivertPolicy,
    uid: Option<u32>,
    now: Instant,
}

impl Harness {
    fn new(policy: DivertPolicy, uid: Option<u32>) -> Self {
        Harness {
            diverter: Diverter::new(),
            policy,
            uid,
            now: Instant::now(),
        }
    }

    fn send(&mut self, packet: &[u8]) -> Outcome {
        let segment = Segment::parse(packet).expect("synthetic packet parses");
        self.diverter
            .handle(packet.to_vec(), &segment, &self.policy, self.uid, self.now)
    }
}

fn reinjected(out: &Outcome) -> Vec<Vec<u8>> {
    out.effects
        .iter()
        .filter_map(|e| match e {
            Effect::Reinject(p) => Some(p.clone()),
            Effect::Deliver(_) => None,
        })
        .collect()
}

fn delivered(out: &Outcome) -> Vec<Vec<u8>> {
    out.effects
        .iter()
        .filter_map(|e| match e {
            Effect::Deliver(p) => Some(p.clone()),
            Effect::Reinject(_) => None,
        })
        .collect()
}

fn tcp_of(packet: &[u8]) -> (Segment, etherparse::TcpHeader) {
    let seg = Segment::parse(packet).unwrap();
    let sliced = etherparse::SlicedPacket::from_ip(packet).unwrap();
    let Some(etherparse::TransportSlice::Tcp(tcp)) = sliced.transport else {
        panic!("not tcp")
    };
    (seg, tcp.to_header())
}

#[test]
fn handshake_and_allowed_request_are_reinjected_unchanged() {
    let mut h = Harness::new(metadata_http(), Some(1000));
    let mut c = Client::v4();
    let syn = c.syn();
    assert_eq!(reinjected(&h.send(&syn)), vec![syn]);
    let ack = c.data(b"");
    assert_eq!(reinjected(&h.send(&ack)), vec![ack]);
    let req = c.data(b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n\r\n");
    let out = h.send(&req);
    assert_eq!(reinjected(&out), vec![req]);
    assert_eq!(out.decisions.len(), 1);
    assert_eq!(out.decisions[0].action, HttpAction::Allow);
    assert_eq!(out.decisions[0].path, "/latest/meta-data/instance-id");
    assert_eq!(out.decisions[0].uid, Some(1000));
}

#[test]
fn request_split_over_segments_is_held_until_the_line_is_complete() {
    let mut h = Harness::new(metadata_http(), Some(1000));
    let mut c = Client::v4();
    h.send(&c.syn());
    let first = c.data(b"GET /latest/meta-da");
    let out = h.send(&first);
    assert!(
        out.effects.is_empty(),
        "incomplete request line must not leave: {out:?}"
    );
    let second = c.data(b"ta/instance-id HTTP/1.1\r\n\r\n");
    let out = h.send(&second);
    assert_eq!(reinjected(&out), vec![first, second]);
}

#[test]
fn refused_request_is_dropped_and_both_ends_reset() {
    for mut c in [Client::v4(), Client::v6()] {
        let mut h = Harness::new(metadata_http(), Some(65534));
        h.send(&c.syn());
        let data_start = c.seq;
        let req = c.data(b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\n\r\n");
        let out = h.send(&req);
        assert_eq!(out.dropped, 1);
        assert_eq!(out.decisions[0].action, HttpAction::Reset);

        let to_client = delivered(&out);
        assert_eq!(to_client.len(), 1);
        let (seg, tcp) = tcp_of(&to_client[0]);
        let flow = Segment::parse(&req).unwrap().flow;
        assert_eq!((seg.flow.src, seg.flow.dst), (flow.dst, flow.src));
        assert!(tcp.rst && tcp.ack);
        assert_eq!(
            tcp.sequence_number, SERVER_NEXT,
            "seq must be what the client expects"
        );
        assert_eq!(tcp.acknowledgment_number, c.seq);

        let to_server = reinjected(&out);
        assert_eq!(
            to_server.len(),
            1,
            "only the server reset is reinjected, never the request"
        );
        let (seg, tcp) = tcp_of(&to_server[0]);
        assert_eq!((seg.flow.src, seg.flow.dst), (flow.src, flow.dst));
        assert!(tcp.rst);
        assert_eq!(
            tcp.sequence_number, data_start,
            "seq must be what the server expects"
        );

        // Stragglers of a refused flow never reach the server.
        let late = c.data(b"more");
        let out = h.send(&late);
        assert!(out.effects.is_empty());
        assert_eq!(out.dropped, 1);
    }
}

#[test]
fn refused_request_split_over_segments_releases_nothing() {
    let mut h = Harness::new(metadata_http(), Some(1000));
    let mut c = Client::v4();
    h.send(&c.syn());
    assert!(
        h.send(&c.data(b"GET /latest/meta-data/i"))
            .effects
            .is_empty()
    );
    let out = h.send(&c.data(b"am/ HTTP/1.1\r\n\r\n"));
    assert_eq!(out.dropped, 2);
    assert_eq!(delivered(&out).len(), 1);
}

#[test]
fn out_of_order_segments_are_reassembled_and_released_in_order() {
    let mut h = Harness::new(metadata_http(), None);
    let mut c = Client::v4();
    h.send(&c.syn());
    let first = c.data(b"GET /latest/meta-data/inst");
    let second = c.data(b"ance-id HTTP/1.1\r\n\r\n");
    assert!(h.send(&second).effects.is_empty());
    let out = h.send(&first);
    assert_eq!(reinjected(&out), vec![first, second]);
}

#[test]
fn every_request_on_a_kept_alive_connection_is_judged() {
    let mut h = Harness::new(metadata_http(), Some(1000));
    let mut c = Client::v4();
    h.send(&c.syn());
    let ok = c.data(b"GET /latest/meta-data/instance-id HTTP/1.1\r\n\r\n");
    assert_eq!(reinjected(&h.send(&ok)).len(), 1);
    let bad = c.data(b"GET /latest/meta-data/instance-id/../iam/x HTTP/1.1\r\n\r\n");
    let out = h.send(&bad);
    assert_eq!(out.decisions[0].path, "/latest/meta-data/iam/x");
    assert_eq!(out.decisions[0].action, HttpAction::Reset);
    assert_eq!(delivered(&out).len(), 1);
}

#[test]
fn retransmission_of_released_bytes_is_reinjected_again() {
    let mut h = Harness::new(metadata_http(), Some(1000));
    let mut c = Client::v4();
    h.send(&c.syn());
    let req = c.data(b"GET /latest/meta-data/instance-id HTTP/1.1\r\n\r\n");
    h.send(&req);
    assert_eq!(reinjected(&h.send(&req)), vec![req]);
}

#[test]
fn retransmission_of_held_bytes_is_dropped_as_the_copy_is_held() {
    let mut h = Harness::new(metadata_http(), Some(1000));
    let mut c = Client::v4();
    h.send(&c.syn());
    let partial = c.data(b"GET /latest/");
    h.send(&partial);
    let out = h.send(&partial);
    assert!(out.effects.is_empty());
    let rest = c.data(b"meta-data/instance-id HTTP/1.1\r\n\r\n");
    assert_eq!(reinjected(&h.send(&rest)), vec![partial, rest]);
}

#[test]
fn uid_conditions_use_the_flows_owner() {
    let req = b"GET /admin/x HTTP/1.1\r\n\r\n";
    for (uid, expect) in [
        (Some(0), HttpAction::Allow),
        (Some(1000), HttpAction::Reset),
        (None, HttpAction::Reset),
    ] {
        let mut h = Harness::new(metadata_http(), uid);
        let mut c = Client::v4();
        h.send(&c.syn());
        let out = h.send(&c.data(req));
        assert_eq!(out.decisions[0].action, expect, "uid {uid:?}");
    }
}

#[test]
fn non_http_bytes_get_the_default_action() {
    let mut h = Harness::new(metadata_http(), Some(1000));
    let mut c = Client::v4();
    h.send(&c.syn());
    let out = h.send(&c.data(b"\x16\x03\x01\x00\x05hello\n"));
    assert!(out.decisions[0].unreadable.is_some());
    assert_eq!(delivered(&out).len(), 1);

    let allow_by_default = DivertPolicy::Http(HttpPolicy {
        requests: vec![],
        default: HttpAction::Allow,
    });
    let mut h = Harness::new(allow_by_default, Some(1000));
    let mut c = Client::v4();
    h.send(&c.syn());
    let junk = c.data(b"\x16\x03\x01\x00\x05hello\n");
    assert_eq!(reinjected(&h.send(&junk)), vec![junk]);
    let more = c.data(b"GET /anything HTTP/1.1\r\n\r\n");
    assert_eq!(
        reinjected(&h.send(&more)),
        vec![more],
        "an unframeable stream is no longer inspected"
    );
}

#[test]
fn flow_joined_mid_connection_is_inspected_from_its_first_seen_byte() {
    let mut h = Harness::new(metadata_http(), Some(1000));
    let mut c = Client::v4();
    c.seq = 77;
    let out = h.send(&c.data(b"GET /latest/meta-data/iam/ HTTP/1.1\r\n\r\n"));
    assert_eq!(out.decisions[0].action, HttpAction::Reset);
}

#[test]
fn packet_rules_reinject_or_drop_without_inspection() {
    let mut c = Client::v4();
    let packet = c.data(b"anything");
    let mut h = Harness::new(
        DivertPolicy::Packets(crate::policy::PacketAction::Reinject),
        None,
    );
    assert_eq!(reinjected(&h.send(&packet)), vec![packet.clone()]);
    let mut h = Harness::new(
        DivertPolicy::Packets(crate::policy::PacketAction::Drop),
        None,
    );
    let out = h.send(&packet);
    assert!(out.effects.is_empty());
    assert_eq!(out.dropped, 1);
}

#[test]
fn idle_flows_expire() {
    let mut h = Harness::new(metadata_http(), Some(1000));
    let mut c = Client::v4();
    h.send(&c.syn());
    assert_eq!(h.diverter.tracked_flows(), 1);
    h.diverter.expire(h.now + Duration::from_secs(10));
    assert_eq!(h.diverter.tracked_flows(), 1);
    h.diverter.expire(h.now + flows::IDLE_TIMEOUT);
    assert_eq!(h.diverter.tracked_flows(), 0);
}

#[test]
fn held_bytes_are_bounded() {
    let mut h = Harness::new(metadata_http(), Some(1000));
    let mut c = Client::v4();
    h.send(&c.syn());
    c.seq = c.seq.wrapping_add(1); // leave a gap so nothing can be fed
    let mut last = Outcome::default();
    for _ in 0..40 {
        last = h.send(&c.data(&[b'a'; 1000]));
        if !last.decisions.is_empty() {
            break;
        }
    }
    assert_eq!(last.decisions.len(), 1);
    assert!(last.decisions[0].unreadable.is_some());
    assert_eq!(delivered(&last).len(), 1);
}

#[test]
fn malformed_packets_are_errors_not_panics() {
    assert!(Segment::parse(&[]).is_err());
    assert!(Segment::parse(&[0x45, 0, 0]).is_err());
    let mut c = Client::v4();
    let mut p = c.data(b"GET / HTTP/1.1\r\n\r\n");
    p.truncate(30);
    assert!(Segment::parse(&p).is_err());
}
