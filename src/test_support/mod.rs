//! Test doubles, compiled only for unit tests.

pub mod fake_apiserver;
