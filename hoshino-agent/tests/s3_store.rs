//! `s3::S3Store` against a real S3 API over HTTP: s3s-fs in-process on loopback, with a fault
//! injector answering the first requests with 503 SlowDown.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aws_sdk_s3::config::{Credentials, Region};
use bytes::Bytes;
use hoshino_agent::edge::s3::{Lookup, S3Error, S3Settings, S3Store as Store, configure};
use hoshino_agent::metrics::{Metrics, S3Op};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::{S3Service, S3ServiceBuilder};

const BUCKET: &str = "hsnet";

#[derive(Clone)]
struct Faulty {
    inner: S3Service,
    fail_next: Arc<AtomicUsize>,
    /// Answer the next N requests 403 AccessDenied, as AWS does for a missing key when the
    /// caller lacks s3:ListBucket on it.
    forbid_next: Arc<AtomicUsize>,
}

impl hyper::service::Service<hyper::Request<Incoming>> for Faulty {
    type Response = s3s::HttpResponse;
    type Error = s3s::HttpError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn call(&self, req: hyper::Request<Incoming>) -> Self::Future {
        let fail = self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            return Box::pin(async {
                let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code><Message>injected</Message></Error>";
                let mut resp = s3s::HttpResponse::new(s3s::Body::from(body.to_string()));
                *resp.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                Ok(resp)
            });
        }
        let forbid = self
            .forbid_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if forbid {
            return Box::pin(async {
                let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>";
                let mut resp = s3s::HttpResponse::new(s3s::Body::from(body.to_string()));
                *resp.status_mut() = hyper::StatusCode::FORBIDDEN;
                Ok(resp)
            });
        }
        hyper::service::Service::call(&self.inner, req)
    }
}

struct Server {
    store: Store,
    metrics: Arc<Metrics>,
    fail_next: Arc<AtomicUsize>,
    forbid_next: Arc<AtomicUsize>,
    _root: TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn server() -> Server {
    static N: AtomicUsize = AtomicUsize::new(0);
    let root = std::env::temp_dir().join(format!(
        "hoshino-agent-s3-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(root.join(BUCKET)).unwrap();
    let fs = s3s_fs::FileSystem::new(&root).unwrap();
    let mut builder = S3ServiceBuilder::new(fs);
    builder.set_auth(SimpleAuth::from_single("ak", "sk"));
    let fail_next = Arc::new(AtomicUsize::new(0));
    let forbid_next = Arc::new(AtomicUsize::new(0));
    let service = Faulty {
        inner: builder.build(),
        fail_next: fail_next.clone(),
        forbid_next: forbid_next.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let http = ConnBuilder::new(TokioExecutor::new());
        while let Ok((socket, _)) = listener.accept().await {
            let conn = http
                .serve_connection(TokioIo::new(socket), service.clone())
                .into_owned();
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
    });
    let mut settings = S3Settings::new(BUCKET);
    settings.endpoint_url = Some(format!("http://{addr}"));
    settings.path_style = true;
    settings.attempt_timeout = Duration::from_secs(5);
    let conf = configure(
        aws_sdk_s3::config::Builder::new()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("ak", "sk", None, None, "test")),
        &settings,
    );
    let metrics = Arc::new(Metrics::default());
    let store = Store::with_settings(
        aws_sdk_s3::Client::from_conf(conf.build()),
        &settings,
        metrics.clone(),
    );
    Server {
        store,
        metrics,
        fail_next,
        forbid_next,
        _root: TempDir(root),
        task,
    }
}

#[tokio::test]
async fn put_list_get_head_delete_round_trip() {
    let s = server().await;
    let st = &s.store;
    st.put("v1/inbox/b/02.a", Bytes::from_static(b"two"))
        .await
        .unwrap();
    st.put("v1/inbox/b/01.a", Bytes::from_static(b"one"))
        .await
        .unwrap();
    let listing = st.list("v1/inbox/b/", None).await.unwrap();
    let keys: Vec<&str> = listing.objects.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(keys, ["v1/inbox/b/01.a", "v1/inbox/b/02.a"]);
    assert_eq!(listing.objects[0].size, 3);
    assert_eq!(
        st.get("v1/inbox/b/01.a", 1024, Lookup::Known)
            .await
            .unwrap()
            .as_deref(),
        Some(&b"one"[..])
    );
    assert!(st.head("v1/inbox/b/01.a").await.unwrap().is_some());
    st.delete("v1/inbox/b/01.a").await.unwrap();
    assert_eq!(
        st.get("v1/inbox/b/01.a", 1024, Lookup::Known)
            .await
            .unwrap(),
        None
    );
    assert_eq!(st.head("v1/inbox/b/01.a").await.unwrap(), None);
    assert_eq!(s.metrics.s3_requests(S3Op::Put), 2);
    assert_eq!(s.metrics.s3_requests(S3Op::Delete), 1);
    let text = s.metrics.render();
    assert!(
        text.contains("hoshino_s3_errors_total{op=\"get\"} 0"),
        "missing object is not an error"
    );
}

#[tokio::test]
async fn doorbell_etag_changes_on_each_ring() {
    let s = server().await;
    assert_eq!(s.store.head("v1/bell/b").await.unwrap(), None);
    s.store
        .put("v1/bell/b", Bytes::from(ulid::Ulid::new().to_string()))
        .await
        .unwrap();
    let first = s.store.head("v1/bell/b").await.unwrap();
    s.store
        .put("v1/bell/b", Bytes::from(ulid::Ulid::new().to_string()))
        .await
        .unwrap();
    let second = s.store.head("v1/bell/b").await.unwrap();
    assert!(first.is_some());
    assert_ne!(first, second);
}

#[tokio::test]
async fn slow_down_is_retried_with_backoff() {
    let s = server().await;
    s.fail_next.store(2, Ordering::SeqCst);
    s.store
        .put("v1/inbox/b/x.a", Bytes::from_static(b"x"))
        .await
        .unwrap();
    assert_eq!(
        s.fail_next.load(Ordering::SeqCst),
        0,
        "both faults were hit"
    );
    assert_eq!(
        s.metrics.s3_requests(S3Op::Put),
        3,
        "every attempt is counted, as AWS bills them"
    );
    assert!(
        s.metrics
            .render()
            .contains("hoshino_s3_errors_total{op=\"put\"} 2"),
        "the two failed attempts are errors"
    );
}

#[tokio::test]
async fn persistent_failure_is_an_error_after_max_attempts() {
    let s = server().await;
    s.fail_next.store(100, Ordering::SeqCst);
    let started = std::time::Instant::now();
    let err = s.store.list("v1/inbox/b/", None).await.unwrap_err();
    assert_eq!(err.code(), Some("SlowDown"), "{err}");
    let attempts = 100 - s.fail_next.load(Ordering::SeqCst);
    assert_eq!(attempts, 12, "the default 12 attempts");
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "backoff rides out an outage of seconds before giving up: {:?}",
        started.elapsed()
    );
    assert!(
        s.metrics
            .render()
            .contains("hoshino_s3_errors_total{op=\"list\"} 12")
    );
}

#[tokio::test]
async fn an_outage_of_a_few_seconds_is_ridden_out() {
    let s = server().await;
    // ~8 failed attempts span about 2.5 s of backoff.
    s.fail_next.store(8, Ordering::SeqCst);
    s.store
        .put("v2/inbox/b/x.a", Bytes::from_static(b"x"))
        .await
        .unwrap();
    assert_eq!(s.metrics.s3_requests(S3Op::Put), 9);
}

#[tokio::test]
async fn access_denied_on_a_listed_key_is_an_error_not_absence() {
    let s = server().await;
    s.store
        .put("v2/inbox/b/k.a", Bytes::from_static(b"x"))
        .await
        .unwrap();
    s.forbid_next.store(1, Ordering::SeqCst);
    let got = s.store.get("v2/inbox/b/k.a", 1024, Lookup::Known).await;
    assert!(
        matches!(&got, Err(e) if e.status() == Some(403)),
        "GET of a known key under 403: {got:?}"
    );
    assert!(
        s.metrics
            .render()
            .contains("hoshino_s3_errors_total{op=\"get\"} 1"),
        "{}",
        s.metrics.render()
    );
    // Not retried (a 403 does not heal in milliseconds); the caller tries again later.
    let again = s.store.get("v2/inbox/b/k.a", 1024, Lookup::Known).await;
    assert_eq!(again.unwrap().as_deref(), Some(&b"x"[..]));
}

#[tokio::test]
async fn delete_objects_removes_a_batch_in_one_request() {
    let s = server().await;
    let keys: Vec<String> = (0..25).map(|i| format!("v2/inbox/b/{i:02}.a")).collect();
    for k in &keys {
        s.store.put(k, Bytes::from_static(b"x")).await.unwrap();
    }
    let failed = s.store.delete_many(&keys).await.unwrap();
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(s.metrics.s3_requests(S3Op::DeleteObjects), 1);
    let left = s.store.list("v2/inbox/b/", None).await.unwrap();
    assert!(left.objects.is_empty(), "{:?}", left.objects);
}

#[tokio::test]
async fn oversized_object_is_refused_without_reading_it() {
    let s = server().await;
    s.store
        .put("v1/inbox/b/big.a", Bytes::from(vec![0u8; 4096]))
        .await
        .unwrap();
    let err = s
        .store
        .get("v1/inbox/b/big.a", 1024, Lookup::Known)
        .await
        .unwrap_err();
    assert!(matches!(err, S3Error::TooLarge { size: 4096, .. }), "{err}");
}

#[tokio::test]
async fn listing_pages_follow_continuation_tokens() {
    let s = server().await;
    let keys: Vec<String> = (0..1005).map(|i| format!("v2/inbox/b/{i:04}.a")).collect();
    use futures::StreamExt;
    let results: Vec<_> = futures::stream::iter(
        keys.iter()
            .map(|k| s.store.put(k, Bytes::from_static(b"x"))),
    )
    .buffer_unordered(32)
    .collect()
    .await;
    for r in results {
        r.unwrap();
    }
    let first = s.store.list("v2/inbox/b/", None).await.unwrap();
    assert!(first.truncated);
    let token = first.next.clone().expect("a continuation token");
    let second = s.store.list("v2/inbox/b/", Some(&token)).await.unwrap();
    assert!(!second.truncated);
    assert_eq!(second.next, None);
    let mut all: Vec<String> = first
        .objects
        .iter()
        .chain(&second.objects)
        .map(|o| o.key.clone())
        .collect();
    all.sort();
    assert_eq!(all, keys);
}

/// Under the least-privilege node policy AWS answers 403 for a missing key (no unconditional
/// s3:ListBucket); an unrung doorbell or an already-deleted inbox object must read as absent, or
/// an idle node would wake on every bell poll.
#[tokio::test]
async fn access_denied_on_own_missing_key_reads_as_absent() {
    let s = server().await;
    s.forbid_next.store(1, Ordering::SeqCst);
    let bell = s.store.head("v1/bell/0123456789abcdef").await;
    assert!(matches!(bell, Ok(None)), "HEAD under 403: {bell:?}");
    s.forbid_next.store(1, Ordering::SeqCst);
    let got = s
        .store
        .get("v1/inbox/0123456789abcdef/x", 1 << 20, Lookup::Probe)
        .await;
    assert!(matches!(got, Ok(None)), "GET under 403: {got:?}");
    assert_eq!(
        s.forbid_next.load(Ordering::SeqCst),
        0,
        "both 403s were served"
    );
}
