//! Policy text (TOML) -> [`Policy`], with every error located in the text.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;

use serde::Deserialize;
use serde::de::{self, Visitor};
use toml::Spanned;

use super::error::{PolicyError, Problem, line_col};
use super::model::{
    DivertPolicy, Family, HttpAction, HttpPolicy, HttpRequestRule, InclusiveRange, Located,
    PacketAction, Policy, PortRange, Protocol, Rule, UidRange, Verdict,
};
use super::prefix::IpPrefix;
use crate::interceptor::proxy::canonical::canonical_prefix;

/// Longest rule name; names become Prometheus label values and table cells.
pub const MAX_RULE_NAME: usize = 64;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    default: Option<Spanned<String>>,
    #[serde(default, rename = "rule")]
    rules: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    #[serde(default)]
    dst: Vec<Spanned<String>>,
    #[serde(default)]
    src: Vec<Spanned<String>>,
    family: Option<Spanned<String>>,
    protocol: Option<Spanned<NumberOrText>>,
    dport: Option<Spanned<NumberOrText>>,
    uid: Option<Spanned<NumberOrText>>,
    action: Spanned<String>,
    http: Option<Spanned<RawHttp>>,
    then: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    default: Spanned<String>,
    #[serde(default, rename = "request")]
    requests: Vec<RawHttpRequest>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttpRequest {
    path: Spanned<String>,
    uid: Option<Spanned<NumberOrText>>,
    method: Option<Spanned<String>>,
    methods: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    query: bool,
    action: Spanned<String>,
}

/// A TOML integer or string (`80`, `"1000-2000"`, `"tcp"`).
enum NumberOrText {
    Number(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for NumberOrText {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = NumberOrText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer or a string")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(NumberOrText::Number(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(NumberOrText::Number(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(NumberOrText::Text(v.to_string()))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// Parses and validates policy text; `path` is only used in error messages.
pub fn parse_policy(path: &str, text: &str) -> Result<Policy, PolicyError> {
    let err = |span: Range<usize>, problem: Problem| PolicyError::at(path, text, span, problem);
    let raw: RawPolicy = toml::from_str(text).map_err(|e| {
        err(
            e.span().unwrap_or(0..0),
            Problem::Syntax(e.message().trim_end().to_string()),
        )
    })?;

    let default = match raw.default {
        None => Verdict::Pass,
        Some(v) => parse_verdict(&v).map_err(|p| err(v.span(), p))?,
    };

    let mut first_use: HashMap<String, Range<usize>> = HashMap::new();
    let mut rules = Vec::with_capacity(raw.rules.len());
    for raw_rule in raw.rules {
        let rule = parse_rule(raw_rule).map_err(|(span, p)| err(span, p))?;
        if let Some(first) = first_use.get(&rule.name.value) {
            let (first_line, _) = line_col(text, first.start);
            return Err(err(
                rule.name.span.clone(),
                Problem::DuplicateRuleName {
                    name: rule.name.value.clone(),
                    first_line,
                },
            ));
        }
        first_use.insert(rule.name.value.clone(), rule.name.span.clone());
        rules.push(rule);
    }
    Ok(Policy { default, rules })
}

/// A value, or the problem and the byte range of the text it is about.
type Checked<T> = Result<T, (Range<usize>, Problem)>;

fn parse_verdict(v: &Spanned<String>) -> Result<Verdict, Problem> {
    Verdict::from_name(v.get_ref()).ok_or_else(|| Problem::UnknownVerdict(v.get_ref().clone()))
}

fn parse_rule(raw: RawRule) -> Checked<Rule> {
    let name_ok = {
        let n = raw.name.get_ref();
        !n.is_empty()
            && n.len() <= MAX_RULE_NAME
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    if !name_ok {
        return Err((
            raw.name.span(),
            Problem::BadRuleName {
                name: raw.name.get_ref().clone(),
                max: MAX_RULE_NAME,
            },
        ));
    }
    let verdict = parse_verdict(&raw.action).map_err(|p| (raw.action.span(), p))?;
    let dst = parse_prefixes(&raw.dst)?;
    let src = parse_prefixes(&raw.src)?;
    let family = match &raw.family {
        None => None,
        Some(f) => {
            let family = Family::from_name(f.get_ref())
                .ok_or_else(|| (f.span(), Problem::UnknownFamily(f.get_ref().clone())))?;
            let other = dst.iter().chain(&src).find(|p| {
                !matches!(
                    (family, p.value),
                    (Family::Ipv4, IpPrefix::V4(_)) | (Family::Ipv6, IpPrefix::V6(_))
                )
            });
            if let Some(p) = other {
                return Err((
                    p.span.clone(),
                    Problem::PrefixOfOtherFamily {
                        prefix: p.value.to_string(),
                        family: family.name().to_string(),
                    },
                ));
            }
            Some(family)
        }
    };
    let protocol = raw.protocol.as_ref().map(parse_protocol).transpose()?;
    let dport = match &raw.dport {
        None => None,
        Some(spanned) => {
            match protocol {
                Some(p) if p.has_ports() => {}
                other => {
                    let got = other.map_or(String::new(), |p| format!(", got `{p}`"));
                    return Err((spanned.span(), Problem::PortWithoutPortProtocol(got)));
                }
            }
            Some(parse_port_range(spanned)?)
        }
    };
    let uid = raw.uid.as_ref().map(parse_uid_range).transpose()?;

    if verdict == Verdict::Tunnel
        && family == Some(Family::Ipv4)
        && let Some(f) = &raw.family
    {
        return Err((f.span(), Problem::TunnelOnIpv4Family));
    }
    if verdict == Verdict::Tunnel
        && let Some(v4) = dst.iter().find(|p| matches!(p.value, IpPrefix::V4(_)))
    {
        return Err((
            v4.span.clone(),
            Problem::TunnelNeedsIpv6(v4.value.to_string()),
        ));
    }

    let divert = match (verdict, raw.http, raw.then) {
        (Verdict::Divert, Some(_), Some(then)) => return Err((then.span(), Problem::HttpAndThen)),
        (Verdict::Divert, Some(http), None) => {
            if protocol != Some(Protocol::TCP) || dport.is_none() {
                return Err((http.span(), Problem::HttpNeedsTcp));
            }
            Some(DivertPolicy::Http(parse_http(http.into_inner())?))
        }
        (Verdict::Divert, None, then) => {
            let action = match then {
                None => PacketAction::Reinject,
                Some(t) => PacketAction::from_name(t.get_ref())
                    .ok_or_else(|| (t.span(), Problem::UnknownPacketAction(t.get_ref().clone())))?,
            };
            Some(DivertPolicy::Packets(action))
        }
        (other, Some(http), _) => {
            return Err((
                http.span(),
                Problem::OnlyForDivert {
                    key: "http",
                    action: other.name().to_string(),
                },
            ));
        }
        (other, None, Some(then)) => {
            return Err((
                then.span(),
                Problem::OnlyForDivert {
                    key: "then",
                    action: other.name().to_string(),
                },
            ));
        }
        (_, None, None) => None,
    };

    Ok(Rule {
        name: Located {
            span: raw.name.span(),
            value: raw.name.into_inner(),
        },
        dst,
        src,
        family,
        protocol,
        dport,
        uid,
        verdict,
        divert,
    })
}

fn parse_prefixes(raw: &[Spanned<String>]) -> Checked<Vec<Located<IpPrefix>>> {
    raw.iter()
        .map(|s| {
            IpPrefix::parse(s.get_ref())
                .map(|value| Located {
                    value,
                    span: s.span(),
                })
                .map_err(|e| (s.span(), Problem::BadPrefix(e)))
        })
        .collect()
}

fn parse_protocol(raw: &Spanned<NumberOrText>) -> Checked<Protocol> {
    match raw.get_ref() {
        NumberOrText::Number(n) => u8::try_from(*n)
            .map(Protocol)
            .map_err(|_| (raw.span(), Problem::ProtocolOutOfRange(*n))),
        NumberOrText::Text(t) => Protocol::from_name(t)
            .or_else(|| t.parse::<u8>().ok().map(Protocol))
            .ok_or_else(|| (raw.span(), Problem::UnknownProtocol(t.clone()))),
    }
}

/// Parses `N` or `"LO-HI"` into an inclusive range of `T`, reporting out-of-range values with
/// `out_of_range`.
fn parse_range<T>(
    raw: &Spanned<NumberOrText>,
    out_of_range: fn(String) -> Problem,
) -> Checked<InclusiveRange<T>>
where
    T: TryFrom<i64> + Copy + PartialOrd,
{
    let one = |n: i64| T::try_from(n).map_err(|_| (raw.span(), out_of_range(n.to_string())));
    match raw.get_ref() {
        NumberOrText::Number(n) => {
            let v = one(*n)?;
            Ok(InclusiveRange { lo: v, hi: v })
        }
        NumberOrText::Text(t) => {
            let bad = || (raw.span(), Problem::BadRange(t.clone()));
            let number = |s: &str| -> Checked<T> {
                let s = s.trim();
                if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                // Digits only: a parse failure means the value is too large for i64.
                let n = s
                    .parse::<i64>()
                    .map_err(|_| (raw.span(), out_of_range(s.to_string())))?;
                one(n)
            };
            let (lo, hi) = match t.split_once('-') {
                Some((lo, hi)) => (number(lo)?, number(hi)?),
                None => {
                    let v = number(t)?;
                    (v, v)
                }
            };
            if lo > hi {
                return Err(bad());
            }
            Ok(InclusiveRange { lo, hi })
        }
    }
}

fn parse_port_range(raw: &Spanned<NumberOrText>) -> Checked<PortRange> {
    parse_range(raw, Problem::PortOutOfRange)
}

fn parse_uid_range(raw: &Spanned<NumberOrText>) -> Checked<UidRange> {
    parse_range(raw, Problem::UidOutOfRange)
}

fn parse_http(raw: RawHttp) -> Checked<HttpPolicy> {
    let action = |s: &Spanned<String>| {
        HttpAction::from_name(s.get_ref())
            .ok_or_else(|| (s.span(), Problem::UnknownHttpAction(s.get_ref().clone())))
    };
    let default = action(&raw.default)?;
    let mut requests = Vec::with_capacity(raw.requests.len());
    for r in raw.requests {
        if let Err(e) = canonical_prefix(r.path.get_ref()) {
            return Err((
                r.path.span(),
                Problem::BadHttpPath {
                    path: r.path.get_ref().clone(),
                    reason: e.to_string(),
                },
            ));
        }
        let mut methods = Vec::new();
        for m in r.method.iter().chain(r.methods.iter().flatten()) {
            let name = m.get_ref();
            if name.is_empty() || name.len() > 16 || !name.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err((m.span(), Problem::BadHttpMethod(name.clone())));
            }
            methods.push(name.clone());
        }
        requests.push(HttpRequestRule {
            uid: r.uid.as_ref().map(parse_uid_range).transpose()?,
            methods,
            query: r.query,
            action: action(&r.action)?,
            path_prefix: r.path.into_inner(),
        });
    }
    Ok(HttpPolicy { requests, default })
}
