//! Admission: the mutating pod webhook and the validating webhook for
//! ephemera's own resources (issue #5). The pure pod mutation is in
//! [`mutate`]; the HTTPS server that calls it is not there yet.

pub mod mutate;

/// Runs the webhook server.
///
/// # Errors
/// Always, until the admission server lands.
#[allow(clippy::unused_async)] // becomes the server loop with issue #5
pub async fn run() -> crate::Result<()> {
    Err(crate::Error::NotImplemented { command: "webhook", issue: 5 })
}
