//! Reads each running engine pod's latest progress report from its
//! `/progress/latest` (the engine's HTTP port), for the status summary.

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use sluice_crds::progress::QueryProgress;

/// An HTTP client for the engine pods' progress.
#[derive(Clone)]
pub struct ProgressReader {
    client: Client<HttpConnector, Empty<Bytes>>,
    port: u16,
    timeout: Duration,
}

impl ProgressReader {
    /// A reader of the engine's HTTP API on `port` (the engine pods serve it
    /// on [`crate::objects::HTTP_PORT`]).
    pub fn new(port: u16) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        ProgressReader {
            client: Client::builder(TokioExecutor::new()).build(connector),
            port,
            timeout: Duration::from_secs(3),
        }
    }

    /// The latest progress of every running pod that has an IP and has
    /// finished a batch. A pod that does not answer is left out (and
    /// logged): progress is a summary, and the pod's probes tell its health.
    pub async fn read(&self, pods: &[Pod]) -> Vec<QueryProgress> {
        let reads = pods.iter().filter_map(|pod| {
            let status = pod.status.as_ref()?;
            if status.phase.as_deref() != Some("Running") {
                return None;
            }
            let ip = status.pod_ip.clone()?;
            Some(async move {
                match tokio::time::timeout(self.timeout, self.latest(&ip)).await {
                    Ok(Ok(progress)) => progress,
                    Ok(Err(why)) => {
                        tracing::debug!(pod = %pod.name_any(), %why, "no progress");
                        None
                    }
                    Err(_) => {
                        tracing::debug!(pod = %pod.name_any(), "progress timed out");
                        None
                    }
                }
            })
        });
        futures::future::join_all(reads)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// One pod's latest report; `None` before its first batch (HTTP 204).
    async fn latest(&self, ip: &str) -> Result<Option<QueryProgress>, String> {
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.to_owned()
        };
        let uri: hyper::Uri = format!("http://{host}:{}/progress/latest", self.port)
            .parse()
            .map_err(|e| format!("{e}"))?;
        let response = self.client.get(uri).await.map_err(|e| e.to_string())?;
        let status = response.status();
        if status == hyper::StatusCode::NO_CONTENT {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(format!("HTTP {status}"));
        }
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| format!("not a progress report: {e}"))
    }
}
