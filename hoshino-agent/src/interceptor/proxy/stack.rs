//! The userspace TCP/IP stack on the divert TUN: smoltcp terminates each diverted HTTP
//! connection as whatever address and port its SYN was sent to, and every connection's bytes go
//! to its [`Conversation`]. No client packet leaves this stack: what reaches the server is only
//! the request the agent rebuilt, over its own connection (see [`super::upstream`]).
//!
//! The stack is driven by the divert loop: it pushes packets in ([`ProxyStack::push`]), calls
//! [`ProxyStack::poll`] and writes the returned packets back into the TUN. Time comes from the
//! caller. Upstream fetches run as tokio tasks whose answers come back through a channel.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use hoshino_common::FlowKey;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpCidr, IpListenEndpoint};
use tokio::sync::mpsc;

use super::ProxyStats;
use super::admission::{Admission, AdmissionError};
use super::audit::{self, GarbageLimiter};
use super::conversation::{Conversation, DivertRule, Judgement, Refusal, Step};
use super::request::rebuild_request;
use super::response::{client_response, own_response};
use super::upstream;
use crate::interceptor::divert::FlowTuple;
use crate::interceptor::flow_key;
use crate::policy::HttpAction;

/// The stack's own addresses. Never used as a source: every connection answers from the
/// address its client asked for (smoltcp's any-IP mode with default routes through these).
const OWN_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 0, 8);
const OWN_V6: Ipv6Addr = Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 8);
/// Largest packet the stack handles (the divert TUN's MTU).
const MTU: usize = 65535;
/// Socket buffers per connection: small, since the conversation reads a head progressively
/// and keeps the rest of an answer in its outbox (bounded memory under many connections).
const RX_BUFFER: usize = 4 * 1024;
const TX_BUFFER: usize = 16 * 1024;
/// A connection that neither sends nor acknowledges for this long is dropped by smoltcp.
const TCP_TIMEOUT: Duration = Duration::from_secs(60);

/// Packets in from the TUN, packets out to it.
#[derive(Debug, Default)]
struct QueueDevice {
    rx: VecDeque<Vec<u8>>,
    tx: Vec<Vec<u8>>,
}

struct RxToken(Vec<u8>);
struct TxToken<'a>(&'a mut Vec<Vec<u8>>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut packet = vec![0u8; len];
        let r = f(&mut packet);
        self.0.push(packet);
        r
    }
}

impl phy::Device for QueueDevice {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(
        &mut self,
        _timestamp: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let packet = self.rx.pop_front()?;
        Some((RxToken(packet), TxToken(&mut self.tx)))
    }

    fn transmit(&mut self, _timestamp: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        Some(TxToken(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = MTU;
        caps
    }
}

/// The server's answer for one forwarded request, or our 502 when there was none.
#[derive(Debug)]
pub struct Answer {
    connection: u64,
    bytes: Vec<u8>,
    relayed: bool,
}

/// One terminated connection.
struct Connection {
    id: u64,
    tuple: FlowTuple,
    conversation: Conversation,
    /// Bytes for the client not yet in the socket's send buffer.
    outbox: Vec<u8>,
    /// Close (FIN) once the outbox is sent.
    close_after: bool,
    /// Refused with a reset: abort at the next chance.
    abort: bool,
    /// Refused with a reset while an earlier response is still going out: abort once it is
    /// sent and acknowledged (a pipelined refused request must not cut the allowed answer).
    abort_after_flush: bool,
}

/// What the stack reports back to the divert loop after a poll.
#[derive(Debug, Default)]
pub struct Polled {
    /// Packets to write into the divert TUN (for the clients).
    pub packets: Vec<Vec<u8>>,
    /// Kernel flow entries of connections that ended.
    pub ended: Vec<FlowKey>,
}

/// The terminating stack and its connections.
pub struct ProxyStack {
    iface: Interface,
    device: QueueDevice,
    sockets: SocketSet<'static>,
    connections: HashMap<SocketHandle, Connection>,
    by_tuple: HashMap<FlowTuple, SocketHandle>,
    admission: Admission,
    garbage: GarbageLimiter,
    epoch: Instant,
    next_id: u64,
    mark: u32,
    answers: mpsc::UnboundedSender<Answer>,
    stats: Arc<ProxyStats>,
}

impl ProxyStack {
    /// A stack whose upstream connections carry `mark`; answers arrive on the returned channel
    /// and go back in through [`Self::answer`].
    pub fn new(
        mark: u32,
        admission: Admission,
        stats: Arc<ProxyStats>,
        now: Instant,
    ) -> (Self, mpsc::UnboundedReceiver<Answer>) {
        let mut device = QueueDevice::default();
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = rand::random();
        let mut iface = Interface::new(config, &mut device, smoltcp::time::Instant::from_micros(0));
        iface.set_any_ip(true);
        iface.update_ip_addrs(|addrs| {
            // Two slots (smoltcp's IFACE_MAX_ADDR_COUNT); both pushes fit.
            let _ = addrs.push(IpCidr::new(OWN_V4.into(), 32));
            let _ = addrs.push(IpCidr::new(OWN_V6.into(), 128));
        });
        // Any-IP accepts a packet for another address only when a route to it goes through
        // one of our own addresses.
        let _ = iface.routes_mut().add_default_ipv4_route(OWN_V4);
        let _ = iface.routes_mut().add_default_ipv6_route(OWN_V6);
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Self {
                iface,
                device,
                sockets: SocketSet::new(Vec::new()),
                connections: HashMap::new(),
                by_tuple: HashMap::new(),
                admission,
                garbage: GarbageLimiter::default(),
                epoch: now,
                next_id: 0,
                mark,
                answers: tx,
                stats,
            },
            rx,
        )
    }

    fn timestamp(&self, now: Instant) -> smoltcp::time::Instant {
        let micros = now.saturating_duration_since(self.epoch).as_micros();
        smoltcp::time::Instant::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
    }

    /// Whether `tuple` is a connection of this stack.
    pub fn owns(&self, tuple: &FlowTuple) -> bool {
        self.by_tuple.contains_key(tuple)
    }

    /// Whether the connection on `tuple` is over as far as TCP goes, so that a new SYN on it
    /// starts a new connection (rather than being an oddity inside the old one, which
    /// smoltcp answers as RFC 5961 says).
    pub fn is_finished(&mut self, tuple: &FlowTuple) -> bool {
        let Some(&handle) = self.by_tuple.get(tuple) else {
            return true;
        };
        let socket = self.sockets.get::<tcp::Socket>(handle);
        matches!(
            socket.state(),
            tcp::State::Closed
                | tcp::State::TimeWait
                | tcp::State::Listen
                | tcp::State::LastAck
                | tcp::State::Closing
        )
    }

    /// Forgets the connection on `tuple` at once (its socket is dropped without a segment).
    pub fn forget(&mut self, tuple: &FlowTuple) -> Option<FlowKey> {
        let handle = self.by_tuple.remove(tuple)?;
        self.sockets.remove(handle);
        let c = self.connections.remove(&handle)?;
        self.admission.release(c.conversation.uid());
        Some(key_of(&c.tuple))
    }

    /// Opens a connection for a SYN on `tuple` from `uid`, diverted by `rule`. On a refusal
    /// the SYN finds no socket and smoltcp answers it with a reset.
    pub fn open(
        &mut self,
        tuple: FlowTuple,
        uid: u32,
        rule: DivertRule,
        now: Instant,
    ) -> Result<(), AdmissionError> {
        if let Err(e) = self.admission.admit(uid) {
            self.stats.refused(e.reason());
            tracing::debug!(uid, flow = ?tuple, error = %e, "diverted connection refused");
            return Err(e);
        }
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; RX_BUFFER]),
            tcp::SocketBuffer::new(vec![0; TX_BUFFER]),
        );
        socket.set_nagle_enabled(false);
        socket.set_ack_delay(None);
        socket.set_timeout(Some(smoltcp::time::Duration::from_secs(
            TCP_TIMEOUT.as_secs(),
        )));
        let endpoint = IpListenEndpoint {
            addr: Some(tuple.dst.into()),
            port: tuple.dst_port,
        };
        if socket.listen(endpoint).is_err() {
            // Port 0: nothing a client could have connected to.
            self.admission.release(uid);
            return Ok(());
        }
        let handle = self.sockets.add(socket);
        self.next_id += 1;
        self.connections.insert(
            handle,
            Connection {
                id: self.next_id,
                tuple,
                conversation: Conversation::new(uid, rule, now),
                outbox: Vec::new(),
                close_after: false,
                abort: false,
                abort_after_flush: false,
            },
        );
        self.by_tuple.insert(tuple, handle);
        self.stats.connections.fetch_add(1, Relaxed);
        Ok(())
    }

    /// A packet from the divert TUN for this stack.
    pub fn push(&mut self, packet: Vec<u8>) {
        self.device.rx.push_back(packet);
    }

    /// The answer of an upstream fetch.
    pub fn answer(&mut self, answer: Answer, now: Instant) {
        let Some(c) = self
            .connections
            .values_mut()
            .find(|c| c.id == answer.connection)
        else {
            return; // the client is gone
        };
        let keep = c.conversation.answered(answer.relayed, now);
        c.outbox.extend_from_slice(&answer.bytes);
        c.close_after |= !keep;
    }

    /// Runs the stack: processes queued packets, serves every connection, returns what to
    /// write into the TUN and which kernel flow entries to delete.
    pub fn poll(&mut self, now: Instant) -> Polled {
        let ts = self.timestamp(now);
        self.iface.poll(ts, &mut self.device, &mut self.sockets);
        self.serve(now);
        // Once more, so that what serving queued (data, FIN, RST) goes out now.
        self.iface.poll(ts, &mut self.device, &mut self.sockets);
        let ended = self.sweep();
        Polled {
            packets: std::mem::take(&mut self.device.tx),
            ended,
        }
    }

    /// When the stack next needs [`Self::poll`] without new packets.
    pub fn poll_delay(&mut self, now: Instant) -> Option<Duration> {
        let ts = self.timestamp(now);
        self.iface
            .poll_delay(ts, &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()))
    }

    fn serve(&mut self, now: Instant) {
        let mut buf = vec![0u8; RX_BUFFER];
        for (&handle, c) in self.connections.iter_mut() {
            let socket = self.sockets.get_mut::<tcp::Socket>(handle);
            if !c.abort && !c.conversation.is_done() && c.conversation.expired(now) {
                self.stats.refused("timeout");
                c.abort = true;
            }
            if c.abort {
                socket.abort();
                continue;
            }
            if c.abort_after_flush && c.outbox.is_empty() && socket.send_queue() == 0 {
                c.abort = true;
                socket.abort();
                continue;
            }
            // A refused conversation takes no more bytes (room 0) and judges nothing more.
            let room = c.conversation.room().min(buf.len());
            if room > 0 && socket.can_recv() {
                match socket.recv_slice(&mut buf[..room]) {
                    Ok(n) => c.conversation.receive(&buf[..n], now),
                    Err(_) => c.abort = true,
                }
            }
            loop {
                match c.conversation.step(now) {
                    Step::Wait => break,
                    Step::Forward { request, judgement } => {
                        self.stats.judged(&judgement);
                        audit::record(&judgement, &mut self.garbage, now);
                        let server = SocketAddr::new(c.tuple.dst, c.tuple.dst_port);
                        let head = request.method == "HEAD";
                        let bytes = rebuild_request(&request, server);
                        let keep_alive = request.keep_alive;
                        let answers = self.answers.clone();
                        let stats = self.stats.clone();
                        let connection = c.id;
                        let mark = self.mark;
                        tokio::spawn(async move {
                            let answer = match upstream::fetch(server, mark, bytes, head).await {
                                Ok(response) => Answer {
                                    connection,
                                    bytes: client_response(&response, head, keep_alive),
                                    relayed: true,
                                },
                                Err(e) => {
                                    stats.upstream_errors.fetch_add(1, Relaxed);
                                    tracing::warn!(error = %e, "metadata request failed upstream");
                                    Answer {
                                        connection,
                                        bytes: own_response(502, "Bad Gateway"),
                                        relayed: false,
                                    }
                                }
                            };
                            let _ = answers.send(answer);
                        });
                    }
                    Step::Refuse { how, judgement } => {
                        self.stats.judged(&judgement);
                        audit::record(&judgement, &mut self.garbage, now);
                        match how {
                            Refusal::Reset => {
                                self.stats.resets.fetch_add(1, Relaxed);
                                if c.outbox.is_empty() && socket.send_queue() == 0 {
                                    c.abort = true;
                                    socket.abort();
                                } else {
                                    c.abort_after_flush = true;
                                }
                            }
                            Refusal::Forbid => {
                                c.outbox = own_response(403, "Forbidden");
                                c.close_after = true;
                            }
                        }
                        break;
                    }
                }
            }
            if c.abort {
                continue;
            }
            if !c.outbox.is_empty() {
                match socket.send_slice(&c.outbox) {
                    Ok(n) => {
                        c.outbox.drain(..n);
                    }
                    Err(_) => c.abort = true,
                }
            }
            if c.abort_after_flush && c.outbox.is_empty() && socket.send_queue() == 0 {
                c.abort = true;
                socket.abort();
                continue;
            }
            if c.outbox.is_empty() && c.close_after {
                socket.close();
            }
            // The client finished sending and no request is pending: an unfinished head
            // will never complete, so the connection closes.
            if socket.state() == tcp::State::CloseWait
                && c.outbox.is_empty()
                && !c.close_after
                && c.conversation.is_reading()
            {
                socket.close();
            }
        }
    }

    /// Drops connections whose socket is closed (after its last segment went out).
    fn sweep(&mut self) -> Vec<FlowKey> {
        let done: Vec<SocketHandle> = self
            .connections
            .iter()
            .filter(|(h, _)| {
                // Closed: aborted, reset or finished. TimeWait: finished (we closed first);
                // dropping it frees the 4-tuple for reuse at once. Listen: its SYN was not
                // taken, or a RST in SYN-RECEIVED sent it back to listening; either way
                // this connection is gone (every socket is opened for one SYN, polled at
                // once).
                let socket = self.sockets.get::<tcp::Socket>(**h);
                matches!(
                    socket.state(),
                    tcp::State::Closed | tcp::State::TimeWait | tcp::State::Listen
                )
            })
            .map(|(h, _)| *h)
            .collect();
        let mut ended = Vec::with_capacity(done.len());
        for handle in done {
            self.sockets.remove(handle);
            if let Some(c) = self.connections.remove(&handle) {
                self.by_tuple.remove(&c.tuple);
                self.admission.release(c.conversation.uid());
                ended.push(key_of(&c.tuple));
            }
        }
        ended
    }

    /// Connections held now.
    pub fn len(&self) -> usize {
        self.connections.len()
    }

    pub fn is_empty(&self) -> bool {
        self.connections.is_empty()
    }
}

fn key_of(t: &FlowTuple) -> FlowKey {
    flow_key(t.src, t.dst, t.proto, t.src_port, t.dst_port)
}

/// The audit-and-count side of a judgement, for the metrics.
impl ProxyStats {
    fn judged(&self, j: &Judgement) {
        match j.action {
            HttpAction::Allow => self.allowed.fetch_add(1, Relaxed),
            HttpAction::Reset => self.reset.fetch_add(1, Relaxed),
            HttpAction::Forbid => self.forbidden.fetch_add(1, Relaxed),
        };
        if let Some(reason) = j.refused_because {
            self.refused(reason);
        }
    }
}

#[cfg(test)]
mod tests {
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
}
