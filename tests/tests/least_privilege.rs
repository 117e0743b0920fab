//! The node policy that Terraform deploys (rendered from
//! `terraform/modules/node/policy.json.tftpl`), enforced by a real S3 API: moto's server with IAM
//! enforcement on, on loopback. Each node talks to it with aws-sdk-s3 and only its own access key.
//!
//! What moto evaluates (moto 5.2.5, `moto/iam/access_control.py`): Action and Resource of identity
//! policies, with `*` as a wildcard anywhere in the ARN, so per-key scoping and the sender id in the
//! key are enforced. moto's matcher is a regex in which the policy's `.` matches any character, so
//! it admits a few keys AWS refuses (`...<x><self>` for `*.<self>`); the crafted-key test asserts
//! what must hold on both. What it does not evaluate:
//! - conditions on S3 requests. moto passes no request context (such as `s3:prefix`) to the
//!   evaluator and skips operators it does not implement (`StringLike`), so the `ListOwnInbox`
//!   statement allows ListBucket with any prefix there. On AWS the same statement denies listing
//!   another node's inbox; `tests/terraform/check_terraform.py` evaluates that case with IAM's rules.
//!   `lists_of_a_peer_inbox_are_not_restricted_by_moto` pins moto's behaviour.
//! - DeleteObjects per key. AWS authorises `POST ?delete` as `s3:DeleteObject` on each key; moto
//!   authorises it once against the bucket ARN, which the policy (rightly) does not grant, and then
//!   answers every key with an AccessDenied error. `batch_delete_of_own_keys_is_refused_by_moto`
//!   pins that, so an agent on moto with IAM must fall back to single DELETEs on such errors.

mod support;

use std::path::PathBuf;
use std::process::Command;

use support::Moto;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{Delete, ObjectIdentifier};

const BUCKET: &str = "hoshino-least-privilege";
const A: &str = "0123456789abcdef";
const B: &str = "fedcba9876543210";
/// `<session:16hex>` and `<seq:16hex>` of the bundle keys used here.
const SESSION: &str = "00000000deadbeef";
const SEQ: &str = "0000000000000007";

struct NodeKey {
    node_id: String,
    access_key_id: String,
    secret: String,
}

/// Creates the bucket, one IAM user + rendered policy + access key per node, then turns IAM
/// enforcement on (`tests/terraform/moto_nodes.py`).
fn provision(moto: &Moto, node_ids: &[&str]) -> Vec<NodeKey> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("terraform/moto_nodes.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(&moto.endpoint)
        .arg(BUCKET)
        .args(node_ids)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let keys: Vec<NodeKey> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            Some(NodeKey {
                node_id: f.next()?.to_owned(),
                access_key_id: f.next()?.to_owned(),
                secret: f.next()?.to_owned(),
            })
        })
        .collect();
    assert_eq!(keys.len(), node_ids.len(), "one key line per node expected");
    keys
}

fn client(moto: &Moto, access_key_id: &str, secret: &str) -> Client {
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(&moto.endpoint)
        .force_path_style(true)
        .credentials_provider(Credentials::new(
            access_key_id,
            secret,
            None,
            None,
            "least-privilege-test",
        ))
        .build();
    Client::from_conf(config)
}

fn node_client(moto: &Moto, keys: &[NodeKey], node_id: &str) -> Client {
    let key = keys
        .iter()
        .find(|k| k.node_id == node_id)
        .unwrap_or_else(|| panic!("no key for node {node_id}"));
    client(moto, &key.access_key_id, &key.secret)
}

/// The HTTP status and S3 error code of a failed request (HEAD has no body, so no code).
fn failure<T, E: ProvideErrorMetadata + std::fmt::Debug>(
    result: Result<T, SdkError<E, aws_sdk_s3::config::http::HttpResponse>>,
    what: &str,
) -> (u16, Option<String>) {
    match result {
        Ok(_) => panic!("{what}: succeeded, expected it to be refused"),
        Err(SdkError::ServiceError(e)) => {
            (e.raw().status().as_u16(), e.err().code().map(str::to_owned))
        }
        Err(other) => panic!("{what}: failed without an S3 answer: {other:?}"),
    }
}

fn assert_access_denied<T, E: ProvideErrorMetadata + std::fmt::Debug>(
    result: Result<T, SdkError<E, aws_sdk_s3::config::http::HttpResponse>>,
    what: &str,
) {
    let (status, code) = failure(result, what);
    assert_eq!(status, 403, "{what}: HTTP {status} {code:?}, expected 403");
    if let Some(code) = code {
        assert_eq!(code, "AccessDenied", "{what}: error code");
    }
}

struct Network {
    moto: Moto,
    a: Client,
    b: Client,
}

async fn network() -> Network {
    let moto = Moto::start();
    let keys = provision(&moto, &[A, B]);
    let a = node_client(&moto, &keys, A);
    let b = node_client(&moto, &keys, B);
    Network { moto, a, b }
}

async fn put(client: &Client, key: &str, body: &'static [u8]) -> Result<(), String> {
    client
        .put_object()
        .bucket(BUCKET)
        .key(key)
        .body(ByteStream::from_static(body))
        .send()
        .await
        .map(|_| ())
        .map_err(|e| format!("{e:?}"))
}

fn bundle_key(dest: &str, src: &str) -> String {
    format!("v2/inbox/{dest}/{SESSION}-{SEQ}.{src}")
}

fn inbox(node: &str) -> String {
    format!("v2/inbox/{node}/")
}

fn bell(node: &str) -> String {
    format!("v2/bell/{node}")
}

/// The sender that receiver `us` reads from a bundle key, per the fixed key contract
/// (DESIGN.md "Mailbox keys"): exactly `v2/inbox/<us:16hex>/<session:16hex>-<seq:16hex>.<src:16hex>`,
/// lowercase hex, sender = the 16 hex digits after the final `.`.
// TODO(merge): replace with `hoshino_agent::wire::mailbox::parse_bundle_key(key, us).ok().map(|k| k.sender)`
// once the tunnel branch's parser lands; this local copy implements the same contract.
fn parsed_sender(key: &str, us: &str) -> Option<String> {
    fn hex16(s: &str) -> bool {
        s.len() == 16 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    }
    let rest = key.strip_prefix("v2/inbox/")?;
    let (dest, name) = rest.split_once('/')?;
    let (stem, sender) = name.rsplit_once('.')?;
    let (session, seq) = stem.split_once('-')?;
    (dest == us && hex16(dest) && hex16(session) && hex16(seq) && hex16(sender))
        .then(|| sender.to_owned())
}

#[test]
fn the_contract_parser_reads_only_the_exact_shape() {
    assert_eq!(parsed_sender(&bundle_key(B, A), B).as_deref(), Some(A));
    assert_eq!(parsed_sender(&bundle_key(B, A), A), None, "wrong receiver");
    for bad in [
        format!("v2/inbox/{B}/{SESSION}-{SEQ}.{B}/x.{A}"),
        format!("v2/inbox/{B}/{SESSION}-{SEQ}.{B}.{A}"),
        format!("v2/inbox/{B}/{SESSION}-{SEQ}.{}", A.to_uppercase()),
        format!("v2/inbox/{B}/x/{SESSION}-{SEQ}.{A}"),
        format!("v2/inbox/{B}/{SESSION}-{SEQ}.{A}{A}"),
        format!("v2/inbox/{B}/{SESSION}{SEQ}.{A}"),
        format!("v1/inbox/{B}/{SESSION}-{SEQ}.{A}"),
    ] {
        assert_eq!(parsed_sender(&bad, B), None, "{bad}");
    }
}

/// A ListObjectsV2 of `prefix`, every page.
async fn list_all(client: &Client, prefix: &str) -> Vec<String> {
    let mut keys = vec![];
    let mut token = None;
    loop {
        let page = client
            .list_objects_v2()
            .bucket(BUCKET)
            .prefix(prefix)
            .set_continuation_token(token.take())
            .send()
            .await
            .unwrap_or_else(|e| panic!("listing {prefix}: {e:?}"));
        keys.extend(
            page.contents()
                .iter()
                .filter_map(|o| o.key())
                .map(str::to_owned),
        );
        match page.next_continuation_token() {
            Some(t) => token = Some(t.to_owned()),
            None => return keys,
        }
    }
}

/// DeleteObjects of `keys`: the keys deleted and the (key, code) of those refused.
async fn delete_objects(client: &Client, keys: &[String]) -> (Vec<String>, Vec<(String, String)>) {
    let objects = keys
        .iter()
        .map(|k| ObjectIdentifier::builder().key(k).build())
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| panic!("object identifiers: {e:?}"));
    let delete = Delete::builder()
        .set_objects(Some(objects))
        .quiet(false)
        .build()
        .unwrap_or_else(|e| panic!("delete request: {e:?}"));
    let out = client
        .delete_objects()
        .bucket(BUCKET)
        .delete(delete)
        .send()
        .await
        .unwrap_or_else(|e| panic!("DeleteObjects answered no result: {e:?}"));
    let deleted = out
        .deleted()
        .iter()
        .filter_map(|d| d.key())
        .map(str::to_owned)
        .collect();
    let errors = out
        .errors()
        .iter()
        .map(|e| {
            (
                e.key().unwrap_or_default().to_owned(),
                e.code().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    (deleted, errors)
}

async fn exists(client: &Client, key: &str) -> bool {
    client
        .head_object()
        .bucket(BUCKET)
        .key(key)
        .send()
        .await
        .is_ok()
}

#[tokio::test]
async fn iam_enforcement_is_on_so_unknown_keys_are_refused() {
    let net = network().await;
    let stranger = client(&net.moto, "AKIAIOSFODNN7EXAMPLE", "not-a-key");
    let (status, code) = failure(
        stranger.list_buckets().send().await,
        "ListBuckets with an access key IAM never issued",
    );
    assert_eq!(status, 403, "unknown key: {code:?}");
    assert_eq!(code.as_deref(), Some("InvalidAccessKeyId"));
}

#[tokio::test]
async fn a_node_delivers_into_a_peer_inbox_and_the_peer_receives_it() {
    let net = network().await;
    let key = bundle_key(B, A);
    put(&net.a, &key, b"bundle from A")
        .await
        .expect("A delivers into B's inbox");
    put(&net.a, &bell(B), b"01JD0000000000000000000001")
        .await
        .expect("A rings B's bell");
    put(&net.b, &bundle_key(B, B), b"bundle from B to itself")
        .await
        .expect("B delivers into its own inbox");

    // B receives: lists its inbox, reads the bundle, watches its bell, deletes the bundle.
    let mut keys = list_all(&net.b, &inbox(B)).await;
    keys.sort();
    let mut expected = vec![key.clone(), bundle_key(B, B)];
    expected.sort();
    assert_eq!(keys, expected);
    // A listing of one stream, as a receiver that knows the session does.
    let stream = list_all(&net.b, &format!("{}{SESSION}-", inbox(B))).await;
    assert_eq!(stream.len(), 2);
    let body = net
        .b
        .get_object()
        .bucket(BUCKET)
        .key(&key)
        .send()
        .await
        .expect("B reads its own inbox")
        .body
        .collect()
        .await
        .expect("body")
        .into_bytes();
    assert_eq!(&body[..], b"bundle from A");
    net.b
        .head_object()
        .bucket(BUCKET)
        .key(bell(B))
        .send()
        .await
        .expect("B HEADs its own bell");
    net.b
        .get_object()
        .bucket(BUCKET)
        .key(bell(B))
        .send()
        .await
        .expect("B GETs its own bell");
    net.b
        .delete_object()
        .bucket(BUCKET)
        .key(&key)
        .send()
        .await
        .expect("B deletes from its own inbox");
    assert!(!exists(&net.b, &key).await, "the deleted bundle is gone");
}

#[tokio::test]
async fn batch_delete_of_own_keys_is_refused_by_moto() {
    // On AWS, DeleteObjects is authorised per key as s3:DeleteObject, so B may batch-delete its
    // own inbox (check_terraform.py evaluates s3:DeleteObject on own keys). moto authorises the
    // request once against the bucket ARN and refuses every key (see the module comment). This
    // pins that limit; if it starts failing, moto began authorising per key: assert success.
    let net = network().await;
    let keys = vec![bundle_key(B, A), bundle_key(B, B)];
    for k in &keys {
        put(if k.ends_with(A) { &net.a } else { &net.b }, k, b"bundle")
            .await
            .expect("deliver");
    }
    let (deleted, errors) = delete_objects(&net.b, &keys).await;
    assert!(deleted.is_empty(), "moto deleted {deleted:?}");
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors.iter().all(|(_, code)| code == "AccessDenied"));
    // Single DELETEs, the fallback, work.
    for k in &keys {
        net.b
            .delete_object()
            .bucket(BUCKET)
            .key(k)
            .send()
            .await
            .unwrap_or_else(|e| panic!("B deletes {k}: {e:?}"));
    }
    assert!(list_all(&net.b, &inbox(B)).await.is_empty());
}

#[tokio::test]
async fn a_node_cannot_read_or_delete_a_peer_inbox_or_watch_its_bell() {
    let net = network().await;
    let key = bundle_key(B, A);
    put(&net.a, &key, b"bundle from A")
        .await
        .expect("A delivers");
    put(&net.a, &bell(B), b"01JD0000000000000000000001")
        .await
        .expect("A rings");

    assert_access_denied(
        net.a.get_object().bucket(BUCKET).key(&key).send().await,
        "A GETs a bundle in B's inbox (even one A wrote)",
    );
    assert_access_denied(
        net.a.delete_object().bucket(BUCKET).key(&key).send().await,
        "A DELETEs a bundle in B's inbox",
    );
    let (deleted, errors) = delete_objects(&net.a, std::slice::from_ref(&key)).await;
    assert!(
        deleted.is_empty(),
        "A batch-deleted {deleted:?} from B's inbox"
    );
    assert_eq!(errors, vec![(key.clone(), "AccessDenied".to_owned())]);
    assert_access_denied(
        net.a.head_object().bucket(BUCKET).key(bell(B)).send().await,
        "A HEADs B's bell",
    );
    assert_access_denied(
        net.a.get_object().bucket(BUCKET).key(bell(B)).send().await,
        "A GETs B's bell",
    );
    assert_access_denied(
        net.a
            .delete_object()
            .bucket(BUCKET)
            .key(bell(B))
            .send()
            .await,
        "A DELETEs B's bell",
    );
    // The bundle is still there for B.
    assert!(
        exists(&net.b, &key).await,
        "B still finds the bundle A could not delete"
    );
}

#[tokio::test]
async fn a_node_cannot_write_a_key_naming_another_sender_or_outside_the_mailbox() {
    let net = network().await;
    // The sender id at the end of the key is IAM's anti-spoofing hook: A may only write *.A.
    for (key, what) in [
        (
            bundle_key(B, B),
            "A PUTs into B's inbox a key claiming B as sender",
        ),
        (
            bundle_key(A, B),
            "A PUTs into its own inbox a key claiming B as sender",
        ),
        (
            format!("v2/inbox/{B}/{SESSION}-{SEQ}"),
            "A PUTs a key without sender id",
        ),
        (
            format!("v1/inbox/{B}/{SESSION}-{SEQ}.{A}"),
            "A PUTs the retired v1 layout",
        ),
        (
            "v3/elsewhere".to_owned(),
            "A PUTs outside v2/inbox and v2/bell",
        ),
    ] {
        assert_access_denied(
            net.a
                .put_object()
                .bucket(BUCKET)
                .key(key)
                .body(ByteStream::from_static(b"forged"))
                .send()
                .await,
            what,
        );
    }
    assert_access_denied(
        net.a.list_buckets().send().await,
        "A lists the account's buckets",
    );
    assert_access_denied(
        net.a.delete_bucket().bucket(BUCKET).send().await,
        "A deletes the bucket",
    );
}

#[tokio::test]
async fn crafted_keys_are_refused_by_iam_or_never_read_as_another_sender() {
    let net = network().await;
    let stem = format!("{SESSION}-{SEQ}");
    // A is the attacker and tries to make B (or any receiver) read a key as sent by B.
    let crafted = [
        format!("v2/inbox/{B}/{stem}.{B}"),
        format!("v2/inbox/{A}/{stem}.{B}"),
        format!("v2/inbox/{B}/{stem}.{B}/x.{A}"),
        format!("v2/inbox/{B}/{stem}.{B}.{A}"),
        format!("v2/inbox/{B}/../{A}/{stem}.{A}"),
        format!("v2/inbox/{B}/./{stem}.{A}"),
        format!("v2/inbox/{B}/{stem}.{}", B.to_uppercase()),
        format!("v2/inbox/{B}/{stem}.{}", A.to_uppercase()),
        format!("v2/inbox/{}/{stem}.{A}", B.to_uppercase()),
        format!("v2/inbox/{B}/extra/{stem}.{A}"),
        format!("v2/inbox/{B}/{stem}.{A}/extra"),
        format!("v2/inbox/{B}/{stem}.{B}{A}"),
        format!("v2/inbox/{B}/{stem}-{A}"),
        format!("v2/inbox/{B}/{stem}.{B}%2e{A}"),
        format!("v2/inbox/{stem}.{A}"),
        format!("v2/inbox/{B}//{stem}.{A}"),
        format!("v2/bell/../inbox/{B}/{stem}.{B}"),
        format!("v2/bell/{B}/../../inbox/{B}/{stem}.{B}"),
    ];
    let mut refused = vec![];
    let mut written = vec![];
    for key in &crafted {
        let result = net
            .a
            .put_object()
            .bucket(BUCKET)
            .key(key)
            .body(ByteStream::from_static(b"crafted"))
            .send()
            .await;
        match result {
            Ok(_) => written.push(key.clone()),
            Err(SdkError::ServiceError(e)) if e.raw().status().as_u16() == 403 => {
                refused.push(key.clone())
            }
            Err(e) => panic!("PUT {key}: neither stored nor refused: {e:?}"),
        }
    }
    for key in &written {
        for us in [A, B] {
            let sender = parsed_sender(key, us);
            assert!(
                sender.is_none() || sender.as_deref() == Some(A),
                "IAM let A write {key}, which receiver {us} reads as sent by {sender:?}"
            );
        }
    }
    // The plain spoofs and wrong-case ids never reach the bucket.
    for key in &crafted[..2] {
        assert!(refused.contains(key), "IAM let A write {key}");
    }
    assert!(refused.contains(&crafted[6]) && refused.contains(&crafted[7]));
    // What is stored may not be what was sent (a server could normalise `..`): check the
    // bucket itself, with enforcement off to see every key.
    support::relax_iam(&net.moto.endpoint);
    let admin = client(&net.moto, "admin", "admin");
    let stored = list_all(&admin, "").await;
    support::enforce_iam(&net.moto.endpoint);
    assert!(
        !stored.is_empty(),
        "nothing crafted was stored: the test proves nothing"
    );
    for key in &stored {
        for us in [A, B] {
            let sender = parsed_sender(key, us);
            assert!(
                sender.is_none() || sender.as_deref() == Some(A),
                "the bucket holds {key}, which receiver {us} reads as sent by {sender:?}"
            );
        }
    }
    eprintln!(
        "crafted keys: {} refused by IAM, {} stored and harmless: {written:?}",
        refused.len(),
        written.len()
    );
}

#[tokio::test]
async fn lists_of_a_peer_inbox_are_not_restricted_by_moto() {
    // On AWS, `ListOwnInbox` allows ListBucket only with `s3:prefix` like `v2/inbox/<self>/*`, so
    // this request is AccessDenied (check_terraform.py evaluates exactly this case). moto ignores
    // conditions on S3 requests (see the module comment), so here it is allowed. This pins that
    // limit instead of pretending the policy is proven on moto; if it starts failing, moto began
    // evaluating s3:prefix: turn this into an AccessDenied assertion.
    let net = network().await;
    put(&net.a, &bundle_key(B, A), b"bundle")
        .await
        .expect("A delivers");
    let listed = net
        .a
        .list_objects_v2()
        .bucket(BUCKET)
        .prefix(inbox(B))
        .send()
        .await
        .expect("moto does not evaluate the s3:prefix condition");
    assert_eq!(listed.key_count(), Some(1));
}

fn record_key(node: &str) -> String {
    format!("v2/nodes/{node}")
}

#[tokio::test]
async fn a_node_publishes_only_its_own_directory_record_and_reads_everyones() {
    let net = network().await;
    put(&net.a, &record_key(A), b"record of A")
        .await
        .expect("A publishes its own record");
    put(&net.b, &record_key(B), b"record of B")
        .await
        .expect("B publishes its own record");
    // A forged record: A's credentials writing under B's key (or below its own).
    for (key, what) in [
        (record_key(B), "A PUTs a record under B's key"),
        (
            format!("{}/x", record_key(A)),
            "A PUTs below its own record key",
        ),
        (
            format!("v2/nodes/{A}{B}"),
            "A PUTs a key starting with its own id",
        ),
    ] {
        assert_access_denied(
            net.a
                .put_object()
                .bucket(BUCKET)
                .key(&key)
                .body(ByteStream::from_static(b"forged"))
                .send()
                .await,
            what,
        );
    }
    assert_access_denied(
        net.a
            .delete_object()
            .bucket(BUCKET)
            .key(record_key(B))
            .send()
            .await,
        "A deletes B's record",
    );
    // Both read the whole directory: LIST the prefix, GET every record.
    for reader in [&net.a, &net.b] {
        assert_eq!(
            list_all(reader, "v2/nodes/").await,
            vec![record_key(A), record_key(B)]
        );
        let body = reader
            .get_object()
            .bucket(BUCKET)
            .key(record_key(B))
            .send()
            .await
            .expect("a node reads B's record")
            .body
            .collect()
            .await
            .expect("body")
            .into_bytes();
        assert_eq!(
            &body[..],
            b"record of B",
            "B's record is B's, not the forgery"
        );
    }
}
