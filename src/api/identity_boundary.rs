//! `IdentityBoundary`: the platform team's ceiling on what workload
//! identities in the namespaces it governs may be granted.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::shared::{ACTION_PATTERN, Duration, KubernetesRule, POLICY_ARN_PATTERN, RESOURCE_PATTERN};

/// The ceiling for workload identities in the namespaces it selects: which
/// AWS actions and resources, which Kubernetes rules, how long a token and a
/// lease may live. Every `WorkloadIdentity` in a governed namespace is clamped
/// to it; when several boundaries govern a namespace, an identity gets only
/// what all of them allow.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "ephemera.dev",
    doc = "IdentityBoundary (cluster-scoped, set by the platform team) is the ceiling on what workload identities in the namespaces it selects may be granted.",
    version = "v1alpha1",
    kind = "IdentityBoundary",
    plural = "identityboundaries",
    shortname = "ib",
    category = "ephemera",
    status = "IdentityBoundaryStatus",
    printcolumn = r#"{"name":"Namespaces","type":"integer","jsonPath":".status.governedNamespaces","description":"Namespaces this boundary governs"}"#,
    printcolumn = r#"{"name":"Max TTL","type":"string","jsonPath":".spec.maxTokenTTL","description":"Longest token lifetime allowed"}"#,
    printcolumn = r#"{"name":"Max Lifetime","type":"string","jsonPath":".spec.maxLifetime","description":"Longest lease lifetime allowed"}"#,
    printcolumn = r#"{"name":"Block IMDS","type":"boolean","jsonPath":".spec.blockInstanceMetadata","description":"Egress to the instance metadata service is blocked"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct IdentityBoundarySpec {
    /// Namespaces this boundary governs. Pods in them lose the default
    /// ServiceAccount token, and their workload identities are clamped to
    /// this boundary. Must not be empty: an empty selector would govern every
    /// namespace, kube-system included.
    #[x_kube(validation = kube::core::Rule::new(
        "(has(self.matchLabels) && size(self.matchLabels) > 0) || (has(self.matchExpressions) && size(self.matchExpressions) > 0)"
    ).message("namespaceSelector must set matchLabels or matchExpressions: an empty selector would govern every namespace"))]
    pub namespace_selector: LabelSelector,

    /// What AWS access identities may be granted. Absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws: Option<AwsBoundary>,

    /// What Kubernetes RBAC identities may be granted in their own namespace.
    /// Absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesBoundary>,

    /// Longest lifetime of a projected token (`15m`, `1h`); a longer
    /// `WorkloadIdentity.spec.token.ttl` is capped to it. At least `10m`, the
    /// kubelet's minimum. Default `1h`.
    #[serde(default = "default_max_token_ttl", rename = "maxTokenTTL")]
    #[x_kube(validation = kube::core::Rule::new("duration(self) >= duration('10m')")
        .message("maxTokenTTL must be at least 10m, the shortest token the kubelet projects"))]
    pub max_token_ttl: Duration,

    /// Hard cap on a lease's life: a workload still running after it loses its
    /// identity (the role is reaped). Default `24h`.
    #[serde(default = "default_max_lifetime")]
    #[x_kube(validation = kube::core::Rule::new("duration(self) >= duration('10m')")
        .message("maxLifetime must be at least 10m"))]
    pub max_lifetime: Duration,

    /// Most leases (live identities) one governed namespace may hold at once.
    /// Absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_leases: Option<i32>,

    /// Keep a NetworkPolicy in every governed namespace that denies egress to
    /// the instance metadata service (169.254.169.254/32 and its IPv6 address),
    /// so pods cannot fall back to the node's instance role. Default `true`.
    #[serde(default = "default_true")]
    pub block_instance_metadata: bool,

    /// Allow pods to keep the default ServiceAccount token with the annotation
    /// `ephemera.dev/default-token: keep`. Default `false`: every pod in a
    /// governed namespace loses it.
    #[serde(default)]
    pub allow_default_token: bool,

    /// Allow pods labelled `ephemera.dev/skip: "true"` to be admitted
    /// unchanged: no identity, and they keep the default ServiceAccount
    /// token (the opt-out IRSA users know). Default `false`: the label is
    /// ignored with a warning. Every pod admitted this way is counted in
    /// `ephemera_pod_opt_outs_total{outcome="skipped"}`.
    #[serde(default)]
    pub allow_skip: bool,
}

/// The AWS part of a boundary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("duration(self.maxSessionDuration) >= duration('1h') && duration(self.maxSessionDuration) <= duration('12h')")
    .message("aws.maxSessionDuration must be between 1h and 12h (the range IAM accepts for a role)")
    .field_path(".maxSessionDuration"))]
pub struct AwsBoundary {
    /// IAM actions identities may be allowed, with `*`/`?` globs
    /// (`s3:Get*`). `*` or `iam:*` here lets identities ask for them too.
    #[serde(default)]
    #[schemars(length(max = 200), inner(pattern(ACTION_PATTERN)))]
    pub allowed_actions: Vec<String>,

    /// Resource ARNs identities may be allowed, with `*`/`?` globs
    /// (`arn:aws:s3:::team-a-*`).
    #[serde(default)]
    #[schemars(length(max = 200), inner(pattern(RESOURCE_PATTERN)))]
    pub allowed_resources: Vec<String>,

    /// Managed policies identities may attach (exact ARNs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20), inner(pattern(POLICY_ARN_PATTERN)))]
    pub allowed_managed_policy_arns: Vec<String>,

    /// Permissions boundary attached to every role made under this boundary:
    /// AWS itself then refuses anything beyond it, even if ephemera were wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(POLICY_ARN_PATTERN))]
    pub permissions_boundary_arn: Option<String>,

    /// IAM path of the roles (`/ephemera/`), so the operator's own IAM policy
    /// can be restricted to it.
    #[serde(default = "default_role_path")]
    #[schemars(length(max = 512), pattern(r"^/([!-.0-~]+/)*$"))]
    pub role_path: String,

    /// Prefix of role names; the rest is derived from the lease.
    #[serde(default = "default_role_name_prefix")]
    #[schemars(length(min = 1, max = 20), pattern(r"^[A-Za-z0-9+=,.@_-]+$"))]
    pub role_name_prefix: String,

    /// `MaxSessionDuration` of each role, between `1h` and `12h`. Default `1h`.
    #[serde(default = "default_max_session_duration")]
    pub max_session_duration: Duration,
}

/// The Kubernetes part of a boundary.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesBoundary {
    /// Rules identities may be granted (each identity rule must fit inside
    /// one of these). `*` in a list means any.
    #[serde(default)]
    #[schemars(length(max = 50))]
    pub allowed_rules: Vec<KubernetesRule>,
}

/// Observed state of a boundary.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IdentityBoundaryStatus {
    /// `.metadata.generation` the controller last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// How many namespaces the selector matches now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub governed_namespaces: Option<i32>,
    /// `Ready`: the boundary is valid and enforced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

fn default_max_token_ttl() -> Duration {
    Duration::from_secs(3600)
}

fn default_max_lifetime() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_max_session_duration() -> Duration {
    Duration::from_secs(3600)
}

fn default_role_path() -> String {
    "/ephemera/".to_owned()
}

fn default_role_name_prefix() -> String {
    "ephemera".to_owned()
}

fn default_true() -> bool {
    true
}
