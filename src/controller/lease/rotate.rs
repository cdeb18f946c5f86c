//! Rotation: a long-lived pod gets a fresh identity before its lease
//! expires instead of losing its role while it runs. Its pod is evicted
//! through the Eviction API (so `PodDisruptionBudget`s hold) and its
//! controller replaces it with a pod the webhook admits with a new lease.
//! A pod nothing would replace (a bare pod, a Job's) is not evicted: its
//! lease says `Expiring` ahead of time and it loses access at expiry.

use std::time::Duration;

use k8s_openapi::{api::core::v1::Pod, jiff::Timestamp};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, EvictParams, PostParams, Preconditions},
    runtime::events::EventType,
};

use super::{
    Holder, LeaseContext,
    end_of_life::{Rotate, rotation_plan},
    publish, set_condition,
};
use crate::{
    Error, Result,
    api::{IdentityLease, well_known::condition as cond},
    controller::condition,
};

/// How soon an eviction a `PodDisruptionBudget` refused is tried again.
pub(super) const EVICTION_RETRY: Duration = Duration::from_secs(30);

/// Reasons of the `Expiring` condition.
const ROTATING: &str = "Rotating";
const EVICTION_BLOCKED: &str = "EvictionBlocked";
const NOT_ROTATED: &str = "NotRotated";

/// Rotates the lease's pod when it is due. `Some(delay)`: look again then
/// (an eviction a `PodDisruptionBudget` refused).
pub(super) async fn rotate_if_due(
    lease: &IdentityLease,
    ctx: &LeaseContext,
    holder: &Holder,
    now: Timestamp,
) -> Result<Option<Duration>> {
    if ctx.cloud.rotation.due_at(lease).is_none_or(|due| due > now) {
        return Ok(None);
    }
    let expires = lease.spec.expires_at.0;
    match rotation_plan(lease, holder) {
        None => Ok(None),
        Some(Rotate::Warn(why)) => {
            let message = format!("{why}; it loses its identity when the lease expires at {expires}");
            if expiring_reason(lease) != Some(NOT_ROTATED) {
                set_expiring(lease, ctx, NOT_ROTATED, message.clone()).await?;
                publish(ctx, lease, EventType::Warning, "Expiring", message).await;
            }
            Ok(None)
        }
        Some(Rotate::Evict { pod, controller }) => evict(lease, ctx, pod, &controller, expires).await,
    }
}

async fn evict(
    lease: &IdentityLease,
    ctx: &LeaseContext,
    pod: &Pod,
    controller: &str,
    expires: Timestamp,
) -> Result<Option<Duration>> {
    let namespace = lease.namespace().unwrap_or_default();
    let name = pod.name_any();
    if let Some(fence) = &ctx.base.fence {
        fence.check().await?;
    }
    // The uid precondition: a pod of the same name made since is not evicted.
    let params = EvictParams {
        delete_options: Some(DeleteParams {
            preconditions: Some(Preconditions { uid: pod.uid(), resource_version: None }),
            ..DeleteParams::default()
        }),
        post_options: PostParams::default(),
    };
    match Api::<Pod>::namespaced(ctx.base.evictions.clone(), &namespace).evict(&name, &params).await {
        Ok(_) => {
            let message = format!(
                "pod {name} evicted ahead of the lease's expiry at {expires}: {controller} replaces it with a pod \
                 that gets a fresh identity; this one keeps its identity until its containers have stopped"
            );
            set_expiring(lease, ctx, ROTATING, message.clone()).await?;
            publish(ctx, lease, EventType::Normal, ROTATING, message).await;
            tracing::info!(namespace, lease = %lease.name_any(), pod = name, "evicted a pod to rotate its identity");
            Ok(None)
        }
        // A `PodDisruptionBudget` says not now (429), or the pod is gone (404)
        // or was replaced (409, the uid precondition).
        Err(kube::Error::Api(status)) if status.code == 429 => {
            let message = format!(
                "pod {name} is due for rotation before the lease expires at {expires}, but its eviction is refused \
                 ({}); tried again every {}s",
                status.message,
                EVICTION_RETRY.as_secs()
            );
            if expiring_reason(lease) != Some(EVICTION_BLOCKED) {
                set_expiring(lease, ctx, EVICTION_BLOCKED, message.clone()).await?;
                publish(ctx, lease, EventType::Warning, EVICTION_BLOCKED, message).await;
            }
            Ok(Some(EVICTION_RETRY))
        }
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(None),
        Err(e) => Err(Error::kube(format!("evicting pod {namespace}/{name} to rotate its identity"))(e)),
    }
}

/// The reason of the lease's `Expiring` condition, if it has one.
fn expiring_reason(lease: &IdentityLease) -> Option<&str> {
    let status = lease.status.as_ref()?;
    status.conditions.iter().find(|c| c.type_ == cond::EXPIRING && c.status == "True").map(|c| c.reason.as_str())
}

async fn set_expiring(lease: &IdentityLease, ctx: &LeaseContext, reason: &str, message: String) -> Result<()> {
    let previous = lease.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    let new = condition(previous, cond::EXPIRING, true, reason, message, lease.meta().generation);
    set_condition(lease, ctx, new).await.map(drop)
}
