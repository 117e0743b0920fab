//! A SIGHUP reload of a 16,000-prefix policy runs off the async runtime and without the divert
//! path's lock: on a single-threaded runtime (where a reload filling maps on the worker would
//! stop everything else) other tasks keep running and keep reading the policy sets while the
//! maps are filled. Loads the real classifier (needs root: CAP_BPF); touches no network.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use hoshino_agent::interceptor::divert::service::PolicySets;
use hoshino_agent::interceptor::reload::PolicyReload;
use hoshino_agent::interceptor::{Classifier, ClassifierOptions};
use hoshino_agent::policy;

const PREFIXES: u32 = 16_000;

fn large_policy() -> String {
    let mut text = String::from(
        "default = \"pass\"\n[[rule]]\nname = \"imds\"\ndst = [\"169.254.169.254/32\"]\nprotocol = \"tcp\"\ndport = 80\naction = \"divert\"\n[rule.http]\ndefault = \"allow\"\n\n[[rule]]\nname = \"nets\"\naction = \"drop\"\ndst = [\n",
    );
    for i in 0..PREFIXES {
        let base = u32::from(std::net::Ipv4Addr::new(198, 18, 0, 0)) + i * 8;
        text.push_str(&format!("  \"{}/29\",\n", std::net::Ipv4Addr::from(base)));
    }
    text.push_str("]\n");
    text
}

#[tokio::test(flavor = "current_thread")]
async fn a_large_reload_leaves_the_runtime_and_the_divert_policy_lock_free() {
    let dir = std::env::temp_dir().join(format!("hoshino-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let path = dir.join("policy.toml");
    std::fs::write(
        &path,
        "default = \"pass\"\n[[rule]]\nname = \"imds\"\ndst = [\"169.254.169.254/32\"]\naction = \"divert\"\n",
    )
    .expect("small policy");
    let options = ClassifierOptions {
        tunnel_ifindex: 0,
        divert_ifindex: 1,
        reinject_mark: 0x4853,
        log_verdicts: false,
    };
    let mut classifier = Classifier::load(&options).expect("load the classifier (root?)");
    let small = Arc::new(policy::load(&path).expect("small policy compiles"));
    classifier
        .install(&small)
        .expect("install the small policy");
    let policies = Arc::new(RwLock::new(PolicySets::default()));
    policies
        .write()
        .expect("policy sets")
        .set(classifier.active_set(), small);
    let classifier = Arc::new(Mutex::new(classifier));

    std::fs::write(&path, large_policy()).expect("large policy");
    let reloading = Arc::new(AtomicBool::new(false));
    let reads_during_reload = Arc::new(AtomicU32::new(0));
    // Stands in for the divert loop: it runs on the same (only) worker and reads the policy
    // sets, as the per-packet path does for each new flow.
    let divert = {
        let (reloading, reads, policies) = (
            reloading.clone(),
            reads_during_reload.clone(),
            policies.clone(),
        );
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(1)).await;
                if reloading.load(Ordering::SeqCst) && policies.try_read().is_ok() {
                    reads.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };
    reloading.store(true, Ordering::SeqCst);
    PolicyReload {
        path: path.clone(),
        tunnel_running: false,
        classifier: classifier.clone(),
        policies: policies.clone(),
    }
    .run()
    .await;
    reloading.store(false, Ordering::SeqCst);
    divert.abort();

    let reads = reads_during_reload.load(Ordering::SeqCst);
    assert!(
        reads > 0,
        "the divert stand-in never ran or never got the policy lock during the reload"
    );
    let active = classifier.lock().expect("classifier").active_set();
    let sets = policies.read().expect("policy sets");
    let installed = sets
        .policy(active)
        .expect("the new set's policy is recorded");
    assert_eq!(installed.rules.len(), 2, "the large policy is active");
    assert!(
        installed.dst_v4.entries.len() >= PREFIXES as usize,
        "{} entries",
        installed.dst_v4.entries.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
