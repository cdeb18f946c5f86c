//! Controllers: identity (boundary clamping), lease (provision and reap),
//! reaper (pod and Job watchers) and the orphan sweep (issues #4 and #6).

/// Runs the controllers.
///
/// # Errors
/// Always, until the controllers land.
#[allow(clippy::unused_async)] // becomes the controller loop with issue #4
pub async fn run() -> crate::Result<()> {
    Err(crate::Error::NotImplemented { command: "controller", issue: 4 })
}
