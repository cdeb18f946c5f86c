//! The `ephemera.dev` API: custom resource types and the well-known names
//! (labels, annotations, finalizers, condition types) that form its public
//! contract with users and GitOps tooling.

pub mod well_known;

/// API group of every ephemera custom resource.
pub const GROUP: &str = "ephemera.dev";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";
