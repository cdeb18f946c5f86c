//! `ephemera uninstall`: what the chart's pre-delete hook runs while the
//! controller still runs, so that `helm uninstall` leaves no identity behind.
//!
//! 1. The webhook configurations go first: no new pod gets a lease, and no
//!    pod creation is refused by a webhook about to disappear.
//! 2. Every `IdentityLease` is deleted; the controller reaps each (sessions
//!    revoked, role, RBAC and ServiceAccount deleted) and removes its
//!    finalizer. The hook waits until none is left: a live identity must not
//!    outlive the operator that would reap it.
//! 3. A boundary finalizer an older ephemera left (`ephemera.dev/boundary-cleanup`)
//!    is removed, so boundaries (and the CRDs) can be deleted without the
//!    operator. Their instance-metadata NetworkPolicies stay: taking that
//!    protection away is the platform team's decision, not an uninstall's
//!    side effect; deleting a boundary withdraws them (they are owned by it).
//!
//! Pods keep running; the ones that had an identity lose their AWS access.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams},
};

use crate::{
    Error, Result,
    api::{IdentityBoundary, IdentityLease},
    controller::boundary::release_legacy_finalizer,
};

/// What to remove, and how long reaping may take.
#[derive(Clone, Debug)]
pub struct Uninstall {
    /// Name of the Mutating/ValidatingWebhookConfiguration of the release.
    pub webhook_configuration: String,
    /// Longest wait for the controller to reap every lease.
    pub timeout: Duration,
}

/// Runs the three steps, printing progress.
///
/// # Errors
/// A refused API call, or leases still there after `timeout` (the error
/// lists them with their last error).
pub async fn run(uninstall: Uninstall) -> Result<()> {
    let client = Client::try_default().await.map_err(Error::KubeConfig)?;
    delete_webhook_configurations(&client, &uninstall.webhook_configuration).await?;
    reap_all_leases(&client, uninstall.timeout).await?;
    release_boundaries(&client).await
}

/// Deleted, or already gone.
fn gone<T>(result: kube::Result<T>) -> kube::Result<()> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

async fn delete_webhook_configurations(client: &Client, name: &str) -> Result<()> {
    gone(Api::<MutatingWebhookConfiguration>::all(client.clone()).delete(name, &DeleteParams::default()).await)
        .map_err(Error::kube(format!("deleting MutatingWebhookConfiguration {name}")))?;
    gone(Api::<ValidatingWebhookConfiguration>::all(client.clone()).delete(name, &DeleteParams::default()).await)
        .map_err(Error::kube(format!("deleting ValidatingWebhookConfiguration {name}")))?;
    println!("webhook configurations {name} deleted: pods are no longer sent to ephemera");
    Ok(())
}

async fn reap_all_leases(client: &Client, timeout: Duration) -> Result<()> {
    let api = Api::<IdentityLease>::all(client.clone());
    let start = tokio::time::Instant::now();
    let mut deleted = 0usize;
    let mut last_report = None;
    loop {
        let leases = api.list(&ListParams::default()).await.map_err(Error::kube("listing IdentityLeases"))?.items;
        if leases.is_empty() {
            println!("every identity reaped ({deleted} lease(s)) in {:.1}s", start.elapsed().as_secs_f64());
            return Ok(());
        }
        for lease in leases.iter().filter(|l| l.metadata.deletion_timestamp.is_none()) {
            let (ns, name) = (lease.namespace().unwrap_or_default(), lease.name_any());
            gone(Api::<IdentityLease>::namespaced(client.clone(), &ns).delete(&name, &DeleteParams::default()).await)
                .map_err(Error::kube(format!("deleting IdentityLease {ns}/{name}")))?;
            deleted += 1;
        }
        if start.elapsed() >= timeout {
            return Err(Error::UninstallIncomplete(describe(&leases)));
        }
        if last_report.is_none_or(|t: tokio::time::Instant| t.elapsed() >= Duration::from_secs(5)) {
            println!("waiting for the controller to reap {} lease(s): {}", leases.len(), by_phase(&leases));
            last_report = Some(tokio::time::Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn release_boundaries(client: &Client) -> Result<()> {
    let boundaries = Api::<IdentityBoundary>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::kube("listing IdentityBoundaries"))?;
    let mut released = 0;
    for boundary in &boundaries.items {
        if release_legacy_finalizer(client, boundary).await? {
            released += 1;
        }
    }
    if released > 0 {
        println!("{released} IdentityBoundary finalizer(s) of an older ephemera removed");
    }
    println!(
        "IdentityBoundaries and their instance-metadata NetworkPolicies stay (delete a boundary to withdraw its policies)"
    );
    Ok(())
}

fn by_phase(leases: &[IdentityLease]) -> String {
    let mut phases = BTreeMap::<String, usize>::new();
    for lease in leases {
        let phase =
            lease.status.as_ref().and_then(|s| s.phase.as_ref()).map_or("Pending".to_owned(), |p| format!("{p:?}"));
        *phases.entry(phase).or_default() += 1;
    }
    phases.iter().map(|(p, n)| format!("{n} {p}")).collect::<Vec<_>>().join(", ")
}

fn describe(leases: &[IdentityLease]) -> String {
    let mut lines: Vec<String> = leases
        .iter()
        .take(20)
        .map(|l| {
            let error = l.status.as_ref().and_then(|s| s.last_error.clone()).unwrap_or_else(|| "-".into());
            format!("{}/{} (last error: {error})", l.namespace().unwrap_or_default(), l.name_any())
        })
        .collect();
    if leases.len() > lines.len() {
        lines.push(format!("and {} more", leases.len() - lines.len()));
    }
    format!(
        "{} lease(s) not reaped; is the controller running? Their roles stay until it reaps them: {}",
        leases.len(),
        lines.join("; ")
    )
}
