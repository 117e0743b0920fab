//! Human-readable rendering of a compiled policy (`hoshino-agent policy check`).

use std::fmt::Write as _;

use super::compile::CompiledPolicy;
use super::model::{DivertPolicy, Family, Located, Rule};
use super::prefix::IpPrefix;

fn prefixes(list: &[Located<IpPrefix>], family: Option<Family>) -> String {
    if list.is_empty() {
        return family.map_or_else(|| "any".to_string(), |f| format!("any {f}"));
    }
    list.iter()
        .map(|p| p.value.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn or_any<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "any".to_string(), |v| v.to_string())
}

fn row(rule: &Rule) -> [String; 7] {
    [
        rule.name.value.clone(),
        rule.verdict.to_string(),
        or_any(rule.protocol),
        or_any(rule.dport),
        or_any(rule.uid),
        prefixes(&rule.dst, rule.family),
        prefixes(&rule.src, rule.family),
    ]
}

/// Renders rules in match order as an aligned table, each divert rule followed by its
/// per-request decisions, then the map sizes.
pub fn render(compiled: &CompiledPolicy) -> String {
    const HEADER: [&str; 7] = ["rule", "action", "proto", "dport", "uid", "dst", "src"];
    // Long prefix lists would make the table unreadable; they are cut here and counted.
    const MAX_CELL: usize = 60;
    let rules = &compiled.policy.rules;
    let rows: Vec<[String; 7]> = rules
        .iter()
        .map(|r| {
            row(r).map(|cell| {
                if cell.chars().count() > MAX_CELL {
                    let count = cell.split(", ").count();
                    let head: String = cell.chars().take(MAX_CELL - 20).collect();
                    format!("{head}... ({count} prefixes)")
                } else {
                    cell
                }
            })
        })
        .collect();
    let mut widths = HEADER.map(str::len);
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let index_width = rows.len().saturating_sub(1).to_string().len().max(1);
    let mut out = String::new();
    let line = |out: &mut String, index: &str, cells: &[String]| {
        let _ = write!(out, "{index:>index_width$}");
        for (cell, w) in cells.iter().zip(widths.iter()) {
            let _ = write!(out, "  {cell:<w$}");
        }
        let trimmed = out.trim_end().len();
        out.truncate(trimmed);
        out.push('\n');
    };
    line(&mut out, "#", &HEADER.map(str::to_string));
    for (i, (cells, rule)) in rows.iter().zip(rules.iter()).enumerate() {
        line(&mut out, &i.to_string(), cells);
        match &rule.divert {
            Some(DivertPolicy::Http(http)) => {
                for req in &http.requests {
                    let uid = req.uid.map_or(String::new(), |u| format!(" uid {u}"));
                    let query = if req.query { " ?query" } else { "" };
                    let _ = writeln!(
                        out,
                        "{:index_width$}    http {} {}{query}{uid} -> {}",
                        "",
                        req.methods_text(),
                        req.path_prefix,
                        req.action
                    );
                }
                let _ = writeln!(
                    out,
                    "{:index_width$}    http otherwise -> {}",
                    "", http.default
                );
            }
            Some(DivertPolicy::Packets(action)) => {
                let _ = writeln!(out, "{:index_width$}    then {action}", "");
            }
            None => {}
        }
    }
    let _ = writeln!(out, "{:>index_width$}  otherwise {}", "*", compiled.default);
    let _ = writeln!(
        out,
        "maps: {} rules; LPM entries dst v4 {}, dst v6 {}, src v4 {}, src v6 {}",
        compiled.rules.len(),
        compiled.dst_v4.entries.len(),
        compiled.dst_v6.entries.len(),
        compiled.src_v4.entries.len(),
        compiled.src_v6.entries.len(),
    );
    out
}
