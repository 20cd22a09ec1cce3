//! `sluice`: run, validate and describe streaming queries.

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice_crds::progress::QueryProgress;
use sluice_engine::health::{Health, Verdict};
use sluice_engine::monitor::Monitor;
use sluice_engine::{RunOptions, Stopped, http, run_query};
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
        /// Run as this replica (from 0) of --replicas: it reads its share
        /// of the Kafka partitions. Else `$SLUICE_REPLICA`, else, with
        /// several replicas, the ordinal ending `$POD_NAME` (a StatefulSet
        /// pod's), else 0.
        #[arg(long)]
        replica: Option<u32>,
        /// How many replicas run the query (else `$SLUICE_REPLICAS`, else
        /// 1); a change hands the query over to the new count at a batch
        /// boundary, exactly once.
        #[arg(long)]
        replicas: Option<u32>,
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
    // NB: delta-rs links rustls' aws-lc-rs provider beside the ring one kube
    // and object_store use; with two, rustls picks none by itself.
    let _ = rustls::crypto::ring::default_provider().install_default();
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
                replica,
                replicas,
            } => {
                let result = match replica_of(replica, replicas) {
                    Ok(replica) => {
                        run(
                            file,
                            RunOptions {
                                max_batches,
                                replica,
                                drain: false,
                            },
                            http_port.map(|port| SocketAddr::new(http_address, port)),
                        )
                        .await
                    }
                    Err(err) => Err(err),
                };
                if let Err(err) = &result {
                    write_termination_message(&format!("error: {err:#}"));
                }
                result
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

/// The replica this run is, from the flags, the environment (empty values
/// count as unset: a missing label read through the downward API is empty)
/// or the pod's name.
fn replica_of(
    index: Option<u32>,
    count: Option<u32>,
) -> anyhow::Result<sluice_engine::replicas::Replica> {
    let env = |name: &str| -> anyhow::Result<Option<u32>> {
        match std::env::var(name) {
            Ok(text) if !text.trim().is_empty() => text
                .trim()
                .parse()
                .map(Some)
                .map_err(|e| anyhow::anyhow!("${name}: {text:?} is not a replica number: {e}")),
            _ => Ok(None),
        }
    };
    let count = match count {
        Some(c) => c,
        None => env("SLUICE_REPLICAS")?.unwrap_or(1),
    };
    let index = match index {
        Some(i) => i,
        None => match env("SLUICE_REPLICA")? {
            Some(i) => i,
            None if count > 1 => std::env::var("POD_NAME")
                .ok()
                .and_then(|pod| pod.rsplit('-').next().and_then(|n| n.parse().ok()))
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "{count} replicas: say which this is with --replica or $SLUICE_REPLICA"
                    )
                })?,
            None => 0,
        },
    };
    Ok(sluice_engine::replicas::Replica::new(index, count)?)
}

async fn run(file: PathBuf, options: RunOptions, http: Option<SocketAddr>) -> anyhow::Result<bool> {
    let query = sluice_crds::load_file(&file)?;
    let name = query.metadata.name.clone().unwrap_or_default();
    let monitor = Arc::new(Monitor::new(&name));
    let stall_timeout = query
        .spec
        .stall_timeout
        .as_deref()
        .map(sluice_crds::duration::parse_duration)
        .transpose()
        .map_err(|e| anyhow::anyhow!("spec.stallTimeout: {e}"))?;
    let health = Arc::new(Health::new(monitor.clone(), stall_timeout));
    {
        // A stall is measured from when it began, whoever asks /healthz.
        let health = health.clone();
        tokio::spawn(async move {
            loop {
                health.sample();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    if let Some(addr) = http {
        let listener = http::bind(addr).await?;
        let local = listener
            .local_addr()
            .context("the HTTP listener has an address")?;
        info!(address = %local, "Serving /progress, /metrics, /healthz and /readyz.");
        let monitor = monitor.clone();
        let health = health.clone();
        tokio::spawn(async move {
            if let Err(err) = http::serve(listener, monitor, health).await {
                warn!(error = %err, "The HTTP server stopped.");
            }
        });
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let stalled = health.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        // A stalled query may never reach the batch boundary: say why it
        // was stopped (Kubernetes' liveness probe) before it is killed.
        let verdict = stalled.verdict();
        if matches!(verdict, Verdict::Stalled { .. }) {
            write_termination_message(&verdict.describe());
        }
        info!("Stopping at the end of the current batch (interrupt again to stop at once).");
        let _ = stop_tx.send(true);
        wait_for_signal().await;
        warn!("Stopped at once.");
        std::process::exit(130);
    });
    match run_query(&query, monitor.clone(), None, options, stop_rx).await {
        Ok(summary) => {
            if query.spec.is_available_now() && summary.stopped == Stopped::Requested {
                // NB: a Job counts a run that exits 0 as complete: an
                // availableNow run stopped before its input was used up is
                // not.
                warn!(
                    "Stopped before the input was used up: exiting with an error so that a Job runs the query again."
                );
                write_termination_message(
                    "error: stopped (SIGTERM or SIGINT) before the input was used up",
                );
                return Ok(false);
            }
            if let Some(last) = monitor.last() {
                write_termination_message(&final_progress(last));
            }
            Ok(true)
        }
        Err(err) => {
            monitor.set_failed(err.to_string());
            Err(err.into())
        }
    }
}

/// Kubernetes keeps at most this much of a termination message.
const TERMINATION_MESSAGE_BYTES: usize = 4096;

/// The file Kubernetes reads a container's termination message from:
/// `SLUICE_TERMINATION_LOG` (empty: none), else `/dev/termination-log`
/// when it exists (in a pod).
fn termination_log() -> Option<PathBuf> {
    match std::env::var_os("SLUICE_TERMINATION_LOG") {
        Some(path) if path.is_empty() => None,
        Some(path) => Some(path.into()),
        None => {
            let path = Path::new("/dev/termination-log");
            path.exists().then(|| path.to_owned())
        }
    }
}

/// Writes why the engine stopped where Kubernetes shows it (the pod's
/// `lastState.terminated.message`, read by the operator): its last error,
/// or, after a run that ended by itself, its final progress as JSON.
fn write_termination_message(text: &str) {
    let Some(path) = termination_log() else {
        return;
    };
    let mut end = text.len().min(TERMINATION_MESSAGE_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    if let Err(err) = std::fs::write(&path, &text[..end]) {
        warn!(path = %path.display(), error = %err, "Cannot write the termination message.");
    }
}

/// The final progress report as one line of JSON that fits a termination
/// message: the sources' offsets go first, then the per-source and
/// per-operator details, when it is too long.
fn final_progress(mut progress: QueryProgress) -> String {
    let text = |p: &QueryProgress| serde_json::to_string(p).unwrap_or_default();
    if text(&progress).len() > TERMINATION_MESSAGE_BYTES {
        for source in &mut progress.sources {
            source.start_offset = serde_json::Value::Null;
            source.end_offset = serde_json::Value::Null;
            source.latest_offset = serde_json::Value::Null;
        }
    }
    if text(&progress).len() > TERMINATION_MESSAGE_BYTES {
        progress.sources.clear();
        progress.state_operators.clear();
    }
    text(&progress)
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
