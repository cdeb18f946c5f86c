//! Shared e2e plumbing: the test bed's coordinates, clients, namespaces that
//! clean up after themselves, bounded waits.

use std::{
    future::Future,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use k8s_openapi::api::{
    admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration},
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::{Namespace, ServiceAccount},
    rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use serde_json::json;

/// A client acting as `user`, who holds `rules` in `namespace` through a Role
/// and RoleBinding named `role` (made with the test bed's admin client).
pub async fn user_with_role(bed: &TestBed, namespace: &str, user: &str, role: &str, rules: Vec<PolicyRule>) -> Client {
    let meta = ObjectMeta { name: Some(role.to_owned()), ..ObjectMeta::default() };
    let made = Role { metadata: meta.clone(), rules: Some(rules) };
    Api::<Role>::namespaced(bed.client.clone(), namespace).create(&PostParams::default(), &made).await.unwrap();
    let binding = RoleBinding {
        metadata: meta,
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name: role.to_owned(),
        },
        subjects: Some(vec![Subject {
            kind: "User".into(),
            name: user.to_owned(),
            api_group: Some("rbac.authorization.k8s.io".into()),
            namespace: None,
        }]),
    };
    Api::<RoleBinding>::namespaced(bed.client.clone(), namespace)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let mut config = kube::Config::infer().await.unwrap();
    config.auth_info.impersonate = Some(user.to_owned());
    Client::try_from(config).unwrap()
}

/// Where the test bed is, read from `.ephemera/dev.env` (exported by `make e2e`).
pub struct TestBed {
    pub client: Client,
    /// Host of the cluster's service-account issuer (the IAM OIDC provider's name).
    pub issuer_host: String,
    /// ARN of the IAM OIDC provider registered for the issuer.
    pub oidc_provider_arn: String,
    /// Python of the test bed's venv (boto3 installed).
    pub python: PathBuf,
    pub iam: aws_sdk_iam::Client,
    pub sts: aws_sdk_sts::Client,
}

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: the e2e tests need the local test bed; run them with `make e2e` (or `make cluster-up && source .ephemera/dev.env`)")
    })
}

impl TestBed {
    pub async fn connect() -> TestBed {
        let issuer = required_env("EPHEMERA_OIDC_ISSUER");
        let client = Client::try_default().await.expect("a Kubernetes client from KUBECONFIG");
        let sdk = ephemera::cloud::aws::sdk_config().await;
        TestBed {
            client,
            issuer_host: issuer.trim_start_matches("https://").trim_end_matches('/').to_owned(),
            oidc_provider_arn: required_env("EPHEMERA_OIDC_PROVIDER_ARN"),
            python: required_env("EPHEMERA_E2E_PYTHON").into(),
            iam: aws_sdk_iam::Client::new(&sdk),
            sts: aws_sdk_sts::Client::new(&sdk),
        }
    }

    /// An IAM client acting as an STS session (a workload's), against the
    /// test bed's endpoint.
    pub async fn iam_as(creds: &aws_sdk_sts::types::Credentials) -> aws_sdk_iam::Client {
        let credentials = aws_sdk_iam::config::Credentials::new(
            creds.access_key_id(),
            creds.secret_access_key(),
            Some(creds.session_token().to_owned()),
            None,
            "workload-session",
        );
        let sdk = ephemera::cloud::aws::sdk_config().await;
        aws_sdk_iam::Client::from_conf(
            aws_sdk_iam::config::Builder::from(&sdk).credentials_provider(credentials).build(),
        )
    }

    /// A fresh namespace, deleted when the returned guard drops.
    pub async fn namespace(&self, prefix: &str) -> TestNamespace {
        let name = unique_name(prefix);
        let ns = Namespace {
            metadata: ObjectMeta { name: Some(name.clone()), ..ObjectMeta::default() },
            ..Namespace::default()
        };
        Api::<Namespace>::all(self.client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
        // The ServiceAccount admission plugin refuses pods until the
        // controller-manager has made the namespace's `default` ServiceAccount.
        let sas = Api::<ServiceAccount>::namespaced(self.client.clone(), &name);
        wait_until(&format!("ServiceAccount {name}/default"), Duration::from_secs(30), || async {
            sas.get_opt("default").await.ok().flatten()
        })
        .await;
        TestNamespace { _cleanup: DeleteOnDrop::new(&name), name }
    }

    /// Creates a ServiceAccount and returns its name.
    pub async fn service_account(&self, namespace: &str, name: &str) -> String {
        let sa = ServiceAccount {
            metadata: ObjectMeta { name: Some(name.to_owned()), ..ObjectMeta::default() },
            ..ServiceAccount::default()
        };
        Api::<ServiceAccount>::namespaced(self.client.clone(), namespace)
            .create(&PostParams::default(), &sa)
            .await
            .unwrap_or_else(|e| panic!("creating ServiceAccount {namespace}/{name}: {e}"))
            .name_any()
    }

    /// A token for a ServiceAccount from the TokenRequest API, as the kubelet
    /// would mint it for a projected volume.
    pub async fn token(&self, namespace: &str, service_account: &str, audience: &str, ttl_seconds: i64) -> String {
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: Some(vec![audience.to_owned()]),
                expiration_seconds: Some(ttl_seconds),
                ..TokenRequestSpec::default()
            }),
            ..TokenRequest::default()
        };
        Api::<ServiceAccount>::namespaced(self.client.clone(), namespace)
            .create_token_request(service_account, &PostParams::default(), &request)
            .await
            .unwrap_or_else(|e| panic!("TokenRequest for {namespace}/{service_account}: {e}"))
            .status
            .and_then(|s| s.token)
            .expect("TokenRequest returns a token")
    }

    /// Runs `e2e/workload/assume.py` as an application pod would: with only the
    /// env an injected pod has, and the token in a file.
    pub fn assume_with_boto3(&self, role_arn: &str, token: &str) -> WorkloadResult {
        self.workload(role_arn, token, &[])
    }

    /// Like [`Self::assume_with_boto3`], then reads each `bucket/key` from S3
    /// with the assumed identity.
    pub fn workload(&self, role_arn: &str, token: &str, s3_objects: &[&str]) -> WorkloadResult {
        self.run_workload(
            &[("AWS_ROLE_ARN", role_arn), ("AWS_ROLE_SESSION_NAME", "e2e-boto3")],
            Some(token),
            s3_objects,
        )
    }

    /// The workload with session credentials obtained earlier (to prove that
    /// reaping revokes sessions already handed out).
    pub fn workload_with_session(
        &self,
        creds: &aws_sdk_sts::types::Credentials,
        s3_objects: &[&str],
    ) -> WorkloadResult {
        self.run_workload(
            &[
                ("AWS_ACCESS_KEY_ID", creds.access_key_id()),
                ("AWS_SECRET_ACCESS_KEY", creds.secret_access_key()),
                ("AWS_SESSION_TOKEN", creds.session_token()),
            ],
            None,
            s3_objects,
        )
    }

    fn run_workload(&self, vars: &[(&str, &str)], token: Option<&str>, s3_objects: &[&str]) -> WorkloadResult {
        let dir = std::env::temp_dir().join(unique_name("ephemera-token"));
        std::fs::create_dir_all(&dir).expect("temp dir for the token file");
        let token_file = dir.join("token");
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("e2e/workload/assume.py");
        let mut command = Command::new(&self.python);
        command
            .arg(script)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(vars.iter().copied());
        if let Some(token) = token {
            std::fs::write(&token_file, token).expect("writing the token file");
            command.env("AWS_WEB_IDENTITY_TOKEN_FILE", &token_file);
        }
        let output = command
            .env("AWS_REGION", required_env("AWS_REGION"))
            .env("AWS_DEFAULT_REGION", required_env("AWS_REGION"))
            .env("AWS_ENDPOINT_URL", required_env("AWS_ENDPOINT_URL"))
            // No other credential source may answer for the web identity.
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("E2E_S3_OBJECTS", s3_objects.join(","))
            .output()
            .expect("running the boto3 workload");
        let _ = std::fs::remove_dir_all(&dir);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout.lines().last().unwrap_or_default();
        let parsed: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| {
            panic!(
                "the boto3 workload printed no JSON ({e}); stdout: {stdout}; stderr: {}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
        WorkloadResult {
            ok: output.status.success() && parsed["ok"] == true,
            arn: parsed["arn"].as_str().map(str::to_owned),
            error: parsed["error"].as_str().map(str::to_owned),
            s3: parsed["s3"]
                .as_object()
                .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned())).collect())
                .unwrap_or_default(),
        }
    }

    /// Makes S3 objects with the administrator's credentials.
    pub fn seed_s3(&self, objects: &[&str]) {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("e2e/workload/seed_s3.py");
        let status = Command::new(&self.python).arg(script).args(objects).status().expect("running seed_s3.py");
        assert!(status.success(), "seeding S3 failed");
    }
}

/// What the boto3 workload saw.
#[derive(Debug)]
pub struct WorkloadResult {
    pub ok: bool,
    /// `bucket/key` -> `ok` or the S3 error code.
    pub s3: std::collections::BTreeMap<String, String>,
    pub arn: Option<String>,
    pub error: Option<String>,
}

/// A namespace that deletes itself (and so everything in it) when dropped,
/// also when the test failed.
pub struct TestNamespace {
    pub name: String,
    _cleanup: DeleteOnDrop<Namespace>,
}

/// A cluster-scoped Kubernetes kind.
pub trait ClusterObject:
    kube::Resource<Scope = kube::core::ClusterResourceScope, DynamicType = ()>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
{
}

impl<K> ClusterObject for K where
    K: kube::Resource<Scope = kube::core::ClusterResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
{
}

/// Deletes a cluster-scoped object when dropped, also when the test failed.
pub struct DeleteOnDrop<K: ClusterObject> {
    name: String,
    kind: std::marker::PhantomData<K>,
}

impl<K: ClusterObject> DeleteOnDrop<K> {
    pub fn new(name: &str) -> Self {
        DeleteOnDrop { name: name.to_owned(), kind: std::marker::PhantomData }
    }
}

impl<K: ClusterObject> Drop for DeleteOnDrop<K> {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop cannot await, and blocking here stalls the test's runtime. A
        // client made on its own thread and runtime does not depend on it
        // (a kube Client's request buffer runs on the runtime that built it).
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("cleanup runtime");
            rt.block_on(async {
                if let Ok(client) = Client::try_default().await {
                    let _ = Api::<K>::all(client).delete(&name, &DeleteParams::background()).await;
                }
            });
        })
        .join();
    }
}

/// `prefix-<suffix>`: unique across tests and runs, a valid DNS label.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").subsec_nanos();
    format!("{prefix}-{:x}{:x}", nanos ^ std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Polls `probe` until it returns `Some`, at most `timeout`; panics naming `what`.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll_until(what, timeout, None, probe).await
}

/// [`wait_until`], also failing at once when `process` stops (naming its log).
async fn poll_until<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut process: Option<&mut EphemeraProcess>,
    mut probe: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    let log = process.as_ref().map(|p| format!("; see {}", p.log.display())).unwrap_or_default();
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        if let Some(p) = process.as_mut() {
            assert!(p.is_running(), "stopped while waiting for {what}{log}");
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}{log}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Installs (server-side apply) ephemera's CRDs from the Rust types and waits
/// until the apiserver serves them.
pub async fn ensure_crds(client: &Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::runtime::wait::{await_condition, conditions};
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    for crd in ephemera::api::crds() {
        let name = crd.name_any();
        api.patch(&name, &kube::api::PatchParams::apply("ephemera-e2e").force(), &kube::api::Patch::Apply(&crd))
            .await
            .unwrap_or_else(|e| panic!("installing CRD {name}: {e}"));
        tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(api.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .unwrap_or_else(|_| panic!("CRD {name} not established after 30s"))
        .expect("watching the CRD");
    }
}

/// Controllers act on the whole cluster, so tests that run one take turns:
/// otherwise one test's controller would reap another test's leases.
pub async fn controller_turn() -> tokio::sync::MutexGuard<'static, ()> {
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    TURN.lock().await
}

/// An `ephemera` process of this build (controller or webhook), running
/// against the test bed for the duration of a test; killed when dropped.
pub struct EphemeraProcess {
    child: std::process::Child,
    /// Where its log goes.
    pub log: PathBuf,
}

/// The controller is the process most tests run.
pub type ControllerProcess = EphemeraProcess;

impl EphemeraProcess {
    /// `ephemera controller` with defaults for the test bed.
    pub fn start() -> EphemeraProcess {
        Self::start_with(&[])
    }

    /// With extra arguments after `ephemera controller`.
    pub fn start_with(args: &[&str]) -> EphemeraProcess {
        let mut all = vec!["controller", "--admin-addr", "127.0.0.1:0"];
        all.extend_from_slice(args);
        Self::spawn("controller", &all)
    }

    /// `ephemera <args>`, logging to a temp file named after `what`.
    pub fn spawn(what: &str, args: &[&str]) -> EphemeraProcess {
        Self::spawn_with_env(what, args, &[])
    }

    /// [`EphemeraProcess::spawn`] with extra environment variables (another
    /// `KUBECONFIG`, `AWS_ENDPOINT_URL`, ...).
    pub fn spawn_with_env(what: &str, args: &[&str], env: &[(&str, &str)]) -> EphemeraProcess {
        Self::launch(what, args, env, false)
    }

    /// `ephemera <args>` with only `env` (plus the log settings), nothing
    /// inherited: a process that sees what a pod of the chart would see, and
    /// not the test bed's admin `KUBECONFIG`, AWS credentials or
    /// `EPHEMERA_*` settings.
    pub fn spawn_with_only_env(what: &str, args: &[String], env: &[(String, String)]) -> EphemeraProcess {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Self::launch(what, &args, &env, true)
    }

    fn launch(what: &str, args: &[&str], env: &[(&str, &str)], clear: bool) -> EphemeraProcess {
        let log = std::env::temp_dir().join(unique_name(&format!("ephemera-{what}")) + ".log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_ephemera"));
        if clear {
            command.env_clear();
        } else {
            // `--cluster-name` is required; a test that names none runs as
            // the chart's old default did (an argument or `env` wins).
            command.env("EPHEMERA_CLUSTER_NAME", "kubernetes");
        }
        let child = command
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info,ephemera=debug")
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("process log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("starting `ephemera {what}`: {e}"));
        eprintln!("ephemera {what} pid {} logs to {}", child.id(), log.display());
        EphemeraProcess { child, log }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its resident memory in MiB, from `/proc`.
    pub fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        kib / 1024.0
    }

    /// Base URL of its admin server (`/metrics`), from the line it logs
    /// once listening (tests bind port 0).
    pub async fn admin_url(&mut self) -> String {
        let start = std::time::Instant::now();
        loop {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let addr = log
                .lines()
                .filter(|l| l.contains("admin server listening"))
                .find_map(|l| l.split("addr=").nth(1)?.split_whitespace().next().map(str::to_owned));
            if let Some(addr) = addr {
                return format!("http://{addr}");
            }
            assert!(self.is_running(), "it stopped before serving; see {}", self.log.display());
            assert!(start.elapsed() < Duration::from_secs(30), "no admin server after 30s; see {}", self.log.display());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits (60 s at most) until the lease controller's watches have listed
    /// what exists: from then on it sees every pod that comes and goes.
    pub async fn wait_synced(&mut self) {
        let log = self.log.clone();
        self.wait_while_running("the controller's watches to sync", Duration::from_mins(1), || {
            let log = log.clone();
            async move { std::fs::read_to_string(&log).ok()?.contains("lease controller watches synced").then_some(()) }
        })
        .await;
    }

    /// The value of one sample of its `/metrics`, e.g.
    /// `ephemera_cloud_requests_total{operation="CreateRole",outcome="ok"}`
    /// (labels in the order the registry writes them); `None` when absent.
    pub async fn metric(&mut self, sample: &str) -> Option<f64> {
        self.metrics_text()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.split_whitespace().next()?.parse().ok())
    }

    /// Its whole `/metrics` page.
    pub async fn metrics_text(&mut self) -> String {
        let url = format!("{}/metrics", self.admin_url().await);
        http_get(&url).await
    }

    /// [`wait_until`], failing at once if this process stops.
    pub async fn wait_while_running<T, F, Fut>(&mut self, what: &str, timeout: Duration, probe: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        poll_until(what, timeout, Some(self), probe).await
    }

    /// Whether it is still running (else its log says why it stopped).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends it `signal` (`STOP`, `CONT`, ...).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([&format!("-{signal}"), &self.child.id().to_string()]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{signal} {} failed", self.child.id());
    }

    /// Its exit status, once it has stopped.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits until it has stopped, at the latest at `deadline`; its exit status.
    pub async fn exited_by(&mut self, deadline: Instant, what: &str) -> std::process::ExitStatus {
        loop {
            if let Some(status) = self.exit_status() {
                return status;
            }
            assert!(Instant::now() < deadline, "{what} still runs; see {}", self.log.display());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Asks it to stop as Kubernetes would (SIGTERM) and waits for it.
    pub fn terminate(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

impl Drop for EphemeraProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Job of two parallel pods that ask for `identity` by label.
pub fn two_pod_job(name: &str, identity: &str) -> k8s_openapi::api::batch::v1::Job {
    serde_json::from_value(json!({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
        "spec": {"parallelism": 2, "completions": 2, "template": {
            "metadata": {"labels": {"ephemera.dev/identity": identity}},
            "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": "busybox"}]},
        }},
    }))
    .expect("a valid Job")
}

/// A free loopback port (bound and released: good enough on a test machine).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free loopback port").port()
}

/// Label that puts a namespace under one test's webhook.
pub const WEBHOOK_LABEL: &str = "ephemera-e2e-webhook";
/// How long a webhook may take to register.
const WAIT: Duration = Duration::from_secs(30);

/// A webhook process registered for namespaces labelled `WEBHOOK_LABEL=<id>`, and
/// its configurations, removed when dropped.
pub struct Webhook {
    pub id: String,
    pub url: String,
    process: EphemeraProcess,
    _mutating: DeleteOnDrop<MutatingWebhookConfiguration>,
    _validating: DeleteOnDrop<ValidatingWebhookConfiguration>,
}

impl Webhook {
    /// The webhook process's id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The webhook for cluster `e2e` (the host-process controllers' usual name).
    pub async fn start(client: &Client) -> Webhook {
        Self::start_for(client, "e2e").await
    }

    /// The webhook naming roles for `cluster`: a controller acts only on
    /// leases whose role names its own cluster name derives.
    pub async fn start_for(client: &Client, cluster: &str) -> Webhook {
        let id = unique_name("wh");
        let url = format!("https://127.0.0.1:{}", free_port());
        let addr = url.trim_start_matches("https://").to_owned();
        let mut process = EphemeraProcess::spawn(
            "webhook",
            &[
                "webhook",
                "--webhook-addr",
                &addr,
                "--webhook-admin-addr",
                "127.0.0.1:0",
                "--register-url",
                &url,
                "--webhook-configuration",
                &id,
                "--webhook-namespace-label",
                &format!("{WEBHOOK_LABEL}={id}"),
                "--cluster-name",
                cluster,
            ],
        );
        let configs = Api::<MutatingWebhookConfiguration>::all(client.clone());
        let start = std::time::Instant::now();
        while configs.get_opt(&id).await.ok().flatten().is_none() {
            assert!(process.is_running(), "the webhook stopped; see {}", process.log.display());
            assert!(start.elapsed() < WAIT, "webhook not registered after {WAIT:?}; see {}", process.log.display());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Webhook { _mutating: DeleteOnDrop::new(&id), _validating: DeleteOnDrop::new(&id), id, url, process }
    }

    /// A sample of the webhook's `/metrics` ([`EphemeraProcess::metric`]).
    pub async fn metric(&mut self, sample: &str) -> Option<f64> {
        self.process.metric(sample).await
    }

    /// Where the webhook process logs.
    pub fn log(&self) -> &std::path::Path {
        &self.process.log
    }

    /// Puts a namespace under this webhook.
    pub async fn watch_namespace(&self, client: &Client, namespace: &str, extra: serde_json::Value) {
        let mut labels = json!({ WEBHOOK_LABEL: self.id });
        if let (Some(l), Some(e)) = (labels.as_object_mut(), extra.as_object()) {
            l.extend(e.clone());
        }
        Api::<Namespace>::all(client.clone())
            .patch(namespace, &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": labels}})))
            .await
            .expect("labelling the namespace");
    }
}

/// GET over plain HTTP on loopback (the admin server), without a client crate.
async fn http_get(url: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let (host, path) = rest.split_once('/').map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("sending the request");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("reading the response");
    response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default()
}

impl<K: ClusterObject> DeleteOnDrop<K> {
    /// Name of the object it deletes.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The replica named in the controller's leader-election Lease
/// (`ephemera-controller`) in `namespace`; `None` while nobody holds it.
pub async fn leader_of(client: &Client, namespace: &str) -> Option<String> {
    Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), namespace)
        .get_opt("ephemera-controller")
        .await
        .ok()
        .flatten()?
        .spec?
        .holder_identity
        .filter(|h| !h.is_empty())
}
