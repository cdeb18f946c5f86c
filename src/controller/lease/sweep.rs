//! The sweep: roles tagged as this cluster's whose lease is gone (a crash
//! between making a role and recording it, a lease force-removed) are
//! deleted; and the bookkeeping and phase gauges that follow the cache.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use kube::{Api, ResourceExt};

use super::{LeaseContext, trusted_role};
use crate::{
    Error, Result,
    api::{IdentityLease, LeasePhase},
};

/// How often the sweep looks for roles without a lease.
pub(super) const SWEEP_EVERY: Duration = Duration::from_mins(5);
pub(super) async fn sweep_forever(ctx: Arc<LeaseContext>) {
    // The sweep skips roles of cached leases, so it starts once the cache is
    // filled (it asks the apiserver about every other role before deleting).
    let gauges = ctx.clone();
    let _gauges = AbortOnDrop(tokio::spawn(async move {
        // Until the cache is filled every lease would look gone.
        if !gauges.base.leases_ready.wait().await {
            return;
        }
        loop {
            update_phase_gauge(&gauges);
            forget_gone(&gauges);
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    }));
    if !ctx.base.leases_ready.wait().await {
        return;
    }
    loop {
        match sweep(&ctx).await {
            Ok(0) => tracing::debug!("sweep found no orphaned role"),
            Ok(n) => tracing::info!(deleted = n, "sweep deleted orphaned roles"),
            Err(e) => tracing::warn!(error = %e, "sweep failed; retrying at the next round"),
        }
        tokio::time::sleep(SWEEP_EVERY).await;
    }
}

/// Stops a task when the owner goes away.
pub(super) struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Deletes roles tagged as this cluster's whose lease no longer exists (a
/// crash between making a role and recording it, or a lease force-removed).
/// Every role lives under the role path root, so one listing of it finds
/// them all, whatever path a boundary used then or uses now.
pub(super) async fn sweep(ctx: &LeaseContext) -> Result<usize> {
    // Roles of leases in the cache are live; only the others are looked at
    // (and the apiserver decides for those).
    // (Only leases the webhook wrote: a forged spec.roleArn must not hide
    // another lease's orphaned role from the sweep.)
    // What the revocation sets list before anything else is read: a key
    // listed later is never dropped by this round.
    let listed = match &ctx.cloud.revocation_sets {
        Some(sets) => Some(sets.listed().await),
        None => None,
    };
    let cached = ctx.leases.state();
    let live: std::collections::HashSet<String> = cached
        .iter()
        .filter(|l| trusted_role(l, &ctx.cloud.cluster, &ctx.cloud.account).is_ok())
        .filter_map(|l| l.spec.role_arn.clone())
        .collect();
    let mut deleted = 0;
    let roles = ctx
        .cloud
        .provider
        .list_owned(&ctx.base.role_path_root, &ctx.cloud.cluster, &ctx.cloud.issuer_host, |arn| live.contains(arn))
        .await?;
    // A set's key stays while its role may exist: the role of a cached lease,
    // or one the listing found (deleted below, dropped at the next round).
    if let (Some(sets), Some(listed)) = (&ctx.cloud.revocation_sets, listed) {
        let keep: std::collections::HashSet<String> = cached
            .iter()
            .filter_map(|l| l.uid())
            .chain(roles.iter().filter_map(|r| r.lease_uid.clone()))
            .map(|uid| crate::cloud::revocation_sets::key_of(&uid))
            .collect();
        let dropped = sets.prune(&listed, &keep).await;
        if dropped > 0 {
            tracing::info!(dropped, "revocation sets: keys of roles that no longer exist go at the next write");
        }
    }
    for role in roles {
        let api = Api::<IdentityLease>::namespaced(ctx.base.client.clone(), &role.namespace);
        // The apiserver, not the cache, decides: a stale cache must never
        // delete a live role. A lease of that name with another uid (made
        // again since) does not own the role.
        let lease = api.get_opt(&role.lease).await.map_err(Error::kube("checking a role's lease"))?;
        if lease.is_some_and(|l| role.lease_uid.is_none() || l.uid() == role.lease_uid) {
            continue;
        }
        ctx.cloud.provider.revoke_and_delete(&role.name, &role.owner()).await?;
        tracing::info!(role = role.name, lease = role.lease, namespace = role.namespace, "deleted an orphaned role");
        deleted += 1;
    }
    Ok(deleted)
}

/// Drops the bookkeeping of leases that are gone; without this the maps grow
/// with every pod the process ever saw. (A pod whose event came in before
/// its lease reached the cache, in the instant before a round, is forgotten
/// too: its lease then falls back to the holder grace period.)
pub(super) fn forget_gone(ctx: &LeaseContext) {
    let cached = ctx.leases.state();
    let live: std::collections::HashSet<(String, String)> =
        cached.iter().map(|l| (l.namespace().unwrap_or_default(), l.name_any())).collect();
    let uids: std::collections::HashSet<String> = cached.iter().filter_map(|l| l.uid()).collect();
    ctx.reaped.lock().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|uid| uids.contains(uid));
    ctx.ready.lock().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|uid| uids.contains(uid));
    ctx.revocations.lock().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|uid, _| uids.contains(uid));
    ctx.seen_pods.lock().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|key, _| live.contains(key));
    ctx.failures
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .retain(|key, _| live.contains(&(key.namespace.clone().unwrap_or_default(), key.name.clone())));
}

pub(super) fn update_phase_gauge(ctx: &LeaseContext) {
    let mut counts: BTreeMap<&'static str, i64> =
        [("Pending", 0), ("Provisioning", 0), ("Ready", 0), ("Reaping", 0)].into();
    for lease in ctx.leases.state() {
        let phase = match lease.status.as_ref().and_then(|s| s.phase).unwrap_or_default() {
            LeasePhase::Pending => "Pending",
            LeasePhase::Provisioning => "Provisioning",
            LeasePhase::Ready => "Ready",
            LeasePhase::Reaping => "Reaping",
        };
        *counts.entry(phase).or_default() += 1;
    }
    for (phase, n) in counts {
        ctx.base.metrics.leases.get_or_create(&crate::telemetry::PhaseLabels { phase }).set(n);
    }
}
