//! `sluice`: run, validate and describe streaming queries.

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice_engine::monitor::Monitor;
use sluice_engine::{RunOptions, http, run_query};
use tokio::sync::watch;
use tracing::{info, warn};

/// Streaming SQL: runs a StreamingQuery as micro-batches, on a laptop or as
/// an engine pod.
#[derive(Parser)]
#[command(name = "sluice", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a StreamingQuery until it is interrupted (SIGINT or SIGTERM stop it
    /// at the next batch boundary), its input ends, or --max-batches ran.
    Run {
        /// The StreamingQuery manifest (YAML).
        file: PathBuf,
        /// Stop after this many batches.
        #[arg(long)]
        max_batches: Option<u64>,
        /// Serve /progress, /metrics, /healthz and /readyz on this port.
        #[arg(long, env = "SLUICE_HTTP_PORT")]
        http_port: Option<u16>,
        /// The address to serve them on.
        #[arg(long, default_value = "0.0.0.0", env = "SLUICE_HTTP_ADDRESS")]
        http_address: IpAddr,
    },
    /// Check StreamingQuery manifests: print every problem, exit non-zero if
    /// there is any. Nothing runs.
    Validate {
        /// The manifests (YAML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print the StreamingQuery CustomResourceDefinition.
    Crd,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("the Tokio runtime starts");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run {
                file,
                max_batches,
                http_port,
                http_address,
            } => {
                run(
                    file,
                    max_batches,
                    http_port.map(|port| SocketAddr::new(http_address, port)),
                )
                .await
            }
            Command::Validate { files } => validate(files).await,
            Command::Crd => {
                print!("{}", sluice_crds::crd_yaml());
                Ok(true)
            }
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(
    file: PathBuf,
    max_batches: Option<u64>,
    http: Option<SocketAddr>,
) -> anyhow::Result<bool> {
    let query = sluice_crds::load_file(&file)?;
    let name = query.metadata.name.clone().unwrap_or_default();
    let monitor = Arc::new(Monitor::new(&name));
    if let Some(addr) = http {
        let listener = http::bind(addr).await?;
        let local = listener
            .local_addr()
            .context("the HTTP listener has an address")?;
        info!(address = %local, "Serving /progress, /metrics, /healthz and /readyz.");
        let monitor = monitor.clone();
        tokio::spawn(async move {
            if let Err(err) = http::serve(listener, monitor).await {
                warn!(error = %err, "The HTTP server stopped.");
            }
        });
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("Stopping at the end of the current batch (interrupt again to stop at once).");
        let _ = stop_tx.send(true);
        wait_for_signal().await;
        warn!("Stopped at once.");
        std::process::exit(130);
    });
    match run_query(
        &query,
        monitor.clone(),
        None,
        RunOptions { max_batches },
        stop_rx,
    )
    .await
    {
        Ok(_) => Ok(true),
        Err(err) => {
            monitor.set_failed(err.to_string());
            Err(err.into())
        }
    }
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM can be handled");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn validate(files: Vec<PathBuf>) -> anyhow::Result<bool> {
    let mut all_valid = true;
    for file in files {
        let origin = file.display().to_string();
        let problems = match sluice_crds::load_file(&file) {
            Ok(query) => match sluice_engine::check(&query).await {
                Ok(()) => {
                    println!("{origin}: valid");
                    continue;
                }
                Err(problems) => problems.0.iter().map(ToString::to_string).collect(),
            },
            Err(sluice_crds::Error::Invalid { problems, .. }) => {
                problems.0.iter().map(ToString::to_string).collect()
            }
            Err(err) => vec![
                err.to_string()
                    .trim_start_matches(&format!("{origin}: "))
                    .to_owned(),
            ],
        };
        all_valid = false;
        let count = problems.len();
        eprintln!(
            "{origin}: {count} problem{}",
            if count == 1 { "" } else { "s" }
        );
        for problem in problems {
            eprintln!("  {problem}");
        }
    }
    Ok(all_valid)
}
