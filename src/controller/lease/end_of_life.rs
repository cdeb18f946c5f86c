//! When a lease ends: the workload's end as the apiserver shows it (a pod
//! succeeded, failed or deleted, a Job complete, the lease expired, its
//! identity deleted), and when a live lease is looked at again.

use std::time::Duration;

use k8s_openapi::{
    api::{batch::v1::Job, core::v1::Pod},
    jiff::Timestamp,
};
use kube::{Resource, ResourceExt};

use super::{Holder, RESYNC};
use crate::api::{IdentityLease, WorkloadIdentity, well_known::LABEL_LEASE};

/// A lease whose pod (or Job) never showed up is reaped after this: the
/// create was refused by a later admission step, after our webhook ran.
pub const HOLDER_GRACE: Duration = Duration::from_mins(2);
/// Why a lease ends now, if it does.
/// `identity` is the lease's `WorkloadIdentity` if it still exists; `seen`
/// whether this process's pod watch has seen the lease's pod.
pub(super) fn end_reason(
    lease: &IdentityLease,
    identity: Option<&WorkloadIdentity>,
    holder: &Holder,
    now: Timestamp,
    seen: bool,
) -> Option<String> {
    let spec = &lease.spec.holder;
    if lease.spec.expires_at.0 <= now {
        return Some(format!("expired at {} (the boundary's maxLifetime)", lease.spec.expires_at.0));
    }
    if identity.is_none_or(|wi| wi.meta().deletion_timestamp.is_some()) {
        return Some(format!("WorkloadIdentity {} was deleted", lease.spec.workload_identity));
    }
    let missing = |what: &str| {
        if spec.uid.is_some() || seen {
            Some(format!("{what} {} was deleted", spec.name))
        } else if lease_age(lease, now) > HOLDER_GRACE {
            Some(format!("{what} {} never appeared (its creation was refused after admission)", spec.name))
        } else {
            None
        }
    };
    let replaced = |what: &str, uid: Option<String>| {
        (spec.uid.is_some() && uid != spec.uid)
            .then(|| format!("{what} {} was replaced by another of the same name", spec.name))
    };
    match holder {
        Holder::Pod(None) => missing("pod"),
        Holder::Job(None) => missing("Job"),
        Holder::Pod(Some(pod)) => replaced("pod", pod.uid())
            .or_else(|| not_its_pod(lease, pod))
            .or_else(|| pod_ended(pod, now).map(|how| format!("pod {} {how}", spec.name))),
        Holder::Job(Some(job)) => {
            replaced("Job", job.uid()).or_else(|| job_ended(job).map(|how| format!("Job {} {how}", spec.name)))
        }
    }
}

/// The pod of the holder's name was admitted for another lease (or none):
/// this lease's own pod was refused by a later admission step and another
/// of the same name (a `StatefulSet`'s, a bare pod made again) came after it.
/// Every pod ephemera admits with an identity carries its lease's label, so
/// a pod without this lease's label is never this lease's: the lease ends
/// at once instead of provisioning a role for a pod that is not its own.
pub(super) fn not_its_pod(lease: &IdentityLease, pod: &Pod) -> Option<String> {
    let name = lease.name_any();
    match pod.labels().get(LABEL_LEASE) {
        Some(own) if *own == name => None,
        Some(other) => Some(format!(
            "pod {} belongs to IdentityLease {other}: this lease's pod was never created (refused after admission)",
            lease.spec.holder.name
        )),
        None => Some(format!(
            "pod {} has no ephemera identity: this lease's pod was never created (refused after admission)",
            lease.spec.holder.name
        )),
    }
}

/// How a pod's workload ended, if it did: `succeeded`, `failed`, or, for a
/// pod being deleted, once none of its containers runs (its SIGTERM handlers
/// and preStop hooks, which may still flush to S3, are done) or once its
/// grace period is over (`deletionTimestamp`: a node that stopped reporting
/// must not keep a role alive). Shared with `ephemera inventory`.
#[must_use]
pub fn pod_ended(pod: &Pod, now: Timestamp) -> Option<&'static str> {
    match pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Succeeded") => return Some("succeeded"),
        Some("Failed") => return Some("failed"),
        _ => {}
    }
    let deadline = pod.meta().deletion_timestamp.as_ref()?;
    if !containers_run(pod) {
        Some("was deleted and its containers have stopped")
    } else if deadline.0 <= now {
        Some("was deleted and its grace period is over")
    } else {
        None
    }
}

/// Whether any container of the pod (init and sidecar containers included)
/// runs, as the kubelet last reported.
fn containers_run(pod: &Pod) -> bool {
    let Some(status) = pod.status.as_ref() else { return false };
    [&status.container_statuses, &status.init_container_statuses, &status.ephemeral_container_statuses]
        .into_iter()
        .flatten()
        .flatten()
        .any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
}

/// How a Job ended, if it did: `completed` or `failed`.
#[must_use]
pub fn job_ended(job: &Job) -> Option<&'static str> {
    let conditions = job.status.as_ref().and_then(|s| s.conditions.as_ref())?;
    let done = conditions.iter().find(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")?;
    Some(if done.type_ == "Complete" { "completed" } else { "failed" })
}

/// How long ago the lease was made (zero without a creation time).
#[must_use]
pub fn lease_age(lease: &IdentityLease, now: Timestamp) -> Duration {
    lease.meta().creation_timestamp.as_ref().map_or(Duration::ZERO, |t| now.duration_since(t.0).unsigned_abs())
}

/// When a live lease is looked at again without any event: at its expiry,
/// at the resync, while no pod was ever bound to it when the holder's grace
/// period ends (a pod deleted while no controller watched, before its uid
/// was recorded, is then reaped at once instead of at the next resync), and,
/// for a pod being deleted, when its grace period ends (a node that stops
/// reporting sends no event), and when its identity is due for rotation.
pub(super) fn next_look(lease: &IdentityLease, holder: &Holder, rotation: &Rotation, now: Timestamp) -> Duration {
    let until = |t: Timestamp| t.duration_since(now).unsigned_abs();
    let mut next = until(lease.spec.expires_at.0).min(RESYNC);
    if let Some(due) = rotation.due_at(lease).filter(|due| *due > now) {
        next = next.min(until(due));
    }
    if lease.spec.holder.uid.is_none() {
        next = next.min(HOLDER_GRACE.saturating_sub(lease_age(lease, now)));
    }
    if let Some(deadline) = holder.pod_of(lease).and_then(|p| p.meta().deletion_timestamp.as_ref()) {
        next = next.min(until(deadline.0));
    }
    next + Duration::from_secs(1)
}

/// When a long-lived workload's identity is rotated: `lead` before the
/// lease expires, the pod is evicted (through the Eviction API, so
/// `PodDisruptionBudget`s hold) and its controller replaces it with a pod that
/// gets a fresh identity, instead of the pod losing its role while it runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rotation {
    /// Share of the lease's lifetime before its expiry (`0.1`: the last 10 %).
    pub fraction: f64,
    /// Shortest lead, for short lifetimes (time for a replacement to start).
    pub min_lead: Duration,
}

/// The largest [`Rotation::fraction`]: a pod rotated at 5 % of its lease's
/// life (its replacement again, and so on) is as eager as it may get.
pub const MAX_LEAD_FRACTION: f64 = 0.95;

impl Default for Rotation {
    fn default() -> Self {
        Self { fraction: 0.1, min_lead: Duration::from_mins(5) }
    }
}

impl Rotation {
    /// When the lease's pod is rotated: `max(fraction x lifetime, min_lead)`
    /// before `expiresAt`, where `min_lead` counts for at most half the
    /// lifetime (a short `maxLifetime` must not evict pods as soon as they
    /// start; only a fraction set that high does). `None` without a
    /// creation time.
    #[must_use]
    pub fn due_at(&self, lease: &IdentityLease) -> Option<Timestamp> {
        let created = lease.meta().creation_timestamp.as_ref()?.0;
        let expires = lease.spec.expires_at.0;
        let lifetime = expires.duration_since(created).unsigned_abs();
        let lead = lifetime.mul_f64(self.fraction.clamp(0.0, MAX_LEAD_FRACTION)).max(self.min_lead.min(lifetime / 2));
        expires.checked_sub(k8s_openapi::jiff::SignedDuration::try_from(lead).ok()?).ok()
    }
}

/// What rotating a lease's identity means for its holder.
#[derive(Debug, PartialEq)]
pub(super) enum Rotate<'a> {
    /// Evict this pod: its controller (named) makes a replacement.
    Evict { pod: &'a Pod, controller: String },
    /// Nothing would replace it: it is told, and loses access at expiry.
    Warn(String),
}

/// How the lease's holder is rotated; `None` when there is nothing to do
/// (the pod is already going, or gone).
pub(super) fn rotation_plan<'a>(lease: &IdentityLease, holder: &'a Holder) -> Option<Rotate<'a>> {
    match holder {
        Holder::Pod(Some(_)) => {
            let pod = holder.pod_of(lease)?;
            if pod.meta().deletion_timestamp.is_some() {
                return None;
            }
            let owner = pod.owner_references().iter().find(|o| o.controller == Some(true));
            Some(match owner {
                // A Job counts an evicted pod against its backoffLimit and
                // starts its work again: a run is meant to finish, not rotate.
                Some(job) if job.kind == "Job" => Rotate::Warn(format!(
                    "pod {} belongs to Job {}, which would count an evicted pod as failed; it is not evicted",
                    pod.name_any(),
                    job.name
                )),
                Some(owner) => Rotate::Evict { pod, controller: format!("{} {}", owner.kind, owner.name) },
                None => Rotate::Warn(format!(
                    "pod {} has no controller that would replace it, so it is not evicted",
                    pod.name_any()
                )),
            })
        }
        Holder::Job(Some(job)) => Some(Rotate::Warn(format!(
            "the identity of Job {}'s run is shared by its pods; rotating it would restart the run",
            job.name_any()
        ))),
        Holder::Pod(None) | Holder::Job(None) => None,
    }
}

/// When the workload ended, as the apiserver shows it (whole seconds, so
/// at most 1 s before the true end): for a pod being deleted, its last
/// container's end (or the deletion request, if none had run; the end of
/// the grace period, if they were still reported running), the last
/// container's end of a pod that succeeded or failed, the
/// Complete/Failed condition of a Job, the expiry of an expired lease; `now`
/// when the apiserver shows nothing earlier (a pod already gone).
pub(super) fn workload_ended_at(lease: &IdentityLease, holder: &Holder, now: Timestamp) -> Timestamp {
    let shown = if lease.spec.expires_at.0 <= now {
        Some(lease.spec.expires_at.0)
    } else {
        match holder {
            Holder::Pod(Some(pod)) => pod_ended_at(pod, now),
            Holder::Job(Some(job)) => job_ended_at(job),
            Holder::Pod(None) | Holder::Job(None) => None,
        }
    };
    shown.map_or(now, |t| t.min(now))
}

/// When a pod's workload ended (see [`workload_ended_at`]).
pub(super) fn pod_ended_at(pod: &Pod, now: Timestamp) -> Option<Timestamp> {
    pod_ended(pod, now)?;
    let last_container_end = || {
        let status = pod.status.as_ref()?;
        status
            .container_statuses
            .iter()
            .flatten()
            .filter_map(|c| c.state.as_ref()?.terminated.as_ref().map(|t| t.finished_at.as_ref().map(|f| f.0)))
            .collect::<Option<Vec<_>>>()?
            .into_iter()
            .max()
    };
    let Some(deadline) = &pod.meta().deletion_timestamp else { return last_container_end() };
    if containers_run(pod) {
        return Some(deadline.0);
    }
    let grace = pod.meta().deletion_grace_period_seconds.unwrap_or(0);
    let requested = deadline.0.checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(grace)).ok();
    last_container_end().or(requested)
}

/// When a Job ended: its Complete or Failed condition's transition.
pub(super) fn job_ended_at(job: &Job) -> Option<Timestamp> {
    job_ended(job)?;
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    conditions
        .iter()
        .find(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")?
        .last_transition_time
        .as_ref()
        .map(|t| t.0)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;

    #[test]
    fn a_lease_without_a_bound_pod_is_looked_at_again_when_its_grace_ends() {
        let lease = |uid: Option<&str>| -> IdentityLease {
            serde_json::from_value(json!({
                "apiVersion": "ephemera.dev/v1alpha1", "kind": "IdentityLease",
                "metadata": {"name": "l", "namespace": "n", "creationTimestamp": "2026-11-23T10:00:00Z"},
                "spec": {"holder": {"kind": "Pod", "name": "p", "uid": uid}, "workloadIdentity": "w",
                         "serviceAccount": "l", "expiresAt": "2026-11-24T10:00:00Z"},
            }))
            .unwrap()
        };
        let now: Timestamp = "2026-11-23T10:00:30Z".parse().unwrap();
        // Grace (2 min) minus 30 s of age, plus the 1 s margin.
        assert_eq!(next_look(&lease(None), &Holder::Pod(None), &Rotation::default(), now), Duration::from_secs(91));
        assert_eq!(
            next_look(&lease(Some("u")), &Holder::Pod(None), &Rotation::default(), now),
            RESYNC + Duration::from_secs(1)
        );
        let late: Timestamp = "2026-11-24T09:59:00Z".parse().unwrap();
        assert_eq!(
            next_look(&lease(Some("u")), &Holder::Pod(None), &Rotation::default(), late),
            Duration::from_secs(61),
            "expiry comes first"
        );
    }

    #[test]
    fn rotation_leads_the_expiry_by_a_share_of_the_lifetime_and_never_evicts_a_young_pod() {
        let lease = |lifetime: &str| -> IdentityLease {
            let created: Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();
            let lifetime: crate::api::Duration = lifetime.parse().unwrap();
            let expires = created.checked_add(Duration::from(lifetime)).unwrap();
            serde_json::from_value(json!({
                "apiVersion": "ephemera.dev/v1alpha1", "kind": "IdentityLease",
                "metadata": {"name": "l", "namespace": "n", "creationTimestamp": "2026-11-23T10:00:00Z"},
                "spec": {"holder": {"kind": "Pod", "name": "p"}, "workloadIdentity": "w",
                         "serviceAccount": "l", "expiresAt": expires.to_string()},
            }))
            .unwrap()
        };
        let at = |s: &str| s.parse::<Timestamp>().unwrap();
        let default = Rotation::default();
        // 24 h: 10 % (2 h 24 min) before expiry.
        assert_eq!(default.due_at(&lease("24h")), Some(at("2026-11-24T07:36:00Z")));
        // 1 h: 10 % is 6 min, more than the 5-minute minimum.
        assert_eq!(default.due_at(&lease("1h")), Some(at("2026-11-23T10:54:00Z")));
        // 30 min: 10 % is 3 min, so the 5-minute minimum.
        assert_eq!(default.due_at(&lease("30m")), Some(at("2026-11-23T10:25:00Z")));
        // 10 min: the minimum counts for at most half the lifetime.
        assert_eq!(default.due_at(&lease("10m")), Some(at("2026-11-23T10:05:00Z")));
        // An eager fraction is taken as given, up to its cap.
        let eager = Rotation { fraction: 0.95, min_lead: Duration::ZERO };
        assert_eq!(eager.due_at(&lease("10m")), Some(at("2026-11-23T10:00:30Z")));
        let beyond = Rotation { fraction: 5.0, min_lead: Duration::ZERO };
        assert_eq!(beyond.due_at(&lease("10m")), eager.due_at(&lease("10m")));

        // The next look comes at the rotation, before the resync would.
        let l = lease("10m");
        assert_eq!(next_look(&l, &Holder::Pod(None), &eager, at("2026-11-23T10:00:10Z")), Duration::from_secs(21));
    }

    #[test]
    fn only_a_pod_some_controller_replaces_is_evicted_for_rotation() {
        let lease: IdentityLease = serde_json::from_value(json!({
            "apiVersion": "ephemera.dev/v1alpha1", "kind": "IdentityLease",
            "metadata": {"name": "l", "namespace": "n"},
            "spec": {"holder": {"kind": "Pod", "name": "p"}, "workloadIdentity": "w",
                     "serviceAccount": "l", "expiresAt": "2026-11-24T10:00:00Z"},
        }))
        .unwrap();
        let pod = |owner: Option<&str>, deleting: bool, label: &str| -> Holder {
            let mut meta = json!({"name": "p", "namespace": "n", "labels": {LABEL_LEASE: label}});
            if let Some(kind) = owner {
                meta["ownerReferences"] =
                    json!([{"apiVersion": "v1", "kind": kind, "name": "o", "uid": "u", "controller": true}]);
            }
            if deleting {
                meta["deletionTimestamp"] = json!("2026-11-24T09:00:00Z");
            }
            Holder::Pod(Some(Box::new(serde_json::from_value(json!({"metadata": meta})).unwrap())))
        };
        let replicas = pod(Some("ReplicaSet"), false, "l");
        assert!(
            matches!(rotation_plan(&lease, &replicas), Some(Rotate::Evict { controller, .. }) if controller == "ReplicaSet o")
        );
        assert!(matches!(rotation_plan(&lease, &pod(Some("StatefulSet"), false, "l")), Some(Rotate::Evict { .. })));
        // A Job would count the eviction as a failure; a bare pod would not come back.
        assert!(
            matches!(rotation_plan(&lease, &pod(Some("Job"), false, "l")), Some(Rotate::Warn(why)) if why.contains("Job o"))
        );
        assert!(
            matches!(rotation_plan(&lease, &pod(None, false, "l")), Some(Rotate::Warn(why)) if why.contains("no controller"))
        );
        // Already going, gone, or not this lease's pod: nothing to do.
        assert_eq!(rotation_plan(&lease, &pod(Some("ReplicaSet"), true, "l")), None);
        assert_eq!(rotation_plan(&lease, &Holder::Pod(None)), None);
        assert_eq!(rotation_plan(&lease, &pod(Some("ReplicaSet"), false, "other")), None);
    }

    #[test]
    fn a_lease_whose_pod_name_went_to_another_lease_ends_at_once() {
        let lease: IdentityLease = serde_json::from_value(json!({
            "apiVersion": "ephemera.dev/v1alpha1", "kind": "IdentityLease",
            "metadata": {"name": "l", "namespace": "n", "creationTimestamp": "2026-11-23T10:00:00Z"},
            "spec": {"holder": {"kind": "Pod", "name": "w"}, "workloadIdentity": "wi",
                     "serviceAccount": "l", "expiresAt": "2026-11-24T10:00:00Z"},
        }))
        .unwrap();
        let identity: WorkloadIdentity = serde_json::from_value(json!({
            "apiVersion": "ephemera.dev/v1alpha1", "kind": "WorkloadIdentity",
            "metadata": {"name": "wi", "namespace": "n"}, "spec": {},
        }))
        .unwrap();
        let pod_of = |lease: Option<&str>| -> Holder {
            let labels: BTreeMap<&str, &str> = lease.map(|l| ("ephemera.dev/lease", l)).into_iter().collect();
            Holder::Pod(Some(Box::new(
                serde_json::from_value(json!({"metadata": {"name": "w", "uid": "p2", "labels": labels}})).unwrap(),
            )))
        };
        let young: Timestamp = "2026-11-23T10:01:00Z".parse().unwrap();
        let end = |holder: &Holder| end_reason(&lease, Some(&identity), holder, young, false);
        assert_eq!(end(&pod_of(Some("l"))), None, "its own pod");
        assert_eq!(
            end(&pod_of(Some("l2"))).as_deref(),
            Some("pod w belongs to IdentityLease l2: this lease's pod was never created (refused after admission)")
        );
        assert!(end(&pod_of(None)).is_some_and(|r| r.contains("has no ephemera identity")));
    }

    #[test]
    fn a_lease_ends_when_its_workload_does_and_not_before() {
        let lease = |kind: &str, uid: Option<&str>| -> IdentityLease {
            serde_json::from_value(json!({
                "apiVersion": "ephemera.dev/v1alpha1", "kind": "IdentityLease",
                "metadata": {"name": "l", "namespace": "n", "creationTimestamp": "2026-11-23T10:00:00Z"},
                "spec": {"holder": {"kind": kind, "name": "w", "uid": uid}, "workloadIdentity": "wi",
                         "serviceAccount": "l", "expiresAt": "2026-11-24T10:00:00Z"},
            }))
            .unwrap()
        };
        let identity: WorkloadIdentity = serde_json::from_value(json!({
            "apiVersion": "ephemera.dev/v1alpha1", "kind": "WorkloadIdentity",
            "metadata": {"name": "wi", "namespace": "n"}, "spec": {},
        }))
        .unwrap();
        let pod = |uid: &str, phase: &str| -> Holder {
            Holder::Pod(Some(Box::new(
                serde_json::from_value(json!({"metadata": {"name": "w", "uid": uid,
                    "labels": {"ephemera.dev/lease": "l"}}, "status": {"phase": phase}}))
                .unwrap(),
            )))
        };
        let job = |condition: Option<&str>| -> Holder {
            let conditions: Vec<_> = condition.map(|c| json!({"type": c, "status": "True"})).into_iter().collect();
            Holder::Job(Some(Box::new(
                serde_json::from_value(
                    json!({"metadata": {"name": "w", "uid": "j1"}, "status": {"conditions": conditions}}),
                )
                .unwrap(),
            )))
        };
        let young: Timestamp = "2026-11-23T10:01:00Z".parse().unwrap();
        let old: Timestamp = "2026-11-23T10:05:00Z".parse().unwrap();
        let expired: Timestamp = "2026-11-24T10:00:00Z".parse().unwrap();
        let wi = Some(&identity);
        let cases: [(&str, Option<String>, Option<&str>); 12] = [
            ("running pod", end_reason(&lease("Pod", Some("p1")), wi, &pod("p1", "Running"), young, true), None),
            (
                "gated pod, uid not bound yet",
                end_reason(&lease("Pod", None), wi, &pod("p1", "Pending"), young, false),
                None,
            ),
            (
                "succeeded",
                end_reason(&lease("Pod", Some("p1")), wi, &pod("p1", "Succeeded"), young, true),
                Some("pod w succeeded"),
            ),
            (
                "failed",
                end_reason(&lease("Pod", Some("p1")), wi, &pod("p1", "Failed"), young, true),
                Some("pod w failed"),
            ),
            (
                "replaced",
                end_reason(&lease("Pod", Some("p1")), wi, &pod("p2", "Running"), young, true),
                Some("pod w was replaced by another of the same name"),
            ),
            (
                "deleted after binding",
                end_reason(&lease("Pod", Some("p1")), wi, &Holder::Pod(None), young, false),
                Some("pod w was deleted"),
            ),
            (
                "deleted, seen by the watch",
                end_reason(&lease("Pod", None), wi, &Holder::Pod(None), young, true),
                Some("pod w was deleted"),
            ),
            (
                "not there yet, within grace",
                end_reason(&lease("Pod", None), wi, &Holder::Pod(None), young, false),
                None,
            ),
            (
                "never appeared",
                end_reason(&lease("Pod", None), wi, &Holder::Pod(None), old, false),
                Some("pod w never appeared (its creation was refused after admission)"),
            ),
            (
                "identity deleted",
                end_reason(&lease("Pod", Some("p1")), None, &pod("p1", "Running"), young, true),
                Some("WorkloadIdentity wi was deleted"),
            ),
            ("Job running", end_reason(&lease("Job", Some("j1")), wi, &job(None), young, true), None),
            (
                "Job complete",
                end_reason(&lease("Job", Some("j1")), wi, &job(Some("Complete")), young, true),
                Some("Job w completed"),
            ),
        ];
        for (case, got, want) in cases {
            assert_eq!(got.as_deref(), want, "{case}");
        }
        let past = end_reason(&lease("Pod", Some("p1")), wi, &pod("p1", "Running"), expired, true).unwrap();
        assert!(past.starts_with("expired at"), "{past}");
    }

    #[test]
    fn a_pod_being_deleted_keeps_its_identity_until_its_containers_stop() {
        let lease: IdentityLease = serde_json::from_value(json!({
            "apiVersion": "ephemera.dev/v1alpha1", "kind": "IdentityLease",
            "metadata": {"name": "l", "namespace": "n", "creationTimestamp": "2026-11-23T10:00:00Z"},
            "spec": {"holder": {"kind": "Pod", "name": "w", "uid": "p1"}, "workloadIdentity": "wi",
                     "serviceAccount": "l", "expiresAt": "2026-11-24T10:00:00Z"},
        }))
        .unwrap();
        let identity: WorkloadIdentity = serde_json::from_value(json!({
            "apiVersion": "ephemera.dev/v1alpha1", "kind": "WorkloadIdentity",
            "metadata": {"name": "wi", "namespace": "n"}, "spec": {},
        }))
        .unwrap();
        // Deleted at 10:01:00 with the default 30 s of grace.
        let deleting = |state: serde_json::Value| -> Holder {
            let statuses: Vec<_> =
                [state].into_iter().filter(|s| !s.is_null()).map(|s| json!({"name": "main", "state": s})).collect();
            Holder::Pod(Some(Box::new(
                serde_json::from_value(json!({
                    "metadata": {"name": "w", "uid": "p1", "labels": {"ephemera.dev/lease": "l"},
                                 "deletionTimestamp": "2026-11-23T10:01:30Z", "deletionGracePeriodSeconds": 30},
                    "status": {"phase": "Running", "containerStatuses": statuses},
                }))
                .unwrap(),
            )))
        };
        let running = deleting(json!({"running": {"startedAt": "2026-11-23T10:00:05Z"}}));
        let stopped = deleting(json!({"terminated": {"exitCode": 0, "finishedAt": "2026-11-23T10:01:04Z"}}));
        let never_ran = deleting(serde_json::Value::Null);
        let at = |t: &str| -> Timestamp { t.parse().unwrap() };
        let end = |holder: &Holder, now: &str| end_reason(&lease, Some(&identity), holder, at(now), true);

        // SIGTERM sent, the shutdown hook still flushing: the role stays, and
        // the lease is looked at again when the grace period ends.
        assert_eq!(end(&running, "2026-11-23T10:01:10Z"), None);
        assert_eq!(
            next_look(&lease, &running, &Rotation::default(), at("2026-11-23T10:01:10Z")),
            Duration::from_secs(21)
        );
        // Its containers stopped: reaped at once, the workload over when the last one ended.
        assert_eq!(
            end(&stopped, "2026-11-23T10:01:05Z").as_deref(),
            Some("pod w was deleted and its containers have stopped")
        );
        assert_eq!(workload_ended_at(&lease, &stopped, at("2026-11-23T10:01:05Z")), at("2026-11-23T10:01:04Z"));
        // Still reported running past the grace period (a node gone quiet): reaped, over at the deadline.
        assert_eq!(
            end(&running, "2026-11-23T10:01:31Z").as_deref(),
            Some("pod w was deleted and its grace period is over")
        );
        assert_eq!(workload_ended_at(&lease, &running, at("2026-11-23T10:01:31Z")), at("2026-11-23T10:01:30Z"));
        // Deleted before any container ran (still gated): over at the deletion request.
        assert!(end(&never_ran, "2026-11-23T10:01:01Z").is_some());
        assert_eq!(workload_ended_at(&lease, &never_ran, at("2026-11-23T10:01:01Z")), at("2026-11-23T10:01:00Z"));
    }
}
