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
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpListenEndpoint};
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
    /// Its kernel flow entry is left alone: a new SYN on the 4-tuple has just replaced it.
    pub fn forget(&mut self, tuple: &FlowTuple) {
        let Some(handle) = self.by_tuple.remove(tuple) else {
            return;
        };
        self.sockets.remove(handle);
        if let Some(c) = self.connections.remove(&handle) {
            self.admission.release(c.conversation.uid());
        }
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
            // Every socket listens on the shared service address, so smoltcp hands a SYN to
            // whichever of them is in LISTEN: one whose own SYN never came, or one an RST sent
            // back from SYN-RECEIVED to LISTEN. A connection accepted on another tuple's socket
            // would be judged with that tuple's uid and rule; it is aborted before a byte of it
            // is read.
            if !c.abort && !socket_matches(socket, &c.tuple) {
                self.stats.refused("tuple_mismatch");
                c.abort = true;
            }
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

/// Whether the peer and local endpoints of `socket` (once it has them) are those of `tuple`.
fn socket_matches(socket: &tcp::Socket, tuple: &FlowTuple) -> bool {
    let remote_ok = socket
        .remote_endpoint()
        .is_none_or(|ep| ep.addr == IpAddress::from(tuple.src) && ep.port == tuple.src_port);
    let local_ok = socket
        .local_endpoint()
        .is_none_or(|ep| ep.addr == IpAddress::from(tuple.dst) && ep.port == tuple.dst_port);
    remote_ok && local_ok
}

#[cfg(test)]
#[path = "stack_tests.rs"]
mod tests;
