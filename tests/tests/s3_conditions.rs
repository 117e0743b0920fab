//! The test S3 server's emulated conditions, seen by aws-sdk-s3 as the agent sees them: latency
//! profiles delay every request by at least their minimum, injected 503/500 answers arrive as S3
//! errors, resets as failed dispatches, and a stall rule holds back exactly the GET bodies it
//! names. The server runs in-process on 127.0.0.1 (nothing leaves loopback). No upper bounds on
//! time are asserted: these are behaviours, not benchmarks.

use std::time::{Duration, Instant};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use hoshino_tests::s3_server::{
    BoundServer, ForbidRule, KeyMatch, LatencyProfile, ServerConditions, ServerConfig,
    ServerCounters, StallRule,
};
use hoshino_tests::scratch::ScratchDir;

const BUCKET: &str = "conditions";

struct Server {
    client: Client,
    counters: ServerCounters,
    task: tokio::task::JoinHandle<()>,
    _root: ScratchDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A server with `conditions` and a client that does not retry, so every injected fault shows.
async fn serve(conditions: ServerConditions) -> Server {
    let root = ScratchDir::create("s3-conditions").expect("scratch dir");
    std::fs::create_dir_all(root.path().join(BUCKET)).expect("bucket dir");
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().expect("address"),
        root: root.path().to_path_buf(),
        access_key: "hoshino".to_owned(),
        secret_key: "hoshino-secret".to_owned(),
        conditions,
    };
    let server = BoundServer::bind(&config).await.expect("bind");
    let addr = server.local_addr().expect("local address");
    let counters = server.counters();
    let task = tokio::spawn(async move {
        server.serve().await;
    });
    let s3 = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(format!("http://{addr}"))
        .force_path_style(true)
        .retry_config(RetryConfig::disabled())
        .credentials_provider(Credentials::new(
            "hoshino",
            "hoshino-secret",
            None,
            None,
            "s3-conditions-test",
        ))
        .build();
    Server {
        client: Client::from_conf(s3),
        counters,
        task,
        _root: root,
    }
}

async fn put(client: &Client, key: &str, body: &'static [u8]) {
    client
        .put_object()
        .bucket(BUCKET)
        .key(key)
        .body(ByteStream::from_static(body))
        .send()
        .await
        .unwrap_or_else(|e| panic!("PUT {key}: {e:?}"));
}

async fn get(client: &Client, key: &str) -> Vec<u8> {
    client
        .get_object()
        .bucket(BUCKET)
        .key(key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {key}: {e:?}"))
        .body
        .collect()
        .await
        .unwrap_or_else(|e| panic!("GET {key} body: {e:?}"))
        .to_vec()
}

async fn every_request_takes_at_least(profile: LatencyProfile) {
    let server = serve(ServerConditions {
        latency: profile,
        ..ServerConditions::default()
    })
    .await;
    let minimum = profile.model().minimum();
    for i in 0..5 {
        let key = format!("k{i}");
        let started = Instant::now();
        put(&server.client, &key, b"small object").await;
        assert!(started.elapsed() >= minimum, "{profile:?} PUT");
        let started = Instant::now();
        assert_eq!(get(&server.client, &key).await, b"small object");
        assert!(started.elapsed() >= minimum, "{profile:?} GET");
    }
    assert_eq!(server.counters.requests(), 10);
    assert!(server.counters.mean_added_latency() >= minimum);
}

#[tokio::test]
async fn express_profile_delays_every_request_by_at_least_its_minimum() {
    every_request_takes_at_least(LatencyProfile::Express).await;
}

#[tokio::test]
async fn standard_profile_delays_every_request_by_at_least_twenty_milliseconds() {
    assert_eq!(
        LatencyProfile::Standard.model().minimum(),
        Duration::from_millis(20)
    );
    every_request_takes_at_least(LatencyProfile::Standard).await;
}

#[tokio::test]
async fn injected_slow_down_and_internal_error_reach_aws_sdk_as_s3_errors() {
    for (conditions, status, code) in [
        (
            ServerConditions {
                slow_down_fraction: 1.0,
                ..ServerConditions::default()
            },
            503,
            "SlowDown",
        ),
        (
            ServerConditions {
                internal_error_fraction: 1.0,
                ..ServerConditions::default()
            },
            500,
            "InternalError",
        ),
    ] {
        let server = serve(conditions).await;
        let result = server
            .client
            .put_object()
            .bucket(BUCKET)
            .key("k")
            .body(ByteStream::from_static(b"x"))
            .send()
            .await;
        match result {
            Err(SdkError::ServiceError(e)) => {
                assert_eq!(e.raw().status().as_u16(), status);
                assert_eq!(e.err().code(), Some(code));
            }
            other => panic!("expected HTTP {status} {code}, got {other:?}"),
        }
        assert_eq!(server.counters.faults_injected(), 1);
    }
}

#[tokio::test]
async fn injected_reset_fails_the_request_without_an_answer() {
    let server = serve(ServerConditions {
        reset_fraction: 1.0,
        ..ServerConditions::default()
    })
    .await;
    let result = server
        .client
        .get_object()
        .bucket(BUCKET)
        .key("k")
        .send()
        .await;
    match result {
        Err(SdkError::DispatchFailure(_) | SdkError::ResponseError(_)) => {}
        other => panic!("expected a connection failure, got {other:?}"),
    }
    assert_eq!(server.counters.faults_injected(), 1);
}

#[tokio::test]
async fn a_stalled_get_body_arrives_only_after_the_stall_and_only_for_its_prefix() {
    let stall = Duration::from_millis(1500);
    let server = serve(ServerConditions {
        stall: Some(StallRule {
            keys: KeyMatch {
                prefix: "slow/".to_owned(),
                sender: None,
            },
            duration: stall,
            count: Some(1),
        }),
        ..ServerConditions::default()
    })
    .await;
    put(&server.client, "slow/a", b"held back").await;
    put(&server.client, "fast/b", b"served").await;

    let started = Instant::now();
    let response = server
        .client
        .get_object()
        .bucket(BUCKET)
        .key("slow/a")
        .send()
        .await
        .expect("the headers of a stalled GET arrive");
    assert_eq!(response.content_length(), Some(9));
    let body = response
        .body
        .collect()
        .await
        .expect("stalled body")
        .to_vec();
    assert!(
        started.elapsed() >= stall,
        "body came before the stall ended"
    );
    assert_eq!(body, b"held back");
    assert_eq!(server.counters.gets_stalled(), 1);

    // Another prefix, and the same key once the rule's count is used up, are not stalled.
    assert_eq!(get(&server.client, "fast/b").await, b"served");
    assert_eq!(get(&server.client, "slow/a").await, b"held back");
    assert_eq!(server.counters.gets_stalled(), 1);
}

#[tokio::test]
async fn a_forbidden_get_is_answered_access_denied_for_its_count_then_served() {
    let sender = "00000000000000aa";
    let mine = format!("v2/inbox/00000000000000bb/0000000000000001-0000000000000000.{sender}");
    let other = "v2/inbox/00000000000000bb/0000000000000002-0000000000000000.00000000000000cc";
    let server = serve(ServerConditions {
        forbid: Some(ForbidRule {
            keys: KeyMatch {
                prefix: "v2/inbox/".to_owned(),
                sender: Some(sender.to_owned()),
            },
            count: Some(2),
        }),
        ..ServerConditions::default()
    })
    .await;
    put(&server.client, &mine, b"for b from a").await;
    put(&server.client, other, b"for b from c").await;

    for attempt in 0..2 {
        let result = server
            .client
            .get_object()
            .bucket(BUCKET)
            .key(&mine)
            .send()
            .await;
        match result {
            Err(SdkError::ServiceError(e)) => {
                assert_eq!(e.raw().status().as_u16(), 403, "attempt {attempt}");
                assert_eq!(e.err().code(), Some("AccessDenied"), "attempt {attempt}");
            }
            other => panic!("attempt {attempt}: expected 403 AccessDenied, got {other:?}"),
        }
    }
    // Another sender's key is never forbidden; the forbidden key is served once the count is
    // used up.
    assert_eq!(get(&server.client, other).await, b"for b from c");
    assert_eq!(get(&server.client, &mine).await, b"for b from a");
    assert_eq!(server.counters.gets_forbidden(), 2);
}
