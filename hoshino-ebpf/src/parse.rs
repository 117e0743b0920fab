//! Packet parsing: Ethernet (optionally one VLAN tag), IPv4, IPv6 with a bounded extension-header
//! walk, and L4 ports.
//!
//! Every read goes through `bpf_skb_load_bytes`, which fails instead of reading past the packet
//! (and works on non-linear skbs), so a truncated header simply leaves the fields it would have
//! filled unknown.

use aya_ebpf::programs::TcContext;
use hoshino_common::{FAMILY_V4, FAMILY_V6};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_UDPLITE: u8 = 136;

/// Extension headers walked before giving up on finding L4 (hop-by-hop, routing, dest opts twice,
/// fragment, AH covers every order RFC 8200 recommends).
const MAX_EXT_HEADERS: usize = 6;

/// What the parser established. Fields whose `has_*` flag is false are zero.
pub struct Packet {
    /// 0 when no IP header was readable.
    pub family: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub has_proto: bool,
    pub proto: u8,
    pub has_ports: bool,
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10); 0 if not TCP or not
    /// readable.
    pub tcp_flags: u8,
}

impl Packet {
    const fn unknown() -> Self {
        Self {
            family: 0,
            src: [0; 16],
            dst: [0; 16],
            has_proto: false,
            proto: 0,
            has_ports: false,
            src_port: 0,
            dst_port: 0,
            tcp_flags: 0,
        }
    }
}

/// Parses the packet in `ctx`. `l3_only` is set for interfaces without an Ethernet header.
#[inline(always)]
pub fn parse(ctx: &TcContext, l3_only: bool) -> Packet {
    let mut pkt = Packet::unknown();
    let (ethertype, l3) = if l3_only {
        // skb->protocol is big-endian in the u32's low 16 bits.
        (u16::from_be(ctx.skb.protocol() as u16), 0)
    } else {
        match ethertype(ctx) {
            Some(found) => found,
            None => return pkt,
        }
    };
    match ethertype {
        ETH_P_IP => parse_v4(ctx, l3, &mut pkt),
        ETH_P_IPV6 => parse_v6(ctx, l3, &mut pkt),
        _ => {}
    }
    pkt
}

#[inline(always)]
fn ethertype(ctx: &TcContext) -> Option<(u16, usize)> {
    let outer = u16::from_be(ctx.load::<u16>(12).ok()?);
    if outer == ETH_P_8021Q || outer == ETH_P_8021AD {
        let inner = u16::from_be(ctx.load::<u16>(ETH_HLEN + 2).ok()?);
        return Some((inner, ETH_HLEN + VLAN_HLEN));
    }
    Some((outer, ETH_HLEN))
}

#[inline(always)]
fn parse_v4(ctx: &TcContext, l3: usize, pkt: &mut Packet) {
    let Ok(header) = ctx.load::<[u8; 20]>(l3) else {
        return;
    };
    let ihl = usize::from(header[0] & 0x0f) * 4;
    if header[0] >> 4 != 4 || ihl < 20 {
        return;
    }
    pkt.family = FAMILY_V4;
    pkt.src[..4].copy_from_slice(&header[12..16]);
    pkt.dst[..4].copy_from_slice(&header[16..20]);
    pkt.has_proto = true;
    pkt.proto = header[9];
    let frag_offset = u16::from_be_bytes([header[6], header[7]]) & 0x1fff;
    if frag_offset == 0 {
        read_ports(ctx, l3 + ihl, pkt);
    }
}

#[inline(always)]
fn parse_v6(ctx: &TcContext, l3: usize, pkt: &mut Packet) {
    let Ok(header) = ctx.load::<[u8; 40]>(l3) else {
        return;
    };
    if header[0] >> 4 != 6 {
        return;
    }
    pkt.family = FAMILY_V6;
    pkt.src.copy_from_slice(&header[8..24]);
    pkt.dst.copy_from_slice(&header[24..40]);
    let mut next = header[6];
    let mut offset = l3 + 40;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let Ok(ext) = ctx.load::<[u8; 2]>(offset) else {
                    return;
                };
                next = ext[0];
                offset += (usize::from(ext[1]) + 1) * 8;
            }
            IPPROTO_AH => {
                let Ok(ext) = ctx.load::<[u8; 2]>(offset) else {
                    return;
                };
                next = ext[0];
                offset += (usize::from(ext[1]) + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                let Ok(ext) = ctx.load::<[u8; 4]>(offset) else {
                    return;
                };
                next = ext[0];
                offset += 8;
                let frag_offset = u16::from_be_bytes([ext[2], ext[3]]) >> 3;
                if frag_offset != 0 {
                    // A non-first fragment: the protocol is known, its ports are elsewhere.
                    pkt.has_proto = true;
                    pkt.proto = next;
                    return;
                }
            }
            _ => {
                pkt.has_proto = true;
                pkt.proto = next;
                read_ports(ctx, offset, pkt);
                return;
            }
        }
    }
    // Still inside extension headers after the bound: L4 stays unknown.
}

#[inline(always)]
fn read_ports(ctx: &TcContext, l4: usize, pkt: &mut Packet) {
    if !matches!(
        pkt.proto,
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP | IPPROTO_UDPLITE
    ) {
        return;
    }
    if let Ok(ports) = ctx.load::<[u8; 4]>(l4) {
        pkt.has_ports = true;
        pkt.src_port = u16::from_be_bytes([ports[0], ports[1]]);
        pkt.dst_port = u16::from_be_bytes([ports[2], ports[3]]);
    }
    if pkt.proto == IPPROTO_TCP
        && let Ok(flags) = ctx.load::<u8>(l4 + 13)
    {
        pkt.tcp_flags = flags;
    }
}
