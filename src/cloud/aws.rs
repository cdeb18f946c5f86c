//! AWS SDK configuration shared by the IAM and STS clients.
//!
//! Credentials, region and endpoint come from the standard AWS chain
//! (`AWS_ENDPOINT_URL`, `AWS_REGION`, web identity, IMDS, ...), so the same code
//! talks to MiniStack in tests and to real AWS in production.

use aws_config::{BehaviorVersion, SdkConfig};
use aws_smithy_http_client::{
    Builder,
    tls::{Provider, rustls_provider::CryptoMode},
};

/// Loads the AWS configuration from the environment with an HTTPS client that
/// uses rustls with the ring provider (the one kube uses), so only one crypto
/// library is compiled into the binary.
///
/// Calls are bounded: an endpoint that stops answering fails the attempt
/// after [`ATTEMPT_TIMEOUT`] (the SDK retries it) and the call after
/// [`CALL_TIMEOUT`], so a hung connection can never hold a lease forever.
pub async fn sdk_config() -> SdkConfig {
    let http_client = Builder::new().tls_provider(Provider::Rustls(CryptoMode::Ring)).build_https();
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(3))
        .operation_attempt_timeout(ATTEMPT_TIMEOUT)
        .operation_timeout(CALL_TIMEOUT)
        .build();
    aws_config::defaults(BehaviorVersion::latest()).http_client(http_client).timeout_config(timeouts).load().await
}

/// Longest one attempt of a cloud call may take.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a cloud call may take, SDK retries included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// Counts the SDK's own retries (throttling, 5xx, timeouts) in
/// `ephemera_cloud_retries_total{operation}`: they are invisible in
/// `ephemera_cloud_requests_total`, which counts calls once.
struct CountRetries(Arc<Metrics>);

impl std::fmt::Debug for CountRetries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CountRetries")
    }
}

impl aws_sdk_iam::config::Intercept for CountRetries {
    fn name(&self) -> &'static str {
        "CountRetries"
    }

    fn read_before_attempt(
        &self,
        _context: &aws_sdk_iam::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &aws_sdk_iam::config::RuntimeComponents,
        cfg: &mut aws_sdk_iam::config::ConfigBag,
    ) -> Result<(), aws_sdk_iam::error::BoxError> {
        use aws_smithy_runtime_api::client::{orchestrator::Metadata, retries::RequestAttempts};
        if cfg.load::<RequestAttempts>().is_some_and(|a| a.attempts() > 1) {
            let operation = cfg.load::<Metadata>().map_or("unknown", Metadata::name).to_owned();
            self.0.cloud_retries.get_or_create(&crate::telemetry::RetryLabels { operation }).inc();
        }
        Ok(())
    }
}

/// An IAM client from [`sdk_config`].
pub async fn iam_client() -> aws_sdk_iam::Client {
    aws_sdk_iam::Client::new(&sdk_config().await)
}

/// An STS client from [`sdk_config`].
pub async fn sts_client() -> aws_sdk_sts::Client {
    aws_sdk_sts::Client::new(&sdk_config().await)
}

// === Policy documents ===

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use aws_sdk_iam::{
    error::{ProvideErrorMetadata, SdkError},
    types::{SummaryKeyType, Tag},
};
use serde_json::{Value, json};

use super::gate::Urgency;
use crate::{Error, Result, api::AwsStatement, telemetry::Metrics};

/// Codes of IAM's (and STS's) own failures, worth another attempt.
const SERVER_FAULT_CODES: &[&str] = &["ServiceFailure", "InternalFailure", "InternalError", "ServiceUnavailable"];

/// Attempts of one mutating call under a write budget (see [`AwsProvider::write`]).
const WRITE_ATTEMPTS: u32 = 5;

/// Name of the inline policy holding the identity's statements.
pub const POLICY_NAME: &str = "ephemera";
/// Name of the inline policy that denies everything to every session of a
/// role being reaped: the first reaping step.
pub const REVOKE_POLICY_NAME: &str = "ephemera-revoked";
/// The revoking policy of ephemera 0.2 and before (a `aws:TokenIssueTime`
/// deny, named as AWS's console names it). A role a crash left with it is
/// finished like any other: [`AwsProvider::revoke_and_delete`] deletes
/// whatever inline policies it finds.
pub const LEGACY_REVOKE_POLICY_NAME: &str = "AWSRevokeOlderSessions";
/// Tag naming the cluster that owns a role; the sweep looks for it.
pub const TAG_CLUSTER: &str = "ephemera.dev/cluster";
/// Tags naming the lease a role belongs to.
pub const TAG_NAMESPACE: &str = "ephemera.dev/namespace";
/// See [`TAG_NAMESPACE`].
pub const TAG_LEASE: &str = "ephemera.dev/lease";
/// Uid of the lease a role belongs to: a lease deleted and made again under
/// the same name is another lease.
pub const TAG_LEASE_UID: &str = "ephemera.dev/lease-uid";
/// Host of the service-account issuer of the cluster that made a role (the
/// issuer its trust policy names): unique per cluster even when two clusters
/// sharing an account were given the same `clusterName`.
pub const TAG_ISSUER: &str = "ephemera.dev/issuer";

/// Whose a role is, as its tags say: the cluster, namespace and lease (and
/// the lease's uid) it was made for. A role is adopted (after a crash) or
/// deleted only when its tags name the same owner, so a lease can never
/// take over or delete a role made for another lease, namespace or cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleOwner {
    /// This cluster's name.
    pub cluster: String,
    /// This cluster's service-account issuer host; `None`: not checked.
    pub issuer: Option<String>,
    /// The lease's namespace.
    pub namespace: String,
    /// The lease's name.
    pub lease: String,
    /// The lease's uid; `None` when unknown (the sweep, for a role whose
    /// lease is gone, takes it from the role's own tags).
    pub lease_uid: Option<String>,
}

impl RoleOwner {
    /// The tags that record the owner on the role.
    #[must_use]
    pub fn tags(&self) -> Vec<(String, String)> {
        let mut tags = vec![
            (TAG_CLUSTER.to_owned(), self.cluster.clone()),
            (TAG_NAMESPACE.to_owned(), self.namespace.clone()),
            (TAG_LEASE.to_owned(), self.lease.clone()),
        ];
        if let Some(issuer) = &self.issuer {
            tags.push((TAG_ISSUER.to_owned(), issuer.clone()));
        }
        if let Some(uid) = &self.lease_uid {
            tags.push((TAG_LEASE_UID.to_owned(), uid.clone()));
        }
        tags
    }

    /// Whether `tags` (a role's) name this owner. A role made by ephemera
    /// 0.1 has no uid or issuer tag and is judged on the rest.
    #[must_use]
    pub fn owns(&self, tags: &[(String, String)]) -> bool {
        let tag = |k: &str| tags.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        let agrees = |found: Option<&str>, wanted: Option<&String>| match (found, wanted) {
            (Some(found), Some(wanted)) => found == wanted,
            (None, _) | (Some(_), None) => true,
        };
        tag(TAG_CLUSTER) == Some(&self.cluster)
            && tag(TAG_NAMESPACE) == Some(&self.namespace)
            && tag(TAG_LEASE) == Some(&self.lease)
            && agrees(tag(TAG_ISSUER), self.issuer.as_ref())
            && agrees(tag(TAG_LEASE_UID), self.lease_uid.as_ref())
    }
}

/// The ownership tags of a role, for a message.
fn describe_owner(tags: &[(String, String)]) -> String {
    let owner: Vec<String> = [TAG_CLUSTER, TAG_ISSUER, TAG_NAMESPACE, TAG_LEASE, TAG_LEASE_UID]
        .iter()
        .map(|k| {
            let v = tags.iter().find(|(key, _)| key == k).map_or("(none)", |(_, v)| v.as_str());
            format!("{k}={v}")
        })
        .collect();
    owner.join(", ")
}

/// The trust policy: only this ServiceAccount's tokens, for this audience,
/// from this cluster's issuer, may assume the role.
#[must_use]
pub fn trust_policy(
    provider_arn: &str,
    issuer_host: &str,
    namespace: &str,
    service_account: &str,
    audience: &str,
) -> Value {
    json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Principal": {"Federated": provider_arn},
            "Action": "sts:AssumeRoleWithWebIdentity",
            "Condition": {"StringEquals": {
                format!("{issuer_host}:sub"): format!("system:serviceaccount:{namespace}:{service_account}"),
                format!("{issuer_host}:aud"): audience,
            }},
        }],
    })
}

/// The role's inline policy from the effective (boundary-clamped) statements.
#[must_use]
pub fn permissions_policy(statements: &[AwsStatement]) -> Value {
    let statements: Vec<Value> = statements
        .iter()
        .map(|s| {
            let mut v = json!({
                "Effect": format!("{:?}", s.effect),
                "Action": s.actions,
                "Resource": s.resources,
            });
            if let Some(sid) = &s.sid {
                v["Sid"] = sid.clone().into();
            }
            if !s.conditions.is_empty() {
                v["Condition"] = json!(s.conditions);
            }
            v
        })
        .collect();
    json!({"Version": "2012-10-17", "Statement": statements})
}

/// Denies everything to every session of the role, unconditionally: the
/// sessions already handed out and any a still-valid token mints before the
/// role is gone. (AWS's "revoke older sessions" deny, on `aws:TokenIssueTime`,
/// leaves the second kind working until `DeleteRole` lands.) An explicit deny
/// beats every allow, inline or managed, so the rest of the reap can take
/// its time.
#[must_use]
pub fn revoke_policy() -> Value {
    json!({
        "Version": "2012-10-17",
        "Statement": [{"Sid": "EphemeraRevoked", "Effect": "Deny", "Action": "*", "Resource": "*"}],
    })
}

// === The provider ===

/// What a role is made from.
#[derive(Clone, Debug)]
pub struct RoleSpec {
    /// Role name (<= 64 chars, see `cloud::naming`).
    pub name: String,
    /// IAM path (`/ephemera/`).
    pub path: String,
    /// Trust policy document.
    pub trust_policy: Value,
    /// Inline policy document; `None` when the identity has no statements.
    pub policy: Option<Value>,
    /// Managed policies to attach.
    pub managed_policy_arns: Vec<String>,
    /// Permissions boundary (the one the governing boundaries agree on).
    pub permissions_boundary: Option<String>,
    /// `MaxSessionDuration`.
    pub max_session: Duration,
    /// Whose the role is (tagged; checked before an existing role is adopted).
    pub owner: RoleOwner,
    /// More tags (identity, owner, expiry).
    pub tags: Vec<(String, String)>,
}

/// What STS said to a role's first assumption.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It issued a session.
    Accepted,
    /// It refused, with this error code and message.
    Refused { code: String, message: String },
}

/// What reaping found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reaped {
    /// The role was there and is deleted now; every session of it was denied
    /// from `revoked` on (when the deny-all policy was in place).
    Deleted { revoked: std::time::SystemTime },
    /// No such role (reaped before, or never made).
    Gone,
}

/// A role ephemera made, as the sweep sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedRole {
    /// Role name.
    pub name: String,
    /// Namespace of its lease.
    pub namespace: String,
    /// Its lease.
    pub lease: String,
    /// Its lease's uid (roles made by ephemera 0.1 have none).
    pub lease_uid: Option<String>,
    /// This cluster's name (the sweep lists only this cluster's roles).
    pub cluster: String,
    /// The issuer tag, if the role has one (only this cluster's are listed).
    pub issuer: Option<String>,
}

impl OwnedRole {
    /// Whose the role is, as its tags said when it was listed.
    #[must_use]
    pub fn owner(&self) -> RoleOwner {
        RoleOwner {
            cluster: self.cluster.clone(),
            issuer: self.issuer.clone(),
            namespace: self.namespace.clone(),
            lease: self.lease.clone(),
            lease_uid: self.lease_uid.clone(),
        }
    }
}

/// How long a reading of the account's role count and quota is trusted; in
/// between, this process counts the roles it makes and deletes itself.
const BUDGET_TTL: Duration = Duration::from_mins(1);

/// The account's roles against its quota, as last read plus what this
/// process made and deleted since.
#[derive(Debug)]
struct RoleBudget {
    read_at: Instant,
    /// `(roles, limit)`; `None` when `GetAccountSummary` was refused (the
    /// operator's policy lacks it): `CreateRole`'s `LimitExceeded` is then the
    /// only check.
    counts: Option<(u64, u64)>,
}

/// IAM and STS, through the standard AWS configuration chain. Every call is
/// counted in `ephemera_cloud_requests_total{operation,outcome}`.
#[derive(Clone)]
pub struct AwsProvider {
    iam: aws_sdk_iam::Client,
    sts: aws_sdk_sts::Client,
    metrics: Option<Arc<Metrics>>,
    /// Most roles the account may hold; `None`: its `RolesQuota`.
    role_limit: Option<u64>,
    budget: Arc<tokio::sync::Mutex<Option<RoleBudget>>>,
    /// Spends a limited IAM write rate by urgency, with the IAM client its
    /// writes go through (no SDK retries: they would skip the queue);
    /// `None`: unlimited.
    gate: Option<(super::gate::Gate, aws_sdk_iam::Client)>,
}

impl std::fmt::Debug for AwsProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsProvider").field("role_limit", &self.role_limit).finish_non_exhaustive()
    }
}

fn cloud_error<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug>(
    operation: &'static str,
    err: &SdkError<E, R>,
) -> Error {
    let message = match err.code() {
        Some(code) => format!("{code}: {}", err.message().unwrap_or_default()),
        None => aws_sdk_iam::error::DisplayErrorContext(err).to_string(),
    };
    Error::Cloud { operation, message }
}

fn is_code<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>, code: &str) -> bool {
    err.code() == Some(code)
}

/// The `outcome` label of a cloud call: `ok`; `already_done` when IAM says
/// the state is already what ephemera wants (`NoSuchEntity` while deleting,
/// `EntityAlreadyExists` while creating); `denied`; `throttled`; `error`.
#[must_use]
pub fn outcome(code: Option<&str>) -> &'static str {
    match code {
        Some("NoSuchEntity" | "EntityAlreadyExists") => "already_done",
        Some("AccessDenied" | "AccessDeniedException") => "denied",
        Some(code) if crate::error::THROTTLING_CODES.contains(&code) => "throttled",
        _ => "error",
    }
}

impl AwsProvider {
    /// Clients from [`sdk_config`]; calls are counted in `metrics`; no role
    /// is made while the account holds `role_limit` roles (default: the
    /// account's quota from `GetAccountSummary`).
    pub async fn from_env(metrics: Option<Arc<Metrics>>, role_limit: Option<u64>) -> AwsProvider {
        let config = sdk_config().await;
        let mut iam = aws_sdk_iam::config::Builder::from(&config);
        let mut sts = aws_sdk_sts::config::Builder::from(&config);
        if let Some(metrics) = &metrics {
            iam = iam.interceptor(CountRetries(metrics.clone()));
            sts = sts.interceptor(CountRetries(metrics.clone()));
        }
        AwsProvider {
            iam: aws_sdk_iam::Client::from_conf(iam.build()),
            sts: aws_sdk_sts::Client::from_conf(sts.build()),
            metrics,
            role_limit,
            budget: Arc::default(),
            gate: None,
        }
    }

    /// A provider for unit tests: IAM and STS at `endpoint` (a test fake),
    /// fixed credentials and region, no retries.
    #[cfg(test)]
    pub(crate) async fn for_endpoint(endpoint: &str) -> AwsProvider {
        let http_client = Builder::new().tls_provider(Provider::Rustls(CryptoMode::Ring)).build_https();
        let config = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http_client)
            .endpoint_url(endpoint)
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_iam::config::Credentials::new("test", "test", None, None, "test"))
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .load()
            .await;
        AwsProvider {
            iam: aws_sdk_iam::Client::new(&config),
            sts: aws_sdk_sts::Client::new(&config),
            metrics: None,
            role_limit: Some(u64::MAX),
            budget: Arc::default(),
            gate: None,
        }
    }

    /// At most `per_second` mutating IAM calls a second, revocations first,
    /// then deletions, then provisioning (see [`super::gate`]).
    #[must_use]
    pub fn with_write_rate(mut self, per_second: f64) -> Self {
        let config = self.iam.config().to_builder().retry_config(aws_config::retry::RetryConfig::disabled()).build();
        self.gate = Some((super::gate::Gate::new(per_second), aws_sdk_iam::Client::from_conf(config)));
        self
    }

    /// [`Self::call`] for a mutating IAM call (`request` makes it with the
    /// client it is given), once the write budget (if any) admits it.
    ///
    /// Under a budget the SDK does not retry writes itself: a retry would
    /// skip the queue. A throttled, failed or timed-out attempt goes back
    /// through the budget at its urgency instead, up to [`WRITE_ATTEMPTS`]
    /// attempts, the others after a short backoff.
    async fn write<T, E, R, F, Fut>(
        &self,
        urgency: Urgency,
        operation: &'static str,
        request: F,
    ) -> Result<T, SdkError<E, R>>
    where
        E: ProvideErrorMetadata,
        F: Fn(&aws_sdk_iam::Client) -> Fut,
        Fut: Future<Output = Result<T, SdkError<E, R>>>,
    {
        let Some((gate, iam)) = &self.gate else { return self.call(operation, Box::pin(request(&self.iam))).await };
        let mut attempt = 1;
        loop {
            gate.admit(urgency).await;
            // Boxed: the SDK's request futures are large, and every step
            // that awaits one would carry it.
            let result = self.call(operation, Box::pin(request(iam))).await;
            let code = result.as_ref().err().and_then(ProvideErrorMetadata::code);
            let throttled = code.is_some_and(|code| crate::error::THROTTLING_CODES.contains(&code));
            let transient = matches!(
                &result,
                Err(SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_))
            ) || code.is_some_and(|code| SERVER_FAULT_CODES.contains(&code));
            if attempt >= WRITE_ATTEMPTS || !(throttled || transient) {
                return result;
            }
            if let Some(metrics) = &self.metrics {
                metrics
                    .cloud_retries
                    .get_or_create(&crate::telemetry::RetryLabels { operation: operation.to_owned() })
                    .inc();
            }
            if transient {
                tokio::time::sleep(Duration::from_millis(100) * (1 << attempt)).await;
            }
            attempt += 1;
        }
    }

    /// Runs one SDK call and records its outcome and latency.
    async fn call<T, E: ProvideErrorMetadata, R>(
        &self,
        operation: &'static str,
        request: impl Future<Output = Result<T, SdkError<E, R>>>,
    ) -> Result<T, SdkError<E, R>> {
        let start = Instant::now();
        let result = request.await;
        if let Some(metrics) = &self.metrics {
            let outcome = match &result {
                Ok(_) => "ok",
                Err(e) => outcome(e.code()),
            };
            metrics.cloud_call(operation, outcome, start.elapsed());
        }
        result
    }

    /// The account of the credentials in use.
    ///
    /// # Errors
    /// When STS cannot be reached or refuses.
    pub async fn account(&self) -> Result<String> {
        let out = self
            .call("GetCallerIdentity", self.sts.get_caller_identity().send())
            .await
            .map_err(|e| cloud_error("GetCallerIdentity", &e))?;
        out.account.ok_or_else(|| Error::Unexpected("STS GetCallerIdentity returned no account".into()))
    }

    /// Makes the role, or brings an existing one (a retry after a crash) to
    /// `spec`. Returns its ARN and its permissions boundary: `spec`'s for a
    /// role made now, the one it has for a role made before (a boundary is
    /// kept as it is: a set it was made with may differ from today's when
    /// the number of sets changed since).
    ///
    /// # Errors
    /// [`Error::QuotaExceeded`] when the account has no room for another
    /// role; any IAM refusal. The caller retries with backoff.
    pub async fn provision(&self, spec: &RoleSpec) -> Result<(String, Option<String>)> {
        let trust = spec.trust_policy.to_string();
        let tags: Vec<Tag> = spec
            .owner
            .tags()
            .iter()
            .chain(&spec.tags)
            .filter_map(|(k, v)| Tag::builder().key(k).value(v).build().ok())
            .collect();
        let max_session = i32::try_from(spec.max_session.as_secs()).unwrap_or(3600);
        self.reserve_role().await?;
        let created = self
            .write(Urgency::Provision, "CreateRole", |iam| {
                iam.create_role()
                    .role_name(&spec.name)
                    .path(&spec.path)
                    .assume_role_policy_document(&trust)
                    .max_session_duration(max_session)
                    .set_permissions_boundary(spec.permissions_boundary.clone())
                    .set_tags(Some(tags.clone()))
                    .description("Made by ephemera for one workload; deleted when it ends")
                    .send()
            })
            .await;
        let (arn, boundary) = match created {
            Ok(out) => (out.role.map(|r| r.arn).unwrap_or_default(), spec.permissions_boundary.clone()),
            Err(e) if is_code(&e, "EntityAlreadyExists") => {
                // Ours from an earlier attempt (a crash, a retry), or not
                // ours at all: only the tags can tell.
                self.release_role().await;
                let (arn, tags, boundary) = self.role_tags(&spec.name).await?.ok_or_else(|| Error::Cloud {
                    operation: "GetRole",
                    message: format!("role {} was there a moment ago and is gone; retrying", spec.name),
                })?;
                if !spec.owner.owns(&tags) {
                    return Err(Error::RoleConflict(format!(
                        "IAM role {} exists and was not made for this lease (its tags: {}); it is left as it is",
                        spec.name,
                        describe_owner(&tags)
                    )));
                }
                self.write(Urgency::Provision, "UpdateAssumeRolePolicy", |iam| {
                    iam.update_assume_role_policy().role_name(&spec.name).policy_document(&trust).send()
                })
                .await
                .map_err(|e| cloud_error("UpdateAssumeRolePolicy", &e))?;
                (arn, boundary)
            }
            Err(e) => {
                self.release_role().await;
                if is_code(&e, "LimitExceeded") {
                    return Err(Error::QuotaExceeded(format!(
                        "IAM refused role {}: {}",
                        spec.name,
                        e.message().unwrap_or("LimitExceeded")
                    )));
                }
                return Err(cloud_error("CreateRole", &e));
            }
        };
        if let Some(policy) = &spec.policy {
            self.write(Urgency::Provision, "PutRolePolicy", |iam| {
                iam.put_role_policy()
                    .role_name(&spec.name)
                    .policy_name(POLICY_NAME)
                    .policy_document(policy.to_string())
                    .send()
            })
            .await
            .map_err(|e| cloud_error("PutRolePolicy", &e))?;
        }
        for arn in &spec.managed_policy_arns {
            self.write(Urgency::Provision, "AttachRolePolicy", |iam| {
                iam.attach_role_policy().role_name(&spec.name).policy_arn(arn).send()
            })
            .await
            .map_err(|e| cloud_error("AttachRolePolicy", &e))?;
        }
        Ok((arn, boundary))
    }

    /// Reserves room for one more role. The account's role count and quota
    /// are read (`GetAccountSummary`) at most once per [`BUDGET_TTL`].
    async fn reserve_role(&self) -> Result<()> {
        let mut budget = self.budget.lock().await;
        if budget.as_ref().is_none_or(|b| b.read_at.elapsed() > BUDGET_TTL) {
            *budget = Some(RoleBudget { read_at: Instant::now(), counts: self.read_role_counts().await? });
        }
        let Some((roles, limit)) = budget.as_mut().and_then(|b| b.counts.as_mut()) else { return Ok(()) };
        self.publish_budget(*roles, *limit);
        if *roles >= *limit {
            return Err(Error::QuotaExceeded(format!(
                "the account holds {roles} IAM roles, its limit is {limit}; new roles wait until roles are \
                 deleted or the quota is raised (GetAccountSummary RolesQuota, or --aws-role-limit)"
            )));
        }
        *roles += 1;
        self.publish_budget(*roles, *limit);
        Ok(())
    }

    /// Gives back a reservation, or counts a deleted role.
    async fn release_role(&self) {
        let mut budget = self.budget.lock().await;
        if let Some((roles, limit)) = budget.as_mut().and_then(|b| b.counts.as_mut()) {
            *roles = roles.saturating_sub(1);
            self.publish_budget(*roles, *limit);
        }
    }

    fn publish_budget(&self, roles: u64, limit: u64) {
        if let Some(metrics) = &self.metrics {
            metrics.iam_roles.set(i64::try_from(roles).unwrap_or(i64::MAX));
            metrics.iam_roles_limit.set(i64::try_from(limit).unwrap_or(i64::MAX));
        }
    }

    /// `(roles, limit)` of the account; `None` when the summary is refused.
    async fn read_role_counts(&self) -> Result<Option<(u64, u64)>> {
        match self.call("GetAccountSummary", self.iam.get_account_summary().send()).await {
            Ok(out) => {
                let map = out.summary_map.unwrap_or_default();
                let get = |key| map.get(&key).and_then(|v| u64::try_from(*v).ok());
                let roles = get(SummaryKeyType::Roles).unwrap_or(0);
                let Some(limit) = self.role_limit.or_else(|| get(SummaryKeyType::RolesQuota)) else {
                    return Ok(None);
                };
                tracing::debug!(roles, limit, "IAM role budget read");
                Ok(Some((roles, limit)))
            }
            Err(e) if outcome(e.code()) == "throttled" => Err(cloud_error("GetAccountSummary", &e)),
            Err(e) => {
                tracing::warn!(
                    error = %cloud_error("GetAccountSummary", &e),
                    "cannot read the account's IAM role quota; relying on CreateRole's LimitExceeded"
                );
                Ok(None)
            }
        }
    }

    /// Proves the chain end to end: STS accepts `token` for the role, or
    /// says why not (the caller tells IAM propagation from a real problem).
    ///
    /// # Errors
    /// Only when STS cannot be reached at all.
    pub async fn verify(&self, role_arn: &str, session: &str, token: &str) -> Result<Verdict> {
        let request = self
            .sts
            .assume_role_with_web_identity()
            .role_arn(role_arn)
            .role_session_name(session)
            .web_identity_token(token)
            .duration_seconds(900)
            .send();
        match self.call("AssumeRoleWithWebIdentity", request).await {
            Ok(_) => Ok(Verdict::Accepted),
            Err(SdkError::ServiceError(e)) => Ok(Verdict::Refused {
                code: e.err().code().unwrap_or("Unknown").to_owned(),
                message: e.err().message().unwrap_or_default().to_owned(),
            }),
            Err(e) => Err(Error::Cloud {
                operation: "AssumeRoleWithWebIdentity",
                message: aws_sdk_sts::error::DisplayErrorContext(e).to_string(),
            }),
        }
    }

    /// Role `role`'s permissions boundary if it exists and its tags say it
    /// is `owner`'s (`Some(None)`: it has none); `None` otherwise.
    ///
    /// # Errors
    /// When IAM cannot be read.
    pub async fn owned_role_boundary(&self, role: &str, owner: &RoleOwner) -> Result<Option<Option<String>>> {
        Ok(self.role_tags(role).await?.filter(|(_, tags, _)| owner.owns(tags)).map(|(_, _, boundary)| boundary))
    }

    /// Brings a live role's permissions to `spec`: its inline policy (put,
    /// or deleted when it allows nothing now) and its managed policies
    /// (attached and detached to match). The narrowing calls come first.
    /// Trust policy, permissions boundary and session length stay as made.
    ///
    /// # Errors
    /// When IAM refuses; the caller retries.
    pub async fn update_permissions(&self, spec: &RoleSpec) -> Result<()> {
        let role = spec.name.as_str();
        match &spec.policy {
            Some(policy) => {
                let document = policy.to_string();
                let put = |iam: &aws_sdk_iam::Client| {
                    iam.put_role_policy().role_name(role).policy_name(POLICY_NAME).policy_document(&document).send()
                };
                self.write(Urgency::Provision, "PutRolePolicy", put)
                    .await
                    .map_err(|e| cloud_error("PutRolePolicy", &e))?;
            }
            None => self.delete_inline(Urgency::Provision, role, &[POLICY_NAME]).await?,
        }
        let attached: Vec<String> = self
            .call("ListAttachedRolePolicies", self.iam.list_attached_role_policies().role_name(role).send())
            .await
            .map_err(|e| cloud_error("ListAttachedRolePolicies", &e))?
            .attached_policies
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| p.policy_arn)
            .collect();
        for arn in attached.iter().filter(|a| !spec.managed_policy_arns.contains(a)) {
            let detach = |iam: &aws_sdk_iam::Client| iam.detach_role_policy().role_name(role).policy_arn(arn).send();
            match self.write(Urgency::Provision, "DetachRolePolicy", detach).await {
                Ok(_) => {}
                Err(e) if is_code(&e, "NoSuchEntity") => {}
                Err(e) => return Err(cloud_error("DetachRolePolicy", &e)),
            }
        }
        for arn in spec.managed_policy_arns.iter().filter(|a| !attached.contains(a)) {
            self.write(Urgency::Provision, "AttachRolePolicy", |iam| {
                iam.attach_role_policy().role_name(role).policy_arn(arn).send()
            })
            .await
            .map_err(|e| cloud_error("AttachRolePolicy", &e))?;
        }
        Ok(())
    }

    /// The ARN, tags and permissions boundary of a role; `None` when there
    /// is no such role. One `GetRole` (which returns tags), or
    /// `ListRoleTags` too where a `GetRole` answer carries none.
    async fn role_tags(&self, role: &str) -> Result<Option<(String, Vec<(String, String)>, Option<String>)>> {
        let found = match self.call("GetRole", self.iam.get_role().role_name(role).send()).await {
            Ok(out) => out.role,
            Err(e) if is_code(&e, "NoSuchEntity") => return Ok(None),
            Err(e) => return Err(cloud_error("GetRole", &e)),
        };
        let Some(found) = found else { return Ok(None) };
        let mut tags: Vec<(String, String)> =
            found.tags.unwrap_or_default().into_iter().map(|t| (t.key, t.value)).collect();
        if tags.is_empty() {
            tags = match self.call("ListRoleTags", self.iam.list_role_tags().role_name(role).send()).await {
                Ok(out) => out.tags.into_iter().map(|t| (t.key, t.value)).collect(),
                Err(e) if is_code(&e, "NoSuchEntity") => return Ok(None),
                Err(e) => return Err(cloud_error("ListRoleTags", &e)),
            };
        }
        let boundary = found.permissions_boundary.and_then(|b| b.permissions_boundary_arn);
        Ok(Some((found.arn, tags, boundary)))
    }

    /// Denies everything to every session of the role (one `PutRolePolicy`,
    /// the first call after reading its tags), then deletes the role with
    /// its policies, once its tags show it is `owner`'s. Idempotent: a role
    /// already gone is [`Reaped::Gone`]; one a crash left half-reaped is
    /// finished.
    ///
    /// # Errors
    /// [`Error::RoleConflict`] when the role is another owner's (nothing is
    /// touched); any other IAM refusal (throttling, conflicts): the caller
    /// retries.
    pub async fn revoke_and_delete(&self, role: &str, owner: &RoleOwner) -> Result<Reaped> {
        let Some((_, tags, _)) = self.role_tags(role).await? else { return Ok(Reaped::Gone) };
        if !owner.owns(&tags) {
            return Err(Error::RoleConflict(format!(
                "IAM role {role} was not made for IdentityLease {}/{} (its tags: {}); it is left as it is",
                owner.namespace,
                owner.lease,
                describe_owner(&tags)
            )));
        }
        match self.revoke_and_delete_owned(role).await? {
            Some(revoked) => Ok(Reaped::Deleted { revoked }),
            None => Ok(Reaped::Gone),
        }
    }

    /// [`Self::revoke_and_delete`] once ownership is established: when the
    /// deny-all landed, or `None` when the role was gone already.
    async fn revoke_and_delete_owned(&self, role: &str) -> Result<Option<std::time::SystemTime>> {
        let Some(revoked) = self.revoke(role).await? else { return Ok(None) };
        self.delete_revoked(role, true, true).await?;
        Ok(Some(revoked))
    }

    /// Denies everything to every session of `role`, old and new: one
    /// `PutRolePolicy` of the deny-all policy, kept apart from the
    /// identity's own policy so that no later write of that one can undo
    /// it. Only for a role whose ownership is established (made by this
    /// lease, or its tags read). When it landed; `None`: no such role.
    ///
    /// # Errors
    /// Any IAM refusal (throttling): the caller retries.
    pub async fn revoke(&self, role: &str) -> Result<Option<std::time::SystemTime>> {
        let document = revoke_policy().to_string();
        let revoke = |iam: &aws_sdk_iam::Client| {
            iam.put_role_policy().role_name(role).policy_name(REVOKE_POLICY_NAME).policy_document(&document).send()
        };
        match self.write(Urgency::Revoke, "PutRolePolicy", revoke).await {
            Ok(_) => Ok(Some(std::time::SystemTime::now())),
            Err(e) if is_code(&e, "NoSuchEntity") => Ok(None),
            Err(e) => Err(cloud_error("PutRolePolicy", &e)),
        }
    }

    /// Deletes a revoked role (see [`Self::revoke`]): its inline policies
    /// (`inline_deny`: its own deny too) and the role, two or three calls.
    /// `managed`: it may have managed
    /// policies attached, which go first (one listing and a detach each);
    /// otherwise they are looked for only if `DeleteRole` finds any, as it
    /// does for inline policies someone else put. A role already gone is done.
    ///
    /// # Errors
    /// Any IAM refusal (throttling, conflicts): the caller retries.
    pub async fn delete_revoked(&self, role: &str, managed: bool, inline_deny: bool) -> Result<()> {
        if managed && !self.detach_all(role).await? {
            return Ok(());
        }
        // The identity's policy, then the deny (while anything could still
        // allow, the deny stays). A role its revocation set denies has no
        // deny of its own.
        let names: &[&str] = if inline_deny { &[POLICY_NAME, REVOKE_POLICY_NAME] } else { &[POLICY_NAME] };
        self.delete_inline(Urgency::Delete, role, names).await?;
        match self.write(Urgency::Delete, "DeleteRole", |iam| iam.delete_role().role_name(role).send()).await {
            Ok(_) => {}
            Err(e) if is_code(&e, "NoSuchEntity") => return Ok(()),
            Err(e) if is_code(&e, "DeleteConflict") => {
                if !managed && !self.detach_all(role).await? {
                    return Ok(());
                }
                let inline =
                    match self.call("ListRolePolicies", self.iam.list_role_policies().role_name(role).send()).await {
                        Ok(out) => out.policy_names,
                        Err(e) if is_code(&e, "NoSuchEntity") => return Ok(()),
                        Err(e) => return Err(cloud_error("ListRolePolicies", &e)),
                    };
                let names: Vec<&str> = inline.iter().map(String::as_str).collect();
                self.delete_inline(Urgency::Delete, role, &names).await?;
                match self.write(Urgency::Delete, "DeleteRole", |iam| iam.delete_role().role_name(role).send()).await {
                    Ok(_) => {}
                    Err(e) if is_code(&e, "NoSuchEntity") => return Ok(()),
                    Err(e) => return Err(cloud_error("DeleteRole", &e)),
                }
            }
            Err(e) => return Err(cloud_error("DeleteRole", &e)),
        }
        self.release_role().await;
        Ok(())
    }

    /// Detaches every managed policy of `role`; `false` when there is no
    /// such role.
    async fn detach_all(&self, role: &str) -> Result<bool> {
        let attached = match self
            .call("ListAttachedRolePolicies", self.iam.list_attached_role_policies().role_name(role).send())
            .await
        {
            Ok(out) => out.attached_policies.unwrap_or_default(),
            Err(e) if is_code(&e, "NoSuchEntity") => return Ok(false),
            Err(e) => return Err(cloud_error("ListAttachedRolePolicies", &e)),
        };
        for policy in attached.into_iter().filter_map(|p| p.policy_arn) {
            let detach =
                |iam: &aws_sdk_iam::Client| iam.detach_role_policy().role_name(role).policy_arn(&policy).send();
            match self.write(Urgency::Delete, "DetachRolePolicy", detach).await {
                Ok(_) => {}
                Err(e) if is_code(&e, "NoSuchEntity") => {}
                Err(e) => return Err(cloud_error("DetachRolePolicy", &e)),
            }
        }
        Ok(true)
    }

    // --- Revocation sets (customer-managed policies, see `cloud::revocation_sets`) ---

    /// The default version's document of managed policy `arn` and the ids
    /// of its other versions, oldest first; `None` when there is no such policy.
    ///
    /// # Errors
    /// When IAM cannot be read or the document cannot be parsed.
    pub async fn policy_versions(&self, arn: &str) -> Result<Option<(Value, Vec<String>)>> {
        let versions =
            match self.call("ListPolicyVersions", self.iam.list_policy_versions().policy_arn(arn).send()).await {
                Ok(out) => out.versions.unwrap_or_default(),
                Err(e) if is_code(&e, "NoSuchEntity") => return Ok(None),
                Err(e) => return Err(cloud_error("ListPolicyVersions", &e)),
            };
        let Some(default) = versions.iter().find(|v| v.is_default_version).and_then(|v| v.version_id.clone()) else {
            return Ok(None);
        };
        let mut others: Vec<_> = versions.into_iter().filter(|v| !v.is_default_version).collect();
        others.sort_by_key(|v| v.create_date.map(|d| (d.secs(), d.subsec_nanos())));
        let others = others.into_iter().filter_map(|v| v.version_id).collect();
        let version = self
            .call("GetPolicyVersion", self.iam.get_policy_version().policy_arn(arn).version_id(&default).send())
            .await
            .map_err(|e| cloud_error("GetPolicyVersion", &e))?;
        let raw = version.policy_version.and_then(|v| v.document).unwrap_or_default();
        // IAM returns the document URL-encoded (RFC 3986).
        let text = if raw.trim_start().starts_with('{') {
            raw
        } else {
            percent_encoding::percent_decode_str(&raw).decode_utf8_lossy().into_owned()
        };
        let document = serde_json::from_str(&text)
            .map_err(|e| Error::Unexpected(format!("the document of policy {arn} is not JSON: {e}")))?;
        Ok(Some((document, others)))
    }

    /// Makes managed policy `name` under `path` with `document`.
    ///
    /// # Errors
    /// Any IAM refusal but `EntityAlreadyExists` (made meanwhile: fine).
    pub async fn create_policy(&self, name: &str, path: &str, document: &Value) -> Result<()> {
        let document = document.to_string();
        let create = |iam: &aws_sdk_iam::Client| {
            iam.create_policy()
                .policy_name(name)
                .path(path)
                .policy_document(&document)
                .description("Made by ephemera: denies every session of the roles it lists (revoked, being deleted)")
                .send()
        };
        match self.write(Urgency::Provision, "CreatePolicy", create).await {
            Ok(_) => Ok(()),
            Err(e) if is_code(&e, "EntityAlreadyExists") => Ok(()),
            Err(e) => Err(cloud_error("CreatePolicy", &e)),
        }
    }

    /// Makes `document` the default version of policy `arn`; the new
    /// version's id.
    ///
    /// # Errors
    /// Any IAM refusal (`LimitExceeded` when it has five versions already).
    pub async fn set_policy_document(&self, arn: &str, document: &Value) -> Result<String> {
        let document = document.to_string();
        let create = |iam: &aws_sdk_iam::Client| {
            iam.create_policy_version().policy_arn(arn).policy_document(&document).set_as_default(true).send()
        };
        let out = self
            .write(Urgency::Revoke, "CreatePolicyVersion", create)
            .await
            .map_err(|e| cloud_error("CreatePolicyVersion", &e))?;
        Ok(out.policy_version.and_then(|v| v.version_id).unwrap_or_default())
    }

    /// Deletes a version (not the default) of policy `arn`; one gone is fine.
    ///
    /// # Errors
    /// Any other IAM refusal.
    pub async fn delete_policy_version(&self, urgency: Urgency, arn: &str, version: &str) -> Result<()> {
        let delete = |iam: &aws_sdk_iam::Client| iam.delete_policy_version().policy_arn(arn).version_id(version).send();
        match self.write(urgency, "DeletePolicyVersion", delete).await {
            Ok(_) => Ok(()),
            Err(e) if is_code(&e, "NoSuchEntity") => Ok(()),
            Err(e) => Err(cloud_error("DeletePolicyVersion", &e)),
        }
    }

    /// Deletes inline policies of `role` by name; one already gone is fine.
    async fn delete_inline(&self, urgency: Urgency, role: &str, names: &[&str]) -> Result<()> {
        for name in names {
            let delete = |iam: &aws_sdk_iam::Client| iam.delete_role_policy().role_name(role).policy_name(*name).send();
            match self.write(urgency, "DeleteRolePolicy", delete).await {
                Ok(_) => {}
                Err(e) if is_code(&e, "NoSuchEntity") => {}
                Err(e) => return Err(cloud_error("DeleteRolePolicy", &e)),
            }
        }
        Ok(())
    }

    /// Roles under `path` tagged as this cluster's, except those `live`
    /// says (by ARN) belong to a lease known to exist: their tags are not
    /// read (IAM's `ListRoles` returns no tags, so each other role costs a
    /// `ListRoleTags` call; with thousands of live roles that was most of a
    /// sweep).
    ///
    /// # Errors
    /// When IAM cannot be listed.
    pub async fn list_owned(
        &self,
        path: &str,
        cluster: &str,
        issuer: &str,
        live: impl Fn(&str) -> bool,
    ) -> Result<Vec<OwnedRole>> {
        let mut roles = Vec::new();
        let mut marker = None;
        loop {
            let page = self
                .call("ListRoles", self.iam.list_roles().path_prefix(path).set_marker(marker.take()).send())
                .await
                .map_err(|e| cloud_error("ListRoles", &e))?;
            roles.extend(page.roles.into_iter().filter(|r| !live(&r.arn)).map(|r| r.role_name));
            match page.marker {
                Some(next) if page.is_truncated => marker = Some(next),
                _ => break,
            }
        }
        let mut owned = Vec::new();
        for name in roles {
            let tags = match self.call("ListRoleTags", self.iam.list_role_tags().role_name(&name).send()).await {
                Ok(out) => out.tags,
                Err(e) if is_code(&e, "NoSuchEntity") => continue,
                Err(e) => return Err(cloud_error("ListRoleTags", &e)),
            };
            let tag = |k: &str| tags.iter().find(|t| t.key == k).map(|t| t.value.clone());
            // Another cluster's, by name or (same name, shared account) by issuer.
            if tag(TAG_CLUSTER).as_deref() != Some(cluster) || tag(TAG_ISSUER).is_some_and(|i| i != issuer) {
                continue;
            }
            if let (Some(namespace), Some(lease)) = (tag(TAG_NAMESPACE), tag(TAG_LEASE)) {
                owned.push(OwnedRole {
                    name,
                    namespace,
                    lease,
                    lease_uid: tag(TAG_LEASE_UID),
                    cluster: cluster.to_owned(),
                    issuer: tag(TAG_ISSUER),
                });
            }
        }
        Ok(owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_role_is_its_owners_only_when_every_tag_says_so() {
        let owner = RoleOwner {
            cluster: "c".into(),
            issuer: Some("oidc.example/id/1".into()),
            namespace: "team-a".into(),
            lease: "report-x7k2p".into(),
            lease_uid: Some("u1".into()),
        };
        assert!(owner.owns(&owner.tags()));
        let with = |k: &str, v: &str| -> Vec<(String, String)> {
            owner
                .tags()
                .into_iter()
                .map(|(key, value)| if key == k { (key, v.to_owned()) } else { (key, value) })
                .collect()
        };
        assert!(!owner.owns(&with(TAG_CLUSTER, "other")), "another cluster's");
        assert!(!owner.owns(&with(TAG_NAMESPACE, "team-b")), "another namespace's");
        assert!(!owner.owns(&with(TAG_LEASE, "report-x7k2q")), "another lease's");
        assert!(!owner.owns(&with(TAG_LEASE_UID, "u2")), "an earlier lease of the same name");
        assert!(!owner.owns(&with(TAG_ISSUER, "oidc.example/id/2")), "a cluster of the same name, sharing the account");
        assert!(!owner.owns(&[]), "untagged: someone else's");
        // Made by ephemera 0.1 (no uid tag): judged on the rest.
        let legacy: Vec<_> = owner.tags().into_iter().filter(|(k, _)| k != TAG_LEASE_UID && k != TAG_ISSUER).collect();
        assert!(owner.owns(&legacy));
        assert!(describe_owner(&legacy).contains("ephemera.dev/lease-uid=(none)"));
    }

    #[test]
    fn the_trust_policy_admits_one_service_account_and_one_audience() {
        let p = trust_policy(
            "arn:aws:iam::1:oidc-provider/oidc.test",
            "oidc.test",
            "team-a",
            "report-x",
            "sts.amazonaws.com",
        );
        let cond = &p["Statement"][0]["Condition"]["StringEquals"];
        assert_eq!(cond["oidc.test:sub"], "system:serviceaccount:team-a:report-x");
        assert_eq!(cond["oidc.test:aud"], "sts.amazonaws.com");
        assert_eq!(p["Statement"][0]["Principal"]["Federated"], "arn:aws:iam::1:oidc-provider/oidc.test");
    }

    #[test]
    fn statements_become_an_iam_document() {
        let s: AwsStatement = serde_json::from_value(json!({
            "sid": "Read", "effect": "Deny", "actions": ["s3:GetObject"], "resources": ["arn:aws:s3:::b/*"],
            "conditions": {"StringEquals": {"aws:RequestedRegion": ["eu-west-1"]}},
        }))
        .unwrap();
        let doc = permissions_policy(&[s]);
        assert_eq!(
            doc["Statement"][0],
            json!({"Sid": "Read", "Effect": "Deny", "Action": ["s3:GetObject"], "Resource": ["arn:aws:s3:::b/*"],
                   "Condition": {"StringEquals": {"aws:RequestedRegion": ["eu-west-1"]}}})
        );
        // The first reaping step denies everything to every session, old or
        // new: no condition a fresh session could pass.
        let revoke = revoke_policy();
        assert_eq!(revoke["Statement"][0]["Effect"], "Deny");
        assert_eq!(
            (&revoke["Statement"][0]["Action"], &revoke["Statement"][0]["Resource"]),
            (&json!("*"), &json!("*"))
        );
        assert!(revoke["Statement"][0].get("Condition").is_none(), "{revoke}");
    }
}
