//! The one strict decoder of request targets. A target is accepted only when it has exactly one
//! spelling: origin-form, no empty or dot segments, no percent-encoding of anything that may be
//! written plainly (or of `/`, `\`, `.`, `%`), no control or non-ASCII bytes. Whatever a server
//! could read differently from us is refused, never "fixed": the path that is judged is the
//! path the server receives.

use std::fmt;

/// Longest request target accepted (IMDS paths are short; longer targets are refused).
pub const MAX_TARGET: usize = 2048;

/// Why a request target is not canonical.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum TargetError {
    #[error("the target is not in origin form (must start with `/`)")]
    NotOriginForm,
    #[error("the target is longer than {MAX_TARGET} bytes")]
    TooLong,
    #[error("the target has a fragment (`#`)")]
    Fragment,
    #[error("the target has a query (`?`) and the policy allows none")]
    Query,
    #[error("the target has an empty segment (`//`)")]
    EmptySegment,
    #[error("the target has a dot segment (`.`, `..` or only dots)")]
    DotSegment,
    #[error("the target has a byte that is never sent plainly ({0:#04x})")]
    ForbiddenByte(u8),
    #[error("the target has a malformed percent-encoding")]
    BadPercent,
    #[error(
        "the target percent-encodes a character that has a plain spelling or is a separator ({0:#04x})"
    )]
    NeedlessPercent(u8),
    #[error("the target uses lowercase hex in a percent-encoding")]
    LowercasePercent,
}

impl TargetError {
    /// The refusal reason label (metrics, audit).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotOriginForm => "target_not_origin_form",
            Self::TooLong => "target_too_long",
            Self::Fragment => "target_fragment",
            Self::Query => "target_query",
            Self::EmptySegment => "target_empty_segment",
            Self::DotSegment => "target_dot_segment",
            Self::ForbiddenByte(_) => "target_forbidden_byte",
            Self::BadPercent | Self::LowercasePercent => "target_bad_percent",
            Self::NeedlessPercent(_) => "target_needless_percent",
        }
    }
}

/// A request target that passed [`canonical_target`]: the path, and the query if there was one
/// (and the caller allowed it), both exactly as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalTarget {
    pub path: String,
    pub query: Option<String>,
}

impl fmt::Display for CanonicalTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.query {
            Some(q) => write!(f, "{}?{q}", self.path),
            None => f.write_str(&self.path),
        }
    }
}

/// RFC 3986 unreserved characters: always written plainly.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~".contains(&b)
}

/// Bytes a canonical path segment may hold plainly: unreserved, and the sub-delims and `:` `@`
/// except `;` (path parameters, which some servers strip before resolving dot segments).
fn is_plain_path_byte(b: u8) -> bool {
    is_unreserved(b) || b"!$&'()*+,=:@".contains(&b)
}

/// Bytes that may only appear percent-encoded: printable ASCII that is not plain. `%` itself
/// (double decoding), `/`, `\` and `.` are refused in any spelling.
fn may_be_encoded(b: u8) -> bool {
    (0x21..0x7f).contains(&b) && !is_plain_path_byte(b) && !b"/\\.%;".contains(&b) || b == b' '
}

/// Checks `target` (the request-line target, raw bytes); `allow_query` says whether a `?query`
/// may follow the path. Checks the path first so that a refused path is reported as such.
pub fn canonical_target(target: &[u8], allow_query: bool) -> Result<CanonicalTarget, TargetError> {
    if target.len() > MAX_TARGET {
        return Err(TargetError::TooLong);
    }
    if target.first() != Some(&b'/') {
        return Err(TargetError::NotOriginForm);
    }
    if target.contains(&b'#') {
        return Err(TargetError::Fragment);
    }
    let (path, query) = match target.iter().position(|&b| b == b'?') {
        Some(i) => (&target[..i], Some(&target[i + 1..])),
        None => (target, None),
    };
    check_path(path)?;
    let query = match query {
        None => None,
        Some(_) if !allow_query => return Err(TargetError::Query),
        Some(q) => {
            check_query(q)?;
            Some(ascii(q))
        }
    };
    Ok(CanonicalTarget {
        path: ascii(path),
        query,
    })
}

/// Checks a policy's path prefix: it must itself be a canonical path, so that a prefix can only
/// ever match the one spelling of a path.
pub fn canonical_prefix(prefix: &str) -> Result<(), TargetError> {
    if prefix.len() > MAX_TARGET {
        return Err(TargetError::TooLong);
    }
    if !prefix.starts_with('/') {
        return Err(TargetError::NotOriginForm);
    }
    if prefix.contains('#') {
        return Err(TargetError::Fragment);
    }
    if prefix.contains('?') {
        return Err(TargetError::Query);
    }
    check_path(prefix.as_bytes())
}

fn ascii(bytes: &[u8]) -> String {
    // Every byte was checked to be printable ASCII.
    bytes.iter().map(|&b| char::from(b)).collect()
}

fn check_path(path: &[u8]) -> Result<(), TargetError> {
    // path = "/" segment *( "/" segment ); only the last segment may be empty (a trailing
    // slash, IMDS's directory listings).
    let segments: Vec<&[u8]> = path[1..].split(|&b| b == b'/').collect();
    let last = segments.len() - 1;
    for (i, segment) in segments.iter().enumerate() {
        if segment.is_empty() {
            if i == last {
                continue;
            }
            return Err(TargetError::EmptySegment);
        }
        if segment.iter().all(|&b| b == b'.') {
            return Err(TargetError::DotSegment);
        }
        check_bytes(segment)?;
    }
    Ok(())
}

fn check_query(query: &[u8]) -> Result<(), TargetError> {
    // A query may hold `/` and `?` plainly; everything else as in a segment.
    for chunk in query.split(|&b| b == b'/' || b == b'?') {
        check_bytes(chunk)?;
    }
    Ok(())
}

fn check_bytes(bytes: &[u8]) -> Result<(), TargetError> {
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(TargetError::BadPercent)?;
            let digit = |h: u8| match h {
                b'0'..=b'9' => Ok(h - b'0'),
                b'A'..=b'F' => Ok(h - b'A' + 10),
                b'a'..=b'f' => Err(TargetError::LowercasePercent),
                _ => Err(TargetError::BadPercent),
            };
            let decoded = digit(hex[0])? << 4 | digit(hex[1])?;
            if !may_be_encoded(decoded) {
                return Err(TargetError::NeedlessPercent(decoded));
            }
            i += 3;
            continue;
        }
        if !is_plain_path_byte(b) {
            return Err(TargetError::ForbiddenByte(b));
        }
        i += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_targets_are_accepted_as_sent() {
        for target in [
            "/",
            "/latest/meta-data/",
            "/latest/meta-data/instance-id",
            "/latest/meta-data/placement/availability-zone",
            "/latest/api/token",
            "/latest/meta-data/iam/security-credentials/role-name_1.2~x",
            "/a/b:c@d!$&'()*+,=",
            "/with%20space",
            "/percent-encoded%22quote%3F",
            "/x/...y/.hidden/a..b",
        ] {
            let t = canonical_target(target.as_bytes(), false)
                .unwrap_or_else(|e| panic!("{target}: {e}"));
            assert_eq!(t.path, target);
            assert_eq!(t.query, None);
            assert_eq!(t.to_string(), target);
        }
    }

    #[test]
    fn non_canonical_targets_are_refused_with_their_reason() {
        use TargetError::*;
        for (target, want) in [
            ("", NotOriginForm),
            ("*", NotOriginForm),
            ("http://169.254.169.254/latest/", NotOriginForm),
            ("169.254.169.254:80", NotOriginForm),
            ("/latest/meta-data/placement/../iam/info", DotSegment),
            ("/latest/meta-data/./iam/info", DotSegment),
            ("/latest/meta-data/..", DotSegment),
            ("/latest/meta-data/...", DotSegment),
            ("/latest/meta-data//../iam/", EmptySegment),
            ("//latest/meta-data/", EmptySegment),
            ("/latest/meta-data/%2e%2e/iam/", LowercasePercent),
            ("/latest/meta-data/%2E%2E/iam/", NeedlessPercent(b'.')),
            (
                "/latest/meta-data/placement%2F..%2Fiam/",
                NeedlessPercent(b'/'),
            ),
            (
                "/latest/meta-data/placement%5C..%5Ciam/",
                NeedlessPercent(b'\\'),
            ),
            (
                "/latest/meta-data/placement\\..\\iam/",
                ForbiddenByte(b'\\'),
            ),
            ("/latest/meta-data/i%61m/", NeedlessPercent(b'a')),
            ("/latest/meta-data/%69am/", NeedlessPercent(b'i')),
            ("/latest/meta-data/iam%252F", NeedlessPercent(b'%')),
            ("/latest/meta-data/instance-id#/../iam/", Fragment),
            ("/latest/meta-data/instance-id?x=1", Query),
            ("/latest/meta-data/placement/..;/iam/", ForbiddenByte(b';')),
            ("/latest/meta-data/%00", NeedlessPercent(0)),
            ("/latest/meta-data/a\0b", ForbiddenByte(0)),
            ("/latest/meta-data/a\tb", ForbiddenByte(b'\t')),
            ("/latest/meta-data/a b", ForbiddenByte(b' ')),
            ("/latest/meta-data/\x7f", ForbiddenByte(0x7f)),
            ("/latest/meta-data/%7F", NeedlessPercent(0x7f)),
            ("/latest/meta-data/%C0%AE%C0%AE/iam/", NeedlessPercent(0xc0)),
            ("/latest/meta-data/%E2%80%A8", NeedlessPercent(0xe2)),
            ("/latest/meta-data/%2", BadPercent),
            ("/latest/meta-data/%zz", BadPercent),
            ("/latest/meta-data/%+1", BadPercent),
        ] {
            assert_eq!(
                canonical_target(target.as_bytes(), false),
                Err(want),
                "{target:?}"
            );
        }
    }

    #[test]
    fn non_ascii_bytes_are_refused() {
        assert_eq!(
            canonical_target(b"/latest/meta-data/\xc0\xae\xc0\xae/iam/", true),
            Err(TargetError::ForbiddenByte(0xc0))
        );
        assert_eq!(
            canonical_target("/latest/méta".as_bytes(), true),
            Err(TargetError::ForbiddenByte(0xc3))
        );
    }

    #[test]
    fn over_long_targets_are_refused() {
        let long = format!("/{}", "a".repeat(MAX_TARGET));
        assert_eq!(
            canonical_target(long.as_bytes(), false),
            Err(TargetError::TooLong)
        );
    }

    #[test]
    fn queries_are_accepted_only_when_allowed_and_checked_like_paths() {
        let t = canonical_target(b"/latest/dynamic?a=1&b=/c?d", true).expect("allowed");
        assert_eq!(t.path, "/latest/dynamic");
        assert_eq!(t.query.as_deref(), Some("a=1&b=/c?d"));
        assert_eq!(t.to_string(), "/latest/dynamic?a=1&b=/c?d");
        assert_eq!(
            canonical_target(b"/latest/dynamic?a=%41", true),
            Err(TargetError::NeedlessPercent(b'A'))
        );
        // The path is judged before the query: a bad path is reported as such.
        assert_eq!(
            canonical_target(b"/x/../y?q", false),
            Err(TargetError::DotSegment)
        );
    }

    #[test]
    fn policy_prefixes_must_be_canonical() {
        assert_eq!(canonical_prefix("/latest/meta-data/iam/"), Ok(()));
        assert_eq!(canonical_prefix("/"), Ok(()));
        assert_eq!(
            canonical_prefix("/latest//iam/"),
            Err(TargetError::EmptySegment)
        );
        assert_eq!(
            canonical_prefix("/latest/%69am"),
            Err(TargetError::NeedlessPercent(b'i'))
        );
        assert_eq!(canonical_prefix("latest/"), Err(TargetError::NotOriginForm));
        assert_eq!(canonical_prefix("/latest?x"), Err(TargetError::Query));
    }
}
