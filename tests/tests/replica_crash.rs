//! Crash test with the real `barnacle-replica` binary: a client writes, unmaps, flushes and takes
//! snapshots through the data protocol while the process is killed with SIGKILL at random
//! instants, again and again. After each restart the store must open cleanly, every write
//! acknowledged before the last acknowledged flush must be there (and, since SIGKILL keeps the page
//! cache, every acknowledged write at all), and every acknowledged snapshot must read exactly as the
//! head did when it was taken.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use barnacle_replica::client::{ClientConfig, ReplicaClient};
use barnacle_tests::ReplicaProcess;
use bytes::Bytes;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

const BLOCK: u64 = 4096;
/// Blocks the workload touches (4 MiB): small enough that blocks are rewritten often.
const BLOCKS: u64 = 1024;
const KILLS: u32 = 24;

/// A block's contents are derived from a version number; 0 means zeros.
fn content(block: u64, version: u64) -> Bytes {
    if version == 0 {
        return Bytes::from(vec![0u8; BLOCK as usize]);
    }
    let mut v = Vec::with_capacity(BLOCK as usize);
    for i in 0..BLOCK / 8 {
        v.extend_from_slice(&(version.wrapping_mul(1_000_003) ^ block << 20 ^ i).to_le_bytes());
    }
    Bytes::from(v)
}

#[derive(Default, Clone)]
struct Model {
    /// Last acknowledged version of each block.
    acked: HashMap<u64, u64>,
    /// State as of the last acknowledged flush.
    flushed: HashMap<u64, u64>,
    /// Versions sent but not acknowledged when the process died: any of them may have landed.
    in_flight: HashMap<u64, Vec<u64>>,
    /// Acknowledged snapshots and the head they captured.
    snapshots: BTreeMap<String, HashMap<u64, u64>>,
    /// A snapshot whose create was sent but not acknowledged.
    snapshot_in_flight: Option<(String, HashMap<u64, u64>)>,
    next_version: u64,
}

fn client_cfg(epoch: u64, engine: Uuid) -> ClientConfig {
    ClientConfig {
        volume_id: "crash-vol".into(),
        token: "crash-token".into(),
        engine_id: engine,
        epoch,
        request_timeout: Duration::from_secs(10),
        heartbeat: Duration::from_millis(500),
    }
}

/// Drives the workload until the connection dies, recording acknowledgements in the model.
async fn workload(client: Arc<ReplicaClient>, model: &mut Model, rng: &mut rand::rngs::StdRng) {
    loop {
        // A batch of concurrent writes and unmaps to distinct blocks.
        let mut blocks: Vec<u64> = (0..16).map(|_| rng.random_range(0..BLOCKS)).collect();
        blocks.sort_unstable();
        blocks.dedup();
        let mut batch = Vec::new();
        for b in blocks {
            let version = if rng.random_bool(0.1) {
                0
            } else {
                model.next_version += 1;
                model.next_version
            };
            model.in_flight.entry(b).or_default().push(version);
            let c = client.clone();
            batch.push(tokio::spawn(async move {
                let r = if version == 0 {
                    c.unmap(b * BLOCK, BLOCK as u32).await
                } else {
                    c.write(b * BLOCK, content(b, version), false).await
                };
                (b, version, r.is_ok())
            }));
        }
        let mut dead = false;
        for t in batch {
            let (b, version, ok) = t.await.unwrap();
            if ok {
                model.acked.insert(b, version);
                let v = model.in_flight.get_mut(&b).unwrap();
                v.retain(|&x| x != version);
            } else {
                dead = true;
            }
        }
        if dead {
            return;
        }
        model.in_flight.retain(|_, v| !v.is_empty());
        match rng.random_range(0..10) {
            0..=2 => {
                if client.flush().await.is_err() {
                    return;
                }
                model.flushed = model.acked.clone();
            }
            3 => {
                let name = format!("snap-{}", model.next_version);
                model.snapshot_in_flight = Some((name.clone(), model.acked.clone()));
                if client.snapshot_create(&name).await.is_err() {
                    return;
                }
                let (n, state) = model.snapshot_in_flight.take().unwrap();
                // A snapshot is durable when acknowledged, so it also marks a flush point.
                model.flushed = state.clone();
                model.snapshots.insert(n, state);
            }
            4 if model.snapshots.len() > 3 => {
                let name = model.snapshots.keys().next().unwrap().clone();
                if client.snapshot_delete(&name).await.is_err() {
                    // It may or may not be gone; stop checking it.
                    model.snapshots.remove(&name);
                    return;
                }
                model.snapshots.remove(&name);
            }
            _ => {}
        }
    }
}

async fn verify(client: &ReplicaClient, model: &mut Model) {
    // Snapshot names on the replica: every acknowledged one, plus possibly the one in flight.
    let listed: Vec<String> = client.snapshot_list().await.unwrap().into_iter().map(|s| s.name).collect();
    for name in model.snapshots.keys() {
        assert!(listed.contains(name), "acknowledged snapshot {name} lost");
    }
    if let Some((name, state)) = model.snapshot_in_flight.take()
        && listed.contains(&name)
    {
        model.snapshots.insert(name, state);
    }
    let all = client.read(0, (BLOCKS * BLOCK) as u32).await.unwrap();
    for b in 0..BLOCKS {
        let got = all.slice((b * BLOCK) as usize..((b + 1) * BLOCK) as usize);
        let acked = model.acked.get(&b).copied().unwrap_or(0);
        let flushed = model.flushed.get(&b).copied().unwrap_or(0);
        let mut allowed = vec![acked];
        allowed.extend(model.in_flight.get(&b).into_iter().flatten().copied());
        let found = allowed.iter().copied().find(|&v| got == content(b, v));
        let Some(v) = found else {
            let was_flushed = got == content(b, flushed);
            panic!(
                "block {b}: not any acknowledged or in-flight version (acked {acked}, flushed {flushed}, matches flushed: {was_flushed})"
            );
        };
        // Whatever landed is now the block's state.
        model.acked.insert(b, v);
    }
    for (name, state) in &model.snapshots {
        let all = client.read_snapshot(name, 0, (BLOCKS * BLOCK) as u32).await.unwrap();
        for b in 0..BLOCKS {
            let got = all.slice((b * BLOCK) as usize..((b + 1) * BLOCK) as usize);
            let want = state.get(&b).copied().unwrap_or(0);
            assert!(got == content(b, want), "snapshot {name} block {b} differs from the head it captured");
        }
    }
    model.in_flight.clear();
    model.flushed = model.acked.clone();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_loses_no_acknowledged_write() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("replica");
    let token = root.path().join("token");
    std::fs::write(&token, "crash-token\n").unwrap();
    let log = root.path().join("replica.log");
    let seed: u64 =
        std::env::var("CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("crash test seed {seed} (set CRASH_SEED to replay)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut model = Model::default();
    let engine = Uuid::new_v4();
    for round in 0..=KILLS {
        let mut proc = ReplicaProcess::start(&dir, "crash-vol", &token, Some("64MiB"), &log);
        let epoch = u64::from(round) + 1;
        let client = ReplicaClient::connect(proc.data, client_cfg(epoch, engine)).await.unwrap();
        client.fence(epoch, engine).await.unwrap();
        let st = client.stat().await.unwrap();
        assert!(st.healthy, "store unhealthy after restart: {st:?}");
        verify(&client, &mut model).await;
        if round == KILLS {
            break;
        }
        let client = Arc::new(client);
        let delay = Duration::from_millis(rng.random_range(5..400));
        let pid = proc.child.id();
        let killer = tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL)
                .unwrap();
        });
        workload(client.clone(), &mut model, &mut rng).await;
        killer.await.unwrap();
        proc.kill();
    }
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.matches("opened replica store").count() >= KILLS as usize,
        "restarts did not reopen the store"
    );
}
