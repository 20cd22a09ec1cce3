//! The engine's HTTP endpoints: `/progress`, `/status`, `/metrics`,
//! `/healthz`, `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::monitor::Monitor;
use crate::{Error, Result};

/// The routes, over a query's monitor.
pub fn router(monitor: Arc<Monitor>) -> Router {
    Router::new()
        .route("/progress", get(progress))
        .route("/progress/latest", get(latest))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(monitor)
}

/// Binds `addr`; returns the listener, so that the caller knows the port
/// before serving (port 0 picks a free one).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Http { addr, source })
}

/// Serves the routes until the process ends.
pub async fn serve(listener: TcpListener, monitor: Arc<Monitor>) -> std::io::Result<()> {
    axum::serve(listener, router(monitor)).await
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

async fn healthz(State(monitor): State<Arc<Monitor>>) -> Response {
    match monitor.failure() {
        None => (StatusCode::OK, "ok\n").into_response(),
        Some(why) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("failed: {why}\n"),
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
