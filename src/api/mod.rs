//! The `ephemera.dev` API: custom resource types and the well-known names
//! (labels, annotations, finalizers, condition types) that form its public
//! contract with users and GitOps tooling.

mod identity_boundary;
mod identity_lease;
pub mod shared;
pub mod well_known;
mod workload_identity;

pub use identity_boundary::{
    AwsBoundary, IdentityBoundary, IdentityBoundarySpec, IdentityBoundaryStatus, KubernetesBoundary,
};
pub use identity_lease::{Holder, HolderKind, IdentityLease, IdentityLeaseSpec, IdentityLeaseStatus, LeasePhase};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
pub use shared::{AwsStatement, Duration, Effect, KubernetesRule};
pub use workload_identity::{
    AwsAccess, EffectiveIdentity, KubernetesAccess, Scope, TokenSpec, WorkloadIdentity, WorkloadIdentitySpec,
    WorkloadIdentityStatus,
};

/// API group of every ephemera custom resource.
pub const GROUP: &str = "ephemera.dev";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";

/// Every CustomResourceDefinition ephemera serves.
#[must_use]
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![IdentityBoundary::crd(), WorkloadIdentity::crd(), IdentityLease::crd()]
}
