//! `hoshino-agent hosts`: the directory as `/etc/hosts` lines, for hosts without
//! systemd-resolved. A name two nodes claim is left out (as a comment), never picked.

use std::process::ExitCode;

use clap::Args;
use hoshino_agent::directory::name::DnsDomain;
use hoshino_agent::directory::table::Directory;

use super::peers::{self, ReadError};
use super::tunnel::S3Args;
use super::{EXIT_RUNTIME, config_error};

#[derive(Debug, Clone, Args)]
pub struct HostsArgs {
    #[command(flatten)]
    pub s3: S3Args,
    #[command(flatten)]
    pub domain: DomainArgs,
}

/// The DNS domain node names live under; shared by `tunnel` and `hosts`.
#[derive(Debug, Clone, Args)]
pub struct DomainArgs {
    /// Domain of node names: `<name>.<domain>`.
    #[arg(long, env = "HOSHINO_DNS_DOMAIN", default_value_t = DnsDomain::default())]
    pub dns_domain: DnsDomain,
}

pub async fn run(args: &HostsArgs) -> ExitCode {
    match peers::read(&args.s3).await {
        Ok(d) => {
            print!("{}", hosts_lines(&d, &args.domain.dns_domain));
            ExitCode::SUCCESS
        }
        Err(ReadError::Config(e)) => config_error(e),
        Err(e) => {
            eprintln!("hoshino-agent hosts: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// `<address>\t<name>.<domain> <name>` per node; colliding names as comments.
pub fn hosts_lines(d: &Directory, domain: &DnsDomain) -> String {
    let mut out = format!("# hoshino nodes ({domain}), from the directory\n");
    for e in d.entries() {
        let name = &e.record.name;
        if e.collides {
            out.push_str(&format!(
                "# {} {} left out: name claimed by several nodes (this one is {})\n",
                e.record.addr,
                domain.fqdn(name),
                e.record.node
            ));
        } else {
            out.push_str(&format!(
                "{}\t{} {name}\n",
                e.record.addr,
                domain.fqdn(name)
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::peers::tests::record;

    #[test]
    fn each_node_is_a_hosts_line_and_collisions_are_comments() {
        let d = Directory::new(
            vec![record(1, "web", 0), record(2, "db", 0), record(3, "web", 0)],
            vec![],
            0,
        );
        let text = hosts_lines(&d, &DnsDomain::default());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], "fd00::2\tdb.hoshino.internal db");
        assert!(lines[2].starts_with("# fd00::1 web.hoshino.internal left out"));
        assert!(lines[3].starts_with("# fd00::3 web.hoshino.internal left out"));
        assert_eq!(lines.len(), 4);
    }
}
