//! `barnacle`: the command line of a local Barnacle cluster.

use barnacle_cli::commands::{self, Ctx};
use barnacle_cli::{Cli, Command, data_dir, up};
use clap::{CommandFactory, Parser};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let data = data_dir(cli.data_dir.clone());
    let ctx = Ctx { data: data.clone() };
    let format = cli.output;
    let result = rt.block_on(async {
        match cli.command {
            Command::Up { nodes } => up::up(&data, nodes).await.map(|()| None),
            Command::Volume(c) => commands::volume(&ctx, c).await.map(Some),
            Command::Attach { volume, node, mount, readonly } => {
                commands::attach(&ctx, &volume, &node, &mount, readonly).await.map(Some)
            }
            Command::Detach { volume } => commands::detach(&ctx, &volume).await.map(Some),
            Command::Snapshot(c) => commands::snapshot(&ctx, c).await.map(Some),
            Command::Status { watch } => {
                commands::status(&ctx, watch, format).await.map(|o| (!watch).then_some(o))
            }
            Command::Replica(c) => commands::replica(&ctx, c).await.map(Some),
            Command::Nodes => commands::nodes(&ctx).await.map(Some),
            Command::Probe { endpoint } => commands::probe(&endpoint).await.map(Some),
            Command::Completions { shell } => {
                clap_complete::generate(shell, &mut Cli::command(), "barnacle", &mut std::io::stdout());
                Ok(None)
            }
        }
    });
    match result.and_then(|out| match out {
        Some(o) => o.print(format),
        None => Ok(()),
    }) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
