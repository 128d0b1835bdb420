//! Replica data path benchmark: 4 KiB random write and read IOPS and 1 MiB sequential write and
//! read bandwidth through the replica protocol over loopback, next to the same workload done with
//! pwrite/pread on a raw file, and through a replica keeping no block checksums, in the same run;
//! prints all three, the replica's ratio to the raw file and to the replica without checksums.
//!
//! `cargo bench -p barnacle-replica --bench replica_bench` (env: BENCH_SECONDS per workload,
//! default 5; BENCH_DIR for the scratch directory, default the system temp dir; BENCH_QD, default 32).

#![allow(
    clippy::unwrap_used,
    clippy::print_stdout,
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss
)]

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use barnacle_replica::client::{ClientConfig, ReplicaClient};
use barnacle_replica::server::{Replica, ServerConfig};
use bytes::Bytes;
use rand::Rng;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const SIZE: u64 = 512 << 20;

#[derive(Clone, Copy, Debug)]
enum Kind {
    RandWrite4k,
    RandRead4k,
    SeqWrite1m,
    SeqRead1m,
}

impl Kind {
    fn block(self) -> u64 {
        match self {
            Kind::RandWrite4k | Kind::RandRead4k => 4096,
            Kind::SeqWrite1m | Kind::SeqRead1m => 1 << 20,
        }
    }
    fn is_write(self) -> bool {
        matches!(self, Kind::RandWrite4k | Kind::SeqWrite1m)
    }
    fn is_random(self) -> bool {
        matches!(self, Kind::RandWrite4k | Kind::RandRead4k)
    }
}

trait Target: Send + Sync + 'static {
    fn op(&self, kind: Kind, offset: u64, data: Bytes) -> impl std::future::Future<Output = ()> + Send;
}

struct RawFile(Arc<File>);

impl Target for RawFile {
    async fn op(&self, kind: Kind, offset: u64, data: Bytes) {
        let f = self.0.clone();
        tokio::task::spawn_blocking(move || {
            if kind.is_write() {
                f.write_all_at(&data, offset).unwrap();
            } else {
                let mut buf = vec![0u8; data.len()];
                f.read_exact_at(&mut buf, offset).unwrap();
            }
        })
        .await
        .unwrap();
    }
}

struct Remote(Arc<ReplicaClient>);

impl Target for Remote {
    async fn op(&self, kind: Kind, offset: u64, data: Bytes) {
        if kind.is_write() {
            self.0.write(offset, data, false).await.unwrap();
        } else {
            self.0.read(offset, data.len() as u32).await.unwrap();
        }
    }
}

/// Runs `kind` against `t` with `qd` workers for `secs`; returns ops per second.
async fn run<T: Target>(t: Arc<T>, kind: Kind, qd: usize, secs: f64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let seq = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let bs = kind.block();
    let data = Bytes::from(vec![0x5Au8; bs as usize]);
    let start = Instant::now();
    let workers: Vec<_> = (0..qd)
        .map(|_| {
            let (t, done, seq, data) = (t.clone(), done.clone(), seq.clone(), data.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let offset = if kind.is_random() {
                        rand::rng().random_range(0..SIZE / bs) * bs
                    } else {
                        (seq.fetch_add(1, Ordering::Relaxed) % (SIZE / bs)) * bs
                    };
                    t.op(kind, offset, data.clone()).await;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// Starts a replica serving a new store in `dir` over loopback, fills it with `chunk` and returns
/// a fenced client.
async fn start_replica(
    dir: &std::path::Path,
    checksums: bool,
    chunk: &[u8],
    shutdown: &CancellationToken,
) -> Arc<Remote> {
    let cfg = ServerConfig {
        volume_id: "bench".into(),
        token: "t".into(),
        idle_timeout: Duration::from_secs(60),
        max_in_flight: 256,
        data_device: None,
        checksums,
        fault_injection: false,
    };
    let replica = Replica::new(cfg, dir).unwrap();
    replica.create_store(SIZE, 64 * 1024).await.unwrap();
    let data = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mgmt = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = data.local_addr().unwrap();
    tokio::spawn(barnacle_replica::run(data, None, mgmt, replica, shutdown.clone()));
    let engine = Uuid::new_v4();
    let client = ReplicaClient::connect(
        addr,
        ClientConfig {
            volume_id: "bench".into(),
            token: "t".into(),
            engine_id: engine,
            epoch: 1,
            request_timeout: Duration::from_secs(60),
            heartbeat: Duration::from_secs(1),
        },
    )
    .await
    .unwrap();
    client.fence(1, engine).await.unwrap();
    for i in 0..SIZE >> 20 {
        client.write(i << 20, Bytes::from(chunk.to_vec()), false).await.unwrap();
    }
    client.flush().await.unwrap();
    Arc::new(Remote(Arc::new(client)))
}

#[tokio::main]
async fn main() {
    let secs: f64 = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5.0);
    let qd: usize = std::env::var("BENCH_QD").ok().and_then(|s| s.parse().ok()).unwrap_or(32);
    let base =
        std::env::var("BENCH_DIR").map(std::path::PathBuf::from).unwrap_or_else(|_| std::env::temp_dir());
    let dir = tempfile::tempdir_in(base).unwrap();

    // Raw file, fully written first so both sides overwrite allocated space.
    let raw = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("raw"))
        .unwrap();
    let chunk = vec![0x11u8; 1 << 20];
    for i in 0..SIZE >> 20 {
        raw.write_all_at(&chunk, i << 20).unwrap();
    }
    raw.sync_all().unwrap();
    let raw = Arc::new(RawFile(Arc::new(raw)));

    // Replicas over loopback, equally prefilled: one keeping block checksums (the default), one
    // without, to show what verifying them costs.
    let shutdown = CancellationToken::new();
    let remote = start_replica(&dir.path().join("replica"), true, &chunk, &shutdown).await;
    let plain = start_replica(&dir.path().join("replica-nosums"), false, &chunk, &shutdown).await;

    println!(
        "replica benchmark: {qd} in flight, {secs} s per workload, {} MiB region, dir {}",
        SIZE >> 20,
        dir.path().display()
    );
    println!(
        "{:<16} {:>14} {:>14} {:>14} {:>8} {:>10}",
        "workload", "raw file", "replica", "no checksums", "ratio", "sums cost"
    );
    for kind in [Kind::RandWrite4k, Kind::RandRead4k, Kind::SeqWrite1m, Kind::SeqRead1m] {
        let a = run(raw.clone(), kind, qd, secs).await;
        let b = run(remote.clone(), kind, qd, secs).await;
        let c = run(plain.clone(), kind, qd, secs).await;
        let unit = if kind.is_random() { "IOPS" } else { "MiB/s" };
        let scale = |v: f64| if kind.is_random() { v } else { v * kind.block() as f64 / 1048576.0 };
        println!(
            "{:<16} {:>9.0} {unit:<4} {:>9.0} {unit:<4} {:>9.0} {unit:<4} {:>8.2} {:>10.2}",
            format!("{kind:?}"),
            scale(a),
            scale(b),
            scale(c),
            b / a,
            b / c
        );
    }
    shutdown.cancel();
}
