//! `ping` between namespaces, parsed into what the tests and the bench need.

use std::net::IpAddr;
use std::time::Duration;

use crate::command::{self, CommandError};
use crate::netns::Namespace;

#[derive(Debug, thiserror::Error)]
#[error("ping in {ns}: {source}")]
pub struct PingError {
    ns: String,
    source: CommandError,
}

#[derive(Debug, Clone, Default)]
pub struct PingReport {
    pub transmitted: u32,
    pub received: u32,
    /// Round-trip times of the replies, in milliseconds, in arrival order.
    pub rtts_ms: Vec<f64>,
    pub raw: String,
}

impl PingReport {
    pub fn percentile_ms(&self, p: f64) -> Option<f64> {
        let mut sorted = self.rtts_ms.clone();
        sorted.sort_by(f64::total_cmp);
        let rank = ((sorted.len().checked_sub(1)?) as f64 * p).round() as usize;
        sorted.get(rank).copied()
    }
}

/// Sends `count` echo requests `interval` apart and waits up to `deadline` in total for all
/// replies (`-w`: ping stops early once every reply arrived).
pub fn ping(
    from: &Namespace,
    to: IpAddr,
    count: u32,
    interval: Duration,
    deadline: Duration,
) -> Result<PingReport, PingError> {
    let mut cmd = from.command("ping");
    cmd.arg("-n")
        .args(["-c", &count.to_string()])
        .args(["-i", &format!("{:.3}", interval.as_secs_f64())])
        .args(["-w", &deadline.as_secs().max(1).to_string()])
        .arg(to.to_string());
    // ping exits 1 when replies are missing; the report says how many, so keep its output.
    let out = command::output(&mut cmd).map_err(|source| PingError {
        ns: from.name().to_owned(),
        source,
    })?;
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    Ok(parse(&raw))
}

fn parse(raw: &str) -> PingReport {
    let mut report = PingReport {
        raw: raw.to_owned(),
        ..PingReport::default()
    };
    for line in raw.lines() {
        if let Some(rtt) = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("time="))
            .and_then(|t| t.parse().ok())
        {
            report.rtts_ms.push(rtt);
        }
        if line.contains("packets transmitted") {
            let mut fields = line.split(',').map(str::trim);
            report.transmitted = leading_number(fields.next());
            report.received = leading_number(fields.next());
        }
    }
    report
}

fn leading_number(field: Option<&str>) -> u32 {
    field
        .and_then(|f| f.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_and_rtts_are_parsed() {
        let r = parse(
            "64 bytes from fd68::2: icmp_seq=1 ttl=64 time=12.5 ms\n\
             64 bytes from fd68::2: icmp_seq=2 ttl=64 time=10.1 ms\n\n\
             --- fd68::2 ping statistics ---\n\
             3 packets transmitted, 2 received, 33.3333% packet loss, time 2003ms\n",
        );
        assert_eq!((r.transmitted, r.received), (3, 2));
        assert_eq!(r.rtts_ms, vec![12.5, 10.1]);
        assert_eq!(r.percentile_ms(0.0), Some(10.1));
    }
}
