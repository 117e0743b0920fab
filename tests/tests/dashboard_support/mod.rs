//! The Grafana dashboard's queries and a `/metrics` exposition's families, for the tests that
//! check one against the other (`dashboard.rs` on a tunnel agent, `interceptor_tunnel.rs` on an
//! `attach` agent, which alone publishes per-rule counters).

use std::collections::BTreeSet;
use std::path::PathBuf;

pub fn dashboard() -> serde_json::Value {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/hoshino-dashboard.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every string under a key `expr` or `query`, anywhere in the dashboard.
pub fn queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => queries(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| queries(i, out)),
        _ => {}
    }
}

/// `hoshino_...` identifiers in a PromQL expression.
pub fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("hoshino_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// Series names the exposition declares, from its `# TYPE <name> <kind>` lines.
pub fn exposed(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (f.next(), f.next(), f.next(), f.next())
        {
            names.insert(name.to_owned());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
}

/// Every `hoshino_*` name the dashboard's queries use.
pub fn queried() -> BTreeSet<String> {
    let mut exprs = Vec::new();
    queries(&dashboard(), &mut exprs);
    exprs.iter().flat_map(|e| metric_names(e)).collect()
}
