//! Admission: the mutating pod webhook and the validating webhook for
//! ephemera's own resources (issue #5).

/// Runs the webhook server.
///
/// # Errors
/// Always, until the admission feature lands.
#[allow(clippy::unused_async)] // becomes the server loop with issue #5
pub async fn run() -> crate::Result<()> {
    Err(crate::Error::NotImplemented { command: "webhook", issue: 5 })
}
