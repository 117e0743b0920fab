//! Specification of the policy language: parsing, errors located as FILE:LINE:COL, compilation.

use hoshino_common::{
    FAMILY_ANY, FAMILY_V4, FAMILY_V6, LPM_ENTRIES_PER_SET, MAX_RULES, RULE_MATCH_PORT,
    RULE_MATCH_PROTO, RULE_MATCH_UID, RuleSet,
};

use super::*;

fn compiled(text: &str) -> CompiledPolicy {
    match compile_text("p.toml", text) {
        Ok(c) => c,
        Err(e) => panic!("policy should compile: {e}"),
    }
}

fn error(text: &str) -> String {
    match compile_text("p.toml", text) {
        Ok(_) => panic!("policy should be rejected:\n{text}"),
        Err(e) => e.to_string(),
    }
}

fn set(bits: &[u32]) -> RuleSet {
    let mut s = RuleSet::EMPTY;
    for b in bits {
        s.insert(*b);
    }
    s
}

const METADATA: &str = include_str!("../../../examples/policies/metadata.toml");
const ULA_TUNNEL: &str = include_str!("../../../examples/policies/ula-tunnel.toml");
const PREFIXES_1000: &str = include_str!("../../../examples/policies/prefixes-1000.toml");

#[test]
fn empty_policy_passes_everything() {
    let c = compiled("");
    assert_eq!(c.default, Verdict::Pass);
    assert!(c.rules.is_empty());
}

#[test]
fn rule_fields_compile_to_kernel_conditions() {
    let c = compiled(
        r#"
default = "drop"
[[rule]]
name = "web"
dst = ["192.0.2.0/24"]
protocol = "tcp"
dport = "8000-8080"
uid = "1000-1999"
action = "pass"
[[rule]]
name = "ping6"
src = ["fd00::/8"]
protocol = "icmpv6"
action = "pass"
[[rule]]
name = "gre"
protocol = 47
action = "drop"
"#,
    );
    assert_eq!(c.default, Verdict::Drop);
    let web = c.rules[0];
    assert_eq!(
        web.flags,
        RULE_MATCH_PROTO | RULE_MATCH_PORT | RULE_MATCH_UID
    );
    assert_eq!((web.proto, web.port_min, web.port_max), (6, 8000, 8080));
    assert_eq!((web.uid_min, web.uid_max), (1000, 1999));
    assert_eq!(web.family, FAMILY_V4);
    assert_eq!(web.verdict, hoshino_common::Verdict::Pass as u8);
    assert_eq!((c.rules[1].proto, c.rules[1].family), (58, FAMILY_V6));
    assert_eq!(
        (c.rules[2].proto, c.rules[2].family, c.rules[2].flags),
        (47, FAMILY_ANY, RULE_MATCH_PROTO)
    );
    assert_eq!(c.any_dst, set(&[1, 2]));
    assert_eq!(c.any_src, set(&[0, 2]));
    assert_eq!(c.rule_name(1), Some("ping6"));
}

#[test]
fn family_restricts_a_rule_without_prefixes_to_one_address_family() {
    let c = compiled(
        r#"
[[rule]]
name = "v4"
family = "ipv4"
action = "drop"
[[rule]]
name = "v6-ula"
family = "ipv6"
dst = ["fd00::/8"]
action = "pass"
"#,
    );
    assert_eq!(c.rules[0].family, FAMILY_V4);
    assert_eq!(c.rules[0].flags, 0, "no other condition");
    assert!(c.any_dst.contains(0) && c.any_src.contains(0));
    assert_eq!(c.rules[1].family, FAMILY_V6);
    assert!(super::table::render(&c).contains("any ipv4"));
}

#[test]
fn family_contradicting_a_prefix_or_the_tunnel_is_located() {
    let e = error(
        "[[rule]]\nname = \"a\"\nfamily = \"ipv6\"\ndst = [\"10.0.0.0/8\"]\naction = \"drop\"\n",
    );
    assert_eq!(
        e,
        "p.toml:4:8: `10.0.0.0/8` is not an ipv6 prefix, but the rule says `family = \"ipv6\"`"
    );
    let e = error("[[rule]]\nname = \"a\"\nfamily = \"ip4\"\naction = \"drop\"\n");
    assert_eq!(
        e,
        "p.toml:3:10: unknown family `ip4`, expected ipv4 or ipv6"
    );
    let e = error("[[rule]]\nname = \"a\"\nfamily = \"ipv4\"\naction = \"tunnel\"\n");
    assert!(
        e.starts_with("p.toml:3:10: the tunnel carries IPv6 only"),
        "{e}"
    );
}

#[test]
fn lpm_entries_include_rules_of_every_covering_prefix() {
    let c = compiled(
        r#"
[[rule]]
name = "wide"
dst = ["10.0.0.0/8", "fd00::/8"]
action = "drop"
[[rule]]
name = "middle"
dst = ["10.1.0.0/16"]
action = "pass"
[[rule]]
name = "narrow"
dst = ["10.1.2.0/24", "10.2.0.0/16", "fd00:1::/64"]
action = "divert"
"#,
    );
    let v4: Vec<(String, RuleSet)> = c
        .dst_v4
        .entries
        .iter()
        .map(|(p, s)| (p.to_string(), *s))
        .collect();
    assert_eq!(
        v4,
        vec![
            ("10.0.0.0/8".to_string(), set(&[0])),
            ("10.1.0.0/16".to_string(), set(&[0, 1])),
            ("10.1.2.0/24".to_string(), set(&[0, 1, 2])),
            ("10.2.0.0/16".to_string(), set(&[0, 2])),
        ]
    );
    let v6: Vec<(String, RuleSet)> = c
        .dst_v6
        .entries
        .iter()
        .map(|(p, s)| (p.to_string(), *s))
        .collect();
    assert_eq!(
        v6,
        vec![
            ("fd00::/8".to_string(), set(&[0])),
            ("fd00:1::/64".to_string(), set(&[0, 2]))
        ]
    );
    assert!(c.src_v4.entries.is_empty());
    assert_eq!(c.any_src, set(&[0, 1, 2]));
    assert!(c.any_dst.is_empty());
}

#[test]
fn a_prefix_listed_by_two_rules_is_one_entry_with_both_bits() {
    let c = compiled(
        r#"
[[rule]]
name = "a"
dst = ["192.0.2.0/24"]
action = "drop"
[[rule]]
name = "b"
dst = ["192.0.2.0/24", "0.0.0.0/0"]
action = "pass"
"#,
    );
    let entries: Vec<(String, RuleSet)> = c
        .dst_v4
        .entries
        .iter()
        .map(|(p, s)| (p.to_string(), *s))
        .collect();
    assert_eq!(
        entries,
        vec![
            ("0.0.0.0/0".to_string(), set(&[1])),
            ("192.0.2.0/24".to_string(), set(&[0, 1]))
        ]
    );
}

#[test]
fn thousand_prefix_policy_compiles_with_folded_entries() {
    let c = compiled(PREFIXES_1000);
    let total = c.dst_v4.entries.len() + c.dst_v6.entries.len();
    assert_eq!(total, 1000);
    // Every entry carries at least the rule that listed it.
    assert!(c.dst_v4.entries.iter().all(|(_, s)| !s.is_empty()));
    assert!(c.dst_v6.entries.iter().all(|(_, s)| !s.is_empty()));
}

#[test]
fn thousand_prefixes_fold_against_a_covering_prefix() {
    let mut text =
        String::from("[[rule]]\nname = \"cover\"\ndst = [\"198.16.0.0/12\"]\naction = \"pass\"\n");
    text.push_str("[[rule]]\nname = \"many\"\naction = \"drop\"\ndst = [\n");
    for i in 0..1000u32 {
        text.push_str(&format!("  \"198.{}.{}.0/24\",\n", 18 + i / 256, i % 256));
    }
    text.push_str("]\n");
    let c = compiled(&text);
    assert_eq!(c.dst_v4.entries.len(), 1001);
    let narrow = c
        .dst_v4
        .entries
        .iter()
        .filter(|(p, _)| p.prefix_len() == 24);
    assert!(narrow.clone().count() == 1000);
    assert!(narrow.into_iter().all(|(_, s)| *s == set(&[0, 1])));
}

#[test]
fn examples_compile() {
    let m = compiled(METADATA);
    assert!(m.policy.rules.iter().any(|r| r.verdict == Verdict::Divert));
    let t = compiled(ULA_TUNNEL);
    assert!(t.policy.rules.iter().any(|r| r.verdict == Verdict::Tunnel));
}

#[test]
fn metadata_example_allows_only_listed_paths_for_other_users() {
    let m = compiled(METADATA);
    let http = m
        .policy
        .rules
        .iter()
        .find_map(|r| match &r.divert {
            Some(DivertPolicy::Http(h)) => Some(h.clone()),
            _ => None,
        })
        .expect("metadata.toml has an http divert rule");
    assert_eq!(
        http.decide("/latest/meta-data/instance-id", Some(1000)),
        HttpAction::Allow
    );
    assert_eq!(
        http.decide("/latest/meta-data/placement/region", Some(65534)),
        HttpAction::Allow
    );
    assert_eq!(
        http.decide("/latest/meta-data/iam/security-credentials/", Some(1000)),
        HttpAction::Reset
    );
    assert_eq!(http.decide("/latest/user-data", None), HttpAction::Reset);
    // Root never reaches the divert rule: an earlier rule passes uid 0 in the kernel.
    let root = &m.policy.rules[0];
    assert_eq!(
        (root.verdict, root.uid.map(|u| (u.lo, u.hi))),
        (Verdict::Pass, Some((0, 0)))
    );
}

#[test]
fn http_requests_match_by_path_prefix_and_uid_in_order() {
    let http = HttpPolicy {
        requests: vec![
            HttpRequestRule {
                path_prefix: "/admin".into(),
                uid: Some(model::UidRange { lo: 0, hi: 0 }),
                methods: vec![],
                query: false,
                action: HttpAction::Allow,
            },
            HttpRequestRule {
                path_prefix: "/admin".into(),
                uid: None,
                methods: vec![],
                query: false,
                action: HttpAction::Reset,
            },
            HttpRequestRule {
                path_prefix: "/".into(),
                uid: None,
                methods: vec![],
                query: false,
                action: HttpAction::Allow,
            },
        ],
        default: HttpAction::Reset,
    };
    assert_eq!(http.decide("/admin/x", Some(0)), HttpAction::Allow);
    assert_eq!(http.decide("/admin/x", Some(5)), HttpAction::Reset);
    assert_eq!(http.decide("/admin/x", None), HttpAction::Reset);
    assert_eq!(http.decide("/public", Some(5)), HttpAction::Allow);
    assert_eq!(http.decide("*", Some(5)), HttpAction::Reset);
}

#[test]
fn unknown_verdict_lists_the_valid_ones_at_its_location() {
    let e = error("[[rule]]\nname = \"x\"\naction = \"tunel\"\n");
    assert_eq!(
        e,
        "p.toml:3:10: unknown verdict `tunel`, expected one of pass, drop, tunnel, divert"
    );
    let e = error("default = \"allow\"\n");
    assert_eq!(
        e,
        "p.toml:1:11: unknown verdict `allow`, expected one of pass, drop, tunnel, divert"
    );
}

#[test]
fn bad_prefix_is_located_on_the_prefix() {
    let e = error(
        "[[rule]]\nname = \"x\"\ndst = [\"10.0.0.0/8\", \"10.0.0.300/32\"]\naction = \"drop\"\n",
    );
    assert!(
        e.starts_with("p.toml:3:22: bad prefix: `10.0.0.300` is not an IPv4 or IPv6 address"),
        "{e}"
    );
    let e = error("[[rule]]\nname = \"x\"\ndst = [\"fd00:ec2::254/64\"]\naction = \"drop\"\n");
    assert!(
        e.contains("host bits set; did you mean `fd00:ec2::/64`?"),
        "{e}"
    );
    let e = error("[[rule]]\nname = \"x\"\nsrc = [\"10.0.0.0/40\"]\naction = \"drop\"\n");
    assert!(
        e.starts_with("p.toml:3:8: bad prefix: prefix length 40 is longer than 32 bits"),
        "{e}"
    );
}

#[test]
fn port_out_of_range_is_rejected() {
    let e = error("[[rule]]\nname = \"x\"\nprotocol = \"tcp\"\ndport = 65536\naction = \"drop\"\n");
    assert_eq!(
        e,
        "p.toml:4:9: port 65536 is out of range, expected a port 0-65535 or a range \"LO-HI\""
    );
    let e = error(
        "[[rule]]\nname = \"x\"\nprotocol = \"udp\"\ndport = \"1-70000\"\naction = \"drop\"\n",
    );
    assert!(
        e.starts_with("p.toml:4:9: port 70000 is out of range"),
        "{e}"
    );
    let e = error("[[rule]]\nname = \"x\"\nprotocol = \"udp\"\ndport = -1\naction = \"drop\"\n");
    assert!(e.starts_with("p.toml:4:9: port -1 is out of range"), "{e}");
    let e =
        error("[[rule]]\nname = \"x\"\nprotocol = \"udp\"\ndport = \"90-80\"\naction = \"drop\"\n");
    assert!(e.starts_with("p.toml:4:9: `90-80` is not a range"), "{e}");
}

#[test]
fn dport_needs_a_protocol_with_ports() {
    let e = error("[[rule]]\nname = \"x\"\ndport = 80\naction = \"drop\"\n");
    assert!(
        e.starts_with("p.toml:3:9: `dport` needs `protocol` to be tcp, udp"),
        "{e}"
    );
    let e = error("[[rule]]\nname = \"x\"\nprotocol = \"icmp\"\ndport = 80\naction = \"drop\"\n");
    assert!(e.ends_with(", got `icmp`"), "{e}");
}

#[test]
fn uid_out_of_range_is_rejected() {
    let e = error("[[rule]]\nname = \"x\"\nuid = 4294967296\naction = \"drop\"\n");
    assert!(
        e.starts_with("p.toml:3:7: uid 4294967296 is out of range"),
        "{e}"
    );
    let c = compiled("[[rule]]\nname = \"x\"\nuid = \"1-4294967295\"\naction = \"drop\"\n");
    assert_eq!((c.rules[0].uid_min, c.rules[0].uid_max), (1, u32::MAX));
}

#[test]
fn duplicate_rule_name_points_at_the_second_use() {
    let e = error(
        "[[rule]]\nname = \"a\"\naction = \"drop\"\n[[rule]]\nname = \"a\"\naction = \"pass\"\n",
    );
    assert_eq!(
        e,
        "p.toml:5:8: duplicate rule name `a` (first used on line 2)"
    );
}

#[test]
fn unknown_keys_are_rejected_with_the_expected_ones() {
    let e = error("[[rule]]\nname = \"a\"\ndest = [\"10.0.0.0/8\"]\naction = \"drop\"\n");
    assert!(
        e.starts_with("p.toml:3:1: unknown field `dest`, expected one of"),
        "{e}"
    );
    let e = error("defaults = \"pass\"\n");
    assert!(e.starts_with("p.toml:1:1: unknown field `defaults`"), "{e}");
}

#[test]
fn missing_and_mistyped_fields_are_syntax_errors_with_locations() {
    let e = error("[[rule]]\nname = \"a\"\n");
    assert!(e.starts_with("p.toml:1:1: missing field `action`"), "{e}");
    let e = error("[[rule]]\nname = \"a\"\naction = \"drop\"\ndst = \"10.0.0.0/8\"\n");
    assert!(e.starts_with("p.toml:4:7: "), "{e}");
    let e = error("[[rule]\n");
    assert!(e.starts_with("p.toml:1:"), "{e}");
}

#[test]
fn rule_names_must_be_label_safe() {
    let e = error("[[rule]]\nname = \"a b\"\naction = \"drop\"\n");
    assert!(e.starts_with("p.toml:2:8: rule name must be"), "{e}");
}

#[test]
fn too_many_rules_names_the_first_rule_that_does_not_fit() {
    let mut text = String::new();
    for i in 0..=MAX_RULES {
        text.push_str(&format!("[[rule]]\nname = \"r{i}\"\naction = \"drop\"\n"));
    }
    let e = error(&text);
    let line = MAX_RULES as usize * 3 + 2;
    assert_eq!(
        e,
        format!("p.toml:{line}:8: too many rules: the classifier holds at most {MAX_RULES}")
    );
}

#[test]
fn too_many_prefixes_names_the_first_prefix_that_does_not_fit() {
    let mut text = String::from("[[rule]]\nname = \"many\"\naction = \"drop\"\ndst = [\n");
    for i in 0..=LPM_ENTRIES_PER_SET {
        text.push_str(&format!("\"10.{}.{}.0/24\",\n", i / 256, i % 256));
    }
    text.push_str("]\n");
    let e = error(&text);
    let line = 5 + LPM_ENTRIES_PER_SET as usize;
    assert_eq!(
        e,
        format!(
            "p.toml:{line}:1: too many IPv4 destination prefixes: the classifier's map holds at most {LPM_ENTRIES_PER_SET}"
        )
    );
}

#[test]
fn http_section_is_only_for_tcp_divert_rules() {
    let e = error(
        "[[rule]]\nname = \"a\"\nprotocol = \"tcp\"\ndport = 80\naction = \"pass\"\n[rule.http]\ndefault = \"reset\"\n",
    );
    assert!(
        e.contains("`http` is only valid with `action = \"divert\"`, this rule's action is `pass`"),
        "{e}"
    );
    let e =
        error("[[rule]]\nname = \"a\"\naction = \"divert\"\n[rule.http]\ndefault = \"reset\"\n");
    assert!(
        e.contains("an `http` section needs `protocol = \"tcp\"` and a `dport`"),
        "{e}"
    );
    let e = error(
        "[[rule]]\nname = \"a\"\nprotocol = \"tcp\"\ndport = 80\naction = \"divert\"\n[rule.http]\ndefault = \"deny\"\n",
    );
    assert!(
        e.starts_with(
            "p.toml:7:11: unknown http action `deny`, expected one of allow, reset, forbid"
        ),
        "{e}"
    );
    let e = error(
        "[[rule]]\nname = \"a\"\nprotocol = \"tcp\"\ndport = 80\naction = \"divert\"\n[rule.http]\ndefault = \"reset\"\n[[rule.http.request]]\npath = \"latest\"\naction = \"allow\"\n",
    );
    assert!(
        e.starts_with("p.toml:9:8: http path prefix `latest` is not a canonical path"),
        "{e}"
    );
}

#[test]
fn http_requests_match_by_method_and_query_permission() {
    let c = compiled(
        "[[rule]]\nname = \"a\"\nprotocol = \"tcp\"\ndport = 80\naction = \"divert\"\n[rule.http]\ndefault = \"reset\"\n[[rule.http.request]]\npath = \"/latest/api/token\"\nmethod = \"PUT\"\naction = \"allow\"\n[[rule.http.request]]\npath = \"/latest/dynamic/\"\nquery = true\naction = \"allow\"\n[[rule.http.request]]\npath = \"/latest/\"\nmethods = [\"GET\"]\naction = \"forbid\"\n",
    );
    let Some(DivertPolicy::Http(http)) = &c.policy.rules[0].divert else {
        panic!("an http rule");
    };
    let q = |method, path, has_query| {
        http.judge(&model::HttpQuestion {
            method,
            path,
            has_query,
            uid: Some(1000),
        })
    };
    assert_eq!(
        q("PUT", "/latest/api/token", false),
        (HttpAction::Allow, Some(0))
    );
    // GET of the token path is not the PUT entry; it falls to the forbid entry.
    assert_eq!(
        q("GET", "/latest/api/token", false),
        (HttpAction::Forbid, Some(2))
    );
    assert_eq!(
        q("HEAD", "/latest/dynamic/x", true),
        (HttpAction::Allow, Some(1))
    );
    // A query only matches entries that allow one.
    assert_eq!(q("GET", "/latest/meta", true), (HttpAction::Reset, None));
    assert_eq!(q("POST", "/latest/meta", false), (HttpAction::Reset, None));
    assert!(http.allows_queries());
}

#[test]
fn http_path_prefixes_and_methods_must_be_canonical() {
    let e = error(
        "[[rule]]\nname = \"a\"\nprotocol = \"tcp\"\ndport = 80\naction = \"divert\"\n[rule.http]\ndefault = \"reset\"\n[[rule.http.request]]\npath = \"/latest/../iam\"\naction = \"allow\"\n",
    );
    assert!(e.starts_with("p.toml:9:8: http path prefix `/latest/../iam` is not a canonical path: the target has a dot segment"), "{e}");
    let e = error(
        "[[rule]]\nname = \"a\"\nprotocol = \"tcp\"\ndport = 80\naction = \"divert\"\n[rule.http]\ndefault = \"reset\"\n[[rule.http.request]]\npath = \"/latest/\"\nmethods = [\"GET\", \"put\"]\naction = \"allow\"\n",
    );
    assert!(
        e.starts_with("p.toml:10:19: `put` is not an HTTP method"),
        "{e}"
    );
}

#[test]
fn divert_without_http_reinjects_unless_told_to_drop() {
    let c = compiled(
        "[[rule]]\nname = \"a\"\nprotocol = \"udp\"\naction = \"divert\"\n[[rule]]\nname = \"b\"\naction = \"divert\"\nthen = \"drop\"\n",
    );
    assert_eq!(
        c.policy.rules[0].divert,
        Some(DivertPolicy::Packets(PacketAction::Reinject))
    );
    assert_eq!(
        c.policy.rules[1].divert,
        Some(DivertPolicy::Packets(PacketAction::Drop))
    );
    let e = error("[[rule]]\nname = \"a\"\naction = \"divert\"\nthen = \"forward\"\n");
    assert!(
        e.contains("unknown divert action `forward`, expected one of reinject, drop"),
        "{e}"
    );
    let e = error("[[rule]]\nname = \"a\"\naction = \"drop\"\nthen = \"drop\"\n");
    assert!(
        e.contains("`then` is only valid with `action = \"divert\"`"),
        "{e}"
    );
}

#[test]
fn tunnel_rules_take_ipv6_prefixes_only() {
    let e = error(
        "[[rule]]\nname = \"a\"\ndst = [\"fd00:1::/64\", \"10.0.0.0/8\"]\naction = \"tunnel\"\n",
    );
    assert_eq!(
        e,
        "p.toml:3:23: the tunnel carries IPv6 only; `10.0.0.0/8` is an IPv4 prefix"
    );
}

#[test]
fn protocol_names_and_numbers() {
    let e = error("[[rule]]\nname = \"a\"\nprotocol = \"tcpp\"\naction = \"drop\"\n");
    assert!(
        e.starts_with("p.toml:3:12: unknown protocol `tcpp`, expected tcp, udp, icmp, icmpv6"),
        "{e}"
    );
    let e = error("[[rule]]\nname = \"a\"\nprotocol = 256\naction = \"drop\"\n");
    assert!(
        e.starts_with("p.toml:3:12: protocol number 256 is out of range"),
        "{e}"
    );
    let c = compiled("[[rule]]\nname = \"a\"\nprotocol = \"132\"\ndport = 9\naction = \"drop\"\n");
    assert_eq!(c.rules[0].proto, 132);
}

#[test]
fn check_table_lists_rules_in_order_with_http_decisions() {
    let text = table::render(&compiled(METADATA));
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("#  rule"), "{text}");
    assert!(
        text.contains("http GET,HEAD /latest/meta-data/iam/ -> reset"),
        "{text}"
    );
    assert!(text.contains("http otherwise -> reset"), "{text}");
    assert!(text.contains("*  otherwise pass"), "{text}");
}

#[test]
fn unreadable_file_is_a_read_error() {
    let e = load(std::path::Path::new("/nonexistent/hoshino/policy.toml")).unwrap_err();
    assert!(matches!(e, PolicyError::Read { .. }));
    assert!(
        e.to_string()
            .starts_with("/nonexistent/hoshino/policy.toml: cannot read policy file")
    );
}
