//! The `barnacle` command against `barnacle up` running in the background: the README
//! walk-through, line by line from README.md (JSON output parsed); `up` run twice on one data
//! directory finds its volumes and data again; every command's `--help`; helpful errors with a
//! non-zero exit. Needs root (real mounts).

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use barnacle_tests::{binary, cleanup_attachments, kill_processes_mentioning, loops_under, mounts_under};
use serde_json::Value;

/// `barnacle up` on a data directory, in the background. Dropping it stops it like Ctrl-C and
/// then removes anything left.
struct Up {
    child: Child,
    data: PathBuf,
}

impl Up {
    fn start(data: &Path) -> Up {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data.with_extension("up.log"))
            .unwrap();
        let child = Command::new(binary("barnacle"))
            .arg("--data-dir")
            .arg(data)
            .arg("up")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let up = Up { child, data: data.to_owned() };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if up.data.join("nodes/n3/plugin.ready").exists() && bn(data, &["nodes"]).status.success() {
                break;
            }
            assert!(Instant::now() < deadline, "barnacle up did not start: {}", up.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        up
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.data.with_extension("up.log")).unwrap_or_default()
    }

    /// Ctrl-C, and wait for the cluster to stop.
    fn stop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "barnacle up did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
        cleanup_attachments(&self.data);
        kill_processes_mentioning(&self.data);
    }
}

fn bn(data: &Path, args: &[&str]) -> Output {
    Command::new(binary("barnacle")).arg("--data-dir").arg(data).args(args).output().unwrap()
}

/// Runs a command with `-o json` and parses its output; panics with stderr on failure.
fn json(data: &Path, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    let out = bn(data, &a);
    assert!(out.status.success(), "barnacle {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("barnacle {args:?} gave no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout))
    })
}

/// The walk-through's lines from README.md.
fn walkthrough() -> Vec<String> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let start = readme.find("<!-- walkthrough -->").unwrap();
    let end = readme.find("<!-- /walkthrough -->").unwrap();
    readme[start..end]
        .lines()
        .filter(|l| !l.starts_with("```") && !l.starts_with("<!--") && !l.trim().is_empty())
        .map(|l| l.split("  #").next().unwrap().trim().to_owned())
        .collect()
}

fn gib(v: &Value) -> f64 {
    v["size_bytes"].as_u64().unwrap() as f64 / f64::from(1 << 30)
}

#[test]
fn the_readme_walkthrough_runs_line_by_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mnt = tmp.path().join("mnt");
    let _up = Up::start(&data);
    let lines = walkthrough();
    assert!(lines.len() >= 12, "{lines:?}");
    let local = |s: &str| s.replace("/mnt/", &format!("{}/", mnt.display()));
    for line in &lines {
        let line = local(line);
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(rest) = line.strip_prefix("echo ") {
            // echo TEXT > FILE && sync
            let (text, file) = rest.split_once(" > ").unwrap();
            let file = file.split(" && ").next().unwrap();
            std::fs::write(file, format!("{text}\n")).unwrap();
            nix::unistd::sync();
            continue;
        }
        if words[0] == "cat" {
            assert_eq!(std::fs::read_to_string(words[1]).unwrap(), "hello\n", "{line}");
            continue;
        }
        if words[0] == "df" {
            let s = nix::sys::statvfs::statvfs(Path::new(words[2])).unwrap();
            let size = s.blocks() * s.fragment_size();
            assert!(size > (3 << 29), "{line}: the filesystem is {size} bytes");
            continue;
        }
        assert_eq!(words[0], "./barnacle", "a walk-through line this test does not know: {line}");
        let args: Vec<&str> = words[1..].to_vec();
        match args[..] {
            ["status", "--watch"] => {
                // Poll the JSON status until every replica is healthy again.
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    let st = json(&data, &["status"]);
                    let all_healthy = st.as_array().unwrap().iter().all(|v| {
                        v["replicas"].as_array().unwrap().iter().all(|r| r["state"] == "healthy")
                            && v["rebuild"].is_null()
                    });
                    if all_healthy {
                        break;
                    }
                    assert!(Instant::now() < deadline, "replicas never all healthy: {st}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            ["volume", "create", name, ..] => {
                let v = json(&data, &args);
                assert_eq!((v["name"].as_str(), v["mode"].as_str()), (Some(name), Some("xfs")), "{v}");
                assert_eq!(gib(&v), 1.0);
                assert_eq!(v["replicas"].as_array().unwrap().len(), 3);
                if line.contains("--from-snapshot") {
                    assert_eq!(v["source"]["kind"], "snapshot");
                }
            }
            ["attach", name, "--node", node, "--mount", path] => {
                let v = json(&data, &args);
                assert_eq!(
                    (v["name"].as_str(), v["attached_node"].as_str(), v["mount"].as_str()),
                    (Some(name), Some(node), Some(path))
                );
                assert!(mounts_under(&mnt).contains(&PathBuf::from(path)), "{path} is mounted");
            }
            ["snapshot", "create", volume, name] => {
                let s = json(&data, &args);
                assert_eq!(
                    (s[0]["name"].as_str(), s[0]["volume"].as_str(), s[0]["ready"].as_bool()),
                    (Some(name), Some(volume), Some(true))
                );
            }
            ["volume", "expand", _, "--size", _] => {
                let v = json(&data, &args);
                assert_eq!(gib(&v), 2.0, "{v}");
            }
            ["snapshot", "group", name, ref volumes @ ..] => {
                let s = json(&data, &args);
                let members = s.as_array().unwrap();
                assert_eq!(members.len(), volumes.len(), "{s}");
                for (m, v) in members.iter().zip(volumes) {
                    assert_eq!(
                        (m["group"]["name"].as_str(), m["ready"].as_bool()),
                        (Some(name), Some(true)),
                        "{s}"
                    );
                    assert!(volumes.contains(&m["volume"].as_str().unwrap()), "{v}: {s}");
                }
            }
            ["volume", "modify", _, "--replicas", n, "--max-iops", iops, ..] => {
                let v = json(&data, &args);
                let replicas = v["replicas"].as_array().unwrap();
                assert_eq!(replicas.len(), n.parse::<usize>().unwrap(), "{v}");
                assert_eq!(v["max_iops"].as_u64(), Some(iops.parse().unwrap()), "{v}");
                if args.contains(&"--wait") {
                    assert!(replicas.iter().all(|r| r["state"] == "healthy"), "--wait returned early: {v}");
                }
            }
            ["volume", "scrub", name, "--wait"] => {
                let v = json(&data, &args);
                let s = &v["scrub"];
                assert_eq!((v["name"].as_str(), s["running"].as_bool()), (Some(name), Some(false)), "{v}");
                assert!(s["total_bytes"].as_u64().unwrap() > 0, "{v}");
                assert_eq!(s["done_bytes"], s["total_bytes"], "{v}");
                assert_eq!((s["damaged"].as_u64(), s["error"].as_str()), (Some(0), Some("")), "{v}");
            }
            ["replica", "kill", volume, replica] => {
                let k = json(&data, &args);
                assert_eq!((k["volume"].as_str(), k["replica"].as_str()), (Some(volume), Some(replica)));
                assert!(k["pid"].as_u64().unwrap() > 0);
            }
            ["detach", name] => {
                let v = json(&data, &args);
                assert_eq!(v["name"].as_str(), Some(name));
                assert!(v["attached_node"].is_null() && v["mount"].is_null(), "{v}");
            }
            ["volume", "delete", name] | ["snapshot", "delete", name] => {
                let d = json(&data, &args);
                assert_eq!(d["deleted"].as_str(), Some(name));
            }
            _ => panic!("a walk-through command this test does not check: {line}"),
        }
    }
    assert_eq!(json(&data, &["volume", "list"]), Value::Array(vec![]));
    assert_eq!(json(&data, &["snapshot", "list"]), Value::Array(vec![]));
    assert!(mounts_under(&mnt).is_empty() && loops_under(tmp.path()).is_empty());
}

#[test]
fn up_twice_finds_its_volumes_and_their_data_again() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mnt = tmp.path().join("mnt");
    let mut up = Up::start(&data);
    json(&data, &["volume", "create", "keep", "--size", "64MiB", "--replicas", "2"]);
    json(&data, &["attach", "keep", "--node", "n2", "--mount", mnt.to_str().unwrap()]);
    std::fs::write(mnt.join("f.txt"), b"still here").unwrap();
    nix::unistd::sync();
    json(&data, &["detach", "keep"]);
    up.stop();
    assert!(bn(&data, &["volume", "list"]).status.code() != Some(0), "no cluster, no answer");
    drop(up);

    let _up = Up::start(&data);
    let vols = json(&data, &["volume", "list"]);
    assert_eq!(vols[0]["name"], "keep");
    assert_eq!(vols[0]["replicas"].as_array().unwrap().len(), 2);
    json(&data, &["attach", "keep", "--node", "n1", "--mount", mnt.to_str().unwrap()]);
    assert_eq!(std::fs::read(mnt.join("f.txt")).unwrap(), b"still here");
    json(&data, &["detach", "keep"]);
    json(&data, &["volume", "delete", "keep"]);
}

#[test]
fn every_command_has_help_and_bad_input_fails_helpfully() {
    use clap::CommandFactory;
    // Every command and subcommand answers --help.
    fn paths(cmd: &clap::Command, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
        out.push(prefix.clone());
        for sub in cmd.get_subcommands() {
            let mut p = prefix.clone();
            p.push(sub.get_name().to_owned());
            paths(sub, p, out);
        }
    }
    let mut all = Vec::new();
    paths(&barnacle_cli::Cli::command(), Vec::new(), &mut all);
    assert!(all.len() > 15, "{all:?}");
    for p in &all {
        let mut args: Vec<&str> = p.iter().map(String::as_str).collect();
        if args.last() == Some(&"help") {
            continue;
        }
        args.push("--help");
        let out = Command::new(binary("barnacle")).args(&args).output().unwrap();
        assert!(out.status.success() && out.stdout.len() > 40, "barnacle {args:?}");
    }

    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    // No cluster: says so, and what to do.
    let out = bn(&data, &["volume", "list"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("barnacle up"), "{out:?}");

    let _up = Up::start(&data);
    let err = |args: &[&str], want: &str| {
        let out = bn(&data, args);
        let e = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "barnacle {args:?} succeeded");
        assert!(e.contains(want), "barnacle {args:?}: {e:?} does not say {want:?}");
    };
    err(&["volume", "get", "nope"], "no volume \"nope\"");
    err(&["volume", "delete", "nope"], "no volume");
    err(&["volume", "create", "x", "--size", "lots"], "is not a size");
    err(&["volume", "create", "x", "--size", "1GiB", "--fs", "btrfs"], "invalid value");
    err(&["snapshot", "delete", "nope"], "no snapshot");
    // More replicas than the 3 nodes: refused with the reason, unless fewer are accepted.
    err(
        &["volume", "create", "five", "--size", "32MiB", "--replicas", "5"],
        "5 replicas need 5 nodes, one each; 3 nodes",
    );
    err(&["volume", "create", "five", "--size", "32MiB", "--allow-fewer"], "--replicas");
    let five =
        json(&data, &["volume", "create", "five", "--size", "32MiB", "--replicas", "5", "--allow-fewer"]);
    assert_eq!(five["replicas"].as_array().map(Vec::len), Some(3), "{five}");
    json(&data, &["volume", "delete", "five"]);
    json(&data, &["volume", "create", "v", "--size", "32MiB", "--replicas", "1"]);
    let yaml = bn(&data, &["-o", "yaml", "volume", "list"]);
    let yaml = String::from_utf8_lossy(&yaml.stdout);
    assert!(
        yaml.contains("- abnormal:") && yaml.contains("name: v") && yaml.contains("size: 32 MiB"),
        "{yaml}"
    );
    let table = String::from_utf8_lossy(&bn(&data, &["volume", "list"]).stdout).into_owned();
    assert!(table.starts_with("NAME") && table.contains("32 MiB"), "{table}");
    let used = tmp.path().join("used");
    std::fs::create_dir_all(&used).unwrap();
    std::fs::write(used.join("something"), b"x").unwrap();
    err(&["attach", "v", "--node", "n1", "--mount", used.to_str().unwrap()], "in use");
    let free = tmp.path().join("free");
    err(
        &["attach", "v", "--node", "n9", "--mount", free.to_str().unwrap()],
        "node \"n9\" is not part of this cluster",
    );
    err(&["replica", "kill", "v", "r7"], "no replica r7");
    err(&["up"], "another `barnacle up` is running");
    json(&data, &["volume", "delete", "v"]);
}
