//! The revocation lane: the moment the pod watch shows a workload's end,
//! its role's sessions are denied, ahead of everything else the controller
//! does. The reconcile that follows (record why, delete the lease, the
//! finalizer's deletions) is off the credential window's path: in a burst
//! it queues behind other leases' work, the revocation does not.
//!
//! Only a lease the controller made Ready is revoked here (its
//! `status.roleArn` is written only then, after the role was made and its
//! ownership established), so the role's tags need no second read; its name
//! is derived from the lease's own identity ([`trusted_role`]). A revocation
//! that fails is not retried here: the reap revokes again, first.

use std::{sync::Arc, time::SystemTime};

use k8s_openapi::{api::core::v1::Pod, jiff::Timestamp};
use kube::{ResourceExt, runtime::reflector::ObjectRef};
use tokio::sync::{Semaphore, mpsc};

use super::{
    LeaseContext, Via,
    end_of_life::{pod_ended, pod_ended_at},
    trusted_role,
};
use crate::api::{HolderKind, IdentityLease, well_known::LABEL_LEASE};

/// Revocations on their own (each one IAM call) in flight at once.
const CONCURRENCY: usize = 32;

/// A workload that ended, and its role.
#[derive(Debug)]
pub(super) struct Revocation {
    uid: String,
    role: String,
    lease: String,
    ended: Timestamp,
    /// The lease as the cache had it (its status names its revocation set).
    of: Arc<IdentityLease>,
}

/// Sends ended workloads to the lane.
#[derive(Clone)]
pub(super) struct Lane(mpsc::UnboundedSender<Revocation>);

impl Lane {
    /// Starts the lane's workers; they stop when every [`Lane`] is dropped.
    pub(super) fn start(
        ctx: Arc<LeaseContext>,
        rx: mpsc::UnboundedReceiver<Revocation>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(run(ctx, rx))
    }

    pub(super) fn channel() -> (Self, mpsc::UnboundedReceiver<Revocation>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self(tx), rx)
    }

    /// Revokes the role of `pod`'s lease if the pod shows its workload
    /// over (see [`revocation`]).
    pub(super) fn offer(&self, leases: &kube::runtime::reflector::Store<IdentityLease>, ctx: &LeaseContext, pod: &Pod) {
        let Some(lease) = pod
            .namespace()
            .zip(pod.labels().get(LABEL_LEASE).cloned())
            .and_then(|(ns, name)| leases.get(&ObjectRef::new(&name).within(&ns)))
        else {
            return;
        };
        let Some(uid) = lease.uid() else { return };
        if ctx.revocation_known(&uid) || ctx.was_reaped(&uid) {
            return;
        }
        if let Some(mut revocation) = revocation(&lease, pod, &ctx.cloud.cluster, &ctx.cloud.account, Timestamp::now())
        {
            revocation.of = lease;
            let _ = self.0.send(revocation);
        }
    }
}

/// What to revoke when `pod` shows that `lease`'s workload is over: only
/// for a pod-held lease the controller made Ready, whose holder is this very
/// pod (by uid).
pub(super) fn revocation(
    lease: &IdentityLease,
    pod: &Pod,
    cluster: &str,
    account: &str,
    now: Timestamp,
) -> Option<Revocation> {
    let made = lease.status.as_ref().is_some_and(|s| s.role_arn.is_some());
    let own_pod = lease.spec.holder.kind == HolderKind::Pod
        && lease.spec.holder.uid.is_some()
        && lease.spec.holder.uid == pod.uid()
        && pod.labels().get(LABEL_LEASE) == Some(&lease.name_any());
    if !made || !own_pod {
        return None;
    }
    pod_ended(pod, now)?;
    let role = trusted_role(lease, cluster, account).ok()?;
    Some(Revocation {
        uid: lease.uid()?,
        role,
        lease: format!("{}/{}", lease.namespace().unwrap_or_default(), lease.name_any()),
        ended: pod_ended_at(pod, now).map_or(now, |t| t.min(now)),
        of: Arc::new(lease.clone()),
    })
}

async fn run(ctx: Arc<LeaseContext>, mut rx: mpsc::UnboundedReceiver<Revocation>) {
    // A revocation through a set only waits for the set's next write (all
    // that wait share it); one revoked on its own (no set, a full set)
    // takes one of these slots for its own IAM call.
    let slots = Arc::new(Semaphore::new(CONCURRENCY));
    while let Some(revocation) = rx.recv().await {
        let (ctx, slots) = (ctx.clone(), slots.clone());
        tokio::spawn(async move { revoke(&ctx, revocation, &slots).await });
    }
}

async fn revoke(ctx: &LeaseContext, revocation: Revocation, slots: &Semaphore) {
    // Claimed first: a second offer (the pod's next event) does nothing.
    if !ctx.claim_revocation(&revocation.uid) {
        return;
    }
    let done = if let Some(at) = ctx.revoke_by_set(&revocation.of).await {
        Ok(Some((at, Via::Set)))
    } else {
        let _slot = slots.acquire().await;
        ctx.revoke_on_its_own(&revocation.role).await
    };
    match done {
        Ok(Some((at, via))) => {
            ctx.record_revocation(&revocation.uid, at, via);
            let window = since(revocation.ended, at);
            if let Some(window) = window {
                ctx.base.metrics.credential_window.observe(window);
            }
            tracing::debug!(
                lease = revocation.lease,
                role = revocation.role,
                ?via,
                window_seconds = window.unwrap_or_default(),
                "revoked every session of the role"
            );
        }
        // Gone already: the reap finds nothing to revoke either.
        Ok(None) => ctx.release_revocation(&revocation.uid),
        Err(e) => {
            ctx.release_revocation(&revocation.uid);
            tracing::warn!(lease = revocation.lease, error = %e, "revoking on the workload's end failed; the reap revokes");
        }
    }
}

/// Seconds from `ended` to `at` (never negative).
pub(super) fn since(ended: Timestamp, at: SystemTime) -> Option<f64> {
    Timestamp::try_from(at).ok().map(|at| at.duration_since(ended).as_secs_f64().max(0.0))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::cloud::naming;

    fn lease(uid: Option<&str>, ready: bool) -> IdentityLease {
        let role = naming::role_name("ephemera", "c", "n", "l");
        let mut lease: IdentityLease = serde_json::from_value(json!({
            "apiVersion": "ephemera.dev/v1alpha1", "kind": "IdentityLease",
            "metadata": {"name": "l", "namespace": "n", "uid": "lease-uid"},
            "spec": {"holder": {"kind": "Pod", "name": "p", "uid": uid}, "workloadIdentity": "w",
                     "serviceAccount": "l", "roleArn": format!("arn:aws:iam::111:role/ephemera/{role}"),
                     "expiresAt": "2026-11-24T10:00:00Z"},
        }))
        .unwrap();
        if ready {
            lease.status = Some(serde_json::from_value(json!({"phase": "Ready", "roleArn": "x"})).unwrap());
        }
        lease
    }

    fn pod(uid: &str, phase: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "n", "uid": uid, "labels": {LABEL_LEASE: "l"}},
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    #[test]
    fn only_a_ready_lease_whose_own_pod_ended_is_revoked_in_the_lane() {
        let now: Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();
        let r = |lease: &IdentityLease, pod: &Pod| revocation(lease, pod, "c", "111", now);
        let found = r(&lease(Some("pod-uid"), true), &pod("pod-uid", "Succeeded")).expect("revoked");
        assert_eq!(found.role, naming::role_name("ephemera", "c", "n", "l"));
        assert_eq!(found.uid, "lease-uid");
        assert_eq!(found.ended, now, "no container end recorded: now");
        assert!(r(&lease(Some("pod-uid"), true), &pod("pod-uid", "Running")).is_none(), "still running");
        assert!(r(&lease(Some("pod-uid"), false), &pod("pod-uid", "Failed")).is_none(), "never made Ready here");
        assert!(r(&lease(Some("other"), true), &pod("pod-uid", "Failed")).is_none(), "another pod of that name");
        assert!(r(&lease(None, true), &pod("pod-uid", "Failed")).is_none(), "not bound to a pod");
        // A lease whose spec does not name its own role is never acted on.
        let mut forged = lease(Some("pod-uid"), true);
        forged.spec.role_arn = Some("arn:aws:iam::111:role/ephemera/admin".into());
        assert!(r(&forged, &pod("pod-uid", "Failed")).is_none());
    }
}
