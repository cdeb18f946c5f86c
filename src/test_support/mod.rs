//! Test doubles, compiled only for unit tests.

pub mod fake_apiserver;
pub mod fake_iam;
