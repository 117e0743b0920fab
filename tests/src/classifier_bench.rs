//! The classifier's cost on traffic it does not match: iperf3 TCP throughput over a veth pair
//! between two namespaces with (a) no program, (b) `hoshino-agent attach` with a 1,000-prefix
//! policy, (c) an nftables ruleset in the sender's namespace doing the same matching (per rule,
//! an IPv4 and an IPv6 interval set of its prefixes, `drop` on a hit). Configurations are
//! interleaved round by round in rotating order and the median of each is reported, so drift on
//! a shared machine hits all three alike. Nothing here touches the host namespace.

use std::fs::File;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::binaries;
use crate::command;
use crate::netns::Namespace;
use crate::process::Spawned;
use crate::scratch::ScratchDir;

const SENDER: &str = "10.233.0.1";
const RECEIVER: &str = "10.233.0.2";

/// Median throughputs in bits per second.
#[derive(Debug, Clone, Copy)]
pub struct ClassifierFigures {
    pub prefixes: usize,
    pub rules: usize,
    pub no_program_bps: f64,
    pub classifier_bps: f64,
    pub nftables_bps: f64,
}

impl ClassifierFigures {
    pub fn print(&self) {
        let g = |bps: f64| bps / 1e9;
        println!(
            "\nNon-matching TCP over veth (iperf3), {} prefixes in {} rules, median of rounds",
            self.prefixes, self.rules
        );
        println!(
            "  no program               {:.2} Gbit/s",
            g(self.no_program_bps)
        );
        println!(
            "  hoshino classifier (TCX) {:.2} Gbit/s",
            g(self.classifier_bps)
        );
        println!(
            "  nftables, same matching  {:.2} Gbit/s",
            g(self.nftables_bps)
        );
        println!(
            "  classifier / no program = {:.3}x  (target >= 0.97x)",
            self.classifier_bps / self.no_program_bps
        );
        println!(
            "  nftables / no program   = {:.3}x",
            self.nftables_bps / self.no_program_bps
        );
        println!(
            "  classifier / nftables   = {:.3}x",
            self.classifier_bps / self.nftables_bps
        );
    }
}

/// The destination prefixes of each rule of a policy file, read leniently (the agent validates
/// the same file when it attaches): every quoted `ADDR/LEN` inside a rule's `dst = [...]`.
pub fn rule_prefixes(policy_text: &str) -> Vec<(String, Vec<String>)> {
    let mut rules: Vec<(String, Vec<String>)> = Vec::new();
    let mut in_dst = false;
    for line in policy_text.lines() {
        let line = line.trim();
        if line == "[[rule]]" {
            rules.push((format!("rule{}", rules.len()), Vec::new()));
            in_dst = false;
            continue;
        }
        if let Some(rest) = line.strip_prefix("name")
            && let (Some(rule), Some(name)) = (rules.last_mut(), rest.split('"').nth(1))
        {
            rule.0 = name.to_string();
        }
        if line.starts_with("dst") {
            in_dst = true;
        }
        if in_dst {
            if let Some(rule) = rules.last_mut() {
                rule.1.extend(
                    line.split('"')
                        .skip(1)
                        .step_by(2)
                        .filter(|s| s.contains('/'))
                        .map(str::to_string),
                );
            }
            if line.contains(']') {
                in_dst = false;
            }
        }
    }
    rules
}

/// An nftables ruleset (table `inet hoshino_bench`) equivalent to the policy's drop rules.
pub fn nft_ruleset(rules: &[(String, Vec<String>)]) -> String {
    let mut sets = String::new();
    let mut chain = String::new();
    for (i, (_, prefixes)) in rules.iter().enumerate() {
        let (v6, v4): (Vec<&String>, Vec<&String>) = prefixes.iter().partition(|p| p.contains(':'));
        for (family, kind, list) in [("ip", "ipv4_addr", v4), ("ip6", "ipv6_addr", v6)] {
            if list.is_empty() {
                continue;
            }
            let elements: Vec<&str> = list.iter().map(|s| s.as_str()).collect();
            sets.push_str(&format!(
                "  set r{i}_{family} {{ type {kind}; flags interval; elements = {{ {} }} }}\n",
                elements.join(", ")
            ));
            chain.push_str(&format!("    {family} daddr @r{i}_{family} drop\n"));
        }
    }
    format!(
        "table inet hoshino_bench {{\n{sets}  chain out {{\n    type filter hook output priority 0; policy accept;\n{chain}  }}\n}}\n"
    )
}

/// Two namespaces joined by a veth pair (`eth0` on both sides).
struct Pair {
    receiver_server: Option<Spawned>,
    sender: Namespace,
    receiver: Namespace,
    scratch: ScratchDir,
    pins: crate::bpffs::PinRoot,
}

impl Pair {
    fn new() -> anyhow::Result<Self> {
        let scratch = ScratchDir::create("clsbench")?;
        let sender = Namespace::create("cbs")?;
        let receiver = Namespace::create("cbr")?;
        sender.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            receiver.name(),
        ])?;
        for (ns, addr) in [(&sender, SENDER), (&receiver, RECEIVER)] {
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
        }
        let child = receiver
            .command("iperf3")
            .args(["-s", "-B", RECEIVER])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 -s")?;
        let pair = Self {
            receiver_server: Some(Spawned::new("iperf3 -s", child)),
            sender,
            receiver,
            scratch,
            pins: crate::bpffs::PinRoot::create("bench")?,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while command::output(
            pair.sender
                .command("iperf3")
                .args(["-c", RECEIVER, "-t", "1"]),
        )
        .map(|o| !o.status.success())
        .unwrap_or(true)
        {
            if Instant::now() > deadline {
                bail!("iperf3 server in {} did not come up", pair.receiver.name());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(pair)
    }

    /// Bits per second received in one `iperf3 -c` run of `seconds`.
    fn iperf(&self, seconds: u32) -> anyhow::Result<f64> {
        let out = command::run(self.sender.command("iperf3").args([
            "-c",
            RECEIVER,
            "-t",
            &seconds.to_string(),
            "-J",
        ]))?;
        received_bps(&out).with_context(|| format!("no sum_received in iperf3 output:\n{out}"))
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.receiver_server.take();
    }
}

/// `end.sum_received.bits_per_second` from `iperf3 -J` output.
fn received_bps(json: &str) -> Option<f64> {
    let rest = json.get(json.find("\"sum_received\"")?..)?;
    let rest = rest.get(rest.find("\"bits_per_second\"")? + "\"bits_per_second\"".len()..)?;
    let value = rest.trim_start().strip_prefix(':')?.trim_start();
    let end = value.find(|c: char| {
        !(c.is_ascii_digit() || c == '.' || c == 'e' || c == 'E' || c == '+' || c == '-')
    })?;
    value.get(..end)?.parse().ok()
}

/// Runs `rounds` interleaved rounds of the three configurations, `seconds` each.
pub fn run(policy: &Path, rounds: u32, seconds: u32) -> anyhow::Result<ClassifierFigures> {
    let text =
        std::fs::read_to_string(policy).with_context(|| format!("reading {}", policy.display()))?;
    let rules = rule_prefixes(&text);
    let prefixes = rules.iter().map(|r| r.1.len()).sum();
    let ruleset = nft_ruleset(&rules);
    let pair = Pair::new()?;
    let nft_file = pair.scratch.path().join("ruleset.nft");
    std::fs::write(&nft_file, &ruleset)?;
    let agent_bin = binaries::agent()?;

    // [no program, classifier, nftables]; the order rotates each round so that whatever drifts
    // within a round (CPU frequency, neighbours on a shared machine) does not favour one.
    let mut samples: [Vec<f64>; 3] = Default::default();
    for round in 0..rounds {
        for k in 0..3 {
            let config = (round as usize + k) % 3;
            let bps = match config {
                0 => pair.iperf(seconds)?,
                1 => {
                    let mut agent = attach(&pair, &agent_bin, policy, round)?;
                    let bps = pair.iperf(seconds);
                    agent.terminate(Duration::from_secs(10))?;
                    bps?
                }
                _ => {
                    pair.sender
                        .run("nft", &["-f", &nft_file.to_string_lossy()])?;
                    let bps = pair.iperf(seconds);
                    pair.sender
                        .run("nft", &["delete", "table", "inet", "hoshino_bench"])?;
                    bps?
                }
            };
            if let Some(list) = samples.get_mut(config) {
                list.push(bps);
            }
        }
    }
    let [mut none, mut classifier, mut nft] = samples;
    Ok(ClassifierFigures {
        prefixes,
        rules: rules.len(),
        no_program_bps: median(&mut none),
        classifier_bps: median(&mut classifier),
        nftables_bps: median(&mut nft),
    })
}

/// Starts `hoshino-agent attach` in the sender namespace and waits until it is attached.
fn attach(pair: &Pair, agent_bin: &Path, policy: &Path, round: u32) -> anyhow::Result<Spawned> {
    let log_path = pair.scratch.path().join(format!("agent-{round}.log"));
    let log = File::create(&log_path)?;
    let child = pair
        .sender
        .command(agent_bin)
        .args(["attach", "--interface", "eth0", "--policy"])
        .arg(policy)
        // Each round measures its own configuration: the classifier goes with the agent.
        .arg("--detach-on-exit")
        .arg("--pin-dir")
        .arg(pair.pins.path())
        .env("RUST_LOG", "info")
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting hoshino-agent attach")?;
    let mut agent = Spawned::new("hoshino-agent attach", child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log_path)
        .unwrap_or_default()
        .contains("interceptor attached")
    {
        if agent.try_status().is_some() || Instant::now() > deadline {
            bail!(
                "agent did not attach:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(agent)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_read_per_rule_and_become_nft_sets() {
        let text = "default = \"pass\"\n[[rule]]\nname = \"a\"\naction = \"drop\"\ndst = [\n  \"198.18.0.0/24\",\n  \"2001:db8::/64\",\n]\n[[rule]]\nname = \"b\"\ndst = [\"10.0.0.0/8\"]\naction = \"drop\"\n";
        let rules = rule_prefixes(text);
        assert_eq!(
            rules,
            vec![
                (
                    "a".to_string(),
                    vec!["198.18.0.0/24".to_string(), "2001:db8::/64".to_string()]
                ),
                ("b".to_string(), vec!["10.0.0.0/8".to_string()]),
            ]
        );
        let nft = nft_ruleset(&rules);
        assert!(nft.contains(
            "set r0_ip { type ipv4_addr; flags interval; elements = { 198.18.0.0/24 } }"
        ));
        assert!(nft.contains("ip6 daddr @r0_ip6 drop"));
        assert!(nft.contains("ip daddr @r1_ip drop"));
    }

    #[test]
    fn iperf_json_received_rate_is_found() {
        let json = r#"{"end":{"sum_sent":{"bits_per_second":2.0e9},"sum_received":{"seconds":4,"bits_per_second":1234567890.5,"x":1}}}"#;
        assert_eq!(received_bps(json), Some(1_234_567_890.5));
        assert_eq!(received_bps("{}"), None);
    }
}
