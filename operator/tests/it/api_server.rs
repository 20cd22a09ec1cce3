//! A scripted Kubernetes API server (kube's `tower-test` mock, the
//! controller-rs pattern): a scenario answers the calls it expects, in order,
//! and fails on a call it did not expect, or when an expected call never
//! comes.

use std::time::Duration;

use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// How long a scenario waits for the next call.
const PATIENCE: Duration = Duration::from_secs(3);

/// One call the reconciler made.
pub struct Call {
    /// The query string.
    pub query: String,
    /// The request body as JSON (`Null` when empty).
    pub body: Value,
}

/// The API server's side of the mocked connection.
pub struct ApiServer {
    handle: Handle,
}

/// A client wired to a new scripted API server.
pub fn pair() -> (Client, ApiServer) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), ApiServer { handle })
}

impl ApiServer {
    /// Waits for the next call, which must be `method path`, answers it with
    /// `status` and `body`, and returns it.
    pub async fn answer(&mut self, method: &str, path: &str, status: u16, body: Value) -> Call {
        let next = tokio::time::timeout(PATIENCE, self.handle.next_request()).await;
        let (request, send) = next
            .unwrap_or_else(|_| panic!("expected {method} {path}, but no further call came"))
            .expect("the client is gone");
        let call_method = request.method().to_string();
        let call_path = request.uri().path().to_owned();
        let query = request.uri().query().unwrap_or_default().to_owned();
        assert_eq!(
            format!("{call_method} {call_path}"),
            format!("{method} {path}"),
            "unexpected call (query {query:?})"
        );
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body_sent = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        send.send_response(
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap(),
        );
        Call {
            query,
            body: body_sent,
        }
    }

    /// Answers `GET path` with `object`, or 404 when it is `None`.
    pub async fn get(&mut self, path: &str, object: Option<&Value>) -> Call {
        match object {
            Some(o) => self.answer("GET", path, 200, o.clone()).await,
            None => self.answer("GET", path, 404, not_found()).await,
        }
    }

    /// Answers a server-side apply `PATCH path` with what was applied, as the
    /// API server would return it, and checks it is an apply by the
    /// operator's field manager.
    pub async fn apply(&mut self, path: &str) -> Call {
        self.apply_onto(path, Value::Null).await
    }

    /// [`ApiServer::apply`] onto `stored`: the answer is `stored` with the
    /// applied top-level fields (e.g. `status`) replaced.
    pub async fn apply_onto(&mut self, path: &str, stored: Value) -> Call {
        let next = tokio::time::timeout(PATIENCE, self.handle.next_request()).await;
        let (request, send) = next
            .unwrap_or_else(|_| panic!("expected PATCH {path}, but no further call came"))
            .expect("the client is gone");
        let call = format!("{} {}", request.method(), request.uri().path());
        let query = request.uri().query().unwrap_or_default().to_owned();
        assert_eq!(call, format!("PATCH {path}"), "unexpected call");
        assert_eq!(
            request.headers()["content-type"],
            "application/apply-patch+yaml",
            "{path} is written with server-side apply"
        );
        assert!(
            query.contains("fieldManager=sluice-operator") && query.contains("force=true"),
            "{path}: {query}"
        );
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body: Value = serde_json::from_slice(&bytes).unwrap();
        // The API server returns the whole object (a status apply sends
        // only `status`), with a new resourceVersion: 17 for a new object,
        // one more than the stored one's for a change.
        let version = match stored["metadata"]["resourceVersion"].as_str() {
            Some(v) => (v.parse::<u64>().unwrap() + 1).to_string(),
            None => "17".to_owned(),
        };
        let mut returned = if stored.is_null() { json!({}) } else { stored };
        for (k, v) in body.as_object().unwrap() {
            if k == "metadata" {
                for (mk, mv) in v.as_object().unwrap() {
                    returned["metadata"][mk] = mv.clone();
                }
            } else {
                returned[k] = v.clone();
            }
        }
        returned["metadata"]["resourceVersion"] = json!(version);
        send.send_response(
            Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&returned).unwrap()))
                .unwrap(),
        );
        Call { query, body }
    }

    /// Answers `GET path` (a list) with `items`.
    pub async fn list(&mut self, path: &str, items: Vec<Value>) -> Call {
        self.answer(
            "GET",
            path,
            200,
            json!({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": items}),
        )
        .await
    }

    /// Answers the creation of an Event and returns its reason and note.
    pub async fn event(&mut self, namespace: &str) -> (String, String, String) {
        let next = tokio::time::timeout(PATIENCE, self.handle.next_request()).await;
        let (request, send) = next
            .unwrap_or_else(|_| panic!("expected an Event, but no further call came"))
            .expect("the client is gone");
        // A new Event is created; one the recorder published before is
        // patched (its series counted).
        let events = format!("/apis/events.k8s.io/v1/namespaces/{namespace}/events");
        let call = format!("{} {}", request.method(), request.uri().path());
        let patched = call.starts_with(&format!("PATCH {events}/"));
        assert!(
            call == format!("POST {events}") || patched,
            "unexpected call {call}, expected an Event"
        );
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let event: Value = serde_json::from_slice(&bytes).unwrap();
        send.send_response(
            Response::builder()
                .status(201)
                .header("content-type", "application/json")
                .body(Body::from(bytes.to_vec()))
                .unwrap(),
        );
        let call = Call {
            query: String::new(),
            body: event,
        };
        let text = |k: &str| call.body[k].as_str().unwrap_or_default().to_owned();
        (text("type"), text("reason"), text("note"))
    }

    /// Answers a server-side apply `PATCH path` with the API server's
    /// refusal: 422 Invalid with `message`.
    pub async fn refuse_apply(&mut self, path: &str, message: &str) -> Call {
        let refusal = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": "Invalid", "code": 422,
        });
        self.answer("PATCH", path, 422, refusal).await
    }

    /// Fails when the reconciler makes any further call.
    pub async fn done(&mut self) {
        if let Ok(Some((request, _))) =
            tokio::time::timeout(Duration::from_millis(300), self.handle.next_request()).await
        {
            panic!(
                "unexpected call {} {}",
                request.method(),
                request.uri().path()
            );
        }
    }
}

fn not_found() -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "not found", "reason": "NotFound", "code": 404,
    })
}
