//! `terraform apply` of the real configuration against moto on loopback, then the bucket settings
//! read back over the S3 API and the access key Terraform issued used under IAM enforcement.
//!
//! Ignored by default: it needs the `terraform` binary and the hashicorp/aws provider in a local
//! mirror (`HOSHINO_TF_PLUGIN_DIR`, default `/opt/tf-plugins`), which no package registry the
//! project can use provides; the offline checks in `terraform.rs` always run. Where both are
//! present: `cargo test -p hoshino-tests --test terraform_apply -- --ignored`. Terraform is run
//! with `CHECKPOINT_DISABLE=1` so it makes no request but to moto.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use support::{Moto, enforce_iam, relax_iam};

const BUCKET: &str = "hoshino-terraform-apply";
const ALPHA: &str = "0123456789abcdef";
const BETA: &str = "fedcba9876543210";
/// `<session:16hex>-<seq:16hex>` of a bundle key (DESIGN.md "Mailbox keys").
const STREAM_SEQ: &str = "00000000deadbeef-0000000000000000";

struct Workdir(PathBuf);

impl Drop for Workdir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

fn root_configuration() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../terraform");
    path.canonicalize()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A root module that points the AWS provider at moto and instantiates the repository's
/// configuration with one node of each identity.
fn main_tf(endpoint: &str) -> String {
    format!(
        r#"
provider "aws" {{
  region                      = "us-east-1"
  access_key                  = "setup"
  secret_key                  = "setup"
  skip_credentials_validation = true
  skip_metadata_api_check     = true
  skip_requesting_account_id  = true
  s3_use_path_style           = true
  endpoints {{
    s3  = "{endpoint}"
    iam = "{endpoint}"
    sts = "{endpoint}"
  }}
}}

module "hoshino" {{
  source        = "{root}"
  bucket_name   = "{BUCKET}"
  force_destroy = true
  nodes = {{
    alpha = {{ node_id = "{ALPHA}" }}
    beta  = {{ node_id = "{BETA}", identity = "instance" }}
  }}
}}

output "alpha_env" {{
  value     = module.hoshino.node_environment_files["alpha"]
  sensitive = true
}}

output "beta_profile" {{
  value = module.hoshino.nodes["beta"].instance_profile_name
}}

output "alpha_address" {{
  value = module.hoshino.nodes["alpha"].address
}}
"#,
        root = root_configuration().display()
    )
}

fn terraform(dir: &Path, args: &[&str]) -> String {
    let terraform = which("terraform").unwrap_or_else(|| panic!("terraform not on PATH"));
    let out = Command::new(terraform)
        .current_dir(dir)
        .args(args)
        .env("CHECKPOINT_DISABLE", "1")
        .env("TF_IN_AUTOMATION", "1")
        .env("TF_INPUT", "0")
        .env("TF_CLI_CONFIG_FILE", dir.join("terraformrc"))
        .env_remove("AWS_PROFILE")
        .output()
        .unwrap_or_else(|e| panic!("running terraform {args:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "terraform {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn s3(endpoint: &str, access_key_id: &str, secret: &str) -> Client {
    Client::from_conf(
        aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(endpoint)
            .force_path_style(true)
            .credentials_provider(Credentials::new(
                access_key_id,
                secret,
                None,
                None,
                "terraform-apply-test",
            ))
            .build(),
    )
}

fn env_value<'a>(env_file: &'a str, key: &str) -> &'a str {
    env_file
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("{key} missing from the environment file:\n{env_file}"))
}

fn assert_access_denied<T, E: ProvideErrorMetadata + std::fmt::Debug>(
    result: Result<T, SdkError<E, aws_sdk_s3::config::http::HttpResponse>>,
    what: &str,
) {
    match result {
        Ok(_) => panic!("{what}: allowed, expected AccessDenied"),
        Err(SdkError::ServiceError(e)) => {
            assert_eq!(e.raw().status().as_u16(), 403, "{what}");
            // moto's refusals by bucket policy come with an empty body, so no code.
            if let Some(code) = e.err().code() {
                assert_eq!(code, "AccessDenied", "{what}");
            }
        }
        Err(other) => panic!("{what}: no S3 answer: {other:?}"),
    }
}

#[tokio::test]
#[ignore = "needs terraform and the hashicorp/aws provider in a local mirror (HOSHINO_TF_PLUGIN_DIR); run with --ignored"]
async fn terraform_applies_and_the_issued_node_key_holds_only_its_policy() {
    let plugin_dir = std::env::var_os("HOSHINO_TF_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/tf-plugins"));
    assert!(
        plugin_dir.is_dir(),
        "no provider mirror at {}",
        plugin_dir.display()
    );
    let moto = Moto::start();
    let dir = Workdir(std::env::temp_dir().join(format!("hoshino-tf-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap_or_else(|e| panic!("{}: {e}", dir.0.display()));
    std::fs::write(dir.0.join("main.tf"), main_tf(&moto.endpoint))
        .unwrap_or_else(|e| panic!("main.tf: {e}"));
    std::fs::write(dir.0.join("terraformrc"), "").unwrap_or_else(|e| panic!("terraformrc: {e}"));

    let plugin_arg = format!("-plugin-dir={}", plugin_dir.display());
    terraform(&dir.0, &["init", "-no-color", &plugin_arg]);
    terraform(&dir.0, &["apply", "-no-color", "-auto-approve"]);
    let alpha_env = terraform(&dir.0, &["output", "-raw", "alpha_env"]);
    let beta_profile = terraform(&dir.0, &["output", "-raw", "beta_profile"]);
    let alpha_address = terraform(&dir.0, &["output", "-raw", "alpha_address"]);
    assert_eq!(beta_profile, "hoshino-node-beta");
    assert_eq!(alpha_address, "fd68:6f73:6869:6e6f:123:4567:89ab:cdef");
    assert_eq!(env_value(&alpha_env, "HOSHINO_BUCKET"), BUCKET);
    assert_eq!(env_value(&alpha_env, "HOSHINO_REGION"), "us-east-1");

    // What Terraform built, read back over the S3 API (before enforcement, as the owner).
    let owner = s3(&moto.endpoint, "setup", "setup");
    let lifecycle = owner
        .get_bucket_lifecycle_configuration()
        .bucket(BUCKET)
        .send()
        .await
        .unwrap_or_else(|e| panic!("lifecycle: {e:?}"));
    let rule = lifecycle
        .rules()
        .first()
        .unwrap_or_else(|| panic!("no lifecycle rule"));
    assert_eq!(rule.expiration().and_then(|e| e.days()), Some(1));
    assert_eq!(
        rule.abort_incomplete_multipart_upload()
            .and_then(|a| a.days_after_initiation()),
        Some(1)
    );
    let block = owner
        .get_public_access_block()
        .bucket(BUCKET)
        .send()
        .await
        .unwrap_or_else(|e| panic!("public access block: {e:?}"));
    let block = block
        .public_access_block_configuration()
        .unwrap_or_else(|| panic!("no public access block"));
    assert_eq!(
        (
            block.block_public_acls(),
            block.block_public_policy(),
            block.ignore_public_acls(),
            block.restrict_public_buckets()
        ),
        (Some(true), Some(true), Some(true), Some(true))
    );
    let policy = owner
        .get_bucket_policy()
        .bucket(BUCKET)
        .send()
        .await
        .unwrap_or_else(|e| panic!("bucket policy: {e:?}"));
    let policy = policy.policy().unwrap_or_default();
    assert!(
        policy.contains("aws:SecureTransport") && policy.contains("\"Deny\""),
        "bucket policy is not TLS-only: {policy}"
    );
    let sse = owner
        .get_bucket_encryption()
        .bucket(BUCKET)
        .send()
        .await
        .unwrap_or_else(|e| panic!("encryption: {e:?}"));
    let algorithm = sse
        .server_side_encryption_configuration()
        .and_then(|c| c.rules().first())
        .and_then(|r| r.apply_server_side_encryption_by_default())
        .map(|d| d.sse_algorithm().as_str().to_owned());
    assert_eq!(algorithm.as_deref(), Some("AES256"));

    // The key Terraform issued to alpha, under IAM enforcement.
    let alpha = s3(
        &moto.endpoint,
        env_value(&alpha_env, "AWS_ACCESS_KEY_ID"),
        env_value(&alpha_env, "AWS_SECRET_ACCESS_KEY"),
    );
    let to_beta = format!("v2/inbox/{BETA}/{STREAM_SEQ}.{ALPHA}");
    // First with the TLS-only bucket policy in place: moto speaks plain HTTP only, and the
    // policy's explicit Deny refuses plain HTTP for everyone, whatever their IAM policy. (moto
    // gets there by ignoring the `aws:SecureTransport` condition, so it would deny HTTPS too;
    // AWS evaluates it.)
    enforce_iam(&moto.endpoint);
    assert_access_denied(
        alpha
            .put_object()
            .bucket(BUCKET)
            .key(&to_beta)
            .body(ByteStream::from_static(b"bundle"))
            .send()
            .await,
        "alpha delivers over plain HTTP despite the TLS-only bucket policy",
    );
    // Then without it, to see the node policy alone.
    relax_iam(&moto.endpoint);
    owner
        .delete_bucket_policy()
        .bucket(BUCKET)
        .send()
        .await
        .unwrap_or_else(|e| panic!("removing the bucket policy: {e:?}"));
    enforce_iam(&moto.endpoint);
    alpha
        .put_object()
        .bucket(BUCKET)
        .key(&to_beta)
        .body(ByteStream::from_static(b"bundle"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("alpha delivers to beta: {e:?}"));
    assert_access_denied(
        alpha.get_object().bucket(BUCKET).key(&to_beta).send().await,
        "alpha reads beta's inbox",
    );
    assert_access_denied(
        alpha
            .put_object()
            .bucket(BUCKET)
            .key(format!("v2/inbox/{BETA}/{STREAM_SEQ}.{BETA}"))
            .body(ByteStream::from_static(b"forged"))
            .send()
            .await,
        "alpha writes a key claiming beta as sender",
    );
    assert_access_denied(
        alpha.get_bucket_policy().bucket(BUCKET).send().await,
        "alpha reads the bucket policy",
    );
}
