//! A SIGHUP reload of a 16,000-prefix policy while a user keeps fetching through the metadata
//! proxy: every diverted request is answered (the maps are filled on a blocking thread, without
//! the locks of the per-packet divert path), and the new policy takes effect. In namespaces the
//! test creates, against the fake metadata server; needs root.

mod interceptor_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use interceptor_support::*;

const PREFIXES: u32 = 16_000;
/// A host inside one of the listed networks, behind the metadata namespace.
const LISTED_HOST: &str = "198.18.5.1";

/// The example metadata policy plus a rule dropping 16,000 /29 networks from 198.18.0.0.
fn large_policy(base: &str) -> String {
    let mut text = base.to_string();
    text.push_str("\n[[rule]]\nname = \"benchmark-nets\"\naction = \"drop\"\ndst = [\n");
    for i in 0..PREFIXES {
        let base = u32::from(std::net::Ipv4Addr::new(198, 18, 0, 0)) + i * 8;
        text.push_str(&format!("  \"{}/29\",\n", std::net::Ipv4Addr::from(base)));
    }
    text.push_str("]\n");
    text
}

#[test]
fn reloading_a_16000_prefix_policy_keeps_every_diverted_request_answered() {
    let bed = MetadataBed::new();
    bed.imds
        .ip(&["addr", "add", &format!("{LISTED_HOST}/32"), "dev", "lo"])
        .expect("addr");
    bed.client
        .ip(&["route", "add", "198.18.5.0/24", "via", SERVER_V4])
        .expect("route");
    let policy = bed.policy_copy(&example_policy("metadata.toml"), "policy.toml");
    let mut agent = bed.attach(&policy, &[]);
    bed.client
        .run("ping", &["-c", "1", "-W", "2", LISTED_HOST])
        .expect("reachable under the small policy");

    let base = std::fs::read_to_string(&policy).expect("read policy");
    std::fs::write(&policy, large_policy(&base)).expect("write the large policy");

    let url = format!("http://{IMDS_V4}/latest/meta-data/instance-id");
    let stop = Arc::new(AtomicBool::new(false));
    let fetches = std::thread::scope(|scope| {
        let client = scope.spawn(|| {
            let mut fetches = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                fetches.push(bed.fetch(Some(1000), &url));
            }
            fetches
        });
        // Some requests before the signal, so the client is mid-stream when the reload runs.
        std::thread::sleep(Duration::from_millis(300));
        let signalled = Instant::now();
        agent.signal(libc::SIGHUP);
        agent.wait_for_log("policy reloaded", 1, Duration::from_secs(60));
        let reload_took = signalled.elapsed();
        // And some after it.
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        let fetches = client.join().expect("client thread");
        eprintln!(
            "{} diverted requests during a reload that took {reload_took:?} (signal to log line)",
            fetches.len()
        );
        fetches
    });
    let log = agent.log_text();
    assert!(fetches.len() >= 3, "the client kept fetching: {fetches:?}");
    for f in &fetches {
        assert!(f.ok(), "every diverted request is answered: {f:?}\n{log}");
        assert_eq!(f.body, INSTANCE_ID, "{f:?}");
    }
    assert!(
        log.contains("rules=4"),
        "the reload installed all rules:\n{log}"
    );
    assert!(
        bed.client
            .run("ping", &["-c", "1", "-W", "1", LISTED_HOST])
            .is_err(),
        "the new policy drops the listed networks"
    );
    let f = bed.fetch(Some(1000), &url);
    assert!(f.ok(), "the metadata rules still hold: {f:?}");
}
