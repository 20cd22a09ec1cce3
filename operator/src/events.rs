//! Events on the StreamingQueries (`events.k8s.io/v1`), as `kubectl
//! describe sq` shows them. Like kube's `Recorder`, an event repeated within
//! a few minutes is counted on the first (its `series`) rather than created
//! again; unlike it, a repeat must have the same note as well as the same
//! reason, so that "Applied StatefulSet q." after "Applied ConfigMap q-query."
//! is not shown as a second occurrence of the first.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};

/// How long a published event is counted on rather than created again
/// (kube's `Recorder` keeps 6 minutes).
const REPEAT_WINDOW: Duration = Duration::from_secs(6 * 60);

/// What makes two events the same event.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    regarding: (Option<String>, Option<String>, Option<String>),
    warning: bool,
    reason: String,
    note: String,
}

/// Publishes events as one controller instance.
pub struct Events {
    client: Client,
    controller: String,
    instance: String,
    published: Mutex<HashMap<Key, Event>>,
}

impl Events {
    /// Events reported by `controller` (the operator), `instance` (this
    /// replica, its pod name).
    pub fn new(client: Client, controller: &str, instance: &str) -> Self {
        Events {
            client,
            controller: controller.to_owned(),
            instance: instance.to_owned(),
            published: Mutex::default(),
        }
    }

    /// Publishes an event about `regarding`: created, or, when the same
    /// event was published in the last minutes, its series counted.
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        warning: bool,
        reason: &str,
        note: &str,
    ) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let key = Key {
            regarding: (
                regarding.namespace.clone(),
                regarding.name.clone(),
                regarding.uid.clone(),
            ),
            warning,
            reason: reason.to_owned(),
            note: note.to_owned(),
        };
        let window =
            k8s_openapi::jiff::SignedDuration::try_from(REPEAT_WINDOW).expect("a few minutes fit");
        let repeat = {
            let mut published = self.published.lock().expect("not poisoned");
            published.retain(|_, e| {
                let last = e
                    .series
                    .as_ref()
                    .map(|s| s.last_observed_time.0)
                    .or(e.event_time.as_ref().map(|t| t.0));
                last.is_some_and(|t| t + window > now)
            });
            published.get(&key).cloned()
        };
        let namespace = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        let event = match repeat {
            Some(mut event) => {
                let count = event.series.as_ref().map_or(2, |s| s.count + 1);
                event.series = Some(EventSeries {
                    count,
                    last_observed_time: MicroTime(now),
                });
                let name = event.metadata.name.clone().unwrap_or_default();
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&event))
                    .await?;
                event
            }
            None => {
                let event = Event {
                    metadata: ObjectMeta {
                        namespace: Some(namespace.clone()),
                        name: Some(format!(
                            "{}.{:x}",
                            regarding.name.as_deref().unwrap_or(&self.controller),
                            now.as_nanosecond()
                        )),
                        ..ObjectMeta::default()
                    },
                    action: Some("Reconcile".to_owned()),
                    reason: Some(reason.to_owned()),
                    note: Some(note.to_owned()),
                    type_: Some(if warning { "Warning" } else { "Normal" }.to_owned()),
                    event_time: Some(MicroTime(now)),
                    regarding: Some(regarding.clone()),
                    reporting_controller: Some(self.controller.clone()),
                    reporting_instance: Some(self.instance.clone()),
                    ..Event::default()
                };
                api.create(&PostParams::default(), &event).await?;
                event
            }
        };
        self.published
            .lock()
            .expect("not poisoned")
            .insert(key, event);
        Ok(())
    }
}
