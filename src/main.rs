//! `ephemera`: the CLI. Parses flags and hands over to the library.

use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};
use ephemera::{
    controller::lease::MAX_LEAD_FRACTION,
    telemetry::{self, LogFormat},
};

/// Ephemera gives every Kubernetes workload its own short-lived, narrowly
/// scoped identity (a ServiceAccount, a projected token, an IAM role) and
/// destroys it the moment the workload ends.
#[derive(Debug, Parser)]
#[command(name = "ephemera", version, propagate_version = true)]
struct Cli {
    /// Log format: `text` for terminals, `json` for log collectors.
    #[arg(long, global = true, value_enum, default_value_t, env = "EPHEMERA_LOG_FORMAT")]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controllers: clamp identities to their boundaries, provision a
    /// cloud role per workload, and reap it when the workload ends.
    Controller {
        #[command(flatten)]
        controller: ControllerArgs,
        #[command(flatten)]
        cloud: CloudArgs,
    },
    /// Run the admission webhook: strip default tokens and inject per-pod
    /// identities into pods; validate ephemera's own resources.
    Webhook {
        #[command(flatten)]
        webhook: WebhookArgs,
        #[command(flatten)]
        cloud: CloudArgs,
        /// The operator's namespace (never mutated; holds the TLS Secret).
        #[arg(long, env = "POD_NAMESPACE", default_value = "ephemera-system")]
        namespace: String,
    },
    /// Run the controllers and the webhook in one process (local development).
    Run {
        #[command(flatten)]
        controller: ControllerArgs,
        #[command(flatten)]
        webhook: WebhookArgs,
        #[command(flatten)]
        cloud: CloudArgs,
    },
    /// List every live identity: workload, owner, purpose, role, age, expiry,
    /// and flags for stale or over-broad ones. Also `kubectl ephemera
    /// inventory` with this binary on PATH as `kubectl-ephemera`.
    Inventory {
        /// Only this namespace (default: all namespaces).
        #[arg(short, long)]
        namespace: Option<String>,
        /// `table` or `json`.
        #[arg(short, long, value_enum, default_value_t)]
        output: ephemera::inventory::Output,
    },
    /// Check a running webhook from inside the cluster (the chart's `helm
    /// test`): `/readyz` answers, the HTTPS port presents a certificate the
    /// given CA signed for the Service's DNS name, and a malformed review
    /// gets 400.
    WebhookCheck {
        /// Address of the webhook Service (its cluster IP or DNS name).
        #[arg(long)]
        host: String,
        /// The Service's HTTPS port.
        #[arg(long, default_value_t = 443)]
        port: u16,
        /// The Service's admin port (`/readyz`).
        #[arg(long)]
        admin_port: u16,
        /// DNS name the certificate must carry (`<service>.<namespace>.svc`).
        #[arg(long)]
        server_name: String,
        /// The CA bundle the apiserver trusts (PEM).
        #[arg(long)]
        ca_file: std::path::PathBuf,
        /// How long to retry while replicas start (e.g. `30s`).
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        timeout: std::time::Duration,
    },
    /// Before the operator is removed (the chart's pre-delete hook): delete
    /// the webhook configurations, have the running controller reap every
    /// identity and wait for it, release the boundaries' finalizers.
    Uninstall {
        /// Name of the Mutating/ValidatingWebhookConfiguration.
        #[arg(long, env = "EPHEMERA_WEBHOOK_CONFIGURATION", default_value = "ephemera")]
        webhook_configuration: String,
        /// Longest wait for the reaping (e.g. `5m`).
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        timeout: std::time::Duration,
    },
    /// Print the CustomResourceDefinitions as YAML, or write one file per CRD.
    Crdgen {
        /// Write `<crd-name>.yaml` files into this directory instead of printing.
        #[arg(long, value_name = "DIR")]
        output_dir: Option<std::path::PathBuf>,
    },
    /// Print the version of this build and the Kubernetes API it targets.
    Version,
}

#[derive(Debug, clap::Args)]
struct ControllerArgs {
    /// Address of the admin server (`/livez`, `/readyz`, `/metrics`).
    #[arg(long, env = "EPHEMERA_ADMIN_ADDR", default_value = "127.0.0.1:8080")]
    admin_addr: std::net::SocketAddr,
    /// Hold the `ephemera-controller` coordination Lease, so that of several
    /// replicas only one reconciles. Off for a single local process.
    #[arg(long, env = "EPHEMERA_LEADER_ELECT")]
    leader_elect: bool,
    /// Namespace of the leader-election Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "ephemera-system")]
    namespace: String,
    /// This replica's name in the leader election.
    #[arg(long, env = "POD_NAME", default_value_t = default_identity())]
    identity: String,
    /// Make no new IAM role while the account holds this many roles (new
    /// leases wait and say why in their Ready condition). Default: the
    /// account's IAM role quota. Set it lower to leave room for other roles.
    #[arg(long, env = "EPHEMERA_AWS_ROLE_LIMIT")]
    aws_role_limit: Option<u64>,
    /// How long after a lease is made STS may refuse its new role
    /// (`AccessDenied`) before that is reported as an error rather than IAM
    /// propagating (`90s`, `2m`).
    #[arg(long, env = "EPHEMERA_PROPAGATION_WINDOW", default_value = "60s", value_parser = parse_duration)]
    propagation_window: std::time::Duration,
    /// Rotate a long-lived pod's identity this share of its lease's lifetime
    /// before expiry: the pod is evicted (`PodDisruptionBudget`s hold) and its
    /// controller replaces it with a pod that gets a fresh identity. Bare pods
    /// and Job runs are not evicted; their lease says `Expiring` instead.
    #[arg(long, env = "EPHEMERA_ROTATION_LEAD_FRACTION", default_value_t = 0.1, value_parser = parse_fraction)]
    rotation_lead_fraction: f64,
    /// The shortest rotation lead (never more than half the lifetime).
    #[arg(long, env = "EPHEMERA_ROTATION_LEAD_MIN", default_value = "5m", value_parser = parse_duration)]
    rotation_lead_min: std::time::Duration,
    /// Make at most this many mutating IAM calls a second (IAM throttles
    /// writes per account; set it at or below your account's share), spent
    /// by urgency: revoking an ended workload's sessions first, then
    /// deleting roles, then making new ones. Unset: no limit of ephemera's own.
    #[arg(long, env = "EPHEMERA_IAM_WRITES_PER_SECOND", value_parser = parse_rate)]
    iam_writes_per_second: Option<f64>,
    /// Revocation sets: customer-managed IAM policies of this cluster
    /// (`ephemera-revoked-<digest>-<n>` under the role path root), each the
    /// permissions boundary of the roles it covers, so that one write revokes
    /// every role that ended since the last. Up to 350 roles being reaped
    /// fit in one at a time (more are revoked one by one). Each set a burst
    /// touches costs two IAM writes a round (a version made, an old one
    /// deleted), so fewer sets revoke sooner under a write budget and more
    /// hold bigger bursts. 0: every role is revoked with its own deny-all
    /// inline policy.
    #[arg(long, env = "EPHEMERA_REVOCATION_SETS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(0..=64))]
    revocation_sets: u16,
}

#[derive(Debug, clap::Args)]
struct WebhookArgs {
    /// HTTPS address of the admission webhook.
    #[arg(long, env = "EPHEMERA_WEBHOOK_ADDR", default_value = "0.0.0.0:8443")]
    webhook_addr: std::net::SocketAddr,
    /// Address of the webhook's admin server (`/livez`, `/readyz`, `/metrics`).
    #[arg(long, env = "EPHEMERA_WEBHOOK_ADMIN_ADDR", default_value = "127.0.0.1:8081")]
    webhook_admin_addr: std::net::SocketAddr,
    /// Serving certificate (PEM), e.g. from cert-manager; reloaded when it
    /// changes. Without it the certificate is self-managed in a Secret.
    #[arg(long, env = "EPHEMERA_TLS_CERT_FILE", requires = "tls_key_file")]
    tls_cert_file: Option<std::path::PathBuf>,
    /// Key of `--tls-cert-file` (PEM).
    #[arg(long, env = "EPHEMERA_TLS_KEY_FILE", requires = "tls_cert_file")]
    tls_key_file: Option<std::path::PathBuf>,
    /// Secret (in the operator namespace) holding the self-managed CA and
    /// serving certificate. It must exist (the chart makes it empty); the
    /// webhook fills and renews it and never creates Secrets.
    #[arg(long, env = "EPHEMERA_TLS_SECRET", default_value = "ephemera-webhook-certs")]
    tls_secret: String,
    /// Secret an earlier release kept the self-managed CA in: an empty
    /// `--tls-secret` takes its CA over (so the `caBundle` stays valid during
    /// the upgrade), then it is deleted.
    #[arg(long, env = "EPHEMERA_TLS_SECRET_ADOPT_FROM")]
    tls_secret_adopt_from: Option<String>,
    /// Service in front of the webhook (its DNS names go into the certificate).
    #[arg(long, env = "EPHEMERA_WEBHOOK_SERVICE", default_value = "ephemera-webhook")]
    webhook_service: String,
    /// Name of the Mutating/ValidatingWebhookConfiguration whose `caBundle`
    /// ephemera keeps current.
    #[arg(long, env = "EPHEMERA_WEBHOOK_CONFIGURATION", default_value = "ephemera")]
    webhook_configuration: String,
    /// Local development: register the webhook configurations with this
    /// base URL (`https://127.0.0.1:8443`) and an in-memory certificate.
    #[arg(long, env = "EPHEMERA_REGISTER_URL", conflicts_with = "tls_cert_file")]
    register_url: Option<String>,
    /// With `--register-url`: send only namespaces labelled `KEY=VALUE` to
    /// the webhook (keeps a local webhook away from unrelated namespaces).
    #[arg(long, env = "EPHEMERA_WEBHOOK_NAMESPACE_LABEL", value_parser = parse_label, requires = "register_url")]
    webhook_namespace_label: Option<(String, String)>,
    /// AWS region injected into pods (`AWS_REGION`, `AWS_DEFAULT_REGION`).
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    aws_region: String,
}

#[derive(Debug, clap::Args)]
struct CloudArgs {
    /// AWS account of the roles; asked from STS when unset.
    #[arg(long, env = "EPHEMERA_AWS_ACCOUNT_ID")]
    aws_account_id: Option<String>,
    /// AWS partition of the role ARNs.
    #[arg(long, env = "EPHEMERA_AWS_PARTITION", default_value = "aws")]
    aws_partition: String,
    /// Name of this cluster, in role names and tags (the orphan sweep only
    /// deletes roles tagged with it).
    /// Required: two clusters sharing an account must not share it.
    #[arg(long, env = "EPHEMERA_CLUSTER_NAME", value_parser = parse_cluster_name)]
    cluster_name: String,
    /// The cluster's service-account issuer URL, which roles trust; read
    /// from the apiserver's OpenID discovery document when unset.
    #[arg(long, env = "EPHEMERA_OIDC_ISSUER")]
    oidc_issuer: Option<String>,
    /// The IAM path every role ephemera makes lives under: an
    /// `IdentityBoundary`'s `spec.aws.rolePath` must lie under it (pods it
    /// governs are refused otherwise), and the orphan sweep lists it. The
    /// operator's IAM policy is restricted to it.
    #[arg(long, env = "EPHEMERA_ROLE_PATH_ROOT", default_value = ephemera::cloud::naming::ROLE_PATH_ROOT, value_parser = parse_role_path)]
    role_path_root: String,
}

impl From<CloudArgs> for ephemera::controller::CloudSettings {
    fn from(args: CloudArgs) -> Self {
        ephemera::controller::CloudSettings {
            cluster: args.cluster_name,
            partition: args.aws_partition,
            account: args.aws_account_id,
            oidc_issuer: args.oidc_issuer,
            role_path_root: args.role_path_root,
        }
    }
}

impl WebhookArgs {
    fn into_settings(
        self,
        namespace: String,
        cloud: ephemera::controller::CloudSettings,
    ) -> ephemera::webhook::Settings {
        use ephemera::webhook::TlsSource;
        let tls = match (self.tls_cert_file, self.tls_key_file, &self.register_url) {
            (Some(cert), Some(key), _) => TlsSource::Files { cert, key },
            (_, _, Some(_)) => TlsSource::Ephemeral,
            _ => TlsSource::Secret {
                name: self.tls_secret,
                service: self.webhook_service,
                adopt_from: self.tls_secret_adopt_from,
            },
        };
        ephemera::webhook::Settings {
            listen_addr: self.webhook_addr,
            admin_addr: self.webhook_admin_addr,
            namespace,
            tls,
            configuration: self.webhook_configuration,
            register_url: self.register_url,
            namespace_label: self.webhook_namespace_label,
            aws_region: self.aws_region,
            aws_account: cloud.account,
            aws_partition: cloud.partition,
            cluster_name: cloud.cluster,
            role_path_root: cloud.role_path_root,
        }
    }
}

impl ControllerArgs {
    fn into_settings(self, cloud: ephemera::controller::CloudSettings) -> ephemera::controller::Settings {
        ephemera::controller::Settings {
            admin_addr: self.admin_addr,
            leader_election: self.leader_elect,
            namespace: self.namespace,
            identity: self.identity,
            cloud,
            aws_role_limit: self.aws_role_limit,
            propagation_window: self.propagation_window,
            rotation: ephemera::controller::lease::Rotation {
                fraction: self.rotation_lead_fraction,
                min_lead: self.rotation_lead_min,
            },
            iam_writes_per_second: self.iam_writes_per_second,
            revocation_sets: usize::from(self.revocation_sets),
        }
    }
}

fn parse_role_path(s: &str) -> Result<String, String> {
    if ephemera::cloud::naming::is_role_path(s) {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?} is not an IAM path: it starts and ends with '/' (`/`, `/ephemera/`, `/org/team/`)"))
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r >= 0.1 && r.is_finite() => Ok(r),
        _ => Err(format!("{s:?} is not a rate of at least 0.1 calls a second")),
    }
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (0.0..=MAX_LEAD_FRACTION).contains(&f) => Ok(f),
        _ => Err(format!("{s:?} is not a fraction between 0 and {MAX_LEAD_FRACTION}")),
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// A cluster name as the chart's schema allows: 1-63 characters, letters,
/// digits, `-`, `_`, `.`, starting and ending with a letter or digit.
fn parse_cluster_name(s: &str) -> Result<String, String> {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    let ok = (1..=63).contains(&s.len())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && edge(s.chars().next())
        && edge(s.chars().last());
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a cluster name: 1-63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        ))
    }
}

/// `90s`, `5m`, `1h30m`: the duration syntax of the CRDs.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    s.parse::<ephemera::api::Duration>().map(Into::into).map_err(|e| e.to_string())
}

fn default_identity() -> String {
    format!("ephemera-{}", std::process::id())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(err) = telemetry::init(cli.log_format, "info,ephemera=info") {
        eprintln!("error: {err}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Controller { controller, cloud } => {
            Box::pin(ephemera::controller::run(controller.into_settings(cloud.into()))).await
        }
        Command::Webhook { webhook, cloud, namespace } => {
            ephemera::webhook::run(webhook.into_settings(namespace, cloud.into())).await
        }
        Command::Run { controller, webhook, cloud } => {
            let cloud: ephemera::controller::CloudSettings = cloud.into();
            let webhook = webhook.into_settings(controller.namespace.clone(), cloud.clone());
            Box::pin(run_all(controller.into_settings(cloud), webhook)).await
        }
        Command::Inventory { namespace, output } => ephemera::inventory::run(namespace.as_deref(), output).await,
        Command::WebhookCheck { host, port, admin_port, server_name, ca_file, timeout } => {
            ephemera::webhook::check::run(ephemera::webhook::check::Check {
                host,
                port,
                admin_port,
                server_name,
                ca_file,
                timeout,
            })
            .await
        }
        Command::Uninstall { webhook_configuration, timeout } => {
            ephemera::uninstall::run(ephemera::uninstall::Uninstall { webhook_configuration, timeout }).await
        }
        Command::Crdgen { output_dir } => ephemera::crdgen::run(output_dir.as_deref()),
        Command::Version => {
            println!("ephemera {} (Kubernetes API {})", ephemera::VERSION, ephemera::KUBERNETES_API);
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Controllers and webhook side by side; the first one to stop ends both.
async fn run_all(
    controller: ephemera::controller::Settings,
    webhook: ephemera::webhook::Settings,
) -> ephemera::Result<()> {
    tokio::select! {
        res = ephemera::controller::run(controller) => res,
        res = ephemera::webhook::run(webhook) => res,
    }
}
