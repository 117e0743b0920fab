//! `hoshino-s3-probe`: plain aws-sdk-s3 calls against the testbed's S3 server, run inside a node
//! namespace. Puts and lists objects for tests; measures the S3 floor for the bench.
//! Credentials come from the standard AWS environment variables.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
struct Args {
    #[arg(long)]
    endpoint_url: String,
    #[arg(long)]
    bucket: String,
    #[arg(long, default_value = "us-east-1")]
    region: String,
    #[command(subcommand)]
    command: Op,
}

#[derive(Debug, Subcommand)]
enum Op {
    /// PUT a file's bytes under a key.
    Put {
        #[arg(long)]
        key: String,
        #[arg(long)]
        file: PathBuf,
    },
    /// PUT a file's bytes under `<prefix><i:06>` for i in 0..count, `concurrency` at a time
    /// (a fast bulk uploader for backlog tests).
    PutMany {
        #[arg(long)]
        prefix: String,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        file: PathBuf,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// Print every key under a prefix, one per line.
    List {
        #[arg(long, default_value = "")]
        prefix: String,
    },
    /// Median and p99 latency of PUT and GET of a small object.
    Floor {
        #[arg(long, default_value_t = 50)]
        samples: usize,
        #[arg(long, default_value_t = 128)]
        size: usize,
    },
    /// PUT `objects` bundles of about `object_bytes` into `dest`'s inbox as `sender` (bench
    /// backlog): valid plaintext bundles of UDP datagrams to port 9, keys in the v2 layout.
    Backlog {
        #[arg(long)]
        dest_node: String,
        #[arg(long)]
        sender_node: String,
        #[arg(long)]
        src_addr: std::net::Ipv6Addr,
        #[arg(long)]
        dst_addr: std::net::Ipv6Addr,
        #[arg(long, default_value_t = 1000)]
        objects: u64,
        #[arg(long, default_value_t = 16 * 1024 * 1024 - 65_536)]
        object_bytes: usize,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
    },
    /// Throughput of a PUT -> GET -> DELETE pipeline keeping `concurrency` objects in flight.
    Throughput {
        #[arg(long, default_value_t = 1024 * 1024)]
        object_bytes: usize,
        #[arg(long, default_value_t = 32)]
        objects: usize,
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
    },
}

#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{op} {key}: {message}")]
    S3 {
        op: &'static str,
        key: String,
        message: String,
    },
}

fn s3_error(op: &'static str, key: &str, e: impl std::fmt::Debug) -> ProbeError {
    ProbeError::S3 {
        op,
        key: key.to_owned(),
        message: format!("{e:?}"),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(&args.endpoint_url)
        .region(aws_config::Region::new(args.region.clone()))
        .load()
        .await;
    let s3 = aws_sdk_s3::config::Builder::from(&config)
        .force_path_style(true)
        .build();
    let client = Client::from_conf(s3);
    let result = match args.command {
        Op::Put { key, file } => put_file(&client, &args.bucket, &key, file).await,
        Op::PutMany {
            prefix,
            count,
            file,
            concurrency,
        } => put_many(&client, &args.bucket, &prefix, count, file, concurrency).await,
        Op::List { prefix } => list(&client, &args.bucket, &prefix).await,
        Op::Floor { samples, size } => floor(&client, &args.bucket, samples, size).await,
        Op::Throughput {
            object_bytes,
            objects,
            concurrency,
        } => throughput(&client, &args.bucket, object_bytes, objects, concurrency).await,
        Op::Backlog {
            dest_node,
            sender_node,
            src_addr,
            dst_addr,
            objects,
            object_bytes,
            concurrency,
        } => {
            let spec = BacklogSpec {
                dest: dest_node,
                sender: sender_node,
                src: src_addr,
                dst: dst_addr,
                object_bytes,
            };
            backlog(&client, &args.bucket, &spec, objects, concurrency).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hoshino-s3-probe: {e}");
            ExitCode::from(1)
        }
    }
}

async fn put_file(
    client: &Client,
    bucket: &str,
    key: &str,
    file: PathBuf,
) -> Result<(), ProbeError> {
    let body = std::fs::read(&file).map_err(|source| ProbeError::Read { path: file, source })?;
    put(client, bucket, key, body).await
}

async fn put_many(
    client: &Client,
    bucket: &str,
    prefix: &str,
    count: usize,
    file: PathBuf,
    concurrency: usize,
) -> Result<(), ProbeError> {
    let body = std::fs::read(&file).map_err(|source| ProbeError::Read { path: file, source })?;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        while tasks.len() >= concurrency.max(1) {
            if let Some(Ok(Err(e))) = tasks.join_next().await {
                return Err(e);
            }
        }
        let (client, bucket, body) = (client.clone(), bucket.to_owned(), body.clone());
        let key = format!("{prefix}{i:06}");
        tasks.spawn(async move { put(&client, &bucket, &key, body).await });
    }
    while let Some(r) = tasks.join_next().await {
        if let Ok(Err(e)) = r {
            return Err(e);
        }
    }
    Ok(())
}

async fn put(client: &Client, bucket: &str, key: &str, body: Vec<u8>) -> Result<(), ProbeError> {
    client
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(ByteStream::from(body))
        .send()
        .await
        .map_err(|e| s3_error("PUT", key, e))?;
    Ok(())
}

async fn get(client: &Client, bucket: &str, key: &str) -> Result<usize, ProbeError> {
    let out = client
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| s3_error("GET", key, e))?;
    let body = out
        .body
        .collect()
        .await
        .map_err(|e| s3_error("GET body", key, e))?;
    Ok(body.into_bytes().len())
}

async fn delete(client: &Client, bucket: &str, key: &str) -> Result<(), ProbeError> {
    client
        .delete_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| s3_error("DELETE", key, e))?;
    Ok(())
}

async fn list(client: &Client, bucket: &str, prefix: &str) -> Result<(), ProbeError> {
    let mut token = None;
    loop {
        let out = client
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .set_continuation_token(token)
            .send()
            .await
            .map_err(|e| s3_error("LIST", prefix, e))?;
        for obj in out.contents() {
            if let Some(key) = obj.key() {
                println!("{key}");
            }
        }
        token = out.next_continuation_token().map(str::to_owned);
        if token.is_none() {
            return Ok(());
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted
        .get(rank.min(sorted.len() - 1))
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
}

async fn floor(
    client: &Client,
    bucket: &str,
    samples: usize,
    size: usize,
) -> Result<(), ProbeError> {
    let body = vec![0x42_u8; size];
    let mut puts = Vec::with_capacity(samples);
    let mut gets = Vec::with_capacity(samples);
    // One warm-up round so connection setup is not counted.
    let warm = "bench/floor/warmup";
    put(client, bucket, warm, body.clone()).await?;
    get(client, bucket, warm).await?;
    delete(client, bucket, warm).await?;
    for i in 0..samples {
        let key = format!("bench/floor/{i}");
        let t = Instant::now();
        put(client, bucket, &key, body.clone()).await?;
        puts.push(t.elapsed());
        let t = Instant::now();
        get(client, bucket, &key).await?;
        gets.push(t.elapsed());
        delete(client, bucket, &key).await?;
    }
    puts.sort();
    gets.sort();
    println!("put_p50_ms {:.3}", percentile(&puts, 0.5));
    println!("put_p99_ms {:.3}", percentile(&puts, 0.99));
    println!("get_p50_ms {:.3}", percentile(&gets, 0.5));
    println!("get_p99_ms {:.3}", percentile(&gets, 0.99));
    Ok(())
}

async fn throughput(
    client: &Client,
    bucket: &str,
    object_bytes: usize,
    objects: usize,
    concurrency: usize,
) -> Result<(), ProbeError> {
    use futures::StreamExt;
    let body = bytes::Bytes::from(vec![0x17_u8; object_bytes]);
    let start = Instant::now();
    // A pipeline, not batches: a new object starts as soon as one of `concurrency` finishes.
    let mut results = futures::stream::iter(0..objects)
        .map(|i| {
            let body = body.clone();
            async move {
                let key = format!("bench/throughput/{i}");
                client
                    .put_object()
                    .bucket(bucket)
                    .key(&key)
                    .body(ByteStream::from(body))
                    .send()
                    .await
                    .map_err(|e| s3_error("PUT", &key, e))?;
                let n = get(client, bucket, &key).await?;
                delete(client, bucket, &key).await?;
                Ok::<usize, ProbeError>(n)
            }
        })
        .buffer_unordered(concurrency.max(1));
    let mut moved = 0usize;
    while let Some(r) = results.next().await {
        moved += r?;
    }
    let seconds = start.elapsed().as_secs_f64();
    println!("bytes {moved} seconds {seconds:.6}");
    Ok(())
}

struct BacklogSpec {
    dest: String,
    sender: String,
    src: std::net::Ipv6Addr,
    dst: std::net::Ipv6Addr,
    object_bytes: usize,
}

/// Bundles as the tunnel writes them, so the receiver GETs and parses every one.
async fn backlog(
    client: &Client,
    bucket: &str,
    spec: &BacklogSpec,
    objects: u64,
    concurrency: usize,
) -> Result<(), ProbeError> {
    use futures::StreamExt;
    use hoshino_tests::bundle_forge::{self, BundleHeader};
    let parse_id = |s: &str| {
        u64::from_str_radix(s, 16).map_err(|e| ProbeError::S3 {
            op: "node id",
            key: s.to_owned(),
            message: e.to_string(),
        })
    };
    let (dest, sender) = (parse_id(&spec.dest)?, parse_id(&spec.sender)?);
    let payload = vec![0x5a_u8; 65_000];
    let packet = bundle_forge::udp6_packet(spec.src, spec.dst, 9, 9, &payload);
    let per_bundle = (spec.object_bytes / (packet.len() + 4)).max(1);
    let packets = vec![packet; per_bundle];
    let session = 0xbac1_0900_0000_0000_u64 | u64::from(std::process::id());
    let start = Instant::now();
    let mut puts = futures::stream::iter(0..objects)
        .map(|seq| {
            let header = BundleHeader {
                sender,
                dest,
                session,
                seq,
            };
            let body = bundle_forge::encode_bundle(&header, &packets);
            let key = format!(
                "v2/inbox/{}/{session:016x}-{seq:016x}.{}",
                spec.dest, spec.sender
            );
            async move { put(client, bucket, &key, body).await }
        })
        .buffer_unordered(concurrency.max(1));
    let mut written = 0u64;
    while let Some(r) = puts.next().await {
        r?;
        written += 1;
    }
    println!(
        "objects {written} seconds {:.3}",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
