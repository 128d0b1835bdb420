//! `barnacle up`: a local cluster in the foreground. A controller (RocksDB store, local
//! orchestrator) and one node plugin per simulated node run as child processes; each node's disk
//! is a directory under the data directory. Ctrl-C stops the node plugins, then the controller,
//! which stops every replica and engine. Run again on the same data directory, the controller finds
//! every volume and starts its processes again.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::CliError;
use crate::commands::Ctx;

fn io(what: &str, e: impl std::fmt::Display) -> CliError {
    CliError::Io(format!("{what}: {e}"))
}

struct Child {
    name: String,
    child: tokio::process::Child,
    log: PathBuf,
}

impl Child {
    fn spawn(name: &str, program: &Path, args: &[String], log: &Path) -> Result<Child, CliError> {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| io(&log.display().to_string(), e))?;
        let child = tokio::process::Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            // Ctrl-C reaches `barnacle up` alone, which stops everything in order.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| io(&format!("starting {}", program.display()), e))?;
        Ok(Child { name: name.to_owned(), child, log: log.to_owned() })
    }

    async fn wait_ready(&mut self, ready: &Path) -> Result<(), CliError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !ready.exists() {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(CliError::Io(format!(
                    "{} exited ({status}); see {}",
                    self.name,
                    self.log.display()
                )));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(CliError::Io(format!(
                    "{} did not start within 60 s; see {}",
                    self.name,
                    self.log.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    async fn stop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid.cast_signed()),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

/// Holds the data directory's lock: one `barnacle up` per data directory.
struct Lock(#[allow(dead_code)] std::fs::File);

fn lock(data: &Path) -> Result<Lock, CliError> {
    let path = data.join("up.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io(&path.display().to_string(), e))?;
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { nix::libc::flock(f.as_raw_fd(), nix::libc::LOCK_EX | nix::libc::LOCK_NB) } != 0 {
        return Err(CliError::Usage(format!(
            "another `barnacle up` is running on {}; stop it first or pass another --data-dir",
            data.display()
        )));
    }
    Ok(Lock(f))
}

/// Runs the cluster until Ctrl-C (or SIGTERM).
pub async fn up(data: &Path, nodes: usize) -> Result<(), CliError> {
    if nodes == 0 || nodes > 16 {
        return Err(CliError::Usage("--nodes must be between 1 and 16".into()));
    }
    std::fs::create_dir_all(data.join("logs")).map_err(|e| io(&data.display().to_string(), e))?;
    let _lock = lock(data)?;
    let bin = std::env::current_exe().map_err(|e| io("finding this program", e))?;
    let bin = bin.parent().ok_or_else(|| CliError::Io("this program has no directory".into()))?.to_owned();
    for b in
        ["barnacle-controller", "barnacle-node", "barnacle-replica", "barnacle-engine", "barnacle-nbd-fuse"]
    {
        if !bin.join(b).is_file() {
            return Err(CliError::Usage(format!(
                "{} is missing: build everything with `cargo build --release --workspace`",
                bin.join(b).display()
            )));
        }
    }
    let ctx = Ctx { data: data.to_owned() };
    let names: Vec<String> = (1..=nodes).map(|i| format!("n{i}")).collect();
    for n in &names {
        for sub in ["disk", "plugin", "staging"] {
            std::fs::create_dir_all(ctx.node_dir(n).join(sub))
                .map_err(|e| io("creating node directories", e))?;
        }
    }
    // Ready files of an earlier run mean nothing now.
    for n in &names {
        let _ = std::fs::remove_file(ctx.node_dir(n).join("plugin.ready"));
    }
    let ready = data.join("controller.ready");
    let _ = std::fs::remove_file(&ready);
    let mut args = vec![
        "--endpoint".to_owned(),
        format!("unix://{}", ctx.controller_socket().display()),
        "--state-dir".to_owned(),
        data.join("controller").display().to_string(),
        "--stop-processes-on-exit".to_owned(),
        "--ready-file".to_owned(),
        ready.display().to_string(),
    ];
    for n in &names {
        args.extend(["--node".to_owned(), format!("{n}={}", ctx.node_dir(n).join("disk").display())]);
    }
    let mut controller = Child::spawn(
        "the controller",
        &bin.join("barnacle-controller"),
        &args,
        &data.join("logs/controller.log"),
    )?;
    controller.wait_ready(&ready).await?;
    // Probe until the controller has looked after the volumes of an earlier run.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let ch = csi_proto::unix_channel(&ctx.controller_socket().display().to_string())
            .map_err(|e| io("controller socket", e))?;
        let mut id = csi_proto::v1::identity_client::IdentityClient::new(ch);
        if let Ok(r) = id.probe(csi_proto::v1::ProbeRequest {}).await
            && r.into_inner().ready == Some(true)
        {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(CliError::Io(format!(
                "the controller did not get ready; see {}",
                data.join("logs/controller.log").display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut plugins = Vec::new();
    for n in &names {
        let ready = ctx.node_dir(n).join("plugin.ready");
        let _ = std::fs::remove_file(&ready);
        let args = vec![
            "--endpoint".to_owned(),
            format!("unix://{}", ctx.node_socket(n).display()),
            "--node-id".to_owned(),
            n.clone(),
            "--state-dir".to_owned(),
            ctx.node_dir(n).join("plugin").display().to_string(),
            "--ready-file".to_owned(),
            ready.display().to_string(),
        ];
        let mut p = Child::spawn(
            &format!("node {n}"),
            &bin.join("barnacle-node"),
            &args,
            &data.join(format!("logs/node-{n}.log")),
        )?;
        p.wait_ready(&ready).await?;
        plugins.push(p);
    }
    #[allow(clippy::print_stdout)]
    {
        println!("Barnacle is up: a controller and {nodes} nodes on this machine.");
        println!("  data:        {}", data.display());
        println!("  controller:  {}", ctx.controller_socket().display());
        for n in &names {
            println!(
                "  node {n}:     {} (disk {})",
                ctx.node_socket(n).display(),
                ctx.node_dir(n).join("disk").display()
            );
        }
        println!("  logs:        {}", data.join("logs").display());
        println!("Try: barnacle volume create demo --size 1GiB   (Ctrl-C stops the cluster)");
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| io("signals", e))?;
    let failed = tokio::select! {
        _ = tokio::signal::ctrl_c() => None,
        _ = term.recv() => None,
        r = controller.child.wait() => Some(format!("the controller exited ({r:?}); see {}", controller.log.display())),
    };
    #[allow(clippy::print_stdout)]
    {
        println!("Stopping: node plugins, then the controller and every replica and engine.");
    }
    for p in &mut plugins {
        p.stop().await;
    }
    controller.stop().await;
    match failed {
        Some(msg) => Err(CliError::Io(msg)),
        None => Ok(()),
    }
}
