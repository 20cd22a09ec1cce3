//! The engine's HTTP endpoints: `/progress`, `/status`, `/metrics`,
//! `/healthz` (failed or stalled: see [`crate::health`]), `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::health::{Health, Verdict};
use crate::monitor::Monitor;
use crate::{Error, Result};

/// The routes, over a query's monitor and its health.
pub fn router(monitor: Arc<Monitor>, health: Arc<Health>) -> Router {
    Router::new()
        .route("/progress", get(progress))
        .route("/progress/latest", get(latest))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/readyz", get(readyz))
        .with_state(monitor)
        .merge(
            Router::new()
                .route("/healthz", get(healthz))
                .with_state(health),
        )
}

/// Binds `addr`; returns the listener, so that the caller knows the port
/// before serving (port 0 picks a free one).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Http { addr, source })
}

/// Serves the routes until the process ends.
pub async fn serve(
    listener: TcpListener,
    monitor: Arc<Monitor>,
    health: Arc<Health>,
) -> std::io::Result<()> {
    axum::serve(listener, router(monitor, health)).await
}

/// The recent progress reports, oldest first (Spark's `recentProgress`).
async fn progress(State(monitor): State<Arc<Monitor>>) -> Response {
    Json(monitor.recent()).into_response()
}

/// The latest progress report (Spark's `lastProgress`), 204 before the first.
async fn latest(State(monitor): State<Arc<Monitor>>) -> Response {
    match monitor.last() {
        Some(progress) => Json(progress).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    }
}

/// What the query is doing now (Spark's `StreamingQuery.status`).
async fn status(State(monitor): State<Arc<Monitor>>) -> Response {
    Json(monitor.status()).into_response()
}

async fn metrics(State(monitor): State<Arc<Monitor>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        monitor.metrics().render(),
    )
        .into_response()
}

/// 200 `ok`, or 500 with why the query failed or is stalled (the body's
/// first word: `failed:` or `stalled:`).
async fn healthz(State(health): State<Arc<Health>>) -> Response {
    match health.verdict() {
        Verdict::Healthy => (StatusCode::OK, "ok\n").into_response(),
        unhealthy => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{}\n", unhealthy.describe()),
        )
            .into_response(),
    }
}

async fn readyz(State(monitor): State<Arc<Monitor>>) -> Response {
    if monitor.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    }
}
