//! `WorkloadIdentity`: what one kind of workload may do, written by the team
//! that owns it. Every matching pod (or Job run) gets its own instance of it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    shared::{AwsStatement, Duration, KubernetesRule, POLICY_ARN_PATTERN},
    well_known,
};

/// The identity a kind of workload gets: the AWS actions and resources and the
/// Kubernetes rules its pods need, and how long their tokens live. Ephemera
/// gives each matching pod (or each Job run) its own ServiceAccount, token and
/// IAM role from it, clamped to the `IdentityBoundary`s of the namespace, and
/// deletes them when the workload ends.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "ephemera.dev",
    doc = "WorkloadIdentity declares the short-lived AWS and Kubernetes identity that each matching pod, or each Job run, gets of its own.",
    version = "v1alpha1",
    kind = "WorkloadIdentity",
    plural = "workloadidentities",
    shortname = "wi",
    category = "ephemera",
    namespaced,
    status = "WorkloadIdentityStatus",
    printcolumn = r#"{"name":"Scope","type":"string","jsonPath":".spec.scope","description":"One identity per Pod or per Job run"}"#,
    printcolumn = r#"{"name":"TTL","type":"string","jsonPath":".status.effective.tokenTTL","description":"Token lifetime after the boundary's cap"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason","priority":1}"#,
    printcolumn = r#"{"name":"Leases","type":"integer","jsonPath":".status.activeLeases","description":"Live identities made from this one"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadIdentitySpec {
    /// Pods that get this identity, besides those labelled
    /// `ephemera.dev/identity: <name>`. When set it must not be empty (an
    /// empty selector would match every pod in the namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new(
        "(has(self.matchLabels) && size(self.matchLabels) > 0) || (has(self.matchExpressions) && size(self.matchExpressions) > 0)"
    ).message("selector must set matchLabels or matchExpressions: an empty selector would match every pod"))]
    pub selector: Option<LabelSelector>,

    /// `Pod` (default): each pod gets its own identity. `Job`: the pods of one
    /// Job run share one identity, which ends with the Job. Immutable.
    #[serde(default)]
    #[x_kube(validation = kube::core::Rule::new("self == oldSelf")
        .message("scope is immutable: create a new WorkloadIdentity to change it"))]
    pub scope: Scope,

    /// AWS access: one IAM role per pod (or Job run) with these statements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws: Option<AwsAccess>,

    /// Kubernetes access in the pod's own namespace, bound to its own
    /// ServiceAccount. The requester must hold these rights already.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesAccess>,

    /// The projected token.
    #[serde(default)]
    pub token: TokenSpec,
}

/// How many workload instances share one identity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Scope {
    /// One identity per pod.
    #[default]
    Pod,
    /// One identity per Job run, shared by its pods.
    Job,
}

/// AWS access of an identity.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AwsAccess {
    /// Inline policy statements of the role. `Allow` statements must fit the
    /// boundary; `Deny` statements are always accepted.
    #[serde(default)]
    #[schemars(length(max = 50))]
    pub statements: Vec<AwsStatement>,

    /// Managed policies to attach; each must be listed in the boundary's
    /// `aws.allowedManagedPolicyArns`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10), inner(pattern(POLICY_ARN_PATTERN)))]
    pub managed_policy_arns: Vec<String>,
}

/// Kubernetes access of an identity.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesAccess {
    /// Rules of the Role bound to the pod's own ServiceAccount.
    #[serde(default)]
    #[schemars(length(max = 50))]
    pub rules: Vec<KubernetesRule>,
}

/// The projected ServiceAccount token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenSpec {
    /// Audience of the token. Default `sts.amazonaws.com` (what AWS STS
    /// expects for `AssumeRoleWithWebIdentity`).
    #[serde(default = "default_audience")]
    #[schemars(length(min = 1, max = 253))]
    pub audience: String,

    /// Token lifetime (`15m`, `1h`); the kubelet refreshes it at 80 %. At
    /// least `10m`; capped by the boundary's `maxTokenTTL`. Default `15m`.
    #[serde(default = "default_ttl")]
    #[x_kube(validation = kube::core::Rule::new("duration(self) >= duration('10m')")
        .message("token.ttl must be at least 10m, the shortest token the kubelet projects"))]
    pub ttl: Duration,
}

impl Default for TokenSpec {
    fn default() -> Self {
        TokenSpec { audience: default_audience(), ttl: default_ttl() }
    }
}

/// Observed state of an identity.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadIdentityStatus {
    /// `.metadata.generation` the controller last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `BoundaryViolation`, `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Live leases (pods or Job runs holding this identity now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_leases: Option<i32>,
    /// What the workloads really get after clamping to the boundaries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective: Option<EffectiveIdentity>,
}

/// The identity after clamping to every governing boundary.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EffectiveIdentity {
    /// The boundaries that govern the namespace.
    #[serde(default)]
    pub boundaries: Vec<String>,
    /// Token lifetime after the boundaries' `maxTokenTTL`.
    #[serde(rename = "tokenTTL", default, skip_serializing_if = "Option::is_none")]
    pub token_ttl: Option<Duration>,
    /// Permissions boundaries attached to each role.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub permissions_boundary_arns: Vec<String>,
    /// SHA-256 of the effective permissions (IAM statements, managed
    /// policies and Kubernetes rules), to see when they changed: live leases
    /// follow a change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_digest: Option<String>,
}

fn default_audience() -> String {
    well_known::DEFAULT_AUDIENCE.to_owned()
}

fn default_ttl() -> Duration {
    Duration::from_secs(well_known::DEFAULT_TOKEN_TTL_SECONDS.unsigned_abs())
}
