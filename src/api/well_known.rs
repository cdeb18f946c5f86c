//! Every label, annotation, finalizer, gate and condition type ephemera reads
//! or writes. They are a public API: renaming one needs a migration note.

/// Pod label that opts a pod into a `WorkloadIdentity` by name.
pub const LABEL_IDENTITY: &str = "ephemera.dev/identity";
/// Label on every object ephemera creates (ServiceAccounts, Roles, leases),
/// so the sweep can find them.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Value of [`LABEL_MANAGED_BY`] on ephemera's objects.
pub const MANAGED_BY: &str = "ephemera";
/// Label tying a per-pod object to its `IdentityLease`.
pub const LABEL_LEASE: &str = "ephemera.dev/lease";

/// Pod label (value `true`) asking to be admitted unchanged; honoured only
/// where every governing boundary sets `allowSkip`.
pub const LABEL_SKIP: &str = "ephemera.dev/skip";
/// Pod annotation asking to keep the default ServiceAccount token
/// (value `keep`); honoured only where the boundary allows it.
pub const ANNOTATION_DEFAULT_TOKEN: &str = "ephemera.dev/default-token";
/// Pod annotation listing injected env vars that were left alone because the
/// user had set them.
pub const ANNOTATION_ENV_KEPT: &str = "ephemera.dev/env-kept";
/// Pod annotations copied into the lease for the inventory.
pub const ANNOTATION_PURPOSE: &str = "ephemera.dev/purpose";
/// See [`ANNOTATION_PURPOSE`].
pub const ANNOTATION_OWNER: &str = "ephemera.dev/owner";

/// Finalizer on `IdentityLease`: cloud and RBAC cleanup runs before the lease
/// may disappear.
pub const FINALIZER_REAPER: &str = "ephemera.dev/reaper";
/// Scheduling gate that holds a pod until its cloud role is verified usable.
pub const SCHEDULING_GATE: &str = "ephemera.dev/identity-ready";

/// Where the projected STS-audience token is mounted in every container.
pub const TOKEN_MOUNT_PATH: &str = "/var/run/secrets/ephemera.dev/token";
/// Default audience of the projected token (AWS STS).
pub const DEFAULT_AUDIENCE: &str = "sts.amazonaws.com";
/// Smallest token lifetime the kubelet accepts for a projected token.
pub const MIN_TOKEN_TTL_SECONDS: i64 = 600;
/// Token lifetime when the identity does not set one.
pub const DEFAULT_TOKEN_TTL_SECONDS: i64 = 900;

/// Condition types.
pub mod condition {
    /// The object is reconciled and usable.
    pub const READY: &str = "Ready";
    /// The identity asks for more than its boundaries allow.
    pub const BOUNDARY_VIOLATION: &str = "BoundaryViolation";
    /// Reconciliation is failing or partial.
    pub const DEGRADED: &str = "Degraded";
    /// A lease nears its expiry: its pod is being rotated (reason
    /// `Rotating`, or `EvictionBlocked` while a `PodDisruptionBudget` holds
    /// it), or nothing would replace it and it loses access at expiry
    /// (`NotRotated`).
    pub const EXPIRING: &str = "Expiring";
}

/// Finalizer ephemera 0.1 put on every `IdentityBoundary`. No longer added:
/// the metadata NetworkPolicies name their boundaries as owners and the
/// garbage collector withdraws them. The controller and `ephemera uninstall`
/// remove it where they find it.
pub const LEGACY_FINALIZER_BOUNDARY: &str = "ephemera.dev/boundary-cleanup";
/// Name of the NetworkPolicy that blocks the instance metadata service.
pub const NETWORK_POLICY_BLOCK_IMDS: &str = "ephemera-block-instance-metadata";
/// Field manager of every server-side apply ephemera makes.
pub const FIELD_MANAGER: &str = "ephemera";

/// Condition reasons.
pub mod reason {
    /// Everything the identity asks for is within its boundaries.
    pub const WITHIN_BOUNDARY: &str = "WithinBoundary";
    /// Part of what the identity asks for was narrowed or refused.
    pub const BOUNDARY_VIOLATION: &str = "BoundaryViolation";
    /// No `IdentityBoundary` governs the namespace: ephemera does not admit it.
    pub const NOT_GOVERNED: &str = "NotGoverned";
    /// A boundary's namespace selector cannot be evaluated.
    pub const INVALID_SELECTOR: &str = "InvalidSelector";
    /// Reconciled.
    pub const RECONCILED: &str = "Reconciled";
    /// The governing boundaries name different IAM permissions boundaries;
    /// a role takes one, so the identity gets no role until they agree.
    pub const PERMISSIONS_BOUNDARY_CONFLICT: &str = "PermissionsBoundaryConflict";
    /// A boundary's `spec.aws.rolePath` is outside the operator's role path
    /// root: pods it governs are refused.
    pub const ROLE_PATH_OUTSIDE_ROOT: &str = "RolePathOutsideRoot";
}
