//! `hoshino-agent status`: asks the running agent through its control socket
//! (`<state dir>/control.sock`) and prints a summary, or `--json`.

use std::process::ExitCode;

use clap::Args;
use hoshino_agent::control::report::StatusReport;
use hoshino_agent::control::socket::query;
use hoshino_agent::directory::unix_millis_now;

use super::tunnel::StateArgs;
use super::{EXIT_RUNTIME, columns};

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub state: StateArgs,
    /// Print JSON instead of a summary.
    #[arg(long, env = "HOSHINO_JSON", num_args = 0..=1, default_value_t = false,
          default_missing_value = "true", value_name = "BOOL")]
    pub json: bool,
}

pub async fn run(args: &StatusArgs) -> ExitCode {
    let report = match query(&args.state.state_dir).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hoshino-agent status: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("hoshino-agent status: cannot render JSON: {e}");
                return ExitCode::from(EXIT_RUNTIME);
            }
        }
    } else {
        print!("{}", summary(&report, unix_millis_now()));
    }
    ExitCode::SUCCESS
}

/// The human summary: who, state, S3 figures, then a PEER table.
pub fn summary(r: &StatusReport, now: u64) -> String {
    let mut out = format!(
        "name:      {}\naddress:   {}\nversion:   {}\ntunnel:    {} ({}), up {}\ns3:        {} requests, {:.2}/s over the last minute, ~${:.6} so far\n",
        r.name,
        r.address,
        r.agent_version,
        r.tunnel,
        r.mode,
        humantime::format_duration(std::time::Duration::from_secs(r.uptime_seconds)),
        r.s3_requests_total,
        r.s3_requests_per_second,
        r.estimated_dollars,
    );
    match &r.last_s3_error {
        Some(e) => out.push_str(&format!(
            "last error: {} ago: {}\n",
            humantime::format_duration(std::time::Duration::from_secs(
                now.saturating_sub(e.at_unix_ms) / 1000
            )),
            e.message
        )),
        None => out.push_str("last error: none\n"),
    }
    let mut rows = vec![[
        "PEER".to_string(),
        "SENT PKTS".into(),
        "SENT BYTES".into(),
        "RECV PKTS".into(),
        "RECV BYTES".into(),
        "LAST HEARD".into(),
    ]];
    for p in &r.peers {
        rows.push([
            p.address.to_string(),
            p.sent_packets.to_string(),
            p.sent_bytes.to_string(),
            p.received_packets.to_string(),
            p.received_bytes.to_string(),
            p.last_heard_unix_ms.map_or("never".into(), |t| {
                format!(
                    "{} ago",
                    humantime::format_duration(std::time::Duration::from_secs(
                        now.saturating_sub(t) / 1000
                    ))
                )
            }),
        ]);
    }
    out.push_str(&columns::aligned(&rows));
    out
}
