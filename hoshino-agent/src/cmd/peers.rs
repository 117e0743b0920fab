//! `hoshino-agent peers`: the directory as a table (or `--json`), read straight from the bucket
//! with the same S3 settings as the tunnel; no running agent needed.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use hoshino_agent::directory::read::read_directory;
use hoshino_agent::directory::record::UnixMillis;
use hoshino_agent::directory::table::Directory;
use hoshino_agent::directory::unix_millis_now;
use hoshino_agent::edge::s3::{self, S3Store};
use hoshino_agent::metrics::Metrics;
use hoshino_agent::tunnel::load_network_key;
use serde::Serialize;

use super::tunnel::S3Args;
use super::{EXIT_RUNTIME, columns, config_error};

#[derive(Debug, Clone, Args)]
pub struct PeersArgs {
    #[command(flatten)]
    pub s3: S3Args,
    /// Print JSON instead of a table.
    #[arg(long, env = "HOSHINO_JSON", num_args = 0..=1, default_value_t = false,
          default_missing_value = "true", value_name = "BOOL")]
    pub json: bool,
}

/// Why the directory could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Config(String),
    #[error("cannot read the directory in bucket `{bucket}` ({endpoint}): {reason}")]
    Bucket {
        bucket: String,
        endpoint: String,
        reason: String,
    },
}

/// Reads the directory the flags point at.
pub async fn read(args: &S3Args) -> Result<Directory, ReadError> {
    let settings = args
        .resolve()
        .map_err(|e| ReadError::Config(e.to_string()))?;
    let key = load_network_key(args.network_key_file.as_deref())
        .map_err(|e| ReadError::Config(e.to_string()))?;
    let client = s3::client(&settings).await;
    let store = S3Store::with_settings(client, &settings, Arc::new(Metrics::default()));
    read_directory(&store, key.as_ref(), unix_millis_now())
        .await
        .map_err(|e| ReadError::Bucket {
            bucket: settings.bucket.clone(),
            endpoint: settings
                .endpoint_url
                .clone()
                .unwrap_or_else(|| "AWS".to_string()),
            reason: e.to_string(),
        })
}

/// Prints the directory's problems (collisions, ignored records) to stderr, reads as warnings.
pub fn warn_about(directory: &Directory) {
    for (name, nodes) in directory.collisions() {
        let ids: Vec<String> = nodes.iter().map(ToString::to_string).collect();
        eprintln!(
            "warning: name `{name}` is claimed by nodes {}: DNS answers none of them until one is renamed",
            ids.join(", ")
        );
    }
    for r in directory.rejected() {
        eprintln!("warning: ignored {}: {}", r.key, r.reason);
    }
}

pub async fn run(args: &PeersArgs) -> ExitCode {
    let directory = match read(&args.s3).await {
        Ok(d) => d,
        Err(ReadError::Config(e)) => return config_error(e),
        Err(e) => {
            eprintln!("hoshino-agent peers: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let now = unix_millis_now();
    if args.json {
        match serde_json::to_string_pretty(&PeersJson::new(&directory, now)) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("hoshino-agent peers: cannot render JSON: {e}");
                return ExitCode::from(EXIT_RUNTIME);
            }
        }
    } else {
        print!("{}", table(&directory, now));
        warn_about(&directory);
    }
    ExitCode::SUCCESS
}

#[derive(Debug, Serialize)]
pub struct PeersJson {
    pub nodes: Vec<NodeJson>,
    pub collisions: Vec<CollisionJson>,
    pub rejected: Vec<RejectedJson>,
}

#[derive(Debug, Serialize)]
pub struct NodeJson {
    pub name: String,
    pub node_id: String,
    pub address: String,
    pub agent_version: String,
    pub started_at_unix_ms: UnixMillis,
    pub refreshed_at_unix_ms: UnixMillis,
    pub last_seen_seconds_ago: u64,
    pub stale: bool,
    pub name_collides: bool,
}

#[derive(Debug, Serialize)]
pub struct CollisionJson {
    pub name: String,
    pub node_ids: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct RejectedJson {
    pub key: String,
    pub reason: String,
}

impl PeersJson {
    pub fn new(d: &Directory, now: UnixMillis) -> PeersJson {
        PeersJson {
            nodes: d
                .entries()
                .iter()
                .map(|e| NodeJson {
                    name: e.record.name.to_string(),
                    node_id: e.record.node.to_string(),
                    address: e.record.addr.to_string(),
                    agent_version: e.record.agent_version.clone(),
                    started_at_unix_ms: e.record.started_at,
                    refreshed_at_unix_ms: e.record.refreshed_at,
                    last_seen_seconds_ago: now.saturating_sub(e.record.refreshed_at) / 1000,
                    stale: e.stale,
                    name_collides: e.collides,
                })
                .collect(),
            collisions: d
                .collisions()
                .into_iter()
                .map(|(name, ids)| CollisionJson {
                    name: name.to_string(),
                    node_ids: ids.iter().map(ToString::to_string).collect(),
                })
                .collect(),
            rejected: d
                .rejected()
                .iter()
                .map(|r| RejectedJson {
                    key: r.key.clone(),
                    reason: r.reason.clone(),
                })
                .collect(),
        }
    }
}

/// `3m 20s ago`, to the second.
fn ago(now: UnixMillis, then: UnixMillis) -> String {
    let secs = now.saturating_sub(then) / 1000;
    format!(
        "{} ago",
        humantime::format_duration(Duration::from_secs(secs))
    )
}

/// Columns NAME, ADDRESS, VERSION, LAST SEEN, STALE; a colliding name is marked `(collision)`.
pub fn table(d: &Directory, now: UnixMillis) -> String {
    let mut rows = vec![[
        "NAME".to_string(),
        "ADDRESS".to_string(),
        "VERSION".to_string(),
        "LAST SEEN".to_string(),
        "STALE".to_string(),
    ]];
    for e in d.entries() {
        let mut name = e.record.name.to_string();
        if e.collides {
            name.push_str(" (collision)");
        }
        rows.push([
            name,
            e.record.addr.to_string(),
            e.record.agent_version.clone(),
            ago(now, e.record.refreshed_at),
            if e.stale { "yes" } else { "no" }.to_string(),
        ]);
    }
    columns::aligned(&rows)
}

#[cfg(test)]
pub(super) mod tests {
    use std::net::Ipv6Addr;

    use hoshino_agent::directory::record::NodeRecord;
    use hoshino_agent::node_addr::NodeId;

    use super::*;

    /// The record the directory commands' tests build on (`peers`, `hosts`): node `node` at
    /// `fd00::<node>`, agent version 0.1.0, started at 0.
    pub(crate) fn record(node: u64, name: &str, refreshed_at: UnixMillis) -> NodeRecord {
        NodeRecord {
            node: NodeId(node),
            name: name.parse().expect("name"),
            addr: Ipv6Addr::from((0xfd00u128 << 112) | u128::from(node)),
            agent_version: "0.1.0".into(),
            started_at: 0,
            refreshed_at,
        }
    }

    #[test]
    fn table_has_one_aligned_row_per_node_under_its_columns() {
        let now = 30 * 3_600_000;
        let d = Directory::new(
            vec![
                record(1, "web", now - 200_000),
                record(2, "db", 0),
                record(3, "web", now),
            ],
            vec![],
            now,
        );
        let text = table(&d, now);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        let header = lines[0];
        for column in ["NAME", "ADDRESS", "VERSION", "LAST SEEN", "STALE"] {
            assert!(header.contains(column), "{header}");
        }
        let at = header.find("ADDRESS").expect("column");
        assert!(lines[1].starts_with("db "));
        assert_eq!(&lines[1][at..at + 7], "fd00::2");
        assert!(lines[1].ends_with("1day 6h ago  yes"), "{}", lines[1]);
        assert!(lines[2].starts_with("web (collision)"));
        let seen = header.find("LAST SEEN").expect("column");
        let stale = header.find("STALE").expect("column");
        assert_eq!(lines[2][seen..stale].trim_end(), "3m 20s ago");
        assert_eq!(&lines[2][stale..], "no");
    }

    #[test]
    fn json_carries_every_field_and_the_collisions() {
        let d = Directory::new(
            vec![record(1, "a", 1_000), record(2, "a", 2_000)],
            vec![],
            5_000,
        );
        let json = serde_json::to_value(PeersJson::new(&d, 5_000)).expect("json");
        assert_eq!(json["nodes"][0]["node_id"], "0000000000000001");
        assert_eq!(json["nodes"][0]["address"], "fd00::1");
        assert_eq!(json["nodes"][1]["last_seen_seconds_ago"], 3);
        assert_eq!(json["nodes"][1]["name_collides"], true);
        assert_eq!(json["collisions"][0]["name"], "a");
        assert_eq!(
            json["collisions"][0]["node_ids"],
            serde_json::json!(["0000000000000001", "0000000000000002"])
        );
    }
}
