//! Driving `hoshino-netprobe udp-recv` from a test: start it, wait until it is bound, read the
//! sequence numbers it received.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};

use crate::process::Spawned;

/// Spawns a receiver that prints `listening` once bound, and waits for that line.
pub fn spawn_listening(mut cmd: Command, name: &str) -> (Spawned, BufReader<ChildStdout>) {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child: Child = cmd.spawn().expect("spawn receiver");
    let stdout = child.stdout.take().expect("stdout piped");
    let mut reader = BufReader::new(stdout);
    let mut first = String::new();
    reader.read_line(&mut first).expect("read receiver output");
    assert_eq!(first.trim(), "listening", "{name} did not start");
    (Spawned::new(name, child), reader)
}

/// Reads `seq N` lines until `done`.
pub fn read_seqs(reader: &mut BufReader<ChildStdout>) -> Vec<u64> {
    let mut seqs = Vec::new();
    for line in reader.lines() {
        let Ok(line) = line else { break };
        if line.starts_with("done") {
            break;
        }
        if let Some(n) = line.strip_prefix("seq ").and_then(|n| n.parse().ok()) {
            seqs.push(n);
        }
    }
    seqs
}
