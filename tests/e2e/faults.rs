//! Cloud faults: a loopback proxy between the controller and MiniStack
//! answers a share of IAM/STS requests with throttling (HTTP 400
//! `Throttling`), server errors (500/503) or added latency, or holds them
//! past the SDK's attempt timeout. Under that, every lifecycle must still
//! complete: gates lifted within a bound, every role, ServiceAccount and lease
//! reaped, and the retries visible in the metrics.
//!
//! `make test` runs a few lifecycles at 20 % faults; `make soak` 500
//! (`EPHEMERA_FAULT_LIFECYCLES`, `EPHEMERA_FAULT_RATE` in percent,
//! `EPHEMERA_FAULT_SEED`).

use std::{
    convert::Infallible,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;

use kube::{ResourceExt, api::PostParams};
use serde_json::json;

use crate::{
    lifecycle::{finish, wait_ungated_within},
    soak::{Churn, Rng, assert_reaped_once, env_or},
    support::{ControllerProcess, controller_turn, unique_name},
    webhook::{env_of, pod},
};

/// What the proxy did, by kind.
#[derive(Default, Debug)]
pub struct FaultCounts {
    pub forwarded: AtomicU64,
    pub throttled: AtomicU64,
    pub server_errors: AtomicU64,
    pub delayed: AtomicU64,
    pub held: AtomicU64,
}

struct Faults {
    upstream: String,
    /// Share of requests that get a fault, in percent.
    rate: u64,
    rng: Mutex<Rng>,
    counts: FaultCounts,
}

/// The proxy, serving until dropped.
pub struct FaultProxy {
    pub url: String,
    state: Arc<Faults>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultProxy {
    /// Proxies to `upstream` (`host:port`, plain HTTP), faulting `rate` % of requests.
    pub async fn start(upstream: &str, rate: u64, seed: u64) -> FaultProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binding the fault proxy");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Faults {
            upstream: upstream.to_owned(),
            rate,
            rng: Mutex::new(Rng(seed)),
            counts: FaultCounts::default(),
        });
        let task = serve(listener, state.clone(), handle);
        FaultProxy { url, state, task }
    }

    pub fn counts(&self) -> &FaultCounts {
        &self.state.counts
    }
}

/// Serves HTTP/1 on `listener`, each request answered by `handle(req, state)`.
pub fn serve<S, F, Fut>(listener: tokio::net::TcpListener, state: Arc<S>, handle: F) -> tokio::task::JoinHandle<()>
where
    S: Send + Sync + 'static,
    F: Fn(Request<hyper::body::Incoming>, Arc<S>) -> Fut + Copy + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let state = state.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| handle(req, state.clone()));
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    })
}

fn aws_error(status: u16, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = format!(
        "<ErrorResponse><Error><Type>{}</Type><Code>{code}</Code><Message>{message}</Message></Error>\
         <RequestId>ephemera-fault-proxy</RequestId></ErrorResponse>",
        if status < 500 { "Sender" } else { "Receiver" }
    );
    Response::builder()
        .status(status)
        .header("content-type", "text/xml")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

async fn handle(req: Request<hyper::body::Incoming>, state: Arc<Faults>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (fault, kind) = {
        let mut rng = state.rng.lock().unwrap();
        (rng.below(100) < state.rate, rng.below(100))
    };
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(http_body_util::Collected::to_bytes).unwrap_or_default();
    let counts = &state.counts;
    if fault {
        match kind {
            0..40 => {
                counts.throttled.fetch_add(1, Ordering::SeqCst);
                return Ok(aws_error(400, "Throttling", "Rate exceeded"));
            }
            40..70 => {
                counts.server_errors.fetch_add(1, Ordering::SeqCst);
                return Ok(aws_error(500, "InternalFailure", "injected by the fault proxy"));
            }
            70..85 => {
                counts.server_errors.fetch_add(1, Ordering::SeqCst);
                return Ok(aws_error(503, "ServiceUnavailable", "injected by the fault proxy"));
            }
            85..97 => {
                counts.delayed.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200 + kind * 5)).await;
            }
            _ => {
                // Longer than the SDK's attempt timeout: the client gives up and retries.
                counts.held.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(ephemera::cloud::aws::ATTEMPT_TIMEOUT + Duration::from_secs(1)).await;
            }
        }
    }
    counts.forwarded.fetch_add(1, Ordering::SeqCst);
    Ok(forward(&state.upstream, parts, body).await.unwrap_or_else(|e| aws_error(502, "ProxyError", &e)))
}

/// Forwards IAM/STS calls, holding those of one action (`CreateRole`)
/// while holding is on, until the test releases them.
pub struct HoldProxy {
    pub url: String,
    state: Arc<Hold>,
    task: tokio::task::JoinHandle<()>,
}

struct Hold {
    upstream: String,
    /// `Action=<action>&`: how the action starts a Query API request body.
    action: Vec<u8>,
    /// Whether calls of the action are held now.
    holding: tokio::sync::watch::Sender<bool>,
    /// Calls that arrived while holding.
    held: tokio::sync::watch::Sender<u64>,
    /// Held calls forwarded and answered by the upstream.
    forwarded: tokio::sync::watch::Sender<u64>,
}

impl Drop for HoldProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HoldProxy {
    /// Holding calls of `action` from the start, or only after [`Self::hold`].
    pub async fn start(upstream: &str, action: &str, holding: bool) -> HoldProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binding the proxy");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Hold {
            upstream: upstream.to_owned(),
            action: format!("Action={action}&").into_bytes(),
            holding: tokio::sync::watch::channel(holding).0,
            held: tokio::sync::watch::channel(0).0,
            forwarded: tokio::sync::watch::channel(0).0,
        });
        let task = serve(listener, state.clone(), hold_or_forward);
        HoldProxy { url, state, task }
    }

    /// Holds calls of the action from now on.
    pub fn hold(&self) {
        self.state.holding.send_replace(true);
    }

    /// Waits until a call of the action is held.
    pub async fn wait_held(&self, timeout: Duration) {
        let mut held = self.state.held.subscribe();
        tokio::time::timeout(timeout, held.wait_for(|n| *n > 0))
            .await
            .expect("no call of the held action reached the proxy in time")
            .unwrap();
    }

    /// Lets held calls go on; waits until the first was answered upstream.
    pub async fn release(&self, timeout: Duration) {
        self.state.holding.send_replace(false);
        let mut forwarded = self.state.forwarded.subscribe();
        tokio::time::timeout(timeout, forwarded.wait_for(|n| *n > 0))
            .await
            .expect("the held call was not answered in time")
            .unwrap();
    }
}

async fn hold_or_forward(
    req: Request<hyper::body::Incoming>,
    state: Arc<Hold>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(http_body_util::Collected::to_bytes).unwrap_or_default();
    let matches = body.windows(state.action.len()).any(|w| w == state.action.as_slice());
    let held = matches && *state.holding.borrow();
    if held {
        state.held.send_modify(|n| *n += 1);
        let mut holding = state.holding.subscribe();
        let _ = holding.wait_for(|h| !*h).await;
    }
    let response = forward(&state.upstream, parts, body).await;
    if held {
        state.forwarded.send_modify(|n| *n += 1);
    }
    Ok(response.unwrap_or_else(|e| aws_error(502, "ProxyError", &e)))
}

/// IAM as a budget: mutating calls (`Create*`, `Put*`, `Attach*`,
/// `Detach*`, `Delete*`, `Update*`, `Tag*`) pass a token bucket of `rate` a
/// second (as IAM's per-account write throttling does; STS and reads are
/// not counted), and over it are answered `Throttling`. Each forwarded
/// write is logged with its action and policy name.
pub struct BudgetProxy {
    pub url: String,
    state: Arc<Budget>,
    task: tokio::task::JoinHandle<()>,
}

struct Budget {
    upstream: String,
    rate: f64,
    bucket: Mutex<(f64, std::time::Instant)>,
    throttled: AtomicU64,
    /// Forwarded writes: when, the action, and the policy name (if any).
    writes: Mutex<Vec<(std::time::Instant, String, String)>>,
}

impl Drop for BudgetProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl BudgetProxy {
    pub async fn start(upstream: &str, rate: f64) -> BudgetProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binding the budget proxy");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Budget {
            upstream: upstream.to_owned(),
            rate,
            bucket: Mutex::new((rate, std::time::Instant::now())),
            throttled: AtomicU64::new(0),
            writes: Mutex::default(),
        });
        let task = serve(listener, state.clone(), spend);
        BudgetProxy { url, state, task }
    }

    /// Writes forwarded since `since`: (action, policy name).
    pub fn writes_since(&self, since: std::time::Instant) -> Vec<(String, String)> {
        let writes = self.state.writes.lock().unwrap();
        writes.iter().filter(|(t, _, _)| *t >= since).map(|(_, a, p)| (a.clone(), p.clone())).collect()
    }

    pub fn throttled(&self) -> u64 {
        self.state.throttled.load(Ordering::SeqCst)
    }
}

/// The value of `key` in a form-encoded Query API body.
fn form_value(body: &[u8], key: &str) -> String {
    let body = String::from_utf8_lossy(body);
    body.split('&').find_map(|kv| kv.strip_prefix(&format!("{key}="))).unwrap_or_default().to_owned()
}

async fn spend(req: Request<hyper::body::Incoming>, state: Arc<Budget>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(http_body_util::Collected::to_bytes).unwrap_or_default();
    let action = form_value(&body, "Action");
    let write = ["Create", "Put", "Attach", "Detach", "Delete", "Update", "Tag"].iter().any(|w| action.starts_with(w))
        && !action.ends_with("WebIdentity");
    if write {
        let mut bucket = state.bucket.lock().unwrap();
        let now = std::time::Instant::now();
        bucket.0 = (bucket.0 + now.duration_since(bucket.1).as_secs_f64() * state.rate).min(state.rate.max(1.0));
        bucket.1 = now;
        if bucket.0 < 1.0 {
            state.throttled.fetch_add(1, Ordering::SeqCst);
            return Ok(aws_error(400, "Throttling", "Rate exceeded"));
        }
        bucket.0 -= 1.0;
        drop(bucket);
        state.writes.lock().unwrap().push((now, action, form_value(&body, "PolicyName")));
    }
    Ok(forward(&state.upstream, parts, body).await.unwrap_or_else(|e| aws_error(502, "ProxyError", &e)))
}

pub async fn forward(
    upstream: &str,
    parts: hyper::http::request::Parts,
    body: Bytes,
) -> Result<Response<Full<Bytes>>, String> {
    let stream =
        tokio::net::TcpStream::connect(upstream).await.map_err(|e| format!("connecting to {upstream}: {e}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let response = sender.send_request(Request::from_parts(parts, Full::new(body))).await.map_err(|e| e.to_string())?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Response::from_parts(parts, Full::new(body)))
}

#[tokio::test]
async fn lifecycles_complete_and_leak_nothing_under_cloud_faults() {
    let lifecycles = env_or("EPHEMERA_FAULT_LIFECYCLES", 12);
    let rate = env_or("EPHEMERA_FAULT_RATE", 20);
    let seed = Rng::seed("EPHEMERA_FAULT_SEED");
    eprintln!("faults: {lifecycles} lifecycles, {rate} % of IAM/STS requests faulted, EPHEMERA_FAULT_SEED={seed}");
    let upstream = std::env::var("AWS_ENDPOINT_URL").expect("AWS_ENDPOINT_URL (source .ephemera/dev.env)");
    let proxy = FaultProxy::start(upstream.trim_start_matches("http://").trim_end_matches('/'), rate, seed).await;

    let _turn = controller_turn().await;
    let cluster = unique_name("faults");
    let churn = Churn::new("e2e-faults", &cluster).await;
    let mut controller = ControllerProcess::spawn_with_env(
        "controller",
        &["controller", "--admin-addr", "127.0.0.1:0", "--cluster-name", &cluster, "--aws-account-id", "000000000000"],
        &[("AWS_ENDPOINT_URL", &proxy.url)],
    );
    // A fault costs at most a few seconds of backoff; minutes mean stuck.
    let made = churn.run(lifecycles, 4, Duration::from_mins(3)).await;
    let settled = churn.assert_nothing_left(&made.roles, &mut controller).await;
    // Retried steps never reap a lease twice.
    assert_reaped_once(&churn, &made.leases).await;

    let c = proxy.counts();
    let injected =
        c.throttled.load(Ordering::SeqCst) + c.server_errors.load(Ordering::SeqCst) + c.held.load(Ordering::SeqCst);
    assert!(injected > 0, "the proxy injected nothing: {c:?}");
    let body = controller.metrics_text().await;
    let retries: f64 = body
        .lines()
        .filter(|l| l.starts_with("ephemera_cloud_retries_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(retries > 0.0, "the SDK's retries are not in the metrics:\n{body}");
    eprintln!(
        "faults: {lifecycles} lifecycles in {:?}, all reaped {settled:?} later; proxy {c:?}; {retries} SDK retries counted",
        made.took
    );
}

/// IAM writes scarce (5 a second, enforced by the proxy, and the controller
/// told so): when workloads end while others start, every ended lease's
/// revoking call goes before any deletion or provisioning call.
#[tokio::test]
async fn scarce_iam_writes_go_to_revocations_first() {
    const RATE: f64 = 5.0;
    const PODS: u64 = 6;
    let upstream = std::env::var("AWS_ENDPOINT_URL").expect("AWS_ENDPOINT_URL (source .ephemera/dev.env)");
    let proxy = BudgetProxy::start(upstream.trim_start_matches("http://").trim_end_matches('/'), RATE).await;
    let _turn = controller_turn().await;
    let cluster = unique_name("budget");
    let churn = Churn::new("e2e-budget", &cluster).await;
    let mut controller = ControllerProcess::spawn_with_env(
        "controller",
        &[
            "controller",
            "--admin-addr",
            "127.0.0.1:0",
            "--cluster-name",
            &cluster,
            "--aws-account-id",
            "000000000000",
            "--iam-writes-per-second",
            &RATE.to_string(),
        ],
        &[("AWS_ENDPOINT_URL", &proxy.url)],
    );
    let pods = &churn.gov.pods;
    let mut names = vec![churn.first.name_any()];
    for i in 1..PODS {
        let p = pod(json!({"name": format!("old-{i}"), "labels": {"ephemera.dev/identity": "reader"}}));
        names.push(pods.create(&PostParams::default(), &p).await.expect("create a pod").name_any());
    }
    let mut roles = Vec::new();
    for name in &names {
        let ready = wait_ungated_within(pods, name, Duration::from_mins(1)).await;
        roles.push(env_of(&ready, "AWS_ROLE_ARN").expect("an injected role"));
    }
    // Quiet: the bucket fills again.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // New pods ask for roles, spending the budget; then the old ones all
    // end at once, while the new ones still wait.
    for i in 0..PODS {
        let p = pod(json!({"name": format!("new-{i}"), "labels": {"ephemera.dev/identity": "reader"}}));
        pods.create(&PostParams::default(), &p).await.expect("create a pod");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ended = std::time::Instant::now();
    futures::future::join_all(
        names.iter().map(|name| finish(&churn.bed.client, &churn.gov.ns.name, name, "Succeeded")),
    )
    .await;
    for i in 0..PODS {
        let ready = wait_ungated_within(pods, &format!("new-{i}"), Duration::from_mins(2)).await;
        roles.push(env_of(&ready, "AWS_ROLE_ARN").expect("an injected role"));
    }
    let writes = proxy.writes_since(ended);
    // A revocation is a write of a revocation set (a new version, and room
    // for it) or, for a role without one, its own deny.
    let is_revocation = |(action, policy): &(String, String)| {
        action == "CreatePolicyVersion"
            || action == "DeletePolicyVersion"
            || (action == "PutRolePolicy" && policy == ephemera::cloud::aws::REVOKE_POLICY_NAME)
    };
    let revocations: Vec<usize> = writes.iter().enumerate().filter(|(_, w)| is_revocation(w)).map(|(i, _)| i).collect();
    eprintln!("budget: writes after the ends: {writes:?}; {} throttled by the proxy", proxy.throttled());
    assert!(
        (1..=2 * usize::try_from(PODS).unwrap()).contains(&revocations.len()),
        "at most a set write (and room for it) per ended pod: {writes:?}"
    );
    // From the first revocation on, nothing else goes until the last.
    let (first, last) = (revocations[0], revocations[revocations.len() - 1]);
    assert!(
        writes[first..=last].iter().all(is_revocation),
        "a deletion or provisioning call went between revocations: {writes:?}"
    );
    assert!(
        !writes[..first].iter().any(|(action, _)| action.starts_with("Delete")),
        "a role was deleted before every ended pod's sessions were denied: {writes:?}"
    );
    for name in &names {
        pods.delete(name, &kube::api::DeleteParams::default()).await.ok();
    }
    for i in 0..PODS {
        finish(&churn.bed.client, &churn.gov.ns.name, &format!("new-{i}"), "Succeeded").await;
    }
    churn.assert_nothing_left(&roles, &mut controller).await;
}
