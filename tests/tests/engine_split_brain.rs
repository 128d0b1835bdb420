//! Split brain is impossible (DESIGN rules 1–4), with real processes and a real network cut.
//!
//! Each replica runs in its own network namespace, reachable at one address over routed veth
//! links; engine A and engine B run in two more namespaces. A starts with every replica, then
//! loses its link to r2 while writing; B starts on the same membership authority reaching only
//! r1 and r2 and writes too. Only one of them may acknowledge writes once the configuration
//! changed: the other must fail its IO. Every acknowledged write must then be on every replica of
//! the committed configuration, and those replicas must be identical.
//!
//! A second test checks rule 4 without a network: several NBD connections writing overlapping
//! ranges concurrently leave all replicas identical.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use barnacle_tests::netns::{Net, in_netns};
use barnacle_tests::{EngineProcess, ReplicaProcess, replica_images, run_ok};

const VOL: &str = "vol-split";
const TOKEN: &str = "split-token";
const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;

/// Writes blocks `first..first+count` (4 KiB each) one at a time through `uri`, each with pattern
/// byte `pattern(block)`, pausing `pause_ms` between writes.
fn writer(uri: &str, first: u64, count: u64, pause_ms: u64) -> std::process::Child {
    let mut args = vec!["-f".to_owned(), "raw".to_owned(), uri.to_owned()];
    for b in first..first + count {
        args.push("-c".into());
        args.push(format!("write -P {} {} {BLOCK}", pattern(b), b * BLOCK));
        args.push("-c".into());
        args.push(format!("sleep {pause_ms}"));
    }
    Command::new("qemu-io")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn pattern(block: u64) -> u8 {
    (block % 251) as u8 + 1
}

/// The blocks a writer's output says were acknowledged ("wrote 4096/4096 bytes at offset N"),
/// and how many writes failed.
fn acknowledged(out: &std::process::Output) -> (Vec<u64>, usize) {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let mut acked = Vec::new();
    let mut failed = 0;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(&format!("wrote {BLOCK}/{BLOCK} bytes at offset ")) {
            acked.push(rest.trim().parse::<u64>().unwrap() / BLOCK);
        } else if line.contains("failed") || line.contains("error") {
            failed += 1;
        }
    }
    (acked, failed)
}

fn membership(state: &Path) -> serde_json::Value {
    let body = std::fs::read_to_string(state.join("membership.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&body).unwrap()["membership"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_on_a_partitioned_network_cannot_both_acknowledge_writes() {
    let mut net = Net::new('b', 77);
    let root = tempfile::tempdir().unwrap();
    let token = root.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let log = root.path().join("log");
    let (na, nb) = (net.ns("A"), net.ns("B"));
    let rns: Vec<String> = (0..3).map(|i| net.ns(&format!("R{i}"))).collect();
    let serve: Vec<String> = (0..3).map(|i| format!("10.78.0.{}", 10 + i)).collect();
    for (i, ns) in rns.iter().enumerate() {
        run_ok("ip", &["-n", ns, "addr", "add", &format!("{}/32", serve[i]), "dev", "lo"]);
    }
    let mut subnet = 1u8;
    let mut link = |a: &str, b: &str, b_serves: &str| {
        let l = net.link(a, b, subnet, &[], &[b_serves]);
        subnet += 1;
        l
    };
    let a_to: Vec<_> = (0..3).map(|i| link(&na, &rns[i], &serve[i])).collect();
    // B has no link to r0 at all.
    link(&nb, &rns[1], &serve[1]);
    link(&nb, &rns[2], &serve[2]);

    let replicas: Vec<ReplicaProcess> = (0..3)
        .map(|i| {
            ReplicaProcess::start_in_netns(
                &rns[i],
                &root.path().join(format!("r{i}")),
                VOL,
                &token,
                Some("64MiB"),
                &log,
                format!("{}:7400", serve[i]).parse().unwrap(),
                &[],
            )
        })
        .collect();
    let ids: Vec<(String, SocketAddr)> =
        replicas.iter().enumerate().map(|(i, r)| (format!("r{i}"), r.data)).collect();
    let state = root.path().join("authority");
    let sock = |n: &str| root.path().join(format!("{n}.sock"));
    let uri = |n: &str| format!("nbd+unix:///{VOL}?socket={}", sock(n).display());
    // Long enough that a busy machine's slow second is not taken for a failure; short enough to
    // keep the test brief.
    let timing = ["--replica-timeout-ms", "3000", "--heartbeat-ms", "500", "--rebuild-retry-ms", "600000"];
    let sock_a = sock("a").display().to_string();
    let mut args_a = vec!["--nbd-socket", &sock_a];
    args_a.extend(timing);
    let mut engine_a = EngineProcess::start_in(Some(&na), VOL, &token, &ids, &state, &args_a, &log);
    let epoch_a = membership(&state)["epoch"].as_u64().unwrap();

    // A writes blocks 0.. ; part-way, its link to r2 goes down.
    let load_a = writer(&uri("a"), 0, 400, 10);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    net.cut(&a_to[2]);
    // B starts on the same authority, reaching r1 and r2 only, and writes blocks 4096.. .
    let sock_b = sock("b").display().to_string();
    let mut args_b = vec!["--nbd-socket", &sock_b];
    args_b.extend(timing);
    let mut engine_b = EngineProcess::start_in(Some(&nb), VOL, &token, &ids, &state, &args_b, &log);
    let load_b = writer(&uri("b"), 4096, 200, 5);
    // A stale engine cannot write: a write through A now is refused and never lands.
    let stale =
        Command::new("qemu-io").args(["-f", "raw", &uri("a"), "-c", "write -P 0xee 8M 4k"]).output().unwrap();
    let (stale_acked, _) = acknowledged(&stale);
    assert!(stale_acked.is_empty(), "the deposed engine acknowledged a write");

    let out_a = load_a.wait_with_output().unwrap();
    let out_b = load_b.wait_with_output().unwrap();
    let (acked_a, failed_a) = acknowledged(&out_a);
    let (acked_b, failed_b) = acknowledged(&out_b);
    // A is deposed: it failed IO and exited with status 3.
    let status_a = engine_a.child.wait().unwrap();
    assert_eq!(status_a.code(), Some(3), "engine A must be deposed");
    assert!(failed_a > 0, "engine A never failed a write");
    assert!(acked_a.len() < 400, "engine A acknowledged every write");
    assert_eq!(failed_b, 0, "engine B failed writes: {}", String::from_utf8_lossy(&out_b.stderr));
    assert_eq!(acked_b.len(), 200);

    // The committed configuration: B's, without r0.
    let m = membership(&state);
    assert!(m["epoch"].as_u64().unwrap() > epoch_a, "{m}");
    assert_eq!(m["replicas"][0]["state"], "ejected", "{m}");
    assert_eq!(m["replicas"][1]["state"], "healthy", "{m}");
    assert_eq!(m["replicas"][2]["state"], "healthy", "{m}");
    run_ok("qemu-io", &["-f", "raw", &uri("b"), "-c", "flush"]);
    engine_b.stop();
    // Read r1 and r2 from B's namespace: identical, and every acknowledged write is there.
    let epoch = membership(&state)["epoch"].as_u64().unwrap() + 1;
    let addrs = [replicas[1].data, replicas[2].data];
    let images =
        in_netns(&nb, move || async move { replica_images(&addrs, VOL, TOKEN, epoch, 32 * MIB).await });
    assert!(images[0] == images[1], "the committed replicas differ");
    for b in acked_a.iter().chain(&acked_b) {
        let at = (b * BLOCK) as usize;
        assert!(
            images[0][at..at + BLOCK as usize].iter().all(|x| *x == pattern(*b)),
            "acknowledged block {b} is missing"
        );
    }
    assert!(
        images[0][8 * MIB as usize..(8 * MIB + BLOCK) as usize].iter().all(|x| *x != 0xee),
        "the stale write landed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_writes_from_several_connections_leave_replicas_identical() {
    let root = tempfile::tempdir().unwrap();
    let token = root.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let log = root.path().join("log");
    let replicas: Vec<ReplicaProcess> = (0..3)
        .map(|i| ReplicaProcess::start(&root.path().join(format!("r{i}")), VOL, &token, Some("64MiB"), &log))
        .collect();
    let ids: Vec<(String, SocketAddr)> =
        replicas.iter().enumerate().map(|(i, r)| (format!("r{i}"), r.data)).collect();
    let mut engine = EngineProcess::start(VOL, &token, &ids, &root.path().join("engine"), &[], &log);
    // Four connections, all writing the same 4 MiB with different block sizes and offsets, so
    // nearly every write overlaps writes of the other connections.
    let jobs: Vec<std::process::Child> = ["4k", "12k", "64k", "132k"]
        .iter()
        .enumerate()
        .map(|(i, bs)| {
            Command::new("fio")
                .args([
                    &format!("--name=overlap{i}"),
                    "--ioengine=nbd",
                    &format!("--uri={}", engine.uri(VOL)),
                    "--rw=randwrite",
                    &format!("--bs={bs}"),
                    "--size=4m",
                    "--io_size=3m",
                    "--iodepth=16",
                    "--randrepeat=0",
                    &format!("--buffer_pattern=0x{:02x}", 0x10 + i),
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for j in jobs {
        let o = j.wait_with_output().unwrap();
        assert!(o.status.success(), "fio failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    run_ok("qemu-io", &["-f", "raw", &engine.uri(VOL), "-c", "flush"]);
    engine.stop();
    let epoch = membership(&root.path().join("engine"))["epoch"].as_u64().unwrap() + 1;
    let addrs: Vec<SocketAddr> = replicas.iter().map(|r| r.data).collect();
    let images = replica_images(&addrs, VOL, TOKEN, epoch, 4 * MIB).await;
    // Several writers' data is there (not one connection's alone), and all replicas agree.
    let distinct: std::collections::BTreeSet<u8> = images[0].iter().copied().collect();
    assert!(distinct.len() >= 3, "expected data from several connections, got {distinct:?}");
    assert!(images[1] == images[0] && images[2] == images[0], "replicas diverged under overlapping writes");
}
