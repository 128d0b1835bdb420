//! The engine with three real replica processes, judged by NBD clients we did not write:
//! qemu-io pattern writes and verified reads, discard and flush; qemu-img convert in and out with
//! qemu-img compare; nbdinfo's view of size and block sizes; fio with the nbd engine and crc32c
//! verification. Afterwards every replica holds the same bytes.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::net::SocketAddr;

use barnacle_tests::{EngineProcess, ReplicaProcess, replica_images, run_ok};

const VOL: &str = "vol-nbd";
const TOKEN: &str = "nbd-test-token";
const SIZE_MIB: u64 = 128;

struct Cluster {
    root: tempfile::TempDir,
    replicas: Vec<ReplicaProcess>,
    engine: EngineProcess,
}

fn cluster(n: usize) -> Cluster {
    let root = tempfile::tempdir().unwrap();
    let token = root.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let log = root.path().join("log");
    let replicas: Vec<_> = (0..n)
        .map(|i| {
            ReplicaProcess::start(
                &root.path().join(format!("r{i}")),
                VOL,
                &token,
                Some(&format!("{SIZE_MIB}MiB")),
                &log,
            )
        })
        .collect();
    // r0 is reached over its unix socket (a replica on the engine's node), the others over TCP.
    let ids: Vec<(String, SocketAddr)> =
        replicas.iter().enumerate().skip(1).map(|(i, r)| (format!("r{i}"), r.data)).collect();
    let local = format!("r0={}", replicas[0].unix);
    let engine =
        EngineProcess::start(VOL, &token, &ids, &root.path().join("engine"), &["--replica", &local], &log);
    Cluster { root, replicas, engine }
}

/// Reads every replica whole (after the engine stopped) and returns their contents.
async fn replica_contents(c: &Cluster) -> Vec<Vec<u8>> {
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(c.root.path().join("engine/membership.json")).unwrap())
            .unwrap();
    let epoch = state["membership"]["epoch"].as_u64().unwrap() + 1;
    let addrs: Vec<SocketAddr> = c.replicas.iter().map(|r| r.data).collect();
    replica_images(&addrs, VOL, TOKEN, epoch, SIZE_MIB << 20).await
}

fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn third_party_nbd_clients_agree_with_three_replicas() {
    let mut c = cluster(3);
    let uri = c.engine.uri(VOL);

    // nbdinfo: size and the 4 KiB minimum block size.
    let info: serde_json::Value =
        serde_json::from_slice(&run_ok("nbdinfo", &["--json", &uri]).stdout).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["export-size"].as_u64(), Some(SIZE_MIB << 20), "{info}");
    assert_eq!(export["block_size_minimum"].as_u64(), Some(4096), "{info}");
    assert_eq!(export["block_size_maximum"].as_u64(), Some(4 << 20), "{info}");
    assert_eq!(export["can_multi_conn"].as_bool(), Some(true), "{info}");

    // qemu-io: pattern writes, verified reads, discard, flush, FUA.
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -P 0xcd -f 1M 64k",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "read -P 0xcd 1M 64k",
            "-c",
            "discard 64k 64k",
            "-c",
            "read -P 0 64k 64k",
            "-c",
            "write -z 128k 64k",
            "-c",
            "read -P 0 128k 64k",
            "-c",
            "read -P 0xab 192k 64k",
            "-c",
            "flush",
        ],
    );
    let t = text(&out);
    assert!(!t.contains("fail") && !t.contains("error"), "qemu-io: {t}");

    // qemu-img convert in and out, and compare.
    let src = c.root.path().join("src.img");
    let data: Vec<u8> = (0..32u64 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    run_ok("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", src.to_str().unwrap(), &uri]);
    run_ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", src.to_str().unwrap(), &uri]);
    let back = c.root.path().join("back.img");
    run_ok("qemu-img", &["convert", "-f", "raw", "-O", "raw", &uri, back.to_str().unwrap()]);
    let back_data = std::fs::read(&back).unwrap();
    assert_eq!(back_data.len() as u64, SIZE_MIB << 20);
    assert!(back_data[..data.len()] == data[..], "qemu-img convert out differs");

    // fio with the nbd engine and crc32c verification.
    let fio_json = c.root.path().join("fio.json");
    let out = run_ok(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            // Small blocks go over the sockets, 16 KiB and up through the local replica's shared
            // memory: both paths verified by a client we did not write.
            "--bsrange=4k-256k",
            "--size=48m",
            "--offset=64m",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--randrepeat=0",
            "--output-format=json",
            &format!("--output={}", fio_json.display()),
        ],
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&fio_json).unwrap()).unwrap();
    let job = &report["jobs"][0];
    assert_eq!(job["error"].as_u64(), Some(0), "fio: {}", text(&out));
    assert!(job["write"]["io_bytes"].as_u64().unwrap() >= 48 << 20, "fio wrote too little: {job}");
    assert!(job["read"]["io_bytes"].as_u64().unwrap() >= 48 << 20, "fio verified too little: {job}");

    // Every replica holds the same bytes.
    c.engine.stop();
    let contents = replica_contents(&c).await;
    assert!(contents.windows(2).all(|w| w[0] == w[1]), "replicas differ");
    assert!(contents[0][..data.len()] == data[..], "replicas do not hold what qemu-img wrote");
}
