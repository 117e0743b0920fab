//! A compiled policy (`policy::compile`, the one compiler: it validates, and folds ancestor
//! prefixes into every LPM entry) -> the contents of one classifier map set ([`SetTables`]).
//! This only changes the representation; `classifier/policy_maps.rs` writes it to the maps.

use hoshino_common::{MAX_RULES, Rule, RuleSet, SetMeta};

use crate::policy::{CompiledPolicy, Ipv4Prefix, Ipv6Prefix};

/// Why a policy does not fit the classifier's maps (the compiler refuses such policies with a
/// location first; this guards map sets built any other way).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TablesError {
    #[error("{count} rules, but the classifier holds at most {MAX_RULES}")]
    TooManyRules { count: usize },
    #[error("{rules} kernel rules but {names} rule names")]
    NameCountMismatch { rules: usize, names: usize },
}

/// The contents of one map set, with set-independent LPM entries (`(prefix, rules)`, the rules
/// of every covering prefix already folded in), plus the rule names for the per-rule metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetTables {
    /// `rule_names[i]` names rule `i`.
    pub rule_names: Vec<String>,
    pub meta: SetMeta,
    pub rules: Vec<Rule>,
    pub dst_v4: Vec<(Ipv4Prefix, RuleSet)>,
    pub src_v4: Vec<(Ipv4Prefix, RuleSet)>,
    pub dst_v6: Vec<(Ipv6Prefix, RuleSet)>,
    pub src_v6: Vec<(Ipv6Prefix, RuleSet)>,
}

/// The map set contents for `policy`.
pub fn set_tables(policy: &CompiledPolicy) -> Result<SetTables, TablesError> {
    let count = policy.rules.len();
    if count > MAX_RULES as usize {
        return Err(TablesError::TooManyRules { count });
    }
    let rule_names = (0..count)
        .map(|i| {
            u32::try_from(i)
                .ok()
                .and_then(|i| policy.rule_name(i))
                .map_or_else(|| format!("rule{i}"), str::to_owned)
        })
        .collect();
    Ok(SetTables {
        rule_names,
        meta: SetMeta {
            any_dst: policy.any_dst,
            any_src: policy.any_src,
            rule_count: u32::try_from(count).map_err(|_| TablesError::TooManyRules { count })?,
            default_verdict: policy.default.to_kernel() as u8,
            _pad: [0; 3],
        },
        rules: policy.rules.clone(),
        dst_v4: policy.dst_v4.entries.clone(),
        src_v4: policy.src_v4.entries.clone(),
        dst_v6: policy.dst_v6.entries.clone(),
        src_v6: policy.src_v6.entries.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_file_tables_keep_rule_order_names_and_prefixes() {
        let text = r#"
default = "drop"

[[rule]]
name = "metadata"
action = "divert"
dst = ["169.254.169.254/32", "fd00:ec2::254/128"]
protocol = "tcp"
dport = 80

[[rule]]
name = "ten"
action = "drop"
dst = ["10.0.0.0/8"]
"#;
        let compiled = crate::policy::compile_text("t.toml", text).unwrap();
        let tables = set_tables(&compiled).unwrap();
        assert_eq!(tables.rule_names, ["metadata", "ten"]);
        assert_eq!(tables.rules.len(), 2);
        assert_eq!(tables.dst_v4.len(), 2);
        assert_eq!(tables.dst_v6.len(), 1);
        assert!(tables.src_v4.is_empty() && tables.src_v6.is_empty());
        assert_eq!(tables.meta.rule_count, 2);
        assert_eq!(
            tables.meta.default_verdict,
            hoshino_common::Verdict::Drop as u8
        );
        assert!(tables.meta.any_src.contains(0) && tables.meta.any_src.contains(1));
    }

    #[test]
    fn lpm_entries_carry_the_rules_of_their_covering_prefixes() {
        // The folding test of the deleted test-only compiler, now through the production one.
        let text = r#"
[[rule]]
name = "narrow"
action = "pass"
dst = ["10.1.0.0/16", "fd00::/8"]

[[rule]]
name = "wide"
action = "drop"
dst = ["10.0.0.0/8"]

[[rule]]
name = "any"
action = "drop"
"#;
        let tables = set_tables(&crate::policy::compile_text("t.toml", text).unwrap()).unwrap();
        let get = |prefix: &str| {
            tables
                .dst_v4
                .iter()
                .find(|(p, _)| p.to_string() == prefix)
                .map(|(_, s)| *s)
                .unwrap()
        };
        assert!(get("10.1.0.0/16").contains(0) && get("10.1.0.0/16").contains(1));
        assert!(!get("10.0.0.0/8").contains(0) && get("10.0.0.0/8").contains(1));
        assert!(tables.meta.any_dst.contains(2) && !tables.meta.any_dst.contains(0));
        assert_eq!(tables.meta.any_src.words[0], 0b111);
        assert_eq!(tables.dst_v6.len(), 1);
    }
}
