//! Data protocol and management API tests against a real server on loopback: pipelining and
//! out-of-order replies, authentication, epochs and fencing, malformed input, heartbeats, the
//! allocated-data stream, and the gRPC management calls.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use barnacle_replica::client::{ClientConfig, ClientError, ReplicaClient};
use barnacle_replica::mgmt::pb::{self, replica_manager_client::ReplicaManagerClient};
use barnacle_replica::server::{Replica, ServerConfig};
use barnacle_replica::wire::{self, ClientCodec, Hello, Op, Request, Status};
use bytes::{BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const TOKEN: &str = "s3cret-token";
const VOL: &str = "vol-proto";
const MIB: u64 = 1 << 20;

struct Server {
    data: SocketAddr,
    mgmt: SocketAddr,
    /// The same data protocol on a unix socket.
    unix: String,
    replica: Arc<Replica>,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn server_with(idle: Duration, size: u64) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ServerConfig {
        volume_id: VOL.into(),
        token: TOKEN.into(),
        idle_timeout: idle,
        max_in_flight: 64,
        data_device: None,
        checksums: true,
        fault_injection: false,
    };
    let replica = Replica::new(cfg, &dir.path().join("r")).unwrap();
    replica.create_store(size, 64 * 1024).await.unwrap();
    let data = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mgmt = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (da, ma) = (data.local_addr().unwrap(), mgmt.local_addr().unwrap());
    let sock = dir.path().join("data.sock");
    let unix = tokio::net::UnixListener::bind(&sock).unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(barnacle_replica::run(data, Some(unix), mgmt, replica.clone(), shutdown.clone()));
    Server { data: da, mgmt: ma, unix: format!("unix:{}", sock.display()), replica, shutdown, _dir: dir }
}

async fn server() -> Server {
    server_with(Duration::from_secs(30), 64 * MIB).await
}

fn cfg(epoch: u64, engine: Uuid) -> ClientConfig {
    ClientConfig {
        volume_id: VOL.into(),
        token: TOKEN.into(),
        engine_id: engine,
        epoch,
        request_timeout: Duration::from_secs(20),
        heartbeat: Duration::from_millis(200),
    }
}

/// A client that holds epoch `epoch` for a fresh engine.
async fn fenced(s: &Server, epoch: u64) -> (ReplicaClient, Uuid) {
    let engine = Uuid::new_v4();
    let c = ReplicaClient::connect(s.data, cfg(epoch, engine)).await.unwrap();
    c.fence(epoch, engine).await.unwrap();
    (c, engine)
}

/// A raw framed connection that said hello for `engine` at `epoch`.
async fn raw_connection(s: &Server, epoch: u64, engine: Uuid) -> Framed<TcpStream, ClientCodec> {
    let stream = TcpStream::connect(s.data).await.unwrap();
    let mut f = Framed::new(stream, ClientCodec::default());
    let hello = Hello {
        version: wire::VERSION,
        volume_id: VOL.into(),
        token: TOKEN.into(),
        epoch,
        engine_id: engine,
    };
    f.send(Request { id: 0, op: Op::Hello(hello) }).await.unwrap();
    assert_eq!(f.next().await.unwrap().unwrap().status, Status::Ok);
    f
}

fn block(tag: u64, len: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(len);
    for i in 0..len / 8 {
        b.put_u64(tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i as u64);
    }
    b.freeze()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_all_complete_correctly() {
    let s = server().await;
    let (c, _) = fenced(&s, 1).await;
    let c = Arc::new(c);
    let mut tasks = Vec::new();
    for i in 0..256u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let off = (i * 7 % 4096) * 4096;
            c.write(off, block(i, 4096), i % 17 == 0).await.map(|()| (off, i))
        }));
    }
    let mut last_writer: HashMap<u64, u64> = HashMap::new();
    for t in tasks {
        let (off, i) = t.await.unwrap().unwrap();
        last_writer.insert(off, i);
    }
    c.flush().await.unwrap();
    let reads: Vec<_> = last_writer
        .iter()
        .map(|(&off, &i)| {
            let c = c.clone();
            tokio::spawn(async move { (c.read(off, 4096).await.unwrap(), i) })
        })
        .collect();
    for r in reads {
        let (got, i) = r.await.unwrap();
        assert_eq!(got, block(i, 4096));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_come_back_out_of_order() {
    let s = server().await;
    let (c, engine) = fenced(&s, 1).await;
    for i in 0..16u64 {
        c.write(i * 2 * MIB, block(i, 2 * MIB as usize), false).await.unwrap();
    }
    // On a raw connection: a long stream (id 1) then a ping (id 2). The ping's reply must come
    // back before the stream has ended.
    let mut f = raw_connection(&s, 1, engine).await;
    f.send(Request { id: 1, op: Op::ReadAllocated { snapshot: None, offset: 0, len: 0 } }).await.unwrap();
    f.send(Request { id: 2, op: Op::Ping }).await.unwrap();
    let mut seen = Vec::new();
    let mut bytes = 0;
    loop {
        let r = f.next().await.unwrap().unwrap();
        assert_eq!(r.status, Status::Ok);
        if r.id == 1 && r.more {
            bytes += r.payload.len() - 8;
        }
        seen.push((r.id, r.more));
        if r.id == 1 && !r.more {
            break;
        }
    }
    assert_eq!(bytes as u64, 32 * MIB);
    let ping_at = seen.iter().position(|e| e.0 == 2).expect("ping answered");
    assert!(ping_at < seen.len() - 1, "ping reply must overtake the stream: {:?}", &seen[..5]);
    assert!(seen[..ping_at].iter().any(|e| e.0 == 1), "the stream started first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_or_volume_is_refused() {
    let s = server().await;
    let mut bad = cfg(0, Uuid::new_v4());
    bad.token = "wrong".into();
    let e = ReplicaClient::connect(s.data, bad).await.unwrap_err();
    assert_eq!(e.status(), Some(Status::Auth), "{e}");
    let mut bad = cfg(0, Uuid::new_v4());
    bad.volume_id = "another-volume".into();
    let e = ReplicaClient::connect(s.data, bad).await.unwrap_err();
    assert_eq!(e.status(), Some(Status::Auth), "{e}");
    // The management API refuses too.
    let mut m = ReplicaManagerClient::connect(format!("http://{}", s.mgmt)).await.unwrap();
    let e = m.stat(pb::StatRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_epochs_are_refused_and_fencing_deposes_the_old_engine() {
    let s = server().await;
    let (old, old_engine) = fenced(&s, 2).await;
    old.write(0, block(1, 4096), false).await.unwrap();

    // An older epoch cannot even connect; an equal epoch from another engine neither.
    let e = ReplicaClient::connect(s.data, cfg(1, Uuid::new_v4())).await.unwrap_err();
    assert_eq!(e.status(), Some(Status::StaleEpoch));
    let e = ReplicaClient::connect(s.data, cfg(2, Uuid::new_v4())).await.unwrap_err();
    assert_eq!(e.status(), Some(Status::EpochConflict));

    // A newer epoch connects but may not do IO until it fenced.
    let new_engine = Uuid::new_v4();
    let new = ReplicaClient::connect(s.data, cfg(3, new_engine)).await.unwrap();
    let e = new.read(0, 4096).await.unwrap_err();
    assert_eq!(e.status(), Some(Status::NotFenced));
    // Fencing backwards is refused.
    let e = new.fence(1, new_engine).await.unwrap_err();
    assert_eq!(e.status(), Some(Status::StaleEpoch));

    // The old engine keeps writing while the new one fences. Every write the old engine saw
    // acknowledged is visible to the new engine once the fence returned; afterwards the old
    // engine gets nothing through.
    let old = Arc::new(old);
    let writers: Vec<_> = (0..200u64)
        .map(|i| {
            let old = old.clone();
            tokio::spawn(async move {
                let off = (1 + i) * 4096;
                (off, i, old.write(off, block(100 + i, 4096), false).await)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(2)).await;
    new.fence(3, new_engine).await.unwrap();
    for w in writers {
        let (off, i, r) = w.await.unwrap();
        let got = new.read(off, 4096).await.unwrap();
        if r.is_ok() {
            assert_eq!(got, block(100 + i, 4096), "acknowledged write at {off} lost across the fence");
        }
    }
    let after = old.write(0, block(9, 4096), false).await;
    assert!(after.is_err(), "deposed engine still wrote");
    assert_eq!(new.read(0, 4096).await.unwrap(), block(1, 4096));
    let st = new.stat().await.unwrap();
    assert_eq!((st.epoch, st.engine_id), (3, Some(new_engine)));
    assert_ne!(Some(old_engine), st.engine_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_errors_and_lose_nothing() {
    let s = server_with(Duration::from_secs(30), 8 * MIB).await;
    let (c, engine) = fenced(&s, 1).await;
    c.write(0, block(5, 8192), false).await.unwrap();
    let cases: Vec<(Result<(), ClientError>, Status)> = vec![
        (c.write(100, block(1, 4096), false).await, Status::Invalid),
        (c.write(8 * MIB, block(1, 4096), false).await, Status::OutOfRange),
        (c.write(u64::MAX - 4095, block(1, 4096), false).await, Status::OutOfRange),
        (c.read(8 * MIB - 4096, 8192).await.map(drop), Status::OutOfRange),
        (c.read(0, wire::MAX_IO + 4096).await.map(drop), Status::Invalid),
        (c.unmap(4096, 100).await, Status::Invalid),
        (c.read_snapshot("missing", 0, 4096).await.map(drop), Status::NotFound),
        (c.snapshot_delete("missing").await, Status::NotFound),
        (c.resize(4096).await, Status::Invalid),
    ];
    for (i, (r, want)) in cases.into_iter().enumerate() {
        assert_eq!(r.unwrap_err().status(), Some(want), "case {i}");
    }
    assert_eq!(c.read(0, 8192).await.unwrap(), block(5, 8192), "refused requests changed data");

    // Raw frames: a write whose length disagrees with its payload gets Invalid with its id; an
    // unknown opcode gets Unsupported; the connection stays usable.
    let mut raw = TcpStream::connect(s.data).await.unwrap();
    let mut buf = BytesMut::new();
    let hello = Hello {
        version: wire::VERSION,
        volume_id: VOL.into(),
        token: TOKEN.into(),
        epoch: 1,
        engine_id: engine,
    };
    tokio_util::codec::Encoder::encode(
        &mut ClientCodec::default(),
        Request { id: 0, op: Op::Hello(hello) },
        &mut buf,
    )
    .unwrap();
    for (id, code, len, payload) in [(7u64, wire::opcode::WRITE, 4096u32, 10usize), (8, 0xEE, 0, 0)] {
        buf.put_u32(24 + payload as u32);
        buf.put_u8(code);
        buf.put_u8(0);
        buf.put_u16(0);
        buf.put_u64(id);
        buf.put_u64(0);
        buf.put_u32(len);
        buf.put_bytes(0xAB, payload);
    }
    raw.write_all(&buf).await.unwrap();
    let mut f = Framed::new(raw, ClientCodec::default());
    assert_eq!(f.next().await.unwrap().unwrap().status, Status::Ok);
    let mut got: Vec<_> = vec![f.next().await.unwrap().unwrap(), f.next().await.unwrap().unwrap()]
        .into_iter()
        .map(|r| (r.id, r.status))
        .collect();
    got.sort_by_key(|g| g.0);
    assert_eq!(got, vec![(7, Status::Invalid), (8, Status::Unsupported)]);

    // An oversize frame closes that connection, and only that one.
    let mut raw = f.into_inner();
    raw.write_all(&(wire::MAX_FRAME + 1).to_be_bytes()).await.unwrap();
    let mut sink = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut sink)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0, "connection should be closed");
    // Garbage before a hello closes the connection too.
    let mut raw = TcpStream::connect(s.data).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(15), raw.read(&mut sink)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(c.read(0, 8192).await.unwrap(), block(5, 8192));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_close_and_heartbeats_keep_them_open() {
    let s = server_with(Duration::from_millis(400), 8 * MIB).await;
    let engine = Uuid::new_v4();
    let mut quiet = cfg(0, engine);
    quiet.heartbeat = Duration::ZERO;
    let silent = ReplicaClient::connect(s.data, quiet).await.unwrap();
    let alive = ReplicaClient::connect(s.data, cfg(0, engine)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(silent.stat().await.is_err(), "a silent connection must be closed");
    alive.stat().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocated_stream_carries_exactly_the_written_data() {
    let s = server().await;
    let (c, _) = fenced(&s, 1).await;
    let writes = [(0u64, 1u64), (5 * MIB, 2), (5 * MIB + 128 * 1024, 3), (63 * MIB, 4)];
    for (off, tag) in writes {
        c.write(off, block(tag, 64 * 1024), false).await.unwrap();
    }
    c.snapshot_create("s1").await.unwrap();
    c.unmap(0, 64 * 1024).await.unwrap();
    let collect = |mut rx: tokio::sync::mpsc::Receiver<Result<(u64, Bytes), ClientError>>| async move {
        let mut out = Vec::new();
        while let Some(item) = rx.recv().await {
            let (off, data) = item.unwrap();
            for (i, chunk) in data.chunks(64 * 1024).enumerate() {
                out.push((off + i as u64 * 64 * 1024, Bytes::copy_from_slice(chunk)));
            }
        }
        out
    };
    let snap = collect(c.read_allocated(Some("s1"), 0, 0).await.unwrap()).await;
    let want: Vec<_> = writes.iter().map(|&(o, t)| (o, block(t, 64 * 1024))).collect();
    assert_eq!(snap, want);
    let head = collect(c.read_allocated(None, 0, 0).await.unwrap()).await;
    assert_eq!(head, want[1..].to_vec());
    let window = collect(c.read_allocated(None, 5 * MIB, MIB).await.unwrap()).await;
    assert_eq!(window, want[1..3].to_vec());

    // A volume whose size is not a whole number of clusters: the stream ends at the volume's end.
    let odd = server_with(Duration::from_secs(30), 4 * MIB + 8192).await;
    let (c, _) = fenced(&odd, 1).await;
    c.write(4 * MIB, block(9, 8192), false).await.unwrap();
    let mut rx = c.read_allocated(None, 0, 0).await.unwrap();
    let (at, data) = rx.recv().await.unwrap().unwrap();
    assert_eq!((at, data), (4 * MIB, block(9, 8192)));
    assert!(rx.recv().await.is_none());
}

fn authed<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_api_snapshots_clones_resizes_and_deletes() {
    let s = server().await;
    let (c, _) = fenced(&s, 1).await;
    c.write(MIB, block(7, 4 * MIB as usize), false).await.unwrap();
    let mut m = ReplicaManagerClient::connect(format!("http://{}", s.mgmt)).await.unwrap();

    // Create is idempotent for the same geometry and refuses a different one.
    let st =
        m.create(authed(pb::CreateRequest { size_bytes: 64 * MIB, cluster_size_bytes: 0 })).await.unwrap();
    assert_eq!(st.get_ref().size_bytes, 64 * MIB);
    let e = m
        .create(authed(pb::CreateRequest { size_bytes: 32 * MIB, cluster_size_bytes: 0 }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists);

    m.create_snapshot(authed(pb::SnapshotRequest { name: "base".into() })).await.unwrap();
    let e = m.create_snapshot(authed(pb::SnapshotRequest { name: "base".into() })).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists);
    let list = m.list_snapshots(authed(pb::ListSnapshotsRequest {})).await.unwrap().into_inner();
    assert_eq!(list.snapshots.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), vec!["base"]);

    // Clone with streamed progress, ending in a finished message.
    let mut stream = m
        .clone_snapshot(authed(pb::CloneSnapshotRequest {
            snapshot: "base".into(),
            target_name: "clone-1".into(),
            target_volume_id: "vol-clone".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    let mut msgs = Vec::new();
    while let Some(p) = stream.message().await.unwrap() {
        msgs.push(p);
    }
    let last = msgs.last().unwrap();
    assert!(last.finished && last.done_bytes == 4 * MIB, "{msgs:?}");
    assert!(msgs.len() >= 2, "progress before the end: {msgs:?}");
    let clone_dir = s.replica.dir().parent().unwrap().join("clone-1");
    let clone = barnacle_replica::Store::open(&clone_dir).unwrap();
    let mut buf = vec![0u8; 4 * MIB as usize];
    clone.read(MIB, &mut buf).unwrap();
    assert_eq!(buf, block(7, 4 * MIB as usize));
    drop(clone);
    let e = m
        .clone_snapshot(authed(pb::CloneSnapshotRequest {
            snapshot: "base".into(),
            target_name: "../escape".into(),
            target_volume_id: "x".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    let st = m.resize(authed(pb::ResizeRequest { size_bytes: 128 * MIB })).await.unwrap().into_inner();
    assert_eq!(st.size_bytes, 128 * MIB);
    let e = m.resize(authed(pb::ResizeRequest { size_bytes: MIB })).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::OutOfRange);

    let freed =
        m.delete_snapshot(authed(pb::SnapshotRequest { name: "base".into() })).await.unwrap().into_inner();
    assert_eq!(freed.freed_bytes, 0, "the head still holds the data");
    m.delete(authed(pb::DeleteRequest {})).await.unwrap();
    assert!(c.read(0, 4096).await.is_err(), "connections close when the store is deleted");
    let e = m.stat(authed(pb::StatRequest {})).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(!s.replica.dir().join("data").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_is_not_held_up_by_a_peer_that_stopped_reading() {
    let s = server().await;
    let (c, engine) = fenced(&s, 1).await;
    c.write(0, block(1, 4 * MIB as usize), false).await.unwrap();
    // The old engine floods 4 MiB reads and never reads a reply: its socket and the replica's
    // reply queue fill up.
    let mut f = raw_connection(&s, 1, engine).await;
    for id in 1..200u64 {
        f.feed(Request { id, op: Op::Read { offset: 0, len: 4 * MIB as u32 } }).await.unwrap();
    }
    f.feed(Request { id: 999, op: Op::ReadAllocated { snapshot: None, offset: 0, len: 0 } }).await.unwrap();
    f.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (new, _) = tokio::time::timeout(Duration::from_secs(10), fenced(&s, 2))
        .await
        .expect("fence hung behind a peer that does not read");
    assert_eq!(new.read(0, 4096).await.unwrap(), block(1, 4096));
    drop(f);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refencing_on_the_same_connection_never_refuses_its_own_requests() {
    let s = server().await;
    let (c, engine) = fenced(&s, 1).await;
    let c = Arc::new(c);
    for epoch in 2..12u64 {
        let writers: Vec<_> = (0..32u64)
            .map(|i| {
                let c = c.clone();
                tokio::spawn(async move { c.write(i * 4096, block(epoch * 100 + i, 4096), false).await })
            })
            .collect();
        c.fence(epoch, engine).await.unwrap();
        for w in writers {
            w.await.unwrap().unwrap();
        }
    }
    assert_eq!(c.stat().await.unwrap().epoch, 11);
}

/// A fake replica that answers the hello, then reads nothing and answers nothing.
async fn mute_replica() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = l.accept().await.unwrap();
        let mut f = Framed::new(stream, wire::ServerCodec::default());
        let _hello = f.next().await;
        let reply = wire::HelloReply {
            version: wire::VERSION,
            volume_id: VOL.into(),
            store_id: Uuid::new_v4(),
            size: 64 * MIB,
            epoch: 0,
            max_io: wire::MAX_IO,
            shm: false,
        };
        f.send(wire::Reply::ok(0, Bytes::from(serde_json::to_vec(&reply).unwrap()))).await.unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(f);
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_gives_up_on_a_replica_that_stopped_answering() {
    // Without heartbeats: every call ends at its timeout, even when the socket is full.
    let addr = mute_replica().await;
    let mut config = cfg(0, Uuid::new_v4());
    config.heartbeat = Duration::ZERO;
    config.request_timeout = Duration::from_millis(800);
    let c = Arc::new(ReplicaClient::connect(addr, config).await.unwrap());
    let started = std::time::Instant::now();
    let calls: Vec<_> = (0..64)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { c.write(i * 4 * MIB, block(i, 4 * MIB as usize), false).await })
        })
        .collect();
    for call in calls {
        let e = call.await.unwrap().unwrap_err();
        assert!(matches!(e, ClientError::Timeout(_)), "{e}");
    }
    assert!(started.elapsed() < Duration::from_secs(10), "calls hung: {:?}", started.elapsed());

    // With heartbeats: silence as long as the request timeout and four beats closes the
    // connection and fails what waits then, though its own timeout is far off.
    let addr = mute_replica().await;
    let mut config = cfg(0, Uuid::new_v4());
    config.heartbeat = Duration::from_millis(100);
    config.request_timeout = Duration::from_millis(2600);
    let c = ReplicaClient::connect(addr, config).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!c.is_closed(), "closed before a request timeout of silence");
    let asked = std::time::Instant::now();
    let e = tokio::time::timeout(Duration::from_secs(10), c.flush())
        .await
        .expect("not closed on silence")
        .unwrap_err();
    assert!(matches!(e, ClientError::Closed), "{e}");
    assert!(
        asked.elapsed() < Duration::from_millis(2900),
        "waited out its own timeout: {:?}",
        asked.elapsed()
    );
    assert!(c.is_closed() && c.silence() >= Duration::from_secs(3));
}

#[tokio::test]
async fn the_protocol_works_the_same_over_a_unix_socket() {
    let s = server().await;
    let engine = Uuid::new_v4();
    let c = ReplicaClient::connect_to(&s.unix, cfg(1, engine)).await.unwrap();
    c.fence(1, engine).await.unwrap();
    let data = Bytes::from(vec![0x3cu8; 256 * 1024]);
    c.write(4096, data.clone(), true).await.unwrap();
    assert_eq!(c.read(4096, 256 * 1024).await.unwrap(), data);
    // The TCP port sees the same store, and a wrong token is refused on the socket too.
    let t = ReplicaClient::connect(s.data, cfg(1, engine)).await.unwrap();
    assert_eq!(t.read(4096, 4096).await.unwrap(), data.slice(..4096));
    let mut bad = cfg(1, engine);
    bad.token = "nope".into();
    let e = ReplicaClient::connect_to(&s.unix, bad).await.err().unwrap();
    assert_eq!(e.status(), Some(Status::Auth));
    // Malformed addresses are refused before connecting.
    assert!(matches!(
        ReplicaClient::connect_to("nowhere", cfg(1, engine)).await,
        Err(ClientError::Protocol(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transfers_to_a_local_engine_go_through_shared_memory() {
    let s = server().await;
    let engine = Uuid::new_v4();
    let c = Arc::new(ReplicaClient::connect_to(&s.unix, cfg(1, engine)).await.unwrap());
    assert!(c.hello().shm && c.has_shared_memory(), "the replica mapped the engine's memory");
    c.fence(1, engine).await.unwrap();
    // More buffers than the area has room for (16 of 128 KiB): the rest are heap buffers and go
    // through the socket. All 40 writes are then in flight together.
    let bufs: Vec<(u64, Bytes, bool)> = (0..40u64)
        .map(|i| {
            let data = block(i, 128 * 1024);
            match c.write_buffer(data.len()) {
                Some(mut slot) => {
                    slot.as_mut_slice().copy_from_slice(&data);
                    (i, slot.into_bytes(), true)
                }
                None => (i, data, false),
            }
        })
        .collect();
    assert_eq!(bufs.iter().filter(|b| b.2).count(), 16, "the area holds 16 writes of 128 KiB");
    let writes: Vec<_> = bufs
        .into_iter()
        .map(|(i, buf, _)| {
            let c = c.clone();
            tokio::spawn(async move { c.write(i * 128 * 1024, buf, false).await.unwrap() })
        })
        .collect();
    for w in writes {
        w.await.unwrap();
    }
    // Read back over shared memory, over the socket (small reads) and over TCP: all agree.
    let t = ReplicaClient::connect(s.data, cfg(1, engine)).await.unwrap();
    for i in 0..40u64 {
        let want = block(i, 128 * 1024);
        assert_eq!(c.read(i * 128 * 1024, 128 * 1024).await.unwrap(), want, "block {i} over shared memory");
        assert_eq!(t.read(i * 128 * 1024, 128 * 1024).await.unwrap(), want, "block {i} over TCP");
        assert_eq!(c.read(i * 128 * 1024 + 4096, 4096).await.unwrap(), want.slice(4096..8192));
    }
    // Every slot came back once its request was answered: the largest request still fits.
    assert!(c.write_buffer(barnacle_replica::shm::MAX_IO).is_some());
}

/// Sends the unix transport preamble by hand: `byte`, with `fd` attached if given.
fn preamble(stream: &std::os::unix::net::UnixStream, byte: u8, fd: Option<std::os::fd::RawFd>) {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    use std::os::fd::AsRawFd;
    let fds: Vec<_> = fd.into_iter().collect();
    let cmsgs: Vec<ControlMessage<'_>> =
        if fds.is_empty() { vec![] } else { vec![ControlMessage::ScmRights(&fds)] };
    let n =
        sendmsg::<()>(stream.as_raw_fd(), &[std::io::IoSlice::new(&[byte])], &cmsgs, MsgFlags::empty(), None)
            .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test]
async fn shared_memory_requests_are_checked() {
    use std::os::fd::AsRawFd;
    let s = server().await;
    let path = s.unix.strip_prefix("unix:").unwrap().to_owned();
    let engine = Uuid::new_v4();
    let hello = |epoch| {
        Op::Hello(Hello {
            version: wire::VERSION,
            volume_id: VOL.into(),
            token: TOKEN.into(),
            epoch,
            engine_id: engine,
        })
    };
    // A sealed area: the replica maps it, but refuses ranges outside it.
    let area = barnacle_replica::shm::Area::create().unwrap();
    let std_stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
    preamble(&std_stream, b'S', Some(area.fd().as_raw_fd()));
    std_stream.set_nonblocking(true).unwrap();
    let mut f = Framed::new(tokio::net::UnixStream::from_std(std_stream).unwrap(), ClientCodec::default());
    f.send(Request { id: 1, op: hello(1) }).await.unwrap();
    let r = f.next().await.unwrap().unwrap();
    let reply: wire::HelloReply = serde_json::from_slice(&r.payload).unwrap();
    assert!(reply.shm);
    f.send(Request { id: 2, op: Op::Fence { epoch: 1, engine_id: engine } }).await.unwrap();
    assert_eq!(f.next().await.unwrap().unwrap().status, Status::Ok);
    let size = barnacle_replica::shm::AREA_BYTES as u64;
    for (id, op) in [
        (3, Op::ReadShm { offset: 0, len: 65536, shm_offset: size - 4096 }),
        (4, Op::WriteShm { offset: 0, len: 4096, shm_offset: u64::MAX - 100, fua: false }),
        (5, Op::ReadShm { offset: 0, len: wire::MAX_IO + 4096, shm_offset: 0 }),
    ] {
        f.send(Request { id, op }).await.unwrap();
        let r = f.next().await.unwrap().unwrap();
        assert_eq!((r.id, r.status), (id, Status::Invalid), "{}", String::from_utf8_lossy(&r.payload));
    }
    // A range inside works, and the connection kept serving after the refusals.
    f.send(Request { id: 6, op: Op::ReadShm { offset: 0, len: 65536, shm_offset: 65536 } }).await.unwrap();
    let r = f.next().await.unwrap().unwrap();
    assert_eq!((r.id, r.status, r.payload.len()), (6, Status::Ok, 0));

    // Memory that could shrink under the replica is refused; the connection goes on without it.
    let unsealed = nix::sys::memfd::memfd_create("t", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
    nix::unistd::ftruncate(&unsealed, 1 << 20).unwrap();
    let std_stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
    preamble(&std_stream, b'S', Some(unsealed.as_raw_fd()));
    std_stream.set_nonblocking(true).unwrap();
    let mut f = Framed::new(tokio::net::UnixStream::from_std(std_stream).unwrap(), ClientCodec::default());
    f.send(Request { id: 1, op: hello(1) }).await.unwrap();
    let r = f.next().await.unwrap().unwrap();
    let reply: wire::HelloReply = serde_json::from_slice(&r.payload).unwrap();
    assert!(!reply.shm);
    f.send(Request { id: 2, op: Op::ReadShm { offset: 0, len: 65536, shm_offset: 0 } }).await.unwrap();
    assert_eq!(f.next().await.unwrap().unwrap().status, Status::Invalid);

    // An unknown preamble closes the connection before any hello.
    let std_stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
    preamble(&std_stream, b'X', None);
    std_stream.set_nonblocking(true).unwrap();
    let mut f = Framed::new(tokio::net::UnixStream::from_std(std_stream).unwrap(), ClientCodec::default());
    let _ = f.send(Request { id: 1, op: hello(1) }).await;
    assert!(matches!(f.next().await, None | Some(Err(_))));

    // Over TCP there is no shared memory to name.
    let (c, _) = fenced(&s, 2).await;
    assert!(!c.has_shared_memory());
}
