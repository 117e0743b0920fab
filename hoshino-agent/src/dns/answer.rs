//! The name responder's answers: one DNS query in, one response out. Sans-IO; the message
//! encoding is hickory-proto's (no DNS parsing of our own).
//!
//! - `<name>.<domain>` AAAA (or ANY): the node's address, TTL `TTL_SECS`, authoritative.
//! - A known name, another type: NOERROR without answers (the name exists).
//! - An unknown name, or anything deeper than one label under the domain: NXDOMAIN.
//! - A name two node ids claim: SERVFAIL, never one of them (the collision is logged and shown
//!   by `peers`).
//! - Any other domain or class: REFUSED (not an open resolver). Not a query: NOTIMP. More or
//!   fewer than one question: FORMERR. Undecodable bytes or a response: no answer at all.

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::AAAA;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use crate::directory::name::DnsDomain;
use crate::directory::table::{Directory, Resolution};

/// AAAA answers' TTL: short, so a renamed or replaced node is seen within a minute.
pub const TTL_SECS: u32 = 30;

/// What the responder did with a query, for logs and counting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Answered,
    NoData,
    NxDomain,
    Ambiguous,
    Refused,
    Malformed,
}

/// The response to `query`, or `None` for bytes that are not a DNS query (dropped silently, as
/// answering garbage would make the responder a reflector).
pub fn respond(
    query: &[u8],
    directory: &Directory,
    domain: &DnsDomain,
) -> Option<(Vec<u8>, Outcome)> {
    let request = Message::from_vec(query).ok()?;
    if request.message_type() != MessageType::Query {
        return None;
    }
    let mut response = Message::new();
    response
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(request.op_code())
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(false);
    response.add_queries(request.queries().iter().cloned());
    let outcome = decide(&request, directory, domain, &mut response);
    response.to_vec().ok().map(|bytes| (bytes, outcome))
}

fn decide(
    request: &Message,
    directory: &Directory,
    domain: &DnsDomain,
    response: &mut Message,
) -> Outcome {
    if request.op_code() != OpCode::Query {
        response.set_response_code(ResponseCode::NotImp);
        return Outcome::Malformed;
    }
    let [query] = request.queries() else {
        response.set_response_code(ResponseCode::FormErr);
        return Outcome::Malformed;
    };
    let Ok(zone) = Name::from_ascii(format!("{domain}.")) else {
        response.set_response_code(ResponseCode::ServFail);
        return Outcome::Malformed;
    };
    let qname = query.name().to_lowercase();
    if query.query_class() != DNSClass::IN || !zone.zone_of(&qname) {
        response.set_response_code(ResponseCode::Refused);
        return Outcome::Refused;
    }
    response.set_authoritative(true);
    if qname.num_labels() == zone.num_labels() {
        // The domain itself exists and has no AAAA.
        return Outcome::NoData;
    }
    if qname.num_labels() != zone.num_labels() + 1 {
        response.set_response_code(ResponseCode::NXDomain);
        return Outcome::NxDomain;
    }
    let label = qname
        .iter()
        .next()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .unwrap_or_default();
    match directory.resolve(&label) {
        Resolution::Unknown => {
            response.set_response_code(ResponseCode::NXDomain);
            Outcome::NxDomain
        }
        Resolution::Ambiguous(_) => {
            response.set_response_code(ResponseCode::ServFail);
            Outcome::Ambiguous
        }
        Resolution::Address(addr) => match query.query_type() {
            RecordType::AAAA | RecordType::ANY => {
                response.add_answer(Record::from_rdata(
                    query.name().clone(),
                    TTL_SECS,
                    RData::AAAA(AAAA(addr)),
                ));
                Outcome::Answered
            }
            _ => Outcome::NoData,
        },
    }
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::Query;

    use super::*;
    use crate::directory::record::NodeRecord;

    fn directory() -> Directory {
        let record = |node: u64, name: &str| NodeRecord::sample(node, name, 0);
        Directory::new(
            vec![record(1, "web"), record(2, "db"), record(3, "db")],
            vec![],
            0,
        )
    }

    fn ask(name: &str, rtype: RecordType) -> (Message, Outcome) {
        let mut q = Message::new();
        q.set_id(4242).set_recursion_desired(true);
        q.add_query(Query::query(Name::from_ascii(name).expect("name"), rtype));
        let bytes = q.to_vec().expect("encodes");
        let (answer, outcome) =
            respond(&bytes, &directory(), &DnsDomain::default()).expect("answered");
        (Message::from_vec(&answer).expect("decodes"), outcome)
    }

    #[test]
    fn a_known_name_gets_its_aaaa_with_a_short_ttl_in_any_case() {
        let (m, outcome) = ask("WEB.hoshino.internal.", RecordType::AAAA);
        assert_eq!(outcome, Outcome::Answered);
        assert_eq!(m.id(), 4242);
        assert_eq!(m.response_code(), ResponseCode::NoError);
        assert!(m.authoritative());
        let [answer] = m.answers() else {
            panic!("one answer expected: {m:?}")
        };
        assert_eq!(answer.ttl(), TTL_SECS);
        assert_eq!(
            answer.data(),
            &RData::AAAA(AAAA("fd00::1".parse().expect("addr")))
        );
    }

    #[test]
    fn an_unknown_or_deeper_name_is_nxdomain() {
        for name in ["cache.hoshino.internal.", "a.web.hoshino.internal."] {
            let (m, outcome) = ask(name, RecordType::AAAA);
            assert_eq!(m.response_code(), ResponseCode::NXDomain, "{name}");
            assert_eq!(outcome, Outcome::NxDomain);
            assert!(m.answers().is_empty());
        }
    }

    #[test]
    fn another_domain_is_refused() {
        for name in [
            "example.com.",
            "web.internal.",
            "web.hoshino.internal.evil.",
        ] {
            let (m, outcome) = ask(name, RecordType::AAAA);
            assert_eq!(m.response_code(), ResponseCode::Refused, "{name}");
            assert_eq!(outcome, Outcome::Refused);
        }
    }

    #[test]
    fn a_name_two_nodes_claim_is_answered_by_neither() {
        let (m, outcome) = ask("db.hoshino.internal.", RecordType::AAAA);
        assert_eq!(m.response_code(), ResponseCode::ServFail);
        assert_eq!(outcome, Outcome::Ambiguous);
        assert!(m.answers().is_empty());
    }

    #[test]
    fn a_known_name_without_that_type_is_nodata() {
        let (m, outcome) = ask("web.hoshino.internal.", RecordType::A);
        assert_eq!(m.response_code(), ResponseCode::NoError);
        assert_eq!(outcome, Outcome::NoData);
        assert!(m.answers().is_empty());
    }

    #[test]
    fn garbage_and_responses_get_no_answer() {
        assert!(respond(b"\x01\x02garbage", &directory(), &DnsDomain::default()).is_none());
        let mut r = Message::new();
        r.set_message_type(MessageType::Response);
        let bytes = r.to_vec().expect("encodes");
        assert!(respond(&bytes, &directory(), &DnsDomain::default()).is_none());
    }
}
