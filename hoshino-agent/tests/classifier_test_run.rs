//! The classifier on synthetic packets via `BPF_PROG_TEST_RUN` (needs root: CAP_BPF +
//! CAP_NET_ADMIN). Each test loads its own classifier, so counters start at zero. Every policy is
//! TOML text through the production path (`policy::compile_text` -> `Classifier::install`), the
//! one an operator's policy file takes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::programs::{TestRun, TestRunOptions};
use hoshino_agent::interceptor::{Classifier, ClassifierOptions, RuleCounters, flow_key};
use hoshino_common::Verdict;

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const TUNNEL_IFINDEX: u32 = 1;
const DIVERT_IFINDEX: u32 = 1;
const REINJECT_MARK: u32 = 0x4853;

const TCP: u8 = 6;
const UDP: u8 = 17;

// ---- packet construction -------------------------------------------------------------------

fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// Inserts an 802.1Q tag (VLAN 5) after the MAC addresses.
fn vlan(frame: &[u8]) -> Vec<u8> {
    let mut tagged = frame[..12].to_vec();
    tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
    tagged.extend_from_slice(&frame[12..]);
    tagged
}

fn ports(src: u16, dst: u16) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&src.to_be_bytes());
    l4.extend_from_slice(&dst.to_be_bytes());
    l4.extend_from_slice(&[0; 16]);
    l4
}

fn ipv4(proto: u8, src: &str, dst: &str, frag_field: u16, l4: &[u8]) -> Vec<u8> {
    let src: Ipv4Addr = src.parse().unwrap();
    let dst: Ipv4Addr = dst.parse().unwrap();
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 1]);
    h.extend_from_slice(&frag_field.to_be_bytes());
    h.extend_from_slice(&[64, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(l4);
    ethernet(0x0800, &h)
}

fn v4_udp(dst: &str, dport: u16) -> Vec<u8> {
    ipv4(UDP, "192.0.2.1", dst, 0, &ports(40000, dport))
}

fn v4_tcp(dst: &str, dport: u16) -> Vec<u8> {
    ipv4(TCP, "192.0.2.1", dst, 0, &ports(40000, dport))
}

/// `chain` is a list of (header type, header bytes) extension headers, then `last` and `l4`.
fn ipv6(dst: &str, chain: &[(u8, Vec<u8>)], last: u8, l4: &[u8]) -> Vec<u8> {
    let src: Ipv6Addr = "2001:db8::1".parse().unwrap();
    let dst: Ipv6Addr = dst.parse().unwrap();
    let mut payload = Vec::new();
    for (i, (_, header)) in chain.iter().enumerate() {
        let mut header = header.clone();
        header[0] = chain.get(i + 1).map_or(last, |(t, _)| *t);
        payload.extend_from_slice(&header);
    }
    payload.extend_from_slice(l4);
    let first = chain.first().map_or(last, |(t, _)| *t);
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    h.extend_from_slice(&[first, 64]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(&payload);
    ethernet(0x86dd, &h)
}

/// An 8-byte options header (hop-by-hop, destination options or routing) with PadN.
fn ext_options() -> Vec<u8> {
    vec![0, 0, 1, 4, 0, 0, 0, 0]
}

/// A 24-byte routing header (type 0 length 2 words), to exercise the length field.
fn ext_routing_long() -> Vec<u8> {
    let mut h = vec![0, 2, 0, 0, 0, 0, 0, 0];
    h.extend_from_slice(&[0; 16]);
    h
}

fn ext_fragment(offset_units: u16, more: bool) -> Vec<u8> {
    let field = (offset_units << 3) | u16::from(more);
    let mut h = vec![0, 0];
    h.extend_from_slice(&field.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 7]);
    h
}

fn ext_ah() -> Vec<u8> {
    // Payload length 4 => (4 + 2) * 4 = 24 bytes.
    let mut h = vec![0, 4, 0, 0];
    h.extend_from_slice(&[0; 20]);
    h
}

// ---- running -------------------------------------------------------------------------------

const OPTIONS: ClassifierOptions = ClassifierOptions {
    tunnel_ifindex: TUNNEL_IFINDEX,
    divert_ifindex: DIVERT_IFINDEX,
    reinject_mark: REINJECT_MARK,
    log_verdicts: false,
};

/// Compiles policy text with the production compiler (panicking with FILE:LINE:COL if invalid).
fn compiled(policy: &str) -> hoshino_agent::policy::CompiledPolicy {
    hoshino_agent::policy::compile_text("test.toml", policy).unwrap_or_else(|e| panic!("{e}"))
}

/// A classifier with redirect targets, running `policy`.
fn classifier(policy: &str) -> Classifier {
    let mut c = Classifier::load(&OPTIONS).expect("load classifier (run as root)");
    c.install(&compiled(policy)).expect("install policy");
    c
}

fn run_with_mark(c: &mut Classifier, packet: &[u8], mark: u32) -> u32 {
    // __sk_buff starts with len, pkt_type, mark; the kernel takes mark from ctx_in.
    let mut ctx = vec![0u8; 12];
    ctx[8..12].copy_from_slice(&mark.to_ne_bytes());
    let opts = TestRunOptions {
        data_in: Some(packet),
        ctx_in: Some(&ctx),
        ..TestRunOptions::default()
    };
    c.program()
        .unwrap()
        .test_run(opts)
        .expect("BPF_PROG_TEST_RUN")
        .return_value
}

fn run(c: &mut Classifier, packet: &[u8]) -> u32 {
    run_with_mark(c, packet, 0)
}

fn packets(c: &Classifier) -> Vec<(String, u64)> {
    c.rule_stats()
        .unwrap()
        .into_iter()
        .map(|RuleCounters { name, packets, .. }| (name, packets))
        .collect()
}

fn counts(pairs: &[(&str, u64)]) -> Vec<(String, u64)> {
    pairs.iter().map(|(n, p)| ((*n).to_owned(), *p)).collect()
}

// ---- tests ---------------------------------------------------------------------------------

#[test]
fn first_match_wins_across_overlapping_prefixes() {
    // (The shadowed host rule diverts: the tunnel carries IPv6 only, so the compiler refuses an
    // IPv4 prefix in a tunnel rule; any verdict other than the first rule's shows the shadowing.)
    let mut c = classifier(
        r#"
default = "pass"
[[rule]]
name = "narrow-pass"
dst = ["10.1.0.0/16"]
action = "pass"
[[rule]]
name = "wide-drop"
dst = ["10.0.0.0/8"]
action = "drop"
[[rule]]
name = "host-divert"
dst = ["10.1.2.3/32"]
action = "divert"
"#,
    );
    assert_eq!(run(&mut c, &v4_udp("10.1.2.3", 53)), TC_ACT_OK);
    assert_eq!(run(&mut c, &v4_udp("10.1.9.9", 53)), TC_ACT_OK);
    assert_eq!(run(&mut c, &v4_udp("10.2.0.1", 53)), TC_ACT_SHOT);
    assert_eq!(run(&mut c, &v4_udp("11.0.0.1", 53)), TC_ACT_OK);
    assert_eq!(
        packets(&c),
        counts(&[
            ("narrow-pass", 2),
            ("wide-drop", 1),
            ("host-divert", 0),
            ("default", 1)
        ])
    );

    // The same prefixes in the other order: the wide rule now shadows the narrow ones.
    let mut c = classifier(
        r#"
[[rule]]
name = "wide-drop"
dst = ["10.0.0.0/8"]
action = "drop"
[[rule]]
name = "narrow-pass"
dst = ["10.1.0.0/16"]
action = "pass"
"#,
    );
    assert_eq!(run(&mut c, &v4_udp("10.1.2.3", 53)), TC_ACT_SHOT);
    assert_eq!(
        packets(&c),
        counts(&[("wide-drop", 1), ("narrow-pass", 0), ("default", 0)])
    );
}

#[test]
fn source_and_destination_prefixes_must_both_match() {
    let mut c = classifier(
        r#"
[[rule]]
name = "from-a-to-b"
dst = ["10.0.0.0/8"]
src = ["192.0.2.0/24"]
action = "drop"
"#,
    );
    assert_eq!(run(&mut c, &v4_udp("10.0.0.1", 1)), TC_ACT_SHOT);
    let other_source = ipv4(UDP, "198.51.100.1", "10.0.0.1", 0, &ports(1, 1));
    assert_eq!(run(&mut c, &other_source), TC_ACT_OK);
    assert_eq!(packets(&c), counts(&[("from-a-to-b", 1), ("default", 1)]));
}

#[test]
fn destination_port_range_is_inclusive_and_needs_the_protocol() {
    let mut c = classifier(
        r#"
[[rule]]
name = "web"
protocol = "tcp"
dport = "8000-8080"
action = "drop"
"#,
    );
    assert_eq!(run(&mut c, &v4_tcp("203.0.113.5", 7999)), TC_ACT_OK);
    assert_eq!(run(&mut c, &v4_tcp("203.0.113.5", 8000)), TC_ACT_SHOT);
    assert_eq!(run(&mut c, &v4_tcp("203.0.113.5", 8080)), TC_ACT_SHOT);
    assert_eq!(run(&mut c, &v4_tcp("203.0.113.5", 8081)), TC_ACT_OK);
    assert_eq!(run(&mut c, &v4_udp("203.0.113.5", 8000)), TC_ACT_OK);
    assert_eq!(packets(&c), counts(&[("web", 2), ("default", 3)]));
}

#[test]
fn default_verdict_applies_when_no_rule_matches() {
    let mut c = classifier(
        r#"
default = "drop"
[[rule]]
name = "only-this"
dst = ["198.51.100.7"]
action = "pass"
"#,
    );
    assert_eq!(run(&mut c, &v4_udp("198.51.100.7", 1)), TC_ACT_OK);
    assert_eq!(run(&mut c, &v4_udp("198.51.100.8", 1)), TC_ACT_SHOT);
    let v6 = ipv6("2001:db8::9", &[], UDP, &ports(1, 1));
    assert_eq!(run(&mut c, &v6), TC_ACT_SHOT);
    assert_eq!(packets(&c), counts(&[("only-this", 1), ("default", 2)]));
}

#[test]
fn ipv6_rules_match_by_prefix_protocol_and_port() {
    let mut c = classifier(
        r#"
[[rule]]
name = "ula-dns"
dst = ["fd00::/8"]
protocol = "udp"
dport = 53
action = "drop"
[[rule]]
name = "v4-only"
dst = ["0.0.0.0/0"]
action = "drop"
"#,
    );
    assert_eq!(
        run(&mut c, &ipv6("fd12::1", &[], UDP, &ports(5000, 53))),
        TC_ACT_SHOT
    );
    assert_eq!(
        run(&mut c, &ipv6("2001:db8::1", &[], UDP, &ports(5000, 53))),
        TC_ACT_OK
    );
    assert_eq!(run(&mut c, &v4_udp("10.0.0.1", 53)), TC_ACT_SHOT);
    assert_eq!(
        packets(&c),
        counts(&[("ula-dns", 1), ("v4-only", 1), ("default", 1)])
    );
}

#[test]
fn ipv6_extension_headers_are_walked_to_find_the_port() {
    let mut c = classifier(
        r#"
[[rule]]
name = "https"
dst = ["2001:db8::/32"]
protocol = "tcp"
dport = 443
action = "drop"
"#,
    );
    let chain = vec![
        (0u8, ext_options()),
        (43u8, ext_routing_long()),
        (60u8, ext_options()),
        (44u8, ext_fragment(0, true)),
        (51u8, ext_ah()),
    ];
    assert_eq!(
        run(&mut c, &ipv6("2001:db8::5", &chain, TCP, &ports(1234, 443))),
        TC_ACT_SHOT
    );
    assert_eq!(
        run(&mut c, &ipv6("2001:db8::5", &chain, TCP, &ports(1234, 444))),
        TC_ACT_OK
    );
    // Seven extension headers exceed the walk's bound: L4 stays unknown, so no port rule matches.
    let too_many: Vec<(u8, Vec<u8>)> = (0..7).map(|_| (60u8, ext_options())).collect();
    assert_eq!(
        run(
            &mut c,
            &ipv6("2001:db8::5", &too_many, TCP, &ports(1234, 443))
        ),
        TC_ACT_OK
    );
    assert_eq!(packets(&c), counts(&[("https", 1), ("default", 2)]));
}

#[test]
fn non_first_fragments_match_only_rules_without_ports() {
    // The port-less rule diverts (a redirect, as a tunnel verdict would be): a tunnel rule may
    // not list the IPv4 prefix.
    let mut c = classifier(
        r#"
[[rule]]
name = "dns"
dst = ["2001:db8::/32", "10.0.0.0/8"]
protocol = "udp"
dport = 53
action = "drop"
[[rule]]
name = "udp"
dst = ["2001:db8::/32", "10.0.0.0/8"]
protocol = "udp"
action = "divert"
"#,
    );
    let first = ipv6(
        "2001:db8::5",
        &[(44, ext_fragment(0, true))],
        UDP,
        &ports(1, 53),
    );
    let later = ipv6(
        "2001:db8::5",
        &[(44, ext_fragment(100, false))],
        UDP,
        &ports(1, 53),
    );
    assert_eq!(run(&mut c, &first), TC_ACT_SHOT);
    assert_eq!(run(&mut c, &later), TC_ACT_REDIRECT);
    // IPv4: fragment offset 100 (units of 8 bytes), then a first fragment with MF set.
    assert_eq!(
        run(
            &mut c,
            &ipv4(UDP, "192.0.2.1", "10.0.0.1", 100, &ports(1, 53))
        ),
        TC_ACT_REDIRECT
    );
    assert_eq!(
        run(
            &mut c,
            &ipv4(UDP, "192.0.2.1", "10.0.0.1", 0x2000, &ports(1, 53))
        ),
        TC_ACT_SHOT
    );
    assert_eq!(
        packets(&c),
        counts(&[("dns", 2), ("udp", 2), ("default", 0)])
    );
}

#[test]
fn truncated_packets_fall_to_rules_without_l4_requirements() {
    let mut c = classifier(
        r#"
[[rule]]
name = "web"
protocol = "tcp"
dport = 80
action = "drop"
[[rule]]
name = "any-tcp"
protocol = "tcp"
action = "tunnel"
[[rule]]
name = "v4"
family = "ipv4"
action = "divert"
[[rule]]
name = "anything"
action = "drop"
"#,
    );

    let full = v4_tcp("203.0.113.1", 80);
    assert_eq!(run(&mut c, &full), TC_ACT_SHOT);
    // IPv4 header intact, TCP header cut to 2 bytes: protocol known, ports not.
    let short_l4 = &full[..14 + 20 + 2];
    assert_eq!(run(&mut c, short_l4), TC_ACT_REDIRECT);
    // IPv4 header cut: nothing above Ethernet is known. (The kernel's test run refuses an
    // untagged IPv4 frame shorter than an IPv4 header, so the cut frame carries a VLAN tag.)
    let short_l3 = vlan(&full[..14 + 12]);
    assert_eq!(run(&mut c, &short_l3), TC_ACT_SHOT);
    // An IPv4 header claiming IHL < 5.
    let mut bad_ihl = full.clone();
    bad_ihl[14] = 0x43;
    assert_eq!(run(&mut c, &bad_ihl), TC_ACT_SHOT);
    // Truncated IPv6 extension header chain.
    let v6 = ipv6("2001:db8::1", &[(0, ext_options())], TCP, &ports(1, 80));
    assert_eq!(run(&mut c, &v6[..14 + 40 + 1]), TC_ACT_SHOT);
    let short_v6 = vlan(&v6[..14 + 39]);
    assert_eq!(run(&mut c, &short_v6), TC_ACT_SHOT);
    // The same truncated IPv4 header inside a VLAN tag as a full one: the tag is skipped.
    assert_eq!(run(&mut c, &vlan(&full)), TC_ACT_SHOT);
    assert_eq!(
        packets(&c),
        counts(&[
            ("web", 2),
            ("any-tcp", 1),
            ("v4", 0),
            ("anything", 4),
            ("default", 0)
        ])
    );
}

#[test]
fn garbage_and_non_ip_frames_only_match_unconstrained_rules() {
    let mut c = classifier(
        r#"
[[rule]]
name = "udp"
protocol = "udp"
action = "drop"
"#,
    );
    let arp = ethernet(0x0806, &[0u8; 28]);
    assert_eq!(run(&mut c, &arp), TC_ACT_OK);
    let mut state = 0x1234_5678_u32;
    for len in [14usize, 15, 33, 54, 60, 200, 1500] {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state as u8
            })
            .collect();
        for ethertype in [0x0800u16, 0x86dd, 0x8100] {
            // Behind a VLAN tag, so the kernel's test run hands over even frames whose IP header
            // it would refuse untagged.
            let mut frame = bytes.clone();
            frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
            let frame = vlan(&frame);
            let verdict = run(&mut c, &frame);
            assert!(
                verdict == TC_ACT_OK || verdict == TC_ACT_SHOT,
                "verdict {verdict} for {len} random bytes"
            );
        }
    }
    let total: u64 = packets(&c).iter().map(|(_, p)| p).sum();
    assert_eq!(total, 1 + 7 * 3);
}

#[test]
fn reinjected_packets_pass_untouched_and_uncounted() {
    let mut c = classifier(
        r#"
default = "drop"
[[rule]]
name = "all"
action = "divert"
"#,
    );
    let packet = v4_udp("169.254.169.254", 80);
    assert_eq!(run(&mut c, &packet), TC_ACT_REDIRECT);
    assert_eq!(run_with_mark(&mut c, &packet, REINJECT_MARK), TC_ACT_OK);
    assert_eq!(
        run_with_mark(&mut c, &packet, REINJECT_MARK + 1),
        TC_ACT_REDIRECT
    );
    assert_eq!(packets(&c), counts(&[("all", 2), ("default", 0)]));
}

#[test]
fn divert_verdicts_record_the_socket_uid_and_tunnel_verdicts_record_no_flow() {
    let mut c = flow_classifier();
    assert_eq!(run(&mut c, &v4_tcp("169.254.169.254", 80)), TC_ACT_REDIRECT);
    assert_eq!(
        run(&mut c, &ipv6("fd68::1", &[], UDP, &ports(7, 9))),
        TC_ACT_REDIRECT
    );
    let flow = c
        .flow(&imds_key(40000))
        .unwrap()
        .expect("diverted flow recorded");
    // BPF_PROG_TEST_RUN gives the packet a fake socket owned by root.
    assert_eq!(flow.uid, 0);
    assert_eq!(flow.verdict, Verdict::Divert as u8);
    assert_eq!(flow.rule, 0);
    assert_eq!(
        c.flows().unwrap().len(),
        1,
        "the tunnelled packet takes no room in the flow table"
    );
}

// ---- the flow table (divert verdicts) ------------------------------------------------------

const FLOW_POLICY: &str = r#"
default = "pass"

[[rule]]
name = "imds"
dst = ["169.254.169.254/32"]
protocol = "tcp"
dport = 80
action = "divert"
then = "reinject"

[[rule]]
name = "ula"
dst = ["fd68::/16"]
action = "tunnel"

[[rule]]
name = "blocked"
dst = ["198.51.100.0/24"]
action = "drop"
"#;

/// A classifier with [`FLOW_POLICY`].
fn flow_classifier() -> Classifier {
    classifier(FLOW_POLICY)
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

/// A TCP segment from 192.0.2.1:`sport` to the metadata address, port 80, with `flags`.
fn imds_segment(sport: u16, flags: u8) -> Vec<u8> {
    let mut l4 = ports(sport, 80);
    l4[12] = 0x50;
    l4[13] = flags;
    ipv4(TCP, "192.0.2.1", "169.254.169.254", 0, &l4)
}

fn imds_key(sport: u16) -> hoshino_common::FlowKey {
    flow_key(
        IpAddr::V4("192.0.2.1".parse().unwrap()),
        IpAddr::V4("169.254.169.254".parse().unwrap()),
        TCP,
        sport,
        80,
    )
}

#[test]
fn a_syn_on_a_recorded_tuple_starts_a_new_flow_and_later_segments_keep_it() {
    let mut c = flow_classifier();
    assert_eq!(run(&mut c, &imds_segment(41000, SYN)), TC_ACT_REDIRECT);
    let first = c.flow(&imds_key(41000)).unwrap().expect("recorded");
    assert_eq!(first.started_ns, first.last_seen_ns);

    assert_eq!(run(&mut c, &imds_segment(41000, ACK)), TC_ACT_REDIRECT);
    let later = c.flow(&imds_key(41000)).unwrap().expect("still recorded");
    assert_eq!(
        later.started_ns, first.started_ns,
        "an ACK continues the flow"
    );
    assert!(later.last_seen_ns > first.last_seen_ns);

    // A SYN with ACK (the answer of a simultaneous open) is not a new connection either.
    assert_eq!(
        run(&mut c, &imds_segment(41000, SYN | ACK)),
        TC_ACT_REDIRECT
    );
    assert_eq!(
        c.flow(&imds_key(41000)).unwrap().unwrap().started_ns,
        first.started_ns
    );

    assert_eq!(run(&mut c, &imds_segment(41000, SYN)), TC_ACT_REDIRECT);
    let reused = c.flow(&imds_key(41000)).unwrap().expect("recorded");
    assert!(
        reused.started_ns > later.last_seen_ns,
        "a new SYN on the tuple replaces the entry: {reused:?} after {later:?}"
    );
    assert_eq!(c.flows().unwrap().len(), 1);
}

#[test]
fn a_full_flow_table_refuses_new_divert_flows_but_keeps_existing_ones() {
    let mut c = flow_classifier();
    assert_eq!(run(&mut c, &imds_segment(42000, SYN)), TC_ACT_REDIRECT);
    let mut table = c.flow_table().unwrap();
    let filler = hoshino_common::FlowValue::default();
    let mut filled = 1usize;
    for n in 0..hoshino_common::FLOW_CAPACITY {
        let mut key = imds_key(0);
        key.src[4..8].copy_from_slice(&n.to_be_bytes());
        if table.insert(&key, &filler).is_err() {
            break;
        }
        filled += 1;
    }
    assert_eq!(
        filled,
        hoshino_common::FLOW_CAPACITY as usize,
        "the table is full"
    );

    assert_eq!(
        run(&mut c, &imds_segment(42001, SYN)),
        TC_ACT_SHOT,
        "a new flow is refused (dropped), not admitted by evicting one"
    );
    assert!(c.flow(&imds_key(42001)).unwrap().is_none());
    assert_eq!(c.events().unwrap().flow_table_full, 1);

    assert_eq!(
        run(&mut c, &imds_segment(42000, ACK)),
        TC_ACT_REDIRECT,
        "the live flow goes on"
    );
    assert_eq!(
        run(&mut c, &imds_segment(42000, SYN)),
        TC_ACT_REDIRECT,
        "a new SYN on a recorded tuple replaces its entry even in a full table"
    );
    assert_eq!(
        run(&mut c, &ipv6("fd68::1", &[], UDP, &ports(7, 9))),
        TC_ACT_REDIRECT,
        "tunnel verdicts need no entry"
    );
    assert_eq!(run(&mut c, &v4_udp("198.51.100.7", 53)), TC_ACT_SHOT);
    assert_eq!(run(&mut c, &v4_udp("10.0.0.1", 53)), TC_ACT_OK);
    assert_eq!(
        c.events().unwrap().flow_table_full,
        1,
        "pass, drop and tunnel verdicts are not refused"
    );

    // Once the agent removes an entry, a new flow is admitted again.
    assert!(table.remove(&imds_key(42000)).unwrap());
    assert_eq!(run(&mut c, &imds_segment(42001, SYN)), TC_ACT_REDIRECT);
}

#[test]
fn a_uid_at_its_flow_cap_is_refused_new_flows_until_the_recount_frees_room() {
    let mut c = flow_classifier();
    c.set_flows_per_uid(2).unwrap();
    // BPF_PROG_TEST_RUN's fake socket is root's: every flow here is uid 0's.
    assert_eq!(run(&mut c, &imds_segment(44000, SYN)), TC_ACT_REDIRECT);
    assert_eq!(run(&mut c, &imds_segment(44001, SYN)), TC_ACT_REDIRECT);
    assert_eq!(
        run(&mut c, &imds_segment(44002, SYN)),
        TC_ACT_SHOT,
        "a third flow of the same uid is refused"
    );
    assert_eq!(c.events().unwrap().uid_flow_cap, 1);
    assert_eq!(c.events().unwrap().flow_table_full, 0);
    assert_eq!(
        run(&mut c, &imds_segment(44000, ACK)),
        TC_ACT_REDIRECT,
        "its recorded flows go on"
    );
    assert_eq!(
        run(&mut c, &imds_segment(44001, SYN)),
        TC_ACT_REDIRECT,
        "a SYN reusing its own tuple is no extra flow"
    );
    let mut table = c.flow_table().unwrap();
    assert_eq!(table.uid_count(0).unwrap(), 2);
    assert!(table.remove(&imds_key(44000)).unwrap());
    // Removal alone does not decrement; the sweep's recount does.
    assert_eq!(run(&mut c, &imds_segment(44002, SYN)), TC_ACT_SHOT);
    table
        .sweep(
            hoshino_agent::interceptor::monotonic_now_ns(),
            hoshino_agent::interceptor::FLOW_IDLE_TIMEOUT,
        )
        .unwrap();
    assert_eq!(table.uid_count(0).unwrap(), 1);
    assert_eq!(run(&mut c, &imds_segment(44002, SYN)), TC_ACT_REDIRECT);
    assert_eq!(table.uid_count(0).unwrap(), 2);
}

#[test]
fn the_sweep_removes_flows_idle_past_the_timeout_only() {
    let mut c = flow_classifier();
    assert_eq!(run(&mut c, &imds_segment(43000, SYN)), TC_ACT_REDIRECT);
    let mut table = c.flow_table().unwrap();
    let stale = imds_key(43001);
    table
        .insert(
            &stale,
            &hoshino_common::FlowValue {
                last_seen_ns: 1,
                started_ns: 1,
                ..Default::default()
            },
        )
        .unwrap();
    let now = hoshino_agent::interceptor::monotonic_now_ns();
    let removed = table
        .sweep(now, hoshino_agent::interceptor::FLOW_IDLE_TIMEOUT)
        .unwrap();
    assert_eq!(removed, 1);
    assert!(c.flow(&stale).unwrap().is_none());
    assert!(
        c.flow(&imds_key(43000)).unwrap().is_some(),
        "the live flow stays"
    );
    assert_eq!(table.clear().unwrap(), 1);
    assert!(c.flows().unwrap().is_empty());
}

#[test]
fn redirect_without_a_target_device_drops() {
    let mut c = Classifier::load(&ClassifierOptions::default()).unwrap();
    c.install(&compiled("[[rule]]\nname = \"all\"\naction = \"tunnel\"\n"))
        .unwrap();
    assert_eq!(run(&mut c, &v4_udp("10.0.0.1", 1)), TC_ACT_SHOT);
    assert!(c.flows().unwrap().is_empty());
}

#[test]
fn reload_replaces_the_policy_and_leaves_no_stale_prefixes() {
    let mut c = classifier(
        r#"
[[rule]]
name = "drop-ten"
dst = ["10.0.0.0/8"]
action = "drop"
"#,
    );
    let packet = v4_udp("10.1.1.1", 1);
    assert_eq!(run(&mut c, &packet), TC_ACT_SHOT);
    let first_set = c.active_set();
    c.install(&compiled("default = \"pass\"\n")).unwrap();
    assert_ne!(c.active_set(), first_set);
    assert_eq!(run(&mut c, &packet), TC_ACT_OK);
    // Back in the first set: the old 10/8 entry must be gone.
    c.install(&compiled(
        "[[rule]]\nname = \"drop-192\"\ndst = [\"192.168.0.0/16\"]\naction = \"drop\"\n",
    ))
    .unwrap();
    assert_eq!(c.active_set(), first_set);
    assert_eq!(run(&mut c, &packet), TC_ACT_OK);
    assert_eq!(run(&mut c, &v4_udp("192.168.1.1", 1)), TC_ACT_SHOT);
    assert_eq!(packets(&c), counts(&[("drop-192", 1), ("default", 1)]));
}

#[test]
fn thousand_prefix_policy_loads_and_matches() {
    let v4: Vec<String> = (0..1000)
        .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
        .collect();
    let v6: Vec<String> = (0..1000).map(|i| format!("fd00:{i:x}::/32")).collect();
    let dst: Vec<String> = v4.iter().chain(&v6).map(|p| format!("\"{p}\"")).collect();
    let mut c = classifier(&format!(
        "[[rule]]\nname = \"thousand\"\ndst = [{}]\naction = \"drop\"\n",
        dst.join(", ")
    ));
    assert_eq!(run(&mut c, &v4_udp("10.3.231.9", 1)), TC_ACT_SHOT);
    assert_eq!(run(&mut c, &v4_udp("10.3.232.9", 1)), TC_ACT_OK);
    assert_eq!(
        run(&mut c, &ipv6("fd00:3e7::1", &[], UDP, &ports(1, 1))),
        TC_ACT_SHOT
    );
    assert_eq!(packets(&c), counts(&[("thousand", 2), ("default", 1)]));
}

#[test]
fn example_thousand_prefix_policy_file_loads_into_the_classifier() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/policies/prefixes-1000.toml");
    let compiled = hoshino_agent::policy::load(&path).expect("example policy compiles");
    let mut c = Classifier::load(&ClassifierOptions::default()).unwrap();
    c.install(&compiled).expect("1,000 prefixes fit");
    assert_eq!(run(&mut c, &v4_udp("198.18.0.77", 5201)), TC_ACT_SHOT);
    assert_eq!(run(&mut c, &v4_udp("10.0.0.1", 5201)), TC_ACT_OK);
    let stats = c.rule_stats().unwrap();
    assert_eq!(
        stats.first().map(|r| (r.name.as_str(), r.packets)),
        Some(("block-0", 1))
    );
    assert_eq!(
        stats.last().map(|r| (r.name.as_str(), r.packets)),
        Some(("default", 1))
    );
}

#[test]
fn uid_ranges_select_rules_by_the_sending_socket() {
    let mut c = classifier(
        r#"
[[rule]]
name = "users"
uid = "1-4294967295"
action = "drop"
[[rule]]
name = "root"
uid = 0
action = "tunnel"
"#,
    );
    // BPF_PROG_TEST_RUN's fake socket belongs to root.
    assert_eq!(run(&mut c, &v4_udp("10.0.0.1", 1)), TC_ACT_REDIRECT);
    assert_eq!(
        packets(&c),
        counts(&[("users", 0), ("root", 1), ("default", 0)])
    );
}
