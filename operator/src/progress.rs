//! Reads each running engine pod's latest progress report from its
//! `/progress/latest` (or, for the autoscaler, its recent reports from
//! `/progress`), and its health from `/healthz` (the engine's HTTP port),
//! for the status.

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

    /// What every running pod that has an IP says: its latest progress
    /// (once it finished a batch) and, when `/healthz` says it is not
    /// healthy, why. A pod that does not answer is left out (and logged):
    /// progress is a summary, and the pod's probes tell its health.
    pub async fn read(&self, pods: &[Pod]) -> Vec<PodReport> {
        self.read_with(pods, false).await
    }

    /// [`Self::read`] with each pod's recent reports too (its `/progress`,
    /// in [`PodReport::recent`]), for the autoscaler: one request instead
    /// of `/progress/latest`, whose report is the last of them.
    pub async fn read_recent(&self, pods: &[Pod]) -> Vec<PodReport> {
        self.read_with(pods, true).await
    }

    async fn read_with(&self, pods: &[Pod], recent: bool) -> Vec<PodReport> {
        let reads = pods.iter().filter_map(|pod| {
            let status = pod.status.as_ref()?;
            if status.phase.as_deref() != Some("Running") {
                return None;
            }
            let ip = status.pod_ip.clone()?;
            Some(async move {
                let name = pod.name_any();
                let ask = async {
                    let (progress, reports) = if recent {
                        let reports = self.recent(&ip).await?;
                        (reports.last().cloned(), Some(reports))
                    } else {
                        (self.latest(&ip).await?, None)
                    };
                    let unhealthy = self.unhealthy(&ip).await?;
                    Ok::<_, String>(PodReport {
                        pod: name.clone(),
                        progress,
                        unhealthy,
                        recent: reports,
                    })
                };
                match tokio::time::timeout(self.timeout, ask).await {
                    Ok(Ok(report)) => Some(report),
                    Ok(Err(why)) => {
                        tracing::debug!(pod = %name, %why, "No progress.");
                        None
                    }
                    Err(_) => {
                        tracing::debug!(pod = %name, "Reading progress timed out.");
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

    /// One pod's recent reports, oldest first.
    async fn recent(&self, ip: &str) -> Result<Vec<QueryProgress>, String> {
        let (status, body) = self.get(ip, "/progress").await?;
        if !status.is_success() {
            return Err(format!("HTTP {status}"));
        }
        serde_json::from_slice(&body).map_err(|e| format!("not progress reports: {e}"))
    }

    /// Why one pod's `/healthz` says it is unhealthy (its body), or `None`
    /// when it answers 200.
    async fn unhealthy(&self, ip: &str) -> Result<Option<String>, String> {
        let (status, body) = self.get(ip, "/healthz").await?;
        Ok((!status.is_success()).then(|| String::from_utf8_lossy(&body).trim().to_owned()))
    }

    /// One pod's latest report; `None` before its first batch (HTTP 204).
    async fn latest(&self, ip: &str) -> Result<Option<QueryProgress>, String> {
        let (status, body) = self.get(ip, "/progress/latest").await?;
        if status == hyper::StatusCode::NO_CONTENT {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(format!("HTTP {status}"));
        }
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| format!("not a progress report: {e}"))
    }

    async fn get(&self, ip: &str, path: &str) -> Result<(hyper::StatusCode, Bytes), String> {
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.to_owned()
        };
        let uri: hyper::Uri = format!("http://{host}:{}{path}", self.port)
            .parse()
            .map_err(|e| format!("{e}"))?;
        let response = self.client.get(uri).await.map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    }
}

/// What one engine pod said.
#[derive(Clone, Debug, PartialEq)]
pub struct PodReport {
    /// The pod's name.
    pub pod: String,
    /// Its latest progress report, once it finished a batch.
    pub progress: Option<QueryProgress>,
    /// Why its `/healthz` says it is not healthy (`stalled: ...`,
    /// `failed: ...`), when it does.
    pub unhealthy: Option<String>,
    /// Its recent reports, oldest first, when they were asked for
    /// ([`ProgressReader::read_recent`]) and are its engine's.
    pub recent: Option<Vec<QueryProgress>>,
}

/// How many engine runs (run ids) [`drop_foreign`] remembers.
const RUNS_KEPT: usize = 4096;

/// Drops the progress of `reports` that is not this pod's engine's: a
/// report of another query (`name` is not `query`), or of an engine run
/// first seen in another pod (by uid). Both happen when a pod gets the
/// address of a pod that was deleted while its engine still answers (its
/// batches would pass for the new pod's). `runs` holds the (run id, pod
/// uid) seen, newest last; `pods` the pods the reports were read from.
pub fn drop_foreign(
    reports: &mut [PodReport],
    query: &str,
    pods: &[Pod],
    runs: &mut std::collections::VecDeque<(String, String)>,
) {
    for report in reports.iter_mut() {
        let Some(progress) = &report.progress else {
            continue;
        };
        let uid = pods
            .iter()
            .find(|p| p.name_any() == report.pod)
            .and_then(|p| p.metadata.uid.clone())
            .unwrap_or_default();
        let first = runs
            .iter()
            .find(|(run, _)| *run == progress.run_id)
            .map(|(_, uid)| uid.clone());
        if progress.name != query || first.as_ref().is_some_and(|f| *f != uid) {
            tracing::debug!(pod = %report.pod, run = %progress.run_id, name = %progress.name, "Progress of another pod's engine: ignored.");
            report.progress = None;
            report.recent = None;
        } else if first.is_none() {
            runs.push_back((progress.run_id.clone(), uid));
            if runs.len() > RUNS_KEPT {
                runs.pop_front();
            }
        }
    }
}

/// The stalled pods among `reports`, in words, or `None`.
pub fn stalled(reports: &[PodReport]) -> Option<String> {
    let stalled: Vec<String> = reports
        .iter()
        .filter_map(|r| {
            let why = r.unhealthy.as_deref()?;
            why.starts_with("stalled")
                .then(|| format!("pod {}: {why}", r.pod))
        })
        .collect();
    (!stalled.is_empty()).then(|| stalled.join("; "))
}
