//! The lease controller: provisions each `IdentityLease`'s IAM role and RBAC,
//! proves the role usable, lifts the pod's scheduling gate, and reaps it all
//! the moment the workload ends.
//!
//! Reaping is deletion: when the workload is over the controller deletes the
//! lease, and the `ephemera.dev/reaper` finalizer revokes live sessions and
//! deletes the role, the Role and RoleBinding and the ServiceAccount before
//! the lease may go. A crash anywhere leaves the finalizer in place, so the
//! next leader finishes the job; every step is idempotent.

//!
//! The story, in the order a lease lives it:
//! - [`provision`]: role made, proven with STS, RBAC applied, gate lifted;
//!   a live role follows its identity's policy;
//! - [`end_of_life`]: when the workload is over (and when to look again);
//! - [`reap`]: every session denied first, then the role, RBAC and
//!   ServiceAccount deleted;
//! - [`sweep`]: roles whose lease is gone.
//!
//! This file wires the watches and holds what every step shares: the
//! reconcile, its backoff, the lease's own names and its status.

mod end_of_life;
mod provision;
mod reap;
mod revoke;
mod rotate;
#[cfg(test)]
mod scenarios;
mod sweep;

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::{
    api::{batch::v1::Job, core::v1::Pod},
    apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{PartialObjectMeta, Patch, PatchParams},
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        events::{Event, EventType},
        finalizer::{Event as Finalizer, finalizer},
        reflector::{ObjectRef, Store, store::Writer},
        watcher,
    },
};
use serde_json::json;

pub use end_of_life::{HOLDER_GRACE, MAX_LEAD_FRACTION, Rotation, job_ended, lease_age, pod_ended};

use super::{Context, RESYNC, condition, drain};
use crate::{
    Error, Result,
    api::{
        HolderKind, IdentityLease, IdentityLeaseStatus, LeasePhase, WorkloadIdentity,
        well_known::{FIELD_MANAGER, FINALIZER_REAPER, LABEL_LEASE, condition as cond},
    },
    cloud::{
        aws::{AwsProvider, RoleOwner},
        naming,
    },
};

const CONTROLLER: &str = "lease";
/// Where roles are made and who trusts them.
#[derive(Clone, Debug)]
pub struct Cloud {
    /// IAM and STS.
    pub provider: AwsProvider,
    /// This cluster's name (role tags; the sweep only touches its own).
    pub cluster: String,
    /// The AWS account roles are made in.
    pub account: String,
    /// Host of the service-account issuer (`oidc.eks.eu-west-1.amazonaws.com/id/..`).
    pub issuer_host: String,
    /// ARN of the IAM OIDC provider for the issuer.
    pub provider_arn: String,
    /// How long after a lease is made STS may refuse its role before that
    /// is an error ([`PROPAGATION_WINDOW`] unless configured).
    pub propagation_window: Duration,
    /// When a long-lived pod is evicted to get a fresh identity.
    pub rotation: Rotation,
    /// This cluster's revocation sets; `None`: every role is revoked with
    /// its own deny-all inline policy.
    pub revocation_sets: Option<Arc<crate::cloud::revocation_sets::RevocationSets>>,
}

/// Default of [`Cloud::propagation_window`]: IAM usually propagates a new
/// role within seconds; a minute of refusals is a real problem.
pub const PROPAGATION_WINDOW: Duration = Duration::from_mins(1);

struct LeaseContext {
    base: Arc<Context>,
    cloud: Cloud,
    leases: Store<IdentityLease>,
    /// Consecutive failures per lease, for exponential backoff.
    failures: std::sync::Mutex<std::collections::HashMap<ObjectRef<IdentityLease>, u32>>,
    /// Leases (namespace, name) whose pod this process's watch has seen: a
    /// pod that is gone was then deleted, even before the lease recorded its
    /// uid, so the lease is reaped at once instead of after the grace period.
    seen_pods: SeenPods,
    /// Uids of leases this process has reaped. In a burst a lease is often
    /// looked at again (a pod event queued meanwhile) before the cache has
    /// seen it go: the finalizer is then still there in the cache, and
    /// without this the whole reap would run again (a second `Reaped` Event,
    /// a handful of IAM calls answered `NoSuchEntity`).
    reaped: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Uids of leases this process made Ready. Ready lasts until the lease
    /// is reaped, but in a burst a pod event often brings a lease back
    /// before its Ready status write has reached the cache: without this it
    /// was provisioned a second time (about 470 of 5,000 leases, each
    /// repeating the role calls and the STS proof).
    ready: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Uids of leases whose role the revocation lane denied (`Some`: when,
    /// and how), or is denying (`None`): the reap does not revoke them again,
    /// nor count their credential window twice.
    revocations: std::sync::Mutex<std::collections::HashMap<String, Option<(std::time::SystemTime, Via)>>>,
    /// `WorkloadIdentity` objects as this controller's own watch has them (see
    /// [`LeaseContext::identity`]).
    identities: Store<WorkloadIdentity>,
    /// Turns to reconcile, [`LEASE_CONCURRENCY`] at once, granted in order.
    turns: tokio::sync::Semaphore,
}

/// How a role's sessions were denied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    /// Its revocation set lists it.
    Set,
    /// Its own deny-all inline policy (deleted with the role).
    Inline,
}

impl LeaseContext {
    /// When (and how) the lane revoked the lease's role, if it did.
    fn revoked_at(&self, uid: &str) -> Option<(std::time::SystemTime, Via)> {
        self.revocations.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(uid).copied().flatten()
    }

    /// Whether the lane revoked, or is revoking, the lease's role.
    fn revocation_known(&self, uid: &str) -> bool {
        self.revocations.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains_key(uid)
    }

    /// Takes the lease's revocation on; `false` when it was taken already.
    fn claim_revocation(&self, uid: &str) -> bool {
        let mut map = self.revocations.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.contains_key(uid) {
            return false;
        }
        map.insert(uid.to_owned(), None);
        true
    }

    fn record_revocation(&self, uid: &str, at: std::time::SystemTime, via: Via) {
        self.revocations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(uid.to_owned(), Some((at, via)));
    }

    /// Denies every session of the lease's role: through its revocation set
    /// when it can ([`Self::revoke_by_set`]), else with its own deny. When it
    /// landed and how; `None`: no such role.
    async fn revoke(&self, lease: &IdentityLease, role: &str) -> Result<Option<(std::time::SystemTime, Via)>> {
        if let Some(at) = self.revoke_by_set(lease).await {
            return Ok(Some((at, Via::Set)));
        }
        self.revoke_on_its_own(role).await
    }

    /// Denies every session of `role` with its own deny-all inline policy.
    async fn revoke_on_its_own(&self, role: &str) -> Result<Option<(std::time::SystemTime, Via)>> {
        Ok(self.cloud.provider.revoke(role).await?.map(|at| (at, Via::Inline)))
    }

    /// Revokes the lease's role through its revocation set (one write for
    /// all that wait) when the role has one and it is the set its key maps
    /// to today (the number of sets may have changed since it was made).
    /// When it landed; `None`: the role must be revoked on its own (no set,
    /// the set full, its write failed).
    async fn revoke_by_set(&self, lease: &IdentityLease) -> Option<std::time::SystemTime> {
        use crate::cloud::revocation_sets::{Revoked, key_of};
        let sets = self.cloud.revocation_sets.as_ref()?;
        let set = lease.status.as_ref()?.revocation_set.as_deref()?;
        let key = key_of(&lease.uid()?);
        if sets.arn_for(&key) != set {
            return None;
        }
        match sets.revoke(&key).await {
            Revoked::At(at) => Some(at),
            // (The set says so once per write, not once per lease.)
            Revoked::Full => None,
            Revoked::Failed(why) => {
                tracing::debug!(lease = %lease.name_any(), set, why, "revoking the role on its own");
                None
            }
        }
    }

    /// A lease's identity from the caches: this controller's watch (which
    /// woke the lease when it changed), else the identity controller's.
    fn identity(&self, lease: &IdentityLease) -> Option<Arc<WorkloadIdentity>> {
        let key = ObjectRef::new(&lease.spec.workload_identity).within(&lease.namespace().unwrap_or_default());
        self.identities.get(&key).or_else(|| self.base.identities.get(&key))
    }

    fn release_revocation(&self, uid: &str) {
        self.revocations.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(uid);
    }

    fn was_reaped(&self, uid: &str) -> bool {
        self.reaped.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains(uid)
    }
}

/// Leases (namespace, name) whose pod this process's watch has seen, with
/// the `resourceVersion` of the last version it delivered.
type SeenPods = Arc<std::sync::Mutex<std::collections::HashMap<(String, String), String>>>;

/// Leases reconciled at once. Unbounded, a burst of pods queues every call
/// at the cloud endpoint and all of them finish late; bounded, they finish
/// in arrival order at the same throughput (IAM answers calls one account at
/// a time anyway).
///
/// The bound is [`LeaseContext::turns`], a semaphore (which grants in
/// arrival order) taken inside the reconcile, not the runner's own limit:
/// at its limit kube-runtime's runner parks the leases that are due in a
/// hash set and takes whichever comes first in hash order, so in a
/// sustained burst a lease could wait for the whole burst (116 of 500 pods
/// waited 5 to 13 s for their first look while the others took 0.2 s). The
/// runner runs every due lease at once (one future per lease at most), and
/// each waits its turn.
const LEASE_CONCURRENCY: usize = 16;

/// First retry delay after a failure; doubles per consecutive failure.
const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Longest retry delay.
const BACKOFF_MAX: Duration = Duration::from_mins(5);

/// `BACKOFF_BASE * 2^failures`, capped, with "equal jitter" (half fixed,
/// half random) so many leases failing together (IAM throttling) spread out.
#[must_use]
pub fn backoff(failures: u32, jitter_seed: u32) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << failures.min(20)).min(BACKOFF_MAX);
    let half = exp / 2;
    let jitter = half.mul_f64(f64::from(jitter_seed % 1000) / 1000.0);
    half + jitter
}

fn error_policy(lease: Arc<IdentityLease>, error: &Error, ctx: Arc<LeaseContext>) -> Action {
    ctx.base.metrics.reconcile_failed(CONTROLLER, error);
    let key = ObjectRef::from_obj(&*lease);
    let failures = {
        let mut map = ctx.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = map.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let delay = backoff(failures - 1, seed);
    tracing::warn!(lease = %lease.name_any(), failures, ?delay, error = %error, "lease reconcile failed; backing off");
    if error.is_throttling() {
        let note = format!("{error}; retrying in {delay:?}");
        tokio::spawn(async move { publish(&ctx, &lease, EventType::Warning, "ThrottledRetry", note).await });
    }
    Action::requeue(delay)
}

/// Runs the lease controller and the orphan sweep until shutdown.
///
/// Memory is what limits how many leases one replica carries, so the
/// watches keep only what the reconciler reads: the lease cache drops
/// `managedFields` (about half of a lease's size, never read here), and pods
/// and Jobs are watched as metadata only (the reconciler reads the one pod or
/// Job it needs from the apiserver; the watches only say which lease to look
/// at).
pub async fn run(
    ctx: Arc<Context>,
    cloud: Cloud,
    writer: Writer<IdentityLease>,
    listed: tokio::sync::watch::Sender<bool>,
) {
    let client = ctx.client.clone();
    let synced = Synced::new(3);
    let leases = writer.as_reader();
    let lease_events = watcher(Api::<IdentityLease>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(|lease| lease.managed_fields_mut().clear())
        .inspect(synced.on_init_done("leases"))
        .reflect(writer)
        // After the reflector applied it: the cache holds the whole list.
        .inspect(move |event| {
            if matches!(event, Ok(watcher::Event::InitDone)) {
                listed.send_replace(true);
            }
        })
        .applied_objects()
        // The controller's own status writes do not wake it: each reconcile
        // asks for its next look itself. A new lease, its spec, its
        // finalizers and its deletion do.
        .predicate_filter(|l: &IdentityLease| Some(lease_changed(l)), kube::runtime::PredicateConfig::default());
    let by_job = leases.clone();
    let seen_pods: SeenPods = Arc::default();
    let seen = seen_pods.clone();
    let identity_writer = Writer::<WorkloadIdentity>::default();
    let lctx = Arc::new(LeaseContext {
        base: ctx.clone(),
        cloud,
        leases: leases.clone(),
        failures: std::sync::Mutex::default(),
        seen_pods,
        reaped: std::sync::Mutex::default(),
        ready: std::sync::Mutex::default(),
        revocations: std::sync::Mutex::default(),
        identities: identity_writer.as_reader(),
        turns: tokio::sync::Semaphore::new(LEASE_CONCURRENCY),
    });
    let sweep = tokio::spawn(sweep::sweep_forever(lctx.clone()));
    let (lane, revocations) = revoke::Lane::channel();
    let lane_task = revoke::Lane::start(lctx.clone(), revocations);
    // Whole pods (not only their metadata): the revocation lane decides
    // from the pod the watch delivers, without a read. Nothing keeps them.
    // Pages of 100: whole pods are listed on every (re)start, and the peak
    // of a page is what the relist costs in memory.
    let pods = watcher(Api::<Pod>::all(client.clone()), watcher::Config::default().labels(LABEL_LEASE).page_size(100))
        .default_backoff()
        .inspect(synced.on_init_done("pods"))
        .touched_objects();
    // Pod events are read by a task of their own, not by the controller's
    // runner: when every reconcile slot is busy (reaps waiting for IAM's
    // write budget), the runner stops reading its inputs, and the lane must
    // still see each end the moment it happens. The leases to look at go
    // to the controller through a channel.
    let (refs, pod_refs) = tokio::sync::mpsc::unbounded_channel::<ObjectRef<IdentityLease>>();
    let pod_events = tokio::spawn(read_pods(pods, leases.clone(), lctx.clone(), lane, seen, refs));
    let pod_refs = futures::stream::unfold(pod_refs, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let jobs = watcher(Api::<PartialObjectMeta<Job>>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .inspect(synced.on_init_done("Jobs"))
        .touched_objects();
    // A WorkloadIdentity's effective permissions (its status.policyDigest,
    // which follows its boundaries) reach the live roles made from it.
    // Kept in a store of its own, which the reconciles it triggers read: the
    // identity controller's store, another watch of the same objects, may
    // not have seen the change yet, and the lease would then never follow.
    let by_identity = leases.clone();
    let identities = watcher(Api::<WorkloadIdentity>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(identity_writer)
        .touched_objects();
    let stream = Controller::for_stream(lease_events, leases)
        .watches_stream(identities, move |identity| {
            let (ns, name) = (identity.namespace(), identity.name_any());
            let digest = identity.status.as_ref().and_then(|s| s.effective.as_ref()?.policy_digest.clone());
            by_identity
                .state()
                .iter()
                .filter(|l| l.namespace() == ns && l.spec.workload_identity == name)
                .filter(|l| l.status.as_ref().and_then(|s| s.policy_digest.clone()) != digest)
                .map(|l| ObjectRef::from_obj(&**l))
                .collect::<Vec<_>>()
        })
        // A pod's phase and deletion decide when its lease ends.
        .reconcile_on(pod_refs)
        // A Job's completion ends the lease its pods share.
        .watches_stream(jobs, move |job| {
            let uid = job.uid();
            by_job
                .state()
                .iter()
                .filter(|l| l.spec.holder.kind == HolderKind::Job && l.spec.holder.uid == uid)
                .map(|l| ObjectRef::from_obj(&**l))
                .collect::<Vec<_>>()
        })
        // Unbounded here: `LeaseContext::turns` bounds the work, in order.
        .with_config(kube::runtime::controller::Config::default().concurrency(0))
        .graceful_shutdown_on(ctx.stop.stopped())
        .run(reconcile, error_policy, lctx);
    drain(CONTROLLER, stream).await;
    sweep.abort();
    pod_events.abort();
    lane_task.abort();
}

/// Reads the pod watch: notes each pod seen, offers ended workloads to the
/// revocation lane at once, and sends the leases with something to do to
/// the controller.
async fn read_pods(
    pods: impl futures::Stream<Item = Result<Pod, watcher::Error>>,
    leases: Store<IdentityLease>,
    ctx: Arc<LeaseContext>,
    lane: revoke::Lane,
    seen: SeenPods,
    refs: tokio::sync::mpsc::UnboundedSender<ObjectRef<IdentityLease>>,
) {
    let mut pods = std::pin::pin!(pods);
    while let Some(event) = pods.next().await {
        let pod = match event {
            Ok(pod) => pod,
            Err(e) => {
                tracing::debug!(error = %e, "pod watch failed; retrying");
                continue;
            }
        };
        let (Some(ns), Some(lease)) = (pod.namespace(), pod.labels().get(LABEL_LEASE).cloned()) else { continue };
        let version = pod.resource_version().unwrap_or_default();
        let first = seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert((ns.clone(), lease.clone()), version)
            .is_none();
        lane.offer(&leases, &ctx, &pod);
        if first {
            // A lease still waiting for a pod of this name (its create was
            // refused after the webhook ran) ends now that the name went
            // to another lease: wake it.
            for other in leases.state().iter().filter(|l| waits_for_name_of(l, &pod, &lease)) {
                if refs.send(ObjectRef::from_obj(&**other)).is_err() {
                    return;
                }
            }
        }
        let key = ObjectRef::new(&lease).within(&ns);
        if !leases.get(&key).is_some_and(|l| nothing_to_do(&l, &pod, Timestamp::now())) && refs.send(key).is_err() {
            return;
        }
    }
}

/// Whether a pod's event leaves its lease with nothing to do: the lease is
/// Ready for this very pod, which runs, ungated. (A pod's scheduling and
/// status reports would otherwise each cost a reconcile; its end, its
/// replacement, its deletion and a gated pod of a Job run do not pass.)
fn nothing_to_do(lease: &IdentityLease, pod: &Pod, now: Timestamp) -> bool {
    let ready = lease.status.as_ref().is_some_and(|s| s.phase == Some(LeasePhase::Ready));
    let gated = pod.spec.as_ref().and_then(|s| s.scheduling_gates.as_ref()).is_some_and(|g| !g.is_empty());
    ready
        && lease.spec.holder.kind == HolderKind::Pod
        && lease.spec.holder.uid.is_some()
        && lease.spec.holder.uid == pod.uid()
        && lease.meta().deletion_timestamp.is_none()
        && pod.meta().deletion_timestamp.is_none()
        && !gated
        && pod_ended(pod, now).is_none()
}

/// Whether `lease` (not `pods_lease`, the pod's own) is a pod's lease that
/// no pod was bound to yet and whose holder has `pod`'s name.
fn waits_for_name_of(lease: &IdentityLease, pod: &Pod, pods_lease: &str) -> bool {
    lease.spec.holder.kind == HolderKind::Pod
        && lease.spec.holder.uid.is_none()
        && lease.spec.holder.name == pod.name_any()
        && lease.namespace() == pod.namespace()
        && lease.name_any() != pods_lease
}

/// What of a lease asks for a reconcile: not its status (the controller's
/// own writes), nor its annotations, nor the pod uid the controller records
/// in its spec while provisioning it (that reconcile goes on with it; a
/// second one would only read the pod again).
fn lease_changed(lease: &IdentityLease) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let meta = lease.meta();
    let mut spec = lease.spec.clone();
    spec.holder.uid = None;
    let spec = serde_json::to_vec(&spec).unwrap_or_default();
    (&meta.uid, spec, &meta.deletion_timestamp.as_ref().map(|t| t.0), &meta.finalizers).hash(&mut hasher);
    hasher.finish()
}

/// Logs once when every watch of the lease controller has listed what
/// exists (operators and tests wait for that line: from then on a pod
/// deleted is a pod this process saw).
#[derive(Clone)]
struct Synced {
    pending: Arc<std::sync::atomic::AtomicUsize>,
}

impl Synced {
    fn new(watches: usize) -> Self {
        Self { pending: Arc::new(std::sync::atomic::AtomicUsize::new(watches)) }
    }

    fn on_init_done<K>(&self, what: &'static str) -> impl FnMut(&Result<watcher::Event<K>, watcher::Error>) + use<K> {
        let pending = self.pending.clone();
        let mut done = false;
        move |event| {
            if done || !matches!(event, Ok(watcher::Event::InitDone)) {
                return;
            }
            done = true;
            tracing::debug!(watch = what, "initial list done");
            if pending.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
                tracing::info!("lease controller watches synced");
            }
        }
    }
}

/// Waits for the lease's turn (see [`LEASE_CONCURRENCY`]), then reconciles.
/// A controller told to stop gives up the wait: the next leader looks.
async fn reconcile(lease: Arc<IdentityLease>, ctx: Arc<LeaseContext>) -> Result<Action> {
    let turn = tokio::select! {
        turn = ctx.turns.acquire() => turn.map_err(|e| Error::Unexpected(format!("reconcile turns: {e}")))?,
        () = ctx.base.stop.stopped() => return Ok(Action::await_change()),
    };
    // The lease as the cache has it now, not as it was when it began to
    // wait (it may have been deleted, or reaped and gone, meanwhile).
    let Some(lease) = ctx.leases.get(&ObjectRef::from_obj(&*lease)) else { return Ok(Action::await_change()) };
    // Boxed: a lease waiting for its turn holds a small future, not the
    // whole reconcile's state.
    let done = Box::pin(reconcile_now(lease, ctx.clone())).await;
    drop(turn);
    done
}

async fn reconcile_now(lease: Arc<IdentityLease>, ctx: Arc<LeaseContext>) -> Result<Action> {
    let _timer = ctx.base.metrics.reconcile_started(CONTROLLER);
    let namespace = lease.namespace().unwrap_or_default();
    let api = Api::<IdentityLease>::namespaced(ctx.base.client.clone(), &namespace);
    let key = ObjectRef::from_obj(&*lease);
    let result = finalizer(&api, FINALIZER_REAPER, lease, |event| async {
        match event {
            Finalizer::Apply(lease) => provision::apply(&lease, &ctx).await,
            Finalizer::Cleanup(lease) => reap::reap(&lease, &ctx).await,
        }
    })
    .await
    .or_else(|e| match e {
        // Reaped, and gone already (this was a stale second look).
        kube::runtime::finalizer::Error::RemoveFinalizer(kube::Error::Api(s)) if s.code == 404 => {
            Ok(Action::await_change())
        }
        kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e) => Err(e),
        other => Err(Error::Unexpected(format!("finalizer {FINALIZER_REAPER}: {other}"))),
    });
    if result.is_ok() {
        ctx.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&key);
    }
    result
}

/// Reads `name` from the apiserver's watch cache (no etcd round trip: in a
/// burst the quorum read of a pod took 20 to 30 ms, most of it waiting for
/// etcd) and keeps what it found when `trusted` says so; otherwise (not in
/// the cache, or not what `trusted` wants) reads it again from etcd. A
/// cached object may be behind (another apiserver's cache, a moment's lag):
/// `trusted` accepts only what a stale copy cannot make wrong (a
/// ServiceAccount owned by the lease: were it gone since, the token request
/// fails and the lease is looked at again); absence or someone else's
/// object is never taken from a cache.
pub(super) async fn read_trusting_cache_if<K>(
    api: &Api<K>,
    name: &str,
    trusted: impl Fn(&K) -> bool,
) -> kube::Result<Option<K>>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.get_with(name, &kube::api::GetParams::any()).await {
        Ok(cached) if trusted(&cached) => return Ok(Some(cached)),
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e),
    }
    api.get_opt(name).await
}

/// Reads `name` at least as new as `version` (the last one this process's
/// watch delivered), from the apiserver's watch cache: as good as a quorum
/// read for deciding on it (any later change is another watch event and
/// another look), without the etcd round trip. A cache that cannot catch up
/// (another apiserver, far behind) answers with an error: then from etcd.
async fn read_not_older_than<K>(api: &Api<K>, name: &str, version: Option<&str>) -> kube::Result<Option<K>>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    if let Some(version) = version.filter(|v| !v.is_empty()) {
        match api.get_with(name, &kube::api::GetParams::at(version)).await {
            Ok(found) => return Ok(Some(found)),
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(None),
            Err(e) => {
                tracing::debug!(error = %e, "the watch cache could not answer at the version seen; reading from etcd");
            }
        }
    }
    api.get_opt(name).await
}

/// The lease's pod or Job as the apiserver has it now (`None`: not there).
/// Read once per reconcile and passed on: deciding the end, binding the uid
/// and lifting the gate all look at the same object.
enum Holder {
    Pod(Option<Box<Pod>>),
    Job(Option<Box<Job>>),
}

impl Holder {
    /// `seen`: the version of the lease's pod this process's watch last
    /// delivered, if it did (the read is then at least as new).
    async fn read(lease: &IdentityLease, client: &Client, seen: Option<&str>) -> Result<Self> {
        let namespace = lease.namespace().unwrap_or_default();
        let name = &lease.spec.holder.name;
        Ok(match lease.spec.holder.kind {
            HolderKind::Pod => Self::Pod(
                read_not_older_than(&Api::<Pod>::namespaced(client.clone(), &namespace), name, seen)
                    .await
                    .map_err(Error::kube(format!("reading pod {namespace}/{name}")))?
                    .map(Box::new),
            ),
            HolderKind::Job => Self::Job(
                Api::<Job>::namespaced(client.clone(), &namespace)
                    .get_opt(name)
                    .await
                    .map_err(Error::kube(format!("reading Job {namespace}/{name}")))?
                    .map(Box::new),
            ),
        })
    }

    /// The lease's own pod: there, and labelled with this lease.
    fn pod_of(&self, lease: &IdentityLease) -> Option<&Pod> {
        match self {
            Self::Pod(Some(pod)) if pod.labels().get(LABEL_LEASE) == Some(&lease.name_any()) => Some(pod),
            _ => None,
        }
    }
}

/// The IAM role name a lease may act on, derived from the lease's own
/// identity and checked against what its spec says: the ServiceAccount must
/// be the lease's own (named as the lease), and `spec.roleArn` must be in
/// this account and carry the name this cluster, namespace and lease
/// derive. The webhook writes exactly that; anything else was written by
/// someone else and is refused (`Err` says which field disagrees).
///
/// # Errors
/// The refusal, naming the field.
pub fn trusted_role(lease: &IdentityLease, cluster: &str, account: &str) -> std::result::Result<String, String> {
    let namespace = lease.namespace().unwrap_or_default();
    let name = lease.name_any();
    if lease.spec.service_account != name {
        return Err(format!(
            "spec.serviceAccount {:?} is not this lease's own ServiceAccount ({name:?})",
            lease.spec.service_account
        ));
    }
    let Some(arn) = lease.spec.role_arn.as_deref() else {
        return Err("spec.roleArn is missing".into());
    };
    let (_, role) =
        naming::split_role_arn(arn).ok_or_else(|| format!("spec.roleArn {arn:?} is not an IAM role ARN"))?;
    if arn.split(':').nth(4) != Some(account) {
        return Err(format!("spec.roleArn {arn:?} is not in this cluster's AWS account ({account})"));
    }
    if !naming::is_role_of(&role, cluster, &namespace, &name) {
        return Err(format!(
            "spec.roleArn {arn:?} does not name the role of IdentityLease {namespace}/{name} in cluster {cluster:?}"
        ));
    }
    Ok(role)
}

/// The owner a lease's role must be tagged with.
fn role_owner(lease: &IdentityLease, ctx: &LeaseContext) -> RoleOwner {
    RoleOwner {
        cluster: ctx.cloud.cluster.clone(),
        issuer: Some(ctx.cloud.issuer_host.clone()),
        namespace: lease.namespace().unwrap_or_default(),
        lease: lease.name_any(),
        lease_uid: lease.uid(),
    }
}

/// Refuses a lease ephemera's webhook did not write: a condition and one
/// Event (not one per look), and nothing else is touched.
async fn refuse(lease: &IdentityLease, ctx: &LeaseContext, why: String) -> Result<Action> {
    let already = lease
        .status
        .as_ref()
        .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == cond::READY && c.reason == "Refused"));
    if !already {
        let error = Error::LeaseRefused(why.clone());
        write_status(lease, ctx, LeasePhase::Pending, None, Some(&error), "not provisioned", None).await?;
        publish(ctx, lease, EventType::Warning, "LeaseRefused", format!("{why}; nothing is provisioned")).await;
        tracing::warn!(namespace = lease.namespace(), lease = %lease.name_any(), why, "lease refused");
    }
    Ok(Action::await_change())
}

/// Whether `object` names `lease` (by uid) among its owners.
fn owned_by<K: Resource>(object: &K, lease: &IdentityLease) -> bool {
    let uid = lease.uid().unwrap_or_default();
    !uid.is_empty() && object.owner_references().iter().any(|o| o.kind == "IdentityLease" && o.uid == uid)
}

fn owner_ref(lease: &IdentityLease) -> OwnerReference {
    OwnerReference {
        api_version: "ephemera.dev/v1alpha1".into(),
        kind: "IdentityLease".into(),
        name: lease.name_any(),
        uid: lease.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: None,
    }
}

/// The role provisioning made, as the Ready status records it.
pub(super) struct Made {
    pub role_arn: String,
    /// Its revocation set (its permissions boundary), if it has one.
    pub revocation_set: Option<String>,
    /// The digest of the policy it was made from.
    pub policy_digest: String,
}

async fn write_status(
    lease: &IdentityLease,
    ctx: &LeaseContext,
    phase: LeasePhase,
    made: Option<&Made>,
    error: Option<&Error>,
    message: &str,
    digest: Option<&str>,
) -> Result<IdentityLease> {
    let previous = lease.status.clone().unwrap_or_default();
    let ready = phase == LeasePhase::Ready;
    let reason = match (phase, error) {
        // The errors a user acts on name themselves; the rest say the phase.
        (_, Some(e)) if e.reason() != "Error" => e.reason(),
        (LeasePhase::Pending, _) => "Pending",
        (LeasePhase::Provisioning, _) => "Provisioning",
        (LeasePhase::Ready, _) => "Verified",
        (LeasePhase::Reaping, _) => "Reaping",
    };
    let message = match error {
        Some(e) => format!("{message}: {e}"),
        None => message.to_owned(),
    };
    let status = IdentityLeaseStatus {
        phase: Some(phase),
        role_arn: made.map(|m| m.role_arn.clone()).or(previous.role_arn.clone()),
        revocation_set: match made {
            Some(m) => m.revocation_set.clone(),
            None => previous.revocation_set.clone(),
        },
        issued_at: if ready && previous.phase != Some(LeasePhase::Ready) {
            Some(Time(Timestamp::now()))
        } else {
            previous.issued_at.clone()
        },
        revoked_at: if phase == LeasePhase::Reaping { Some(Time(Timestamp::now())) } else { None },
        last_error: error.map(ToString::to_string),
        policy_digest: digest.map(str::to_owned).or(previous.policy_digest.clone()),
        observed_generation: lease.meta().generation,
        conditions: with_condition(
            &previous.conditions,
            condition(&previous.conditions, cond::READY, ready, reason, message, lease.meta().generation),
        ),
    };
    apply_status(lease, ctx, &status).await
}

/// `conditions` with `new` in place of the one of its type (the others kept).
fn with_condition(conditions: &[Condition], new: Condition) -> Vec<Condition> {
    let mut all: Vec<Condition> = conditions.iter().filter(|c| c.type_ != new.type_).cloned().collect();
    all.push(new);
    all.sort_by(|a, b| (a.type_ != cond::READY, &a.type_).cmp(&(b.type_ != cond::READY, &b.type_)));
    all
}

/// Sets one condition of the lease's status, the rest as it was.
async fn set_condition(lease: &IdentityLease, ctx: &LeaseContext, new: Condition) -> Result<IdentityLease> {
    let mut status = lease.status.clone().unwrap_or_default();
    status.conditions = with_condition(&status.conditions, new);
    apply_status(lease, ctx, &status).await
}

async fn apply_status(
    lease: &IdentityLease,
    ctx: &LeaseContext,
    status: &IdentityLeaseStatus,
) -> Result<IdentityLease> {
    Api::<IdentityLease>::namespaced(ctx.base.client.clone(), &lease.namespace().unwrap_or_default())
        .patch_status(
            &lease.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(json!({"apiVersion": "ephemera.dev/v1alpha1", "kind": "IdentityLease", "status": status})),
        )
        .await
        .map_err(Error::kube(format!("writing the status of IdentityLease {}", lease.name_any())))
}

async fn publish(ctx: &LeaseContext, lease: &IdentityLease, type_: EventType, reason: &str, note: String) {
    let ev = Event { type_, reason: reason.into(), note: Some(note), action: "Lifecycle".into(), secondary: None };
    ctx.base.events.publish(&ev, &lease.object_ref(&())).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_a_lease_derives_from_its_own_identity_is_trusted() {
        let role = naming::role_name("ephemera", "c", "team-a", "report-x7k2p");
        let lease = |sa: &str, arn: &str| -> IdentityLease {
            serde_json::from_value(json!({
                "apiVersion": "ephemera.dev/v1alpha1", "kind": "IdentityLease",
                "metadata": {"name": "report-x7k2p", "namespace": "team-a"},
                "spec": {"holder": {"kind": "Pod", "name": "p"}, "workloadIdentity": "report",
                         "serviceAccount": sa, "roleArn": arn, "expiresAt": "2026-11-24T10:00:00Z"},
            }))
            .unwrap()
        };
        let own = format!("arn:aws:iam::111:role/ephemera/{role}");
        assert_eq!(trusted_role(&lease("report-x7k2p", &own), "c", "111"), Ok(role.clone()));
        // Any prefix and path a boundary chose; 0.1's names too.
        let other_prefix = naming::role_name("team-roles", "c", "team-a", "report-x7k2p");
        assert!(
            trusted_role(&lease("report-x7k2p", &format!("arn:aws:iam::111:role/x/{other_prefix}")), "c", "111")
                .is_ok()
        );
        assert!(
            trusted_role(
                &lease("report-x7k2p", "arn:aws:iam::111:role/ephemera/ephemera-team-a-report-x7k2p"),
                "c",
                "111"
            )
            .is_ok()
        );

        let refused = |sa: &str, arn: &str| trusted_role(&lease(sa, arn), "c", "111").unwrap_err();
        assert!(refused("default", &own).contains("spec.serviceAccount"), "another ServiceAccount");
        let victim = naming::role_name("ephemera", "c", "team-b", "report-x7k2p");
        assert!(refused("report-x7k2p", &format!("arn:aws:iam::111:role/ephemera/{victim}")).contains("spec.roleArn"));
        let other_cluster = naming::role_name("ephemera", "c2", "team-a", "report-x7k2p");
        assert!(
            refused("report-x7k2p", &format!("arn:aws:iam::111:role/ephemera/{other_cluster}"))
                .contains("spec.roleArn")
        );
        assert!(refused("report-x7k2p", &format!("arn:aws:iam::222:role/ephemera/{role}")).contains("account"));
        assert!(refused("report-x7k2p", "arn:aws:iam::111:role/ephemera/admin").contains("spec.roleArn"));
        assert!(refused("report-x7k2p", "not an arn").contains("spec.roleArn"));
    }

    #[test]
    fn only_what_the_controller_acts_on_wakes_it() {
        let lease: IdentityLease = serde_json::from_value(json!({
            "apiVersion": "ephemera.dev/v1alpha1", "kind": "IdentityLease",
            "metadata": {"name": "l", "namespace": "n", "uid": "lu", "generation": 2},
            "spec": {"holder": {"kind": "Pod", "name": "p", "uid": "pu"}, "workloadIdentity": "w",
                     "serviceAccount": "l", "expiresAt": "2099-01-01T00:00:00Z"},
            "status": {"phase": "Ready"},
        }))
        .unwrap();
        // Its own status writes do not wake the controller...
        let mut written = lease.clone();
        written.status.as_mut().unwrap().policy_digest = Some("d".into());
        assert_eq!(lease_changed(&lease), lease_changed(&written));
        // ...nor the pod uid it records while provisioning...
        let mut unbound = lease.clone();
        unbound.spec.holder.uid = None;
        unbound.metadata.generation = Some(1);
        assert_eq!(lease_changed(&lease), lease_changed(&unbound));
        // ...its spec, finalizers and deletion do.
        for change in [
            json!({"spec": {"roleArn": "arn:aws:iam::111:role/ephemera/other"}}),
            json!({"spec": {"holder": {"name": "q"}}}),
            json!({"metadata": {"finalizers": [FINALIZER_REAPER]}}),
            json!({"metadata": {"deletionTimestamp": "2026-11-23T10:00:00Z"}}),
            json!({"metadata": {"uid": "another"}}),
        ] {
            let mut changed = serde_json::to_value(&lease).unwrap();
            json_patch::merge(&mut changed, &change);
            let changed: IdentityLease = serde_json::from_value(changed).unwrap();
            assert_ne!(lease_changed(&lease), lease_changed(&changed), "{change}");
        }

        let pod = |status: serde_json::Value, gated: bool| -> Pod {
            let gates = if gated { json!([{"name": "ephemera.dev/identity-ready"}]) } else { json!(null) };
            serde_json::from_value(json!({
                "metadata": {"name": "p", "namespace": "n", "uid": "pu"},
                "spec": {"containers": [], "schedulingGates": gates},
                "status": status,
            }))
            .unwrap()
        };
        let now: Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();
        let running = json!({"phase": "Running"});
        assert!(nothing_to_do(&lease, &pod(running.clone(), false), now), "a Ready lease's running pod");
        assert!(!nothing_to_do(&lease, &pod(running.clone(), true), now), "a gated pod (a Job run's next)");
        assert!(!nothing_to_do(&lease, &pod(json!({"phase": "Succeeded"}), false), now), "the workload's end");
        let mut other = pod(running.clone(), false);
        other.metadata.uid = Some("another".into());
        assert!(!nothing_to_do(&lease, &other, now), "a pod of that name made again");
        // A lease no pod was bound to, of the same pod name: woken by the
        // pod of another lease (it ends), not by its own.
        let mut waiting = lease.clone();
        waiting.spec.holder.uid = None;
        assert!(waits_for_name_of(&waiting, &pod(running.clone(), false), "another-lease"));
        assert!(!waits_for_name_of(&waiting, &pod(running.clone(), false), "l"), "its own pod");
        assert!(!waits_for_name_of(&lease, &pod(running.clone(), false), "another-lease"), "bound to a pod");
        let mut provisioning = lease.clone();
        provisioning.status.as_mut().unwrap().phase = Some(LeasePhase::Provisioning);
        assert!(!nothing_to_do(&provisioning, &pod(running, false), now), "not Ready yet");
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        for (failures, low, high) in [(0, 250, 500), (1, 500, 1000), (3, 2000, 4000)] {
            for seed in [0, 499, 999] {
                let d = backoff(failures, seed).as_millis();
                assert!((low..=high).contains(&d), "failures {failures} seed {seed}: {d} ms");
            }
        }
        assert!(backoff(40, 999) <= BACKOFF_MAX);
        assert!(backoff(40, 0) >= BACKOFF_MAX / 2);
        assert_ne!(backoff(2, 100), backoff(2, 900), "jitter spreads retries");
    }
}
