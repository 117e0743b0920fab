//! The testbed itself: namespaces come and go, nodes reach the hub, both S3 servers serve a node,
//! the fault injector really answers SlowDown, and the server flags apply a latency profile.
//! Needs root (network namespaces).

use std::process::Command;
use std::time::Duration;

use hoshino_tests::command;
use hoshino_tests::ping::ping;
use hoshino_tests::s3_backend::{BackendKind, BackendOptions};
use hoshino_tests::s3_server::{LatencyProfile, ServerConditions};
use hoshino_tests::topology::{HUB_IPV4, Testbed};
use hoshino_tests::tunnel_net::{NetOptions, TunnelNet};

fn netns_list() -> String {
    command::run(Command::new("ip").args(["netns", "list"])).unwrap_or_default()
}

#[test]
fn namespaces_are_deleted_when_the_testbed_is_dropped() {
    let bed = Testbed::new(2).expect("testbed");
    let names: Vec<String> = std::iter::once(bed.hub.name().to_owned())
        .chain(bed.nodes.iter().map(|n| n.ns.name().to_owned()))
        .collect();
    let listed = netns_list();
    assert!(
        names.iter().all(|n| listed.contains(n.as_str())),
        "{listed}"
    );
    drop(bed);
    let listed = netns_list();
    assert!(
        names.iter().all(|n| !listed.contains(n.as_str())),
        "{listed}"
    );
}

#[test]
fn namespaces_are_deleted_even_when_a_test_panics() {
    let names = std::sync::Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(|| {
        let bed = Testbed::new(1).expect("testbed");
        if let Ok(mut n) = names.lock() {
            n.push(bed.hub.name().to_owned());
            n.push(bed.nodes[0].ns.name().to_owned());
        }
        panic!("deliberate");
    });
    assert!(result.is_err());
    let listed = netns_list();
    let names = names.lock().map(|n| n.clone()).unwrap_or_default();
    assert_eq!(names.len(), 2);
    assert!(
        names.iter().all(|n| !listed.contains(n.as_str())),
        "{listed}"
    );
}

#[test]
fn nodes_have_distinct_machine_ids_and_reach_the_hub() {
    let bed = Testbed::new(2).expect("testbed");
    assert_ne!(bed.nodes[0].machine_id, bed.nodes[1].machine_id);
    assert_ne!(bed.nodes[0].tunnel_addr, bed.nodes[1].tunnel_addr);
    for node in &bed.nodes {
        let report = ping(
            &node.ns,
            HUB_IPV4.into(),
            2,
            Duration::from_millis(200),
            Duration::from_secs(10),
        )
        .expect("ping");
        assert!(report.unanswered(2).is_empty(), "{}", report.raw);
    }
}

fn server_serves_put_and_list_from_a_node(kind: BackendKind) {
    let net = TunnelNet::without_agents(kind, 1, &NetOptions::default()).expect("testbed");
    net.put_object(1, "v1/inbox/probe/a", b"hello")
        .expect("put");
    net.put_object(1, "v1/inbox/probe/b", b"world")
        .expect("put");
    let keys = net.list_keys(1, "v1/inbox/probe/").expect("list");
    assert_eq!(keys, vec!["v1/inbox/probe/a", "v1/inbox/probe/b"]);
}

#[test]
fn s3s_fs_server_serves_put_and_list_from_a_node() {
    server_serves_put_and_list_from_a_node(BackendKind::S3sFs);
}

#[test]
fn moto_server_serves_put_and_list_from_a_node() {
    server_serves_put_and_list_from_a_node(BackendKind::Moto);
}

#[test]
fn fault_injector_answers_slowdown() {
    let options = NetOptions {
        backend: BackendOptions {
            fault_fraction: 1.0,
        },
        ..NetOptions::default()
    };
    let net = TunnelNet::without_agents(BackendKind::S3sFs, 1, &options).expect("testbed");
    let err = net
        .put_object(1, "v1/inbox/probe/a", b"hello")
        .expect_err("every request fails");
    assert!(err.to_string().contains("SlowDown"), "{err}");
}

#[test]
fn server_flags_apply_the_latency_profile_to_requests_from_a_node() {
    let options = NetOptions {
        server: ServerConditions {
            latency: LatencyProfile::Standard,
            ..ServerConditions::default()
        },
        ..NetOptions::default()
    };
    let net = TunnelNet::without_agents(BackendKind::S3sFs, 1, &options).expect("testbed");
    let out = net
        .s3_probe(1, &["floor", "--samples", "3", "--size", "16"])
        .expect("floor probe");
    let minimum = LatencyProfile::Standard.model().minimum().as_secs_f64() * 1000.0;
    for field in ["put_p50_ms", "get_p50_ms"] {
        let ms: f64 = out
            .lines()
            .find_map(|l| l.strip_prefix(field)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in {out}"));
        assert!(
            ms >= minimum,
            "{field} {ms} ms < the profile's {minimum} ms"
        );
    }
}

#[test]
fn moto_refuses_emulated_conditions_it_cannot_provide() {
    let options = NetOptions {
        server: ServerConditions {
            latency: LatencyProfile::Express,
            ..ServerConditions::default()
        },
        ..NetOptions::default()
    };
    let err = TunnelNet::without_agents(BackendKind::Moto, 1, &options)
        .expect_err("moto cannot add latency");
    assert!(
        err.to_string().contains("only available with the s3s-fs"),
        "{err}"
    );
}
