//! Map contents from a compiled policy file (`policy::CompiledPolicy` already folds ancestor
//! prefixes; this only changes the representation).

use std::net::IpAddr;

use hoshino_common::SetMeta;

use super::tables::{Prefix, SetTables, TablesError};
use crate::policy::CompiledPolicy;

/// The map set contents for `policy`.
pub fn set_tables(policy: &CompiledPolicy) -> Result<SetTables, TablesError> {
    let count = policy.rules.len();
    let rule_names = (0..count)
        .map(|i| {
            u32::try_from(i)
                .ok()
                .and_then(|i| policy.rule_name(i))
                .map_or_else(|| format!("rule{i}"), str::to_owned)
        })
        .collect();
    let v4 = |entries: &[(crate::policy::Ipv4Prefix, hoshino_common::RuleSet)]| {
        entries
            .iter()
            .map(|(p, s)| Ok((Prefix::new(IpAddr::V4(p.addr()), p.prefix_len())?, *s)))
            .collect::<Result<Vec<_>, TablesError>>()
    };
    let v6 = |entries: &[(crate::policy::Ipv6Prefix, hoshino_common::RuleSet)]| {
        entries
            .iter()
            .map(|(p, s)| Ok((Prefix::new(IpAddr::V6(p.addr()), p.prefix_len())?, *s)))
            .collect::<Result<Vec<_>, TablesError>>()
    };
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
        dst_v4: v4(&policy.dst_v4.entries)?,
        src_v4: v4(&policy.src_v4.entries)?,
        dst_v6: v6(&policy.dst_v6.entries)?,
        src_v6: v6(&policy.src_v6.entries)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_file_tables_keep_rule_order_names_and_prefixes() {
        let text = r#"
default = "pass"

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
        assert_eq!(tables.meta.rule_count, 2);
        assert!(tables.meta.any_src.contains(0) && tables.meta.any_src.contains(1));
    }
}
