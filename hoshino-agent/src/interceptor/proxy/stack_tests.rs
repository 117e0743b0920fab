//! The stack driven with hand-made client segments (and, for the forwarding case, a local
//! server on loopback).

use std::net::IpAddr;

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TcpHeader, TransportSlice};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::policy::{HttpPolicy, HttpRequestRule};

const CLIENT: [u8; 4] = [10, 231, 0, 11];

fn rule() -> DivertRule {
    let entry = |path: &str, action| HttpRequestRule {
        path_prefix: path.into(),
        uid: None,
        methods: vec![],
        query: false,
        action,
    };
    DivertRule {
        name: "imds-users".into(),
        http: Arc::new(HttpPolicy {
            requests: vec![
                entry("/latest/meta-data/iam/", HttpAction::Reset),
                entry("/latest/meta-data/", HttpAction::Allow),
            ],
            default: HttpAction::Reset,
        }),
    }
}

/// A client's side of one connection, written as raw segments.
struct Client {
    server: [u8; 4],
    port: u16,
    src_port: u16,
    seq: u32,
    ack: u32,
}

#[derive(Debug)]
struct Seen {
    syn: bool,
    rst: bool,
    fin: bool,
    seq: u32,
    payload: Vec<u8>,
}

impl Client {
    fn segment(&self, syn: bool, payload: &[u8]) -> Vec<u8> {
        let mut h = TcpHeader::new(self.src_port, self.port, self.seq, 64000);
        h.syn = syn;
        if !syn {
            h.ack = true;
            h.acknowledgment_number = self.ack;
        }
        let mut out = Vec::new();
        PacketBuilder::ipv4(CLIENT, self.server, 64)
            .tcp_header(h)
            .write(&mut out, payload)
            .expect("builds");
        out
    }

    fn tuple(&self) -> FlowTuple {
        FlowTuple {
            src: IpAddr::from(CLIENT),
            dst: IpAddr::from(self.server),
            proto: 6,
            src_port: self.src_port,
            dst_port: self.port,
        }
    }

    fn read(packets: &[Vec<u8>]) -> Vec<Seen> {
        packets
            .iter()
            .map(|p| {
                let s = SlicedPacket::from_ip(p).expect("stack writes IP");
                assert!(matches!(s.net, Some(NetSlice::Ipv4(_))));
                let Some(TransportSlice::Tcp(t)) = s.transport else {
                    panic!("not tcp")
                };
                Seen {
                    syn: t.syn(),
                    rst: t.rst(),
                    fin: t.fin(),
                    seq: t.sequence_number(),
                    payload: t.payload().to_vec(),
                }
            })
            .collect()
    }
}

fn stack() -> ProxyStack {
    let (stack, _rx) = ProxyStack::new(0, Admission::new(8, 2), Arc::default(), Instant::now());
    stack
}

/// SYN, SYN-ACK, ACK: returns the client with its acknowledgement set.
fn connect(stack: &mut ProxyStack, mut c: Client, now: Instant) -> Client {
    stack.open(c.tuple(), 1000, rule(), now).expect("admitted");
    stack.push(c.segment(true, &[]));
    let out = Client::read(&stack.poll(now).packets);
    assert!(out.len() == 1 && out[0].syn, "{out:?}");
    c.seq += 1;
    c.ack = out[0].seq.wrapping_add(1);
    stack.push(c.segment(false, &[]));
    stack.poll(now);
    c
}

fn client(src_port: u16) -> Client {
    Client {
        server: [169, 254, 169, 254],
        port: 80,
        src_port,
        seq: 1000,
        ack: 0,
    }
}

#[test]
fn the_stack_answers_as_the_address_the_syn_was_sent_to() {
    let mut s = stack();
    let now = Instant::now();
    let c = connect(&mut s, client(40000), now);
    assert!(s.owns(&c.tuple()));
    assert!(!s.is_finished(&c.tuple()));
}

#[test]
fn a_refused_request_is_reset_at_once_and_the_flow_ends() {
    let mut s = stack();
    let now = Instant::now();
    let mut c = connect(&mut s, client(40001), now);
    let request = b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\n\r\n";
    s.push(c.segment(false, request));
    c.seq += request.len() as u32;
    let polled = s.poll(now);
    let out = Client::read(&polled.packets);
    assert!(out.iter().any(|p| p.rst), "{out:?}");
    assert!(out.iter().all(|p| p.payload.is_empty()), "{out:?}");
    assert_eq!(polled.ended.len(), 1);
    assert!(!s.owns(&c.tuple()));
    assert_eq!(s.stats.resets.load(Relaxed), 1);
    assert_eq!(s.stats.reset.load(Relaxed), 1);
}

#[test]
fn many_small_segments_are_acknowledged_and_reassembled() {
    let mut s = stack();
    let now = Instant::now();
    let mut c = connect(&mut s, client(40002), now);
    let request = b"GET /latest/meta-data/iam/ HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut acked = 0;
    for byte in request.iter() {
        s.push(c.segment(false, &[*byte]));
        c.seq += 1;
        let out = Client::read(&s.poll(now).packets);
        acked += out.iter().filter(|p| !p.rst).count();
        if out.iter().any(|p| p.rst) {
            break;
        }
    }
    // Every one-byte segment was acknowledged (the last one too, just before its reset).
    assert_eq!(acked, request.len());
    assert!(!s.owns(&c.tuple()));
}

#[test]
fn a_stray_segment_without_a_connection_gets_a_reset() {
    let mut s = stack();
    let now = Instant::now();
    let c = client(40003);
    s.push(c.segment(false, b"GET /latest/meta-data/iam/ HTTP/1.1\r\n\r\n"));
    let out = Client::read(&s.poll(now).packets);
    assert!(out.len() == 1 && out[0].rst, "{out:?}");
}

#[test]
fn the_per_uid_cap_refuses_a_further_connection() {
    let mut s = stack();
    let now = Instant::now();
    let _a = connect(&mut s, client(40010), now);
    let _b = connect(&mut s, client(40011), now);
    let c = client(40012);
    assert!(s.open(c.tuple(), 1000, rule(), now).is_err());
    s.push(c.segment(true, &[]));
    let out = Client::read(&s.poll(now).packets);
    assert!(out.len() == 1 && out[0].rst, "{out:?}");
    assert_eq!(s.stats.refusals("uid_cap"), 1);
}

#[tokio::test]
async fn an_allowed_request_is_rebuilt_sent_upstream_and_the_answer_relayed() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.expect("accept");
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"\r\n\r\n") {
            let n = conn.read(&mut buf).await.expect("read");
            got.extend_from_slice(&buf[..n]);
        }
        conn.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 19\r\n\r\ni-0123456789abcdef0")
            .await
            .expect("write");
        String::from_utf8(got).expect("ascii")
    });
    let (mut s, mut answers) =
        ProxyStack::new(0, Admission::default(), Arc::default(), Instant::now());
    let now = Instant::now();
    let c = connect(
        &mut s,
        Client {
            server: [127, 0, 0, 1],
            port,
            src_port: 40020,
            seq: 1,
            ack: 0,
        },
        now,
    );
    let request =
        b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: evil\r\nX-Smuggle: 1\r\n\r\n";
    s.push(c.segment(false, request));
    s.poll(now);
    let answer = answers.recv().await.expect("an answer");
    s.answer(answer, now);
    let out = Client::read(&s.poll(now).packets);
    let body: Vec<u8> = out.iter().flat_map(|p| p.payload.clone()).collect();
    let text = String::from_utf8(body).expect("ascii");
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\ni-0123456789abcdef0"), "{text}");
    assert!(!out.iter().any(|p| p.rst || p.fin), "kept alive: {out:?}");
    let seen = server.await.expect("server");
    assert_eq!(
        seen,
        format!(
            "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
        )
    );
    assert_eq!(s.stats.allowed.load(Relaxed), 1);
}

/// A rule that allows everything, as a more privileged uid's rule might.
fn allow_all() -> DivertRule {
    DivertRule {
        name: "imds-trusted".into(),
        http: Arc::new(HttpPolicy {
            requests: vec![],
            default: HttpAction::Allow,
        }),
    }
}

#[tokio::test]
async fn a_syn_taken_by_another_tuples_listening_socket_is_aborted_unread() {
    let mut s = stack();
    let now = Instant::now();
    // A trusted client's connection is opened, but its SYN never reaches the stack (or an RST
    // sent its socket back to LISTEN): that socket listens on the service address.
    let trusted = client(40020);
    s.open(trusted.tuple(), 0, allow_all(), now)
        .expect("admitted");
    // Another client's SYN: smoltcp may hand it to the trusted socket.
    let mut other = client(40021);
    s.open(other.tuple(), 1000, rule(), now).expect("admitted");
    s.push(other.segment(true, &[]));
    let out = Client::read(&s.poll(now).packets);
    if let Some(synack) = out.iter().find(|p| p.syn) {
        other.seq += 1;
        other.ack = synack.seq.wrapping_add(1);
    }
    s.push(other.segment(false, &[]));
    let request = b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\n\r\n";
    s.push(other.segment(false, request));
    let out = Client::read(&s.poll(now).packets);
    assert_eq!(
        s.stats.refusals("tuple_mismatch"),
        1,
        "the socket that accepted another tuple was not aborted"
    );
    assert!(out.iter().all(|p| p.payload.is_empty()), "{out:?}");
    assert_eq!(
        s.stats.allowed.load(Relaxed),
        0,
        "a request was judged under the trusted rule"
    );
}
