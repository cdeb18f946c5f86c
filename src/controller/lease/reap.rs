//! Reaping: the lease is deleted when its workload ends, and its finalizer
//! first denies every session of the role, then deletes the role, the
//! lease's Role and RoleBinding and its ServiceAccount.

use k8s_openapi::{
    api::{
        core::v1::ServiceAccount,
        rbac::v1::{Role, RoleBinding},
    },
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
    runtime::{controller::Action, events::EventType},
};
use serde_json::json;

use super::{
    LeaseContext, Via, owned_by, publish, read_trusting_cache_if, revoke::since, role_owner, trusted_role, write_status,
};
use crate::{
    Error, Result,
    api::{IdentityLease, LeasePhase},
    cloud::aws::Reaped,
};

/// Annotation recording why and when the controller decided to reap.
pub(super) const ANNOTATION_REAP: &str = "ephemera.dev/reap";

/// Records why and when the workload ended, then deletes the lease: the
/// finalizer does the reaping.
pub(super) async fn start_reaping(
    lease: &IdentityLease,
    ctx: &LeaseContext,
    reason: &str,
    ended: Timestamp,
) -> Result<Action> {
    let namespace = lease.namespace().unwrap_or_default();
    let api = Api::<IdentityLease>::namespaced(ctx.base.client.clone(), &namespace);
    let note = json!({"reason": reason, "ended": ended.to_string()}).to_string();
    api.patch(
        &lease.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {ANNOTATION_REAP: note}}})),
    )
    .await
    .map_err(Error::kube("recording why the lease is reaped"))?;
    api.delete(&lease.name_any(), &DeleteParams::background()).await.map_err(Error::kube("deleting the lease"))?;
    tracing::info!(namespace, lease = %lease.name_any(), reason, "reaping");
    Ok(Action::await_change())
}

/// The finalizer: revoke, delete the role, RBAC and ServiceAccount.
pub(super) async fn reap(lease: &IdentityLease, ctx: &LeaseContext) -> Result<Action> {
    let client = &ctx.base.client;
    let namespace = lease.namespace().unwrap_or_default();
    let name = lease.name_any();
    let note: Option<serde_json::Value> =
        lease.annotations().get(ANNOTATION_REAP).and_then(|n| serde_json::from_str(n).ok());
    let reason = note.as_ref().and_then(|n| n["reason"].as_str()).unwrap_or("the lease was deleted").to_owned();
    let uid = lease.uid().unwrap_or_default();
    if ctx.reaped.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains(&uid) {
        // Done before; only the finalizer's removal is left (or was stale).
        return Ok(Action::await_change());
    }
    // A lease the webhook did not write names nothing of ours: it goes,
    // and nothing it names is touched.
    let role = match trusted_role(lease, &ctx.cloud.cluster, &ctx.cloud.account) {
        Ok(role) => role,
        Err(why) => {
            publish(ctx, lease, EventType::Warning, "LeaseRefused", format!("{why}; nothing it names was touched"))
                .await;
            ctx.reaped.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(uid);
            return Ok(Action::await_change());
        }
    };
    // The lease is normally gone within milliseconds: status says Reaping
    // only when something holds it (kubectl shows the deletion meanwhile).
    // (`at`, the reap decision, is what 0.2 recorded.)
    let ended = note
        .as_ref()
        .and_then(|n| n["ended"].as_str().or_else(|| n["at"].as_str()))
        .and_then(|t| t.parse::<Timestamp>().ok());
    let since_end = |at: std::time::SystemTime| ended.and_then(|e| since(e, at));
    match reap_role(lease, ctx, &role, &uid).await {
        Ok((Reaped::Deleted { revoked }, counted)) => {
            if !counted && let Some(window) = since_end(revoked) {
                ctx.base.metrics.credential_window.observe(window);
            }
        }
        Ok((Reaped::Gone, _)) => {}
        // Not ours: left alone, said once; the lease's own objects still go.
        Err(e @ Error::RoleConflict(_)) => {
            publish(ctx, lease, EventType::Warning, "RoleConflict", e.to_string()).await;
        }
        Err(e) => {
            // Best effort: the namespace may be going away.
            let _ = write_status(lease, ctx, LeasePhase::Reaping, None, Some(&e), &reason, None).await;
            publish(ctx, lease, EventType::Warning, "ReapFailed", e.to_string()).await;
            return Err(e);
        }
    }
    // At once: each is looked up and deleted on its own terms. (The
    // ServiceAccount, which the webhook always makes, is looked up in the
    // apiserver's watch cache first; the Role and RoleBinding, which most
    // identities never have, in etcd: a miss in the cache is read again.)
    tokio::try_join!(
        delete_if_owned::<RoleBinding>(client, lease, &name, false),
        delete_if_owned::<Role>(client, lease, &name, false),
        delete_if_owned::<ServiceAccount>(client, lease, &lease.spec.service_account, true),
    )?;
    if let Some(window) = since_end(std::time::SystemTime::now()) {
        ctx.base.metrics.ghost_window.observe(window);
    }
    publish(
        ctx,
        lease,
        EventType::Normal,
        "Reaped",
        format!("{reason}: sessions revoked, role and ServiceAccount deleted"),
    )
    .await;
    ctx.reaped.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(uid);
    tracing::info!(namespace, lease = name, reason, "reaped");
    Ok(Action::await_change())
}

/// Revokes and deletes the lease's role; whether its credential window was
/// counted already (the revocation lane denied its sessions first).
///
/// A role this controller made Ready (`status.roleArn`, written only then)
/// is this lease's by construction: its name derives from the lease, and it
/// was made here or its tags were read before it was adopted. It is
/// revoked (unless the lane did) and deleted without reading its tags again:
/// four calls, or three after the lane. Any other role (a lease that never
/// got Ready) is read first and touched only if its tags name this lease.
async fn reap_role(lease: &IdentityLease, ctx: &LeaseContext, role: &str, uid: &str) -> Result<(Reaped, bool)> {
    let made = lease.status.as_ref().is_some_and(|s| s.role_arn.is_some());
    if !made {
        return ctx.cloud.provider.revoke_and_delete(role, &role_owner(lease, ctx)).await.map(|r| (r, false));
    }
    let (revoked, counted) = match lane_result(ctx, uid).await {
        Some(done) => (Some(done), true),
        None => (ctx.revoke(lease, role).await?, false),
    };
    let Some((revoked, via)) = revoked else { return Ok((Reaped::Gone, counted)) };
    // Managed policies are looked for first only when the identity may
    // have attached some; otherwise `DeleteRole` says if any are there.
    let identity = ctx.base.identities.get(
        &kube::runtime::reflector::ObjectRef::new(&lease.spec.workload_identity)
            .within(&lease.namespace().unwrap_or_default()),
    );
    let managed = identity.is_none_or(|wi| wi.spec.aws.as_ref().is_some_and(|a| !a.managed_policy_arns.is_empty()));
    ctx.cloud.provider.delete_revoked(role, managed, via == Via::Inline).await?;
    // Its key may leave its set at the set's next write.
    if via == Via::Set
        && let Some(sets) = &ctx.cloud.revocation_sets
    {
        sets.forget(&crate::cloud::revocation_sets::key_of(uid)).await;
    }
    Ok((Reaped::Deleted { revoked }, counted))
}

/// When the revocation lane denied the role's sessions, waiting a while
/// for a revocation it has in flight (under a write budget it may wait its
/// turn): a second revoking call would spend what is scarce. `None`: the
/// lane did not (or not in time); the reap revokes.
async fn lane_result(ctx: &LeaseContext, uid: &str) -> Option<(std::time::SystemTime, Via)> {
    let deadline = tokio::time::Instant::now() + LANE_WAIT;
    loop {
        if let Some(done) = ctx.revoked_at(uid) {
            return Some(done);
        }
        if !ctx.revocation_known(uid) || tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Longest a reap waits for the lane's revocation in flight.
const LANE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Deletes `name` if it is there and owned by `lease` (by uid; the delete
/// is conditional on the uid read, so a replacement is never hit).
/// `from_cache`: an owned copy in the apiserver's watch cache will do (see
/// [`read_trusting_cache_if`]; a stale one fails the uid precondition).
pub(super) async fn delete_if_owned<K>(
    client: &Client,
    lease: &IdentityLease,
    name: &str,
    from_cache: bool,
) -> Result<()>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    let namespace = lease.namespace().unwrap_or_default();
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    let api = Api::<K>::namespaced(client.clone(), &namespace);
    let found = if from_cache {
        read_trusting_cache_if(&api, name, |found| owned_by(found, lease)).await
    } else {
        api.get_opt(name).await
    };
    let Some(found) = found.map_err(Error::kube(format!("reading {kind} {namespace}/{name}")))? else {
        return Ok(());
    };
    if !owned_by(&found, lease) {
        tracing::warn!(namespace, name, kind, "not deleted: it is not owned by the lease being reaped");
        return Ok(());
    }
    let dp = DeleteParams {
        preconditions: Some(kube::api::Preconditions { uid: found.uid(), resource_version: None }),
        ..DeleteParams::background()
    };
    match api.delete(name, &dp).await {
        Ok(_) => Ok(()),
        // Gone, or replaced since the read (409: the uid precondition).
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(e) => Err(Error::kube(format!("deleting {kind} {namespace}/{name}"))(e)),
    }
}
