//! `IdentityLease`: one live identity, held by one pod or Job run. The set of
//! leases is the inventory of every non-human identity in the cluster.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One live identity: the ServiceAccount, token audience and IAM role made for
/// one pod or Job run, with its owner, purpose and expiry. Made by the
/// webhook when the pod is admitted, driven by the controller through
/// Pending, Provisioning, Ready and Reaping, and deleted (with everything it
/// stands for) when the workload ends. `kubectl get identityleases -A` lists
/// every live workload identity.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "ephemera.dev",
    doc = "IdentityLease records one live workload identity: who holds it, what it is for, its IAM role and when it dies. Made and deleted by ephemera.",
    version = "v1alpha1",
    kind = "IdentityLease",
    plural = "identityleases",
    shortname = "il",
    category = "ephemera",
    namespaced,
    status = "IdentityLeaseStatus",
    printcolumn = r#"{"name":"Holder","type":"string","jsonPath":".spec.holder.name","description":"Pod or Job holding the identity"}"#,
    printcolumn = r#"{"name":"Identity","type":"string","jsonPath":".spec.workloadIdentity","priority":1}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Role","type":"string","jsonPath":".status.roleArn"}"#,
    printcolumn = r#"{"name":"Expires","type":"string","jsonPath":".spec.expiresAt","description":"When the identity is reaped even if the workload still runs"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct IdentityLeaseSpec {
    /// The pod or Job run holding this identity. Kind and name are immutable;
    /// the uid is filled in once, when the pod exists.
    pub holder: Holder,

    /// The `WorkloadIdentity` (same namespace) this lease instantiates. Immutable.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = kube::core::Rule::new("self == oldSelf").message("workloadIdentity is immutable"))]
    pub workload_identity: String,

    /// The per-workload ServiceAccount. Immutable.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = kube::core::Rule::new("self == oldSelf").message("serviceAccount is immutable"))]
    pub service_account: String,

    /// The IAM role the workload was told to assume (its `AWS_ROLE_ARN`),
    /// fixed at admission so a later boundary change cannot make the role
    /// and the pod disagree. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = kube::core::Rule::new("self == oldSelf").message("roleArn is immutable"))]
    pub role_arn: Option<String>,

    /// When the identity is reaped even if the workload still runs (the
    /// boundary's `maxLifetime` after admission).
    pub expires_at: Time,

    /// Why the workload exists, from the pod annotation `ephemera.dev/purpose`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub purpose: Option<String>,

    /// Who answers for it, from the pod annotation `ephemera.dev/owner`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub owner: Option<String>,
}

/// The holder of a lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.kind == oldSelf.kind && self.name == oldSelf.name")
    .message("holder.kind and holder.name are immutable"))]
#[x_kube(validation = kube::core::Rule::new("!has(oldSelf.uid) || (has(self.uid) && self.uid == oldSelf.uid)")
    .message("holder.uid is set once and never changed"))]
pub struct Holder {
    /// `Pod` or `Job`.
    pub kind: HolderKind,
    /// Name of the pod or Job. For a pod created with `generateName`, the
    /// name ephemera gave it at admission.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Uid of the pod or Job once it exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub uid: Option<String>,
}

/// Kind of object holding a lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum HolderKind {
    /// A pod (scope `Pod`).
    Pod,
    /// A Job run (scope `Job`).
    Job,
}

/// Where a lease is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum LeasePhase {
    /// Admitted; nothing made in the cloud yet.
    #[default]
    Pending,
    /// The role and RBAC are being made and verified.
    Provisioning,
    /// Verified usable; the pod's scheduling gate is lifted.
    Ready,
    /// The workload ended (or the lease expired); sessions are revoked and
    /// everything is being deleted.
    Reaping,
}

/// Observed state of a lease.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IdentityLeaseStatus {
    /// Where the lease is in its life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<LeasePhase>,
    /// ARN of the IAM role made for this lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role_arn: Option<String>,
    /// When the role was verified usable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<Time>,
    /// When sessions were revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<Time>,
    /// The last error, until a step succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The `WorkloadIdentity`'s `status.effective.policyDigest` (its permissions,
    /// clamped to the boundaries) the role's policies were last brought to.
    /// When the identity or a boundary changes, the controller re-applies
    /// them to the live role and updates this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_digest: Option<String>,
    /// The revocation set (a customer-managed IAM policy of this cluster,
    /// the role's permissions boundary) whose next version denies every
    /// session of the role once its workload ends; absent: the role is
    /// revoked with a deny-all inline policy of its own (its boundaries name
    /// a permissions boundary, or it was made before sets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation_set: Option<String>,
    /// `.metadata.generation` the controller last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
