//! Cloud identity providers. AWS IAM/STS is the first; the provider trait
//! (provision, verify, revoke, delete, list owned) arrives with the lease
//! controller.

pub mod aws;
pub mod gate;
pub mod naming;
pub mod revocation_sets;
