//! The real `barnacle-replica` binary: refusals are logged with the volume id and never with a
//! secret, the token never appears in argv, and the process serves again after a clean restart.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use barnacle_replica::client::{ClientConfig, ReplicaClient};
use barnacle_replica::wire::Status;
use barnacle_tests::ReplicaProcess;
use uuid::Uuid;

const TOKEN: &str = "tok-7f3a91c2e5d84b06";

fn cfg(token: &str, epoch: u64, engine: Uuid) -> ClientConfig {
    ClientConfig {
        volume_id: "vol-bin".into(),
        token: token.into(),
        engine_id: engine,
        epoch,
        request_timeout: Duration::from_secs(10),
        heartbeat: Duration::ZERO,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_logged_without_secrets() {
    let root = tempfile::tempdir().unwrap();
    let token_file = root.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let log = root.path().join("replica.log");
    let dir = root.path().join("replica");
    let proc = ReplicaProcess::start(&dir, "vol-bin", &token_file, Some("16MiB"), &log);

    let cmdline = std::fs::read(format!("/proc/{}/cmdline", proc.child.id())).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains(TOKEN), "token on the command line");

    let wrong = "not-the-token-55aa";
    let e = ReplicaClient::connect(proc.data, cfg(wrong, 0, Uuid::new_v4())).await.unwrap_err();
    assert_eq!(e.status(), Some(Status::Auth));

    let engine = Uuid::new_v4();
    let c = ReplicaClient::connect(proc.data, cfg(TOKEN, 5, engine)).await.unwrap();
    c.fence(5, engine).await.unwrap();
    let e = ReplicaClient::connect(proc.data, cfg(TOKEN, 4, Uuid::new_v4())).await.unwrap_err();
    assert_eq!(e.status(), Some(Status::StaleEpoch));
    drop(c);
    drop(proc);

    let text = std::fs::read_to_string(&log).unwrap();
    let auth_line = text.lines().find(|l| l.contains("wrong token")).expect("auth refusal logged");
    assert!(auth_line.contains("vol-bin"), "refusal without the volume id: {auth_line}");
    let epoch_line = text.lines().find(|l| l.contains("stale epoch")).expect("stale epoch logged");
    assert!(epoch_line.contains("vol-bin") && epoch_line.contains("current=5"), "{epoch_line}");
    assert!(!text.contains(TOKEN) && !text.contains(wrong), "a token reached the log");

    // Restart on the same directory: the store and its epoch are still there.
    let proc = ReplicaProcess::start(&dir, "vol-bin", &token_file, Some("16MiB"), &log);
    let e = ReplicaClient::connect(proc.data, cfg(TOKEN, 4, Uuid::new_v4())).await.unwrap_err();
    assert_eq!(e.status(), Some(Status::StaleEpoch), "epoch forgotten across a restart");
    let c = ReplicaClient::connect(proc.data, cfg(TOKEN, 5, engine)).await.unwrap();
    assert_eq!(c.stat().await.unwrap().size, 16 << 20);
}
