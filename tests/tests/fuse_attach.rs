//! The userspace attach (barnacle-nbd-fuse + a loop device in direct-IO mode, as the node plugin
//! sets it up) keeps the queue depth of what runs above it: concurrent IO on the loop device
//! reaches the NBD server concurrently. Judged by a server we did not write: nbdkit's memory
//! plugin behind its delay filter (every request takes a while) and its log filter (every request's
//! start and end, in order), so the number of requests the server had in flight at once is read
//! from its log, not inferred from timing. Needs root (FUSE, loop devices).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use barnacle_tests::{binary, run_ok};

struct Cleanup {
    children: Vec<Child>,
    mountpoint: std::path::PathBuf,
    device: Option<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(d) = &self.device {
            let _ = Command::new("losetup").args(["-d", d]).status();
        }
        let _ = Command::new("umount").arg("-l").arg(&self.mountpoint).status();
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_for(what: &str, ok: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(Instant::now() < deadline, "{what} did not happen within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The most requests of `op` ("Read", "Write") the nbdkit log shows in flight at once.
fn peak_in_flight(log: &Path, op: &str) -> (usize, usize) {
    let text = std::fs::read_to_string(log).unwrap();
    let (start, end) = (format!(" {op} id="), format!("...{op} id="));
    let (mut now, mut peak, mut total) = (0usize, 0usize, 0usize);
    for line in text.lines() {
        if line.contains(&end) {
            now = now.saturating_sub(1);
        } else if line.contains(&start) {
            now += 1;
            total += 1;
            peak = peak.max(now);
        }
    }
    (peak, total)
}

#[test]
fn concurrent_io_on_the_loop_device_reaches_the_server_concurrently() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, log, mnt) =
        (dir.path().join("nbd.sock"), dir.path().join("nbdkit.log"), dir.path().join("mnt"));
    std::fs::create_dir(&mnt).unwrap();
    let mut guard = Cleanup { children: Vec::new(), mountpoint: mnt.clone(), device: None };
    let nbdkit = Command::new("nbdkit")
        .args(["--foreground", "--exit-with-parent", "-e", "disk", "-U"])
        .arg(&sock)
        .args(["--filter=log", "--filter=delay", "memory", "64M", "delay-read=50ms", "delay-write=50ms"])
        .arg(format!("logfile={}", log.display()))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    guard.children.push(nbdkit);
    wait_for("nbdkit listening", || sock.exists());
    let helper = Command::new(binary("barnacle-nbd-fuse"))
        .args(["--volume-id", "fuse-depth", "--export", "disk", "--socket"])
        .arg(&sock)
        .arg("--mountpoint")
        .arg(&mnt)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    guard.children.push(helper);
    let disk = mnt.join("disk");
    wait_for("the FUSE file", || std::fs::metadata(&disk).is_ok_and(|m| m.len() == 64 << 20));
    let out = run_ok(
        "losetup",
        &["--find", "--show", "--sector-size", "4096", "--direct-io=on", disk.to_str().unwrap()],
    );
    let device = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    guard.device = Some(device.clone());
    let dio = std::fs::read_to_string(format!("/sys/block/{}/loop/dio", device.trim_start_matches("/dev/")))
        .unwrap();
    assert_eq!(dio.trim(), "1", "the loop device runs in direct-IO mode on the FUSE file");

    // 16 at a time, 48 of each, every one taking 50 ms at the server.
    for rw in ["randread", "randwrite"] {
        run_ok(
            "fio",
            &[
                "--name=depth",
                &format!("--filename={device}"),
                "--ioengine=libaio",
                "--direct=1",
                &format!("--rw={rw}"),
                "--bs=4k",
                "--iodepth=16",
                "--number_ios=48",
                "--size=64m",
                "--output=/dev/null",
            ],
        );
    }
    for op in ["Read", "Write"] {
        let (peak, total) = peak_in_flight(&log, op);
        assert!(total >= 48, "{total} {op} requests reached the server");
        // One at a time is what a loop device gets when the FUSE file does not take asynchronous
        // direct IO; at least half the queue depth is what passing it through looks like.
        assert!(
            peak >= 8,
            "at most {peak} {op} requests were in flight at the server at once (queue depth 16)"
        );
    }
}
