//! Loopback load test of the webhook's HTTPS endpoint with real
//! AdmissionReview bodies: a governed namespace, a pod that gets an identity,
//! `dryRun` so no ServiceAccount or lease is made (the issue's "without SA
//! creation"). The caches are filled by hand, so no apiserver is needed.
//!
//! The server runs in a process of its own (this bench re-executes itself),
//! so its CPU time is measured apart from the load generator's.
//!
//! Prints: open-loop latency percentiles at a fixed rate (default 500/s for
//! 10 s), closed-loop throughput and p50 with 16 connections, the webhook
//! process's CPU time (user + system) per request in each, and its RSS.
//! The closed loop also prints the load generator's own CPU per request:
//! it shares the machine, so with two cores it bounds the throughput either
//! webhook can reach (about 2 cores / (server's + generator's CPU)).
//!
//! `EPHEMERA_BENCH_PER_CONNECTION` (default 1000) sets the closed loop's
//! requests per connection (more, to profile it).
//!
//! With `EPHEMERA_BENCH_PEER` (the amazon-eks-pod-identity-webhook binary)
//! and `EPHEMERA_BENCH_PEER_KUBECONFIG` (a cluster holding the annotated
//! ServiceAccount `EPHEMERA_BENCH_PEER_NAMESPACE/orders-api`), as
//! `e2e/scripts/bench-webhook.sh` sets them, that webhook is measured the
//! same way, in turn with ephemera's (A/B/A/B), on the same machine.
//! `make bench` runs it; figures are printed, not asserted.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use ephemera::{
    api::{IdentityBoundary, WorkloadIdentity},
    telemetry::Metrics,
    webhook::{
        mutate,
        pods::AwsTarget,
        server::{AppState, Stores, router},
        tls,
    },
};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::{reflector, watcher};
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::json;

// The allocator the `ephemera` binary uses, so the server here is measured as it runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RATE: u64 = 500;
const SECONDS: u64 = 10;
const CONNECTIONS: usize = 16;

/// An AdmissionReview of a Deployment's pod in `namespace`, running as
/// `service_account`.
fn review(uid: usize, namespace: &str, service_account: &str) -> Vec<u8> {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": format!("bench-{uid}"),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace, "operation": "CREATE", "dryRun": true,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"generateName": "orders-api-5689b45f8b-", "namespace": namespace, "labels": {"app": "orders-api"}},
                "spec": {
                    "serviceAccountName": service_account,
                    "containers": [{"name": "api", "image": "registry.invalid/orders:1",
                        "volumeMounts": [{"name": "kube-api-access-abcde", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}]}],
                    "volumes": [{"name": "kube-api-access-abcde", "projected": {"sources": [
                        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}]}}],
                },
            },
        },
    })
    .to_string()
    .into_bytes()
}

fn stores() -> Stores {
    fn filled<K>(objects: Vec<K>) -> reflector::Store<K>
    where
        K: kube::Resource + Clone + 'static,
        K::DynamicType: Default + Eq + std::hash::Hash + Clone,
    {
        let (reader, mut writer) = reflector::store();
        writer.apply_watcher_event(&watcher::Event::Init);
        for o in objects {
            writer.apply_watcher_event(&watcher::Event::InitApply(o));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
        reader
    }
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": "team-a", "labels": {"team": "a"}}})).unwrap();
    let boundary: IdentityBoundary = serde_json::from_value(json!({
        "apiVersion": "ephemera.dev/v1alpha1", "kind": "IdentityBoundary", "metadata": {"name": "team-a"},
        "spec": {"namespaceSelector": {"matchLabels": {"team": "a"}},
                 "aws": {"allowedActions": ["sqs:*"], "allowedResources": ["arn:aws:sqs:*:*:team-a-*"]}},
    }))
    .unwrap();
    let identity: WorkloadIdentity = serde_json::from_value(json!({
        "apiVersion": "ephemera.dev/v1alpha1", "kind": "WorkloadIdentity",
        "metadata": {"name": "orders-api", "namespace": "team-a"},
        "spec": {"selector": {"matchLabels": {"app": "orders-api"}},
                 "aws": {"statements": [{"actions": ["sqs:SendMessage"], "resources": ["arn:aws:sqs:eu-west-1:1:team-a-orders"]}]}},
    }))
    .unwrap();
    Stores {
        namespaces: filled(vec![ns]),
        boundaries: filled(vec![boundary]),
        identities: filled(vec![identity]),
        leases: filled(vec![]),
        lease_counts: Arc::default(),
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: std::net::SocketAddr, tls: Arc<rustls::ClientConfig>) -> Sender {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake");
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.expect("HTTP handshake");
    tokio::spawn(conn);
    sender
}

/// The part of an answer the load generator checks, read through borrowed
/// fields rather than into a `serde_json::Value`: the generator shares the
/// machine with the server it measures, and what it spends per request
/// bounds the throughput either webhook can show.
#[derive(serde::Deserialize)]
struct Answer<'a> {
    #[serde(borrow)]
    response: Verdict<'a>,
}

#[derive(serde::Deserialize)]
struct Verdict<'a> {
    allowed: bool,
    patch: Option<&'a str>,
}

async fn call(sender: &mut Sender, path: &str, body: Vec<u8>) -> Duration {
    let start = Instant::now();
    let request = hyper::Request::post(path)
        .header("content-type", "application/json")
        .header("host", "localhost")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    sender.ready().await.expect("connection ready");
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status(), 200);
    let bytes = response.into_body().collect().await.expect("body").to_bytes();
    let took = start.elapsed();
    // Checked through borrowed fields, not a `serde_json::Value` (see [`Answer`]).
    let answer: Answer<'_> =
        serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&bytes)));
    assert!(answer.response.allowed, "{}", String::from_utf8_lossy(&bytes));
    // The patch is base64, as the AdmissionReview API specifies.
    assert!(answer.response.patch.is_some(), "the pod must be mutated: {}", String::from_utf8_lossy(&bytes));
    took
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// CPU time (user + system) a process has used, from `/proc/<pid>/stat`.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces) start after its ')'.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks: u64 = [11, 12].iter().filter_map(|i| fields.get(*i)?.parse::<u64>().ok()).sum();
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

fn rss_of(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// The webhook server alone, in this process (the bench re-executes itself
/// with `EPHEMERA_BENCH_SERVE` set), so its CPU time is its own: it prints
/// its port and the CA, then serves until killed.
fn serve() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let bundle = tls::generate(&["localhost".into()], &[std::net::IpAddr::from([127, 0, 0, 1])]).unwrap();
        let server_tls = tls::server_config(bundle.cert.as_bytes(), bundle.key.as_bytes()).unwrap();
        // Never called: the namespace is cached and dry runs make nothing.
        let client = kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap();
        let state = Arc::new(AppState {
            client,
            stores: stores(),
            aws: AwsTarget {
                partition: "aws".into(),
                account: "123456789012".into(),
                cluster: "bench".into(),
                role_path_root: "/ephemera/".into(),
            },
            settings: mutate::Settings { aws_region: "eu-west-1".into() },
            metrics: Arc::new(Metrics::default()),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        println!("{}", addr.port());
        println!("{}", bundle.ca_cert.replace('\n', "\\n"));
        let config = axum_server::tls_rustls::RustlsConfig::from_config(server_tls);
        axum_server::from_tcp_rustls(listener, config).unwrap().serve(router(state).into_make_service()).await.unwrap();
    });
}

/// A webhook under test: a process of its own, reached over HTTPS.
struct Target {
    name: &'static str,
    process: std::process::Child,
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    path: &'static str,
    namespace: String,
    service_account: &'static str,
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

impl Target {
    fn review(&self, uid: usize) -> Vec<u8> {
        review(uid, &self.namespace, self.service_account)
    }
}

fn client_tls(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap()).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// This build's webhook, in a process of its own (see [`serve`]).
fn ephemera() -> Target {
    let mut process = std::process::Command::new(std::env::current_exe().unwrap())
        .env("EPHEMERA_BENCH_SERVE", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the webhook server process");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(process.stdout.take().unwrap()));
    let port: u16 = lines.next().unwrap().unwrap().parse().unwrap();
    let ca = lines.next().unwrap().unwrap().replace("\\n", "\n");
    Target {
        name: "ephemera",
        process,
        addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        tls: client_tls(&ca),
        path: "/mutate/pods",
        namespace: "team-a".into(),
        service_account: "default",
    }
}

/// amazon-eks-pod-identity-webhook, out of cluster, with a certificate for
/// localhost; `None` unless the environment names it.
fn peer() -> Option<Target> {
    let binary = std::env::var("EPHEMERA_BENCH_PEER").ok()?;
    let kubeconfig = std::env::var("EPHEMERA_BENCH_PEER_KUBECONFIG").expect("EPHEMERA_BENCH_PEER_KUBECONFIG");
    let namespace = std::env::var("EPHEMERA_BENCH_PEER_NAMESPACE").expect("EPHEMERA_BENCH_PEER_NAMESPACE");
    let bundle = tls::generate(&["localhost".into()], &[std::net::IpAddr::from([127, 0, 0, 1])]).unwrap();
    let dir = std::env::temp_dir().join(format!("ephemera-bench-peer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tls.crt"), &bundle.cert).unwrap();
    std::fs::write(dir.join("tls.key"), &bundle.key).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log = std::fs::File::create(dir.join("peer.log")).unwrap();
    let process = std::process::Command::new(binary)
        .args(["--in-cluster=false", "--kubeconfig", &kubeconfig, "--port", &port.to_string()])
        .args(["--metrics-port", &metrics.to_string(), "--aws-default-region", "eu-west-1"])
        .arg(format!("--tls-cert={}", dir.join("tls.crt").display()))
        .arg(format!("--tls-key={}", dir.join("tls.key").display()))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start the peer webhook");
    Some(Target {
        name: "amazon-eks-pod-identity-webhook",
        process,
        addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        tls: client_tls(&bundle.ca_cert),
        path: "/mutate",
        namespace,
        service_account: "orders-api",
    })
}

/// What one round measured.
struct Figures {
    open_p50: Duration,
    open_p99: Duration,
    open_cpu: f64,
    closed_rps: f64,
    closed_p50: Duration,
    closed_cpu: f64,
    /// This process's CPU per request in the closed loop.
    generator_cpu: f64,
    rss: f64,
}

fn main() {
    if std::env::var_os("EPHEMERA_BENCH_SERVE").is_some() {
        serve();
        return;
    }
    // `cargo bench` passes `--bench`; any filter argument is ignored here.
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut targets = vec![ephemera()];
        targets.extend(peer());
        for target in &targets {
            ready(target).await;
        }
        println!("webhook /mutate over HTTPS on loopback (a Deployment's pod, dryRun, {CONNECTIONS} connections)");
        // A/B/A/B when there is a peer: drift on the machine hits both.
        let rounds = if targets.len() > 1 { 2 } else { 1 };
        for round in 1..=rounds {
            for target in &targets {
                let f = measure(target).await;
                println!(
                    "  {} (round {round}): open loop {RATE}/s for {SECONDS}s p50 {:.2} ms, p99 {:.2} ms, CPU {:.0} us \
                     per request; closed loop {:.0} requests/s, p50 {:.2} ms, CPU {:.0} us per request (the load \
                     generator's {:.0} us); RSS {:.1} MiB",
                    target.name,
                    f.open_p50.as_secs_f64() * 1e3,
                    f.open_p99.as_secs_f64() * 1e3,
                    f.open_cpu,
                    f.closed_rps,
                    f.closed_p50.as_secs_f64() * 1e3,
                    f.closed_cpu,
                    f.generator_cpu,
                    f.rss,
                );
            }
        }
    });
}

/// Waits until `target` answers a review (the peer lists ServiceAccounts first).
async fn ready(target: &Target) {
    let start = Instant::now();
    loop {
        if let Ok(Ok(mut s)) =
            tokio::time::timeout(Duration::from_secs(1), try_connect(target.addr, target.tls.clone())).await
        {
            // Mutated means its cache has the ServiceAccount.
            if tokio::time::timeout(Duration::from_secs(2), try_call(&mut s, target.path, target.review(0))).await
                == Ok(true)
            {
                return;
            }
        }
        assert!(start.elapsed() < Duration::from_mins(1), "{} did not answer within a minute", target.name);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn try_connect(addr: std::net::SocketAddr, tls: Arc<rustls::ClientConfig>) -> std::io::Result<Sender> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let stream = tokio_rustls::TlsConnector::from(tls).connect(ServerName::try_from("localhost").unwrap(), tcp).await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Whether the review was answered with a patch.
async fn try_call(sender: &mut Sender, path: &str, body: Vec<u8>) -> bool {
    let request = hyper::Request::post(path)
        .header("content-type", "application/json")
        .header("host", "localhost")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let Ok(response) = sender.send_request(request).await else { return false };
    let Ok(bytes) = response.into_body().collect().await.map(http_body_util::Collected::to_bytes) else { return false };
    serde_json::from_slice::<serde_json::Value>(&bytes).is_ok_and(|a| a["response"]["patch"].is_string())
}

async fn measure(target: &Target) -> Figures {
    let (addr, pid) = (target.addr, target.process.id());
    // Warm up.
    let mut warm = connect(addr, target.tls.clone()).await;
    for i in 0..200 {
        call(&mut warm, target.path, target.review(i)).await;
    }

    // Open loop: one request every 1/RATE s, whatever the answers do,
    // spread over the connections (latency includes queueing).
    let total = usize::try_from(RATE * SECONDS).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut senders = Vec::new();
    for _ in 0..CONNECTIONS {
        senders.push(Arc::new(tokio::sync::Mutex::new(connect(addr, target.tls.clone()).await)));
    }
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    let cpu_before = cpu_time(pid);
    for i in 0..total {
        tick.tick().await;
        let sender = senders[i % CONNECTIONS].clone();
        let (tx, path, body) = (tx.clone(), target.path, target.review(i));
        tokio::spawn(async move {
            let queued = Instant::now();
            let mut s = sender.lock().await;
            let _ = call(&mut s, path, body).await;
            let _ = tx.send(queued.elapsed());
        });
    }
    drop(tx);
    let mut latencies = Vec::with_capacity(total);
    while let Some(l) = rx.recv().await {
        latencies.push(l);
    }
    let open_cpu = per_request(cpu_time(pid).saturating_sub(cpu_before), latencies.len());
    latencies.sort();
    let (open_p50, open_p99) = (percentile(&latencies, 0.50), percentile(&latencies, 0.99));

    // Closed loop: each connection sends its next request as soon as the
    // previous answer is in.
    let per_connection: usize =
        std::env::var("EPHEMERA_BENCH_PER_CONNECTION").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let (cpu_before, generator_before) = (cpu_time(pid), cpu_time(std::process::id()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CONNECTIONS {
        let tls = target.tls.clone();
        let (path, bodies): (&str, Vec<Vec<u8>>) =
            (target.path, (0..per_connection).map(|i| target.review(c * per_connection + i)).collect());
        tasks.push(tokio::spawn(async move {
            let mut s = connect(addr, tls).await;
            let mut took = Vec::with_capacity(bodies.len());
            for body in bodies {
                took.push(call(&mut s, path, body).await);
            }
            took
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    #[allow(clippy::cast_precision_loss)]
    let closed_rps = latencies.len() as f64 / start.elapsed().as_secs_f64();
    let closed_cpu = per_request(cpu_time(pid).saturating_sub(cpu_before), latencies.len());
    let generator_cpu = per_request(cpu_time(std::process::id()).saturating_sub(generator_before), latencies.len());
    latencies.sort();
    Figures {
        open_p50,
        open_p99,
        open_cpu,
        closed_rps,
        closed_p50: percentile(&latencies, 0.50),
        closed_cpu,
        generator_cpu,
        rss: rss_of(pid),
    }
}

/// CPU microseconds per request.
fn per_request(cpu: Duration, requests: usize) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let n = requests.max(1) as f64;
    cpu.as_secs_f64() * 1e6 / n
}
