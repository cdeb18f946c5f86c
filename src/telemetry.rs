//! Logging (tracing) setup. Metrics and the admin server join this module with
//! the controller.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, for a terminal.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs the global tracing subscriber. The filter comes from `RUST_LOG`
/// when set (e.g. `RUST_LOG=ephemera=debug,kube=info`), else `default_filter`.
///
/// # Errors
/// Fails when `RUST_LOG` cannot be parsed or a subscriber is already installed.
pub fn init(format: LogFormat, default_filter: &str) -> crate::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) => EnvFilter::try_new(&spec)
            .map_err(|e| crate::Error::Config(format!("RUST_LOG={spec:?} is not a valid filter: {e}")))?,
        Err(_) => EnvFilter::new(default_filter),
    };
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Text => registry.with(fmt::layer().with_writer(std::io::stderr)).try_init(),
        LogFormat::Json => registry
            .with(fmt::layer().json().flatten_event(true).with_current_span(true).with_writer(std::io::stderr))
            .try_init(),
    };
    installed.map_err(|e| crate::Error::Config(format!("cannot install the log subscriber: {e}")))
}

// === Metrics ===

use std::{net::SocketAddr, sync::Arc};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Labels of the per-controller metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    /// `workload_identity`, `boundary`, ...
    pub controller: &'static str,
}

/// Labels of the error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The controller that failed.
    pub controller: &'static str,
    /// [`crate::Error::metric_label`].
    pub reason: &'static str,
}

/// Labels of the opt-out counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OptOutLabels {
    /// The pod's namespace.
    pub namespace: String,
    /// `skipped` (admitted unchanged) or `refused` (a boundary does not
    /// allow it; the pod was governed as usual, or denied).
    pub outcome: &'static str,
}

/// Labels of the admission metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    /// `pods` or `workloadidentities`.
    pub webhook: &'static str,
    /// `mutated`, `allowed`, `denied` or `malformed`.
    pub outcome: &'static str,
}

/// Labels of the leases gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// `Pending`, `Provisioning`, `Ready`, `Reaping`.
    pub phase: &'static str,
}

/// Labels of the cloud call counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloudLabels {
    /// The API operation (`CreateRole`, `AssumeRoleWithWebIdentity`, ...).
    pub operation: &'static str,
    /// `ok`, `already_done`, `denied`, `throttled` or `error` (see
    /// [`crate::cloud::aws::outcome`]).
    pub outcome: &'static str,
}

/// Labels of the cloud retry counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    /// The API operation, as the SDK names it.
    pub operation: String,
}

/// Labels of the cloud call latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    /// The API operation.
    pub operation: &'static str,
}

/// Every metric ephemera exports, registered in one registry.
pub struct Metrics {
    registry: Registry,
    /// `ephemera_reconciles_total{controller}`.
    pub reconciles: Family<ControllerLabels, Counter>,
    /// `ephemera_reconcile_errors_total{controller,reason}`.
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    /// `ephemera_reconcile_duration_seconds{controller}`.
    pub reconcile_duration: Family<ControllerLabels, Histogram>,
    /// `ephemera_admission_requests_total{webhook,outcome}`.
    pub admission_requests: Family<AdmissionLabels, Counter>,
    /// `ephemera_admission_duration_seconds{webhook,outcome}`.
    pub admission_duration: Family<AdmissionLabels, Histogram>,
    /// `ephemera_leases{phase}`.
    pub leases: Family<PhaseLabels, Gauge>,
    /// `ephemera_provision_latency_seconds`: pod created -> gate lifted.
    pub provision_latency: Histogram,
    /// `ephemera_ghost_window_seconds`: workload over -> role deleted.
    pub ghost_window: Histogram,
    /// `ephemera_credential_window_seconds`: workload over -> every session
    /// of its role denied.
    pub credential_window: Histogram,
    /// `ephemera_cloud_requests_total{operation,outcome}`.
    pub cloud_requests: Family<CloudLabels, Counter>,
    /// `ephemera_cloud_request_duration_seconds{operation}`.
    pub cloud_duration: Family<OperationLabels, Histogram>,
    /// `ephemera_cloud_retries_total{operation}`: attempts the SDK repeated.
    pub cloud_retries: Family<RetryLabels, Counter>,
    /// `ephemera_iam_roles`: roles in the account, as last read plus made minus deleted since.
    pub iam_roles: Gauge,
    /// `ephemera_iam_roles_limit`: the account's role quota (or `--aws-role-limit`).
    pub iam_roles_limit: Gauge,
    /// `ephemera_webhook_certificate_expiry_timestamp_seconds`: when the
    /// self-managed serving certificate expires (unset with cert-manager).
    pub certificate_expiry: Gauge,
    /// `ephemera_pod_opt_outs_total{namespace,outcome}`: pods labelled
    /// `ephemera.dev/skip: "true"`.
    pub opt_outs: Family<OptOutLabels, Counter>,
}

/// Registers `metric` under `name` and returns it.
fn registered<M: prometheus_client::registry::Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::with_prefix("ephemera");
        let lifecycle_buckets = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0];
        let since_end = "From the workload's end as the apiserver records it (whole seconds: up to 1 s early) to";
        Metrics {
            reconciles: registered(&mut r, "reconciles", "Reconciliations run, by controller", Family::default()),
            reconcile_errors: registered(
                &mut r,
                "reconcile_errors",
                "Reconciliations that failed, by controller and reason",
                Family::default(),
            ),
            reconcile_duration: registered(
                &mut r,
                "reconcile_duration_seconds",
                "Time spent in one reconciliation",
                Family::new_with_constructor(|| {
                    Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
                }),
            ),
            admission_requests: registered(
                &mut r,
                "admission_requests",
                "AdmissionReviews answered, by webhook and outcome",
                Family::default(),
            ),
            admission_duration: registered(
                &mut r,
                "admission_duration_seconds",
                "Time to answer one AdmissionReview (includes making the ServiceAccount and lease)",
                Family::new_with_constructor(|| {
                    Histogram::new([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0])
                }),
            ),
            leases: registered(&mut r, "leases", "Live IdentityLeases by phase", Family::default()),
            provision_latency: registered(
                &mut r,
                "provision_latency_seconds",
                "From the pod's creation as the apiserver records it (whole seconds: up to 1 s early; the lease's for a Job run) to the role verified and the gate lifted",
                Histogram::new(lifecycle_buckets),
            ),
            ghost_window: registered(
                &mut r,
                "ghost_window_seconds",
                &format!("{since_end} its role, RBAC and ServiceAccount deleted"),
                Histogram::new(lifecycle_buckets),
            ),
            credential_window: registered(
                &mut r,
                "credential_window_seconds",
                &format!("{since_end} every session of its role denied (the deny-all policy in place)"),
                Histogram::new(lifecycle_buckets),
            ),
            cloud_requests: registered(
                &mut r,
                "cloud_requests",
                "Cloud API calls (IAM, STS), by operation and outcome",
                Family::default(),
            ),
            cloud_duration: registered(
                &mut r,
                "cloud_request_duration_seconds",
                "Latency of one cloud API call, SDK retries included",
                Family::new_with_constructor(|| {
                    Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0])
                }),
            ),
            cloud_retries: registered(
                &mut r,
                "cloud_retries",
                "Cloud API attempts the SDK repeated (throttling, 5xx, timeouts), by operation",
                Family::default(),
            ),
            iam_roles: registered(
                &mut r,
                "iam_roles",
                "IAM roles in the account (GetAccountSummary, plus roles made minus deleted since)",
                Gauge::default(),
            ),
            iam_roles_limit: registered(
                &mut r,
                "iam_roles_limit",
                "IAM roles the account may hold (RolesQuota, or --aws-role-limit)",
                Gauge::default(),
            ),
            certificate_expiry: registered(
                &mut r,
                "webhook_certificate_expiry_timestamp_seconds",
                "When the webhook's self-managed serving certificate expires (Unix time; renewed with a third left)",
                Gauge::default(),
            ),
            opt_outs: registered(
                &mut r,
                "pod_opt_outs",
                "Pods created with the label ephemera.dev/skip=true, by namespace and outcome (skipped: admitted unchanged, as their boundaries allow; refused: governed as usual or denied)",
                Family::default(),
            ),
            registry: r,
        }
    }
}

impl Metrics {
    /// Counts one reconciliation of `controller` and returns a guard that
    /// records its duration when dropped.
    #[must_use]
    pub fn reconcile_started(&self, controller: &'static str) -> ReconcileTimer<'_> {
        self.reconciles.get_or_create(&ControllerLabels { controller }).inc();
        ReconcileTimer { metrics: self, controller, start: std::time::Instant::now() }
    }

    /// Counts one failed reconciliation.
    pub fn reconcile_failed(&self, controller: &'static str, error: &crate::Error) {
        self.reconcile_errors.get_or_create(&ErrorLabels { controller, reason: error.metric_label() }).inc();
    }

    /// Counts one answered AdmissionReview and its latency.
    pub fn admission_done(&self, webhook: &'static str, outcome: &'static str, took: std::time::Duration) {
        let labels = AdmissionLabels { webhook, outcome };
        self.admission_requests.get_or_create(&labels).inc();
        self.admission_duration.get_or_create(&labels).observe(took.as_secs_f64());
    }

    /// Counts one pod that asked to be skipped.
    pub fn opt_out(&self, namespace: &str, outcome: &'static str) {
        self.opt_outs.get_or_create(&OptOutLabels { namespace: namespace.to_owned(), outcome }).inc();
    }

    /// Counts one cloud API call and its latency.
    pub fn cloud_call(&self, operation: &'static str, outcome: &'static str, took: std::time::Duration) {
        self.cloud_requests.get_or_create(&CloudLabels { operation, outcome }).inc();
        self.cloud_duration.get_or_create(&OperationLabels { operation }).observe(took.as_secs_f64());
    }

    /// The registry in the OpenMetrics text format.
    ///
    /// # Errors
    /// Only if formatting into a `String` fails, which it does not.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Records a reconciliation's duration when dropped.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    controller: &'static str,
    start: std::time::Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        let labels = ControllerLabels { controller: self.controller };
        self.metrics.reconcile_duration.get_or_create(&labels).observe(self.start.elapsed().as_secs_f64());
    }
}

// === Admin server ===

/// Serves `/livez`, `/readyz` and `/metrics` on `addr` (plain HTTP on a port
/// separate from the webhook, for kubelet probes and Prometheus). `/readyz`
/// answers 503 until `ready` is set.
///
/// # Errors
/// Fails when the address cannot be bound.
pub async fn serve_admin(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    ready: Arc<std::sync::atomic::AtomicBool>,
) -> crate::Result<()> {
    use axum::{Router, http::StatusCode, http::header, routing::get};
    let readyz = move || {
        let ready = ready.load(std::sync::atomic::Ordering::SeqCst);
        async move { if ready { (StatusCode::OK, "ok") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready") } }
    };
    let app = Router::new().route("/livez", get(|| async { "ok" })).route("/readyz", get(readyz)).route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                match metrics.encode() {
                    Ok(body) => (
                        StatusCode::OK,
                        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                        body,
                    ),
                    Err(_) => {
                        (StatusCode::INTERNAL_SERVER_ERROR, [(header::CONTENT_TYPE, "text/plain")], String::new())
                    }
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(crate::Error::io(format!("binding the admin server to {addr}")))?;
    let bound = listener.local_addr().map_or_else(|_| addr.to_string(), |a| a.to_string());
    tracing::info!(addr = %bound, "admin server listening (/livez /readyz /metrics)");
    axum::serve(listener, app).await.map_err(crate::Error::io("serving the admin endpoints"))
}
