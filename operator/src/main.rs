//! `sluice-operator`: runs the StreamingQuery controller (`run`) or prints
//! the CRD (`crd`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use clap::{Parser, Subcommand};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use sluice_operator::controller::{self, Context, Settings};
use sluice_operator::lease::{Elector, LeaseConfig};
use sluice_operator::metrics::Metrics;
use sluice_operator::objects::Defaults;
use tokio::sync::watch;

/// The Sluice operator: reconciles StreamingQuery resources into engine pods.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller.
    Run(RunArgs),
    /// Print the StreamingQuery CRD (`sluice-operator crd | kubectl apply -f -`).
    Crd,
    /// Run one step of a query's autoscaler outside Kubernetes, for
    /// replicas run as processes (`sluice run --replica i --replicas n`):
    /// prints the decision (as `status.autoscaling`) and keeps the
    /// autoscaler's memory in `--state`.
    AutoscaleStep(StepArgs),
}

#[derive(clap::Args)]
struct StepArgs {
    /// The query's YAML (its `spec.autoscaling` is the policy).
    #[arg(long)]
    query: std::path::PathBuf,
    /// The file the previous step's decision and memory are read from and
    /// this step's written to (missing: the first step).
    #[arg(long)]
    state: std::path::PathBuf,
    /// A JSON list with each running replica's `/progress` (a list of
    /// reports); absent while scaled to zero (the brokers are asked).
    #[arg(long)]
    reports: Option<std::path::PathBuf>,
    /// Nothing is measured now, and why (e.g. a rescale under way).
    #[arg(long)]
    waiting: Option<String>,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The engine image for queries that do not set `spec.engine.image`.
    #[arg(long, env = "SLUICE_ENGINE_IMAGE", default_value = concat!("ghcr.io/sluice-dev/sluice:", env!("CARGO_PKG_VERSION")))]
    engine_image: String,
    /// Watch only this namespace; empty: every namespace.
    #[arg(long, env = "SLUICE_WATCH_NAMESPACE", default_value = "")]
    namespace: String,
    /// The port of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, default_value_t = 8080)]
    http_port: u16,
    /// Elect one leader among the operator's replicas on a Lease; only the
    /// leader reconciles.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// The Lease's name.
    #[arg(long, default_value = "sluice-operator")]
    lease_name: String,
    /// The Lease's namespace (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// This replica's identity in the election and in Events (its pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// How often the engine pods' progress and health are read into each
    /// query's status, e.g. `30s`.
    #[arg(long, default_value = "30s", value_parser = duration)]
    progress_interval: Duration,
    /// How long the deletion of a query waits for its engine pods to stop
    /// before it gives up, names them in an Event and lets the query go.
    #[arg(long, default_value = "5m", value_parser = duration)]
    deletion_timeout: Duration,
}

/// A duration as specs write them: `30s`, `5m`.
fn duration(text: &str) -> Result<Duration, String> {
    sluice_crds::duration::parse_duration(text)
}

#[derive(Clone)]
struct Http {
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
}

async fn serve_metrics(State(http): State<Http>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        http.metrics.render(),
    )
        .into_response()
}

async fn readyz(State(http): State<Http>) -> Response {
    if http.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn terminated() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // NB: delta-rs links rustls' aws-lc-rs provider beside the ring one kube
    // and object_store use; with two, rustls picks none by itself.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", sluice_crds::crd_yaml());
            Ok(())
        }
        Command::Run(args) => run(args).await,
        Command::AutoscaleStep(args) => autoscale_step(args),
    }
}

fn autoscale_step(args: StepArgs) -> anyhow::Result<()> {
    use sluice_operator::autoscaler::scaler::{Saved, offline_step};
    let text = std::fs::read_to_string(&args.query)
        .with_context(|| format!("cannot read {}", args.query.display()))?;
    let query = sluice_crds::load(&text, &args.query.display().to_string())?;
    anyhow::ensure!(
        query.spec.autoscaling.is_some(),
        "{}: spec.autoscaling is not set",
        args.query.display()
    );
    let saved: Saved = match std::fs::read(&args.state) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a saved step", args.state.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Saved::default(),
        Err(e) => return Err(e).context(format!("cannot read {}", args.state.display())),
    };
    let reports = match &args.reports {
        Some(path) => Some(
            serde_json::from_slice(&std::fs::read(path)?)
                .with_context(|| format!("{}: not a list of /progress lists", path.display()))?,
        ),
        None => None,
    };
    let saved = offline_step(&query, saved, reports, args.waiting, chrono::Utc::now());
    std::fs::write(&args.state, serde_json::to_vec(&saved)?)
        .with_context(|| format!("cannot write {}", args.state.display()))?;
    println!("{}", serde_json::to_string(&saved.status)?);
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();

    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let router = Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Http {
            metrics: metrics.clone(),
            ready: ready.clone(),
        });
    let address = SocketAddr::from(([0, 0, 0, 0], args.http_port));
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address}"))?;
    tokio::spawn(async move { axum::serve(listener, router).await });

    let client = Client::try_default().await.context(
        "cannot configure a Kubernetes client (in a pod: the ServiceAccount; elsewhere: KUBECONFIG)",
    )?;
    let identity = args.identity.clone().unwrap_or_else(|| {
        std::env::var("HOSTNAME")
            .unwrap_or_else(|_| format!("sluice-operator-{}", std::process::id()))
    });
    let ctx = Arc::new(
        Context::new(
            client.clone(),
            Defaults {
                engine_image: args.engine_image.clone(),
            },
            metrics.clone(),
            Some(identity.clone()),
        )
        .with_settings(Settings {
            progress_interval: args.progress_interval,
            deletion_timeout: args.deletion_timeout,
        }),
    );
    let namespace = Some(args.namespace.clone()).filter(|ns| !ns.is_empty());

    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        terminated().await;
        tracing::info!("Stopping at the end of the running reconciles.");
        let _ = stop.send(true);
    });
    let shutdown = {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };
    ready.store(true, Ordering::Relaxed);

    if !args.leader_election {
        tracing::info!(namespace = ?namespace, "Reconciling (leader election off).");
        controller::run(ctx, namespace, shutdown).await?;
        return Ok(());
    }
    let elector = Elector::new(
        Api::<Lease>::namespaced(client, &args.lease_namespace),
        LeaseConfig::new(&args.lease_name, &identity),
    );
    tracing::info!(lease = %args.lease_name, %identity, "Waiting to lead.");
    let mut before_leading = stopped.clone();
    tokio::select! {
        _ = elector.acquire() => {}
        _ = before_leading.wait_for(|s| *s) => return Ok(()),
    }
    metrics.leader.set(1);
    tracing::info!(namespace = ?namespace, %identity, "Leading: reconciling.");
    tokio::select! {
        result = controller::run(ctx, namespace, shutdown) => {
            if let Err(e) = elector.release().await {
                tracing::warn!(error = %e, "Cannot release the Lease; it expires on its own.");
            }
            metrics.leader.set(0);
            result?;
            Ok(())
        }
        lost = elector.hold() => {
            metrics.leader.set(0);
            // Stop at once, before another replica starts: the pod restarts
            // and rejoins the election as a follower.
            Err(anyhow::Error::new(lost).context("lost leadership"))
        }
    }
}
