//! The lease controller: provisions each `IdentityLease`'s IAM role and RBAC,
//! proves the role usable, lifts the pod's scheduling gate, and reaps it all
//! the moment the workload ends.
//!
//! Reaping is deletion: when the workload is over the controller deletes the
//! lease, and the `ephemera.dev/reaper` finalizer revokes live sessions and
//! deletes the role, the Role and RoleBinding and the ServiceAccount before
//! the lease may go. A crash anywhere leaves the finalizer in place, so the
//! next leader finishes the job; every step is idempotent.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::{
    api::{
        authentication::v1::{TokenRequest, TokenRequestSpec},
        batch::v1::Job,
        core::v1::{Pod, ServiceAccount},
        rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, PartialObjectMeta, Patch, PatchParams, PostParams},
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

use super::{
    Context, RESYNC, condition, drain,
    workload_identity::{evaluate, namespace_and_boundaries},
};
use crate::{
    Error, Result,
    api::{
        HolderKind, IdentityBoundary, IdentityLease, IdentityLeaseStatus, LeasePhase, WorkloadIdentity,
        well_known::{
            FIELD_MANAGER, FINALIZER_REAPER, LABEL_LEASE, LABEL_MANAGED_BY, MANAGED_BY, SCHEDULING_GATE,
            condition as cond,
        },
    },
    cloud::{
        aws::{self, AwsProvider, Reaped, RoleOwner, RoleSpec, Verdict},
        naming,
    },
};

const CONTROLLER: &str = "lease";
/// A lease whose pod (or Job) never showed up is reaped after this: the
/// create was refused by a later admission step, after our webhook ran.
pub const HOLDER_GRACE: Duration = Duration::from_mins(2);
/// How often a role that is not assumable yet (IAM propagation) is retried.
const VERIFY_RETRY: Duration = Duration::from_millis(500);
/// How often the sweep looks for roles without a lease.
const SWEEP_EVERY: Duration = Duration::from_mins(5);
/// Annotation recording why and when the controller decided to reap.
const ANNOTATION_REAP: &str = "ephemera.dev/reap";

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
}

type SeenPods = Arc<std::sync::Mutex<std::collections::HashSet<(String, String)>>>;

/// Leases reconciled at once. Unbounded, a burst of pods queues every call
/// at the cloud endpoint and all of them finish late; bounded, they finish
/// in arrival order at the same throughput (IAM answers calls one account at
/// a time anyway).
const LEASE_CONCURRENCY: u16 = 16;

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
        .applied_objects();
    let by_job = leases.clone();
    let seen_pods: SeenPods = Arc::default();
    let seen = seen_pods.clone();
    let lctx = Arc::new(LeaseContext {
        base: ctx.clone(),
        cloud,
        leases: leases.clone(),
        failures: std::sync::Mutex::default(),
        seen_pods,
        reaped: std::sync::Mutex::default(),
        ready: std::sync::Mutex::default(),
    });
    let sweep = tokio::spawn(sweep_forever(lctx.clone()));
    let pods =
        watcher(Api::<PartialObjectMeta<Pod>>::all(client.clone()), watcher::Config::default().labels(LABEL_LEASE))
            .default_backoff()
            .inspect(synced.on_init_done("pods"))
            .touched_objects();
    let jobs = watcher(Api::<PartialObjectMeta<Job>>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .inspect(synced.on_init_done("Jobs"))
        .touched_objects();
    // A WorkloadIdentity's effective permissions (its status.policyDigest,
    // which follows its boundaries) reach the live roles made from it.
    let by_identity = leases.clone();
    let identities = watcher(Api::<WorkloadIdentity>::all(client.clone()), watcher::Config::default())
        .default_backoff()
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
        .watches_stream(pods, move |pod| {
            let ns = pod.namespace()?;
            let lease = pod.labels().get(LABEL_LEASE)?;
            seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert((ns.clone(), lease.clone()));
            Some(ObjectRef::new(lease).within(&ns))
        })
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
        .with_config(kube::runtime::controller::Config::default().concurrency(LEASE_CONCURRENCY))
        .graceful_shutdown_on(ctx.stop.stopped())
        .run(reconcile, error_policy, lctx);
    drain(CONTROLLER, stream).await;
    sweep.abort();
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

async fn reconcile(lease: Arc<IdentityLease>, ctx: Arc<LeaseContext>) -> Result<Action> {
    let _timer = ctx.base.metrics.reconcile_started(CONTROLLER);
    let namespace = lease.namespace().unwrap_or_default();
    let api = Api::<IdentityLease>::namespaced(ctx.base.client.clone(), &namespace);
    let key = ObjectRef::from_obj(&*lease);
    let result = finalizer(&api, FINALIZER_REAPER, lease, |event| async {
        match event {
            Finalizer::Apply(lease) => apply(&lease, &ctx).await,
            Finalizer::Cleanup(lease) => reap(&lease, &ctx).await,
        }
    })
    .await
    .or_else(|e| match e {
        // Reaped, and gone already (this was a stale second look).
        kube::runtime::finalizer::Error::RemoveFinalizer(kube::Error::Api(s)) if s.code == 404 => {
            Ok(Action::await_change())
        }
        kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e) => Err(e),
        other => Err(Error::Config(format!("finalizer {FINALIZER_REAPER}: {other}"))),
    });
    if result.is_ok() {
        ctx.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&key);
    }
    result
}

/// The lease's pod or Job as the apiserver has it now (`None`: not there).
/// Read once per reconcile and passed on: deciding the end, binding the uid
/// and lifting the gate all look at the same object.
enum Holder {
    Pod(Option<Box<Pod>>),
    Job(Option<Box<Job>>),
}

impl Holder {
    async fn read(lease: &IdentityLease, client: &Client) -> Result<Self> {
        let namespace = lease.namespace().unwrap_or_default();
        let name = &lease.spec.holder.name;
        Ok(match lease.spec.holder.kind {
            HolderKind::Pod => Self::Pod(
                Api::<Pod>::namespaced(client.clone(), &namespace)
                    .get_opt(name)
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

/// Why a lease ends now, if it does.
/// `identity` is the lease's `WorkloadIdentity` if it still exists; `seen`
/// whether this process's pod watch has seen the lease's pod.
fn end_reason(
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
            .or_else(|| pod_ended(pod).map(|how| format!("pod {} {how}", spec.name))),
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
fn not_its_pod(lease: &IdentityLease, pod: &Pod) -> Option<String> {
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

/// How a pod's workload ended, if it did: `is being deleted`, `succeeded`
/// or `failed`. Shared with `ephemera inventory`.
#[must_use]
pub fn pod_ended(pod: &Pod) -> Option<&'static str> {
    if pod.meta().deletion_timestamp.is_some() {
        return Some("is being deleted");
    }
    match pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Succeeded") => Some("succeeded"),
        Some("Failed") => Some("failed"),
        _ => None,
    }
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

/// The lease's ServiceAccount must be the one the webhook made for it
/// (owned by the lease's uid): someone else's of that name is never bound
/// to or deleted. `Some`: what to do instead of provisioning.
async fn check_service_account(lease: &IdentityLease, ctx: &LeaseContext) -> Result<Option<Action>> {
    let namespace = lease.namespace().unwrap_or_default();
    let found = Api::<ServiceAccount>::namespaced(ctx.base.client.clone(), &namespace)
        .get_opt(&lease.spec.service_account)
        .await
        .map_err(Error::kube(format!("reading ServiceAccount {namespace}/{}", lease.spec.service_account)))?;
    match found {
        Some(sa) if owned_by(&sa, lease) => Ok(None),
        Some(_) => {
            let why = format!(
                "ServiceAccount {namespace}/{} is not owned by this lease: it was not made for it",
                lease.spec.service_account
            );
            refuse(lease, ctx, why).await.map(Some)
        }
        // The webhook makes it right after the lease: look again shortly.
        None => Ok(Some(Action::requeue(VERIFY_RETRY))),
    }
}

async fn apply(lease: &IdentityLease, ctx: &LeaseContext) -> Result<Action> {
    let client = &ctx.base.client;
    let namespace = lease.namespace().unwrap_or_default();
    let name = lease.name_any();
    let now = Timestamp::now();

    let seen = ctx
        .seen_pods
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .contains(&(namespace.clone(), name.clone()));
    let cached = ctx.base.identities.get(&ObjectRef::new(&lease.spec.workload_identity).within(&namespace));
    let identity = match cached {
        Some(identity) => Some(WorkloadIdentity::clone(&identity)),
        // Not cached (yet): the apiserver decides whether it exists.
        None => Api::<WorkloadIdentity>::namespaced(client.clone(), &namespace)
            .get_opt(&lease.spec.workload_identity)
            .await
            .map_err(Error::kube(format!("reading WorkloadIdentity {namespace}/{}", lease.spec.workload_identity)))?,
    };
    let holder = Holder::read(lease, client).await?;
    if let Some(reason) = end_reason(lease, identity.as_ref(), &holder, now, seen) {
        // (A refused lease goes too, and its reap touches nothing it names.)
        return start_reaping(lease, ctx, &reason, workload_ended_at(lease, &holder, now)).await;
    }
    let role_name = match trusted_role(lease, &ctx.cloud.cluster, &ctx.cloud.account) {
        Ok(role) => role,
        Err(why) => return refuse(lease, ctx, why).await,
    };
    let Some(identity) = identity else { return Ok(Action::await_change()) };
    let uid_bound = bind_holder_uid(lease, client, &holder).await?;

    let status = lease.status.clone().unwrap_or_default();
    let made_ready = || {
        lease
            .uid()
            .is_some_and(|uid| ctx.ready.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains(&uid))
    };
    if status.phase == Some(LeasePhase::Ready) || made_ready() {
        // Pods of a Job may arrive after the first one: lift their gates too.
        lift_gates(lease, ctx, uid_bound, &holder).await?;
        if status.phase == Some(LeasePhase::Ready) && status.policy_digest.as_deref() != digest_of(&identity) {
            follow_policy(lease, ctx, &identity, &role_name).await?;
        }
        return Ok(Action::requeue(next_look(lease, now)));
    }

    // No "Provisioning" write on the way: a lease whose role is made and
    // proven in one pass goes from Pending to Ready (one status write, one
    // reconcile fewer per pod); Provisioning shows while something waits.
    let role_arn = lease.spec.role_arn.clone().unwrap_or_default(); // checked by `trusted_role`
    if let Some(wait) = check_service_account(lease, ctx).await? {
        return Ok(wait);
    }
    let (spec, rules) = match role_spec(lease, &identity, &role_arn, &role_name, ctx).await {
        Ok(found) => found,
        Err(e) => {
            write_status(lease, ctx, LeasePhase::Provisioning, None, Some(&e), "cannot provision", None).await?;
            return Err(e);
        }
    };
    // A replica that no longer leads makes nothing (see `Fence`).
    if let Some(fence) = &ctx.base.fence {
        fence.check().await?;
    }
    make_role(lease, ctx, &spec, &identity).await?;
    // The role exists now. Every way out of here either confirms the lease
    // was still live after the role was made (the Ready status write answers
    // with the lease) or asks the apiserver; a lease gone or being deleted
    // by then was reaped while the role was being made (by another replica,
    // while this one was frozen past its leadership), and its role would
    // otherwise wait for the sweep.
    let outcome = prove_and_lift(lease, ctx, &identity, &role_arn, &rules, uid_bound, &holder).await;
    let live = match &outcome {
        Ok(Proven::Ready { deleting }) => !deleting,
        // Cannot tell (apiserver unreachable): keep the role, report the
        // original outcome; the lease is looked at again (or swept).
        Ok(Proven::Waiting) | Err(_) => still_live(lease, ctx).await.unwrap_or(true),
    };
    if !live {
        ctx.cloud.provider.revoke_and_delete(&spec.name, &spec.owner).await?;
        tracing::warn!(
            namespace,
            lease = name,
            role = spec.name,
            "the lease was reaped while its role was being made; role deleted"
        );
        return Ok(Action::await_change());
    }
    match outcome? {
        Proven::Waiting => Ok(Action::requeue(VERIFY_RETRY)),
        Proven::Ready { .. } => {
            if let Some(uid) = lease.uid() {
                ctx.ready.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(uid);
            }
            // From the pod's creation, as the user sees it (the lease's, made in
            // the same admission call, for a Job run), to the gate lifted.
            let pod_created = holder.pod_of(lease).and_then(|p| p.meta().creation_timestamp.clone());
            if let Some(created) = pod_created.or_else(|| lease.meta().creation_timestamp.clone()) {
                let took = Timestamp::now().duration_since(created.0).as_secs_f64().max(0.0);
                ctx.base.metrics.provision_latency.observe(took);
            }
            publish(
                ctx,
                lease,
                EventType::Normal,
                "Ready",
                format!("role {role_arn} verified; scheduling gate lifted"),
            )
            .await;
            tracing::info!(namespace, lease = name, role = role_arn, "lease ready");
            Ok(Action::requeue(next_look(lease, now)))
        }
    }
}

/// How far [`prove_and_lift`] got.
enum Proven {
    /// STS accepts the pod's token: gates lifted, Ready written; whether the
    /// lease, as that write returned it, is being deleted.
    Ready { deleting: bool },
    /// STS does not accept the role yet (IAM propagation): look again soon.
    Waiting,
}

/// With the role made: RBAC, then Ready only once STS really accepts a
/// token of the pod's account; then the gates go.
async fn prove_and_lift(
    lease: &IdentityLease,
    ctx: &LeaseContext,
    identity: &WorkloadIdentity,
    role_arn: &str,
    rules: &[crate::api::KubernetesRule],
    uid_bound: bool,
    holder: &Holder,
) -> Result<Proven> {
    let client = &ctx.base.client;
    let namespace = lease.namespace().unwrap_or_default();
    ensure_rbac(lease, client, rules).await?;
    let token = token_for(client, &namespace, &lease.spec.service_account, &identity.spec.token.audience).await?;
    let session = naming::session_name(&namespace, &format!("ephemera-verify-{}", lease.name_any()));
    if let Verdict::Refused { code, message } = ctx.cloud.provider.verify(role_arn, &session, &token).await? {
        if let Some(e) = refusal_error(lease, &ctx.cloud, identity, &code, &message) {
            write_status(lease, ctx, LeasePhase::Provisioning, None, Some(&e), "role made; STS refuses it", None)
                .await?;
            publish(ctx, lease, EventType::Warning, e.reason(), e.to_string()).await;
            return Err(e);
        }
        tracing::debug!(lease = %lease.name_any(), code, "STS does not accept the new role yet");
        let status = lease.status.clone().unwrap_or_default();
        if status.phase != Some(LeasePhase::Provisioning) || status.policy_digest.as_deref() != digest_of(identity) {
            let waiting = "role made; waiting for STS to accept it (IAM propagation)";
            write_status(lease, ctx, LeasePhase::Provisioning, None, None, waiting, digest_of(identity)).await?;
        }
        return Ok(Proven::Waiting);
    }
    lift_gates(lease, ctx, uid_bound, holder).await?;
    let written = write_status(
        lease,
        ctx,
        LeasePhase::Ready,
        Some(role_arn.to_owned()),
        None,
        "role verified usable",
        digest_of(identity),
    )
    .await?;
    Ok(Proven::Ready { deleting: written.meta().deletion_timestamp.is_some() })
}

/// Makes the role, or brings it to `spec`. A role made and brought to this
/// policy on an earlier pass (waiting for STS to accept it) is not rewritten
/// on every retry (rewriting its trust policy would only restart IAM's
/// propagation): one read tells that it is still there and ours.
async fn make_role(
    lease: &IdentityLease,
    ctx: &LeaseContext,
    spec: &RoleSpec,
    identity: &WorkloadIdentity,
) -> Result<()> {
    let status = lease.status.clone().unwrap_or_default();
    let made_before = status.phase == Some(LeasePhase::Provisioning)
        && status.policy_digest.is_some()
        && status.policy_digest.as_deref() == digest_of(identity)
        && ctx.cloud.provider.role_is(&spec.name, &spec.owner).await?;
    if made_before {
        tracing::debug!(lease = %lease.name_any(), "role made on an earlier pass; proving it again");
        return Ok(());
    }
    if let Err(e) = ctx.cloud.provider.provision(spec).await {
        write_status(lease, ctx, LeasePhase::Provisioning, None, Some(&e), "cannot provision", None).await?;
        let reason = match e {
            Error::QuotaExceeded(_) => "QuotaExceeded",
            Error::RoleConflict(_) => "RoleConflict",
            _ => "ProvisionFailed",
        };
        publish(ctx, lease, EventType::Warning, reason, e.to_string()).await;
        return Err(e);
    }
    Ok(())
}

/// The identity's effective permissions, as its controller digested them
/// (`status.effective.policyDigest`); `None` until it has.
fn digest_of(identity: &WorkloadIdentity) -> Option<&str> {
    identity.status.as_ref()?.effective.as_ref()?.policy_digest.as_deref()
}

/// Brings a live role's policies and the lease's RBAC to what the identity
/// and its boundaries allow now (a boundary or identity changed), records
/// the digest and says so in an Event.
async fn follow_policy(
    lease: &IdentityLease,
    ctx: &LeaseContext,
    identity: &WorkloadIdentity,
    role_name: &str,
) -> Result<()> {
    let role_arn = lease.spec.role_arn.clone().unwrap_or_default(); // checked by `trusted_role`
    let (spec, rules) = role_spec(lease, identity, &role_arn, role_name, ctx).await?;
    if let Some(fence) = &ctx.base.fence {
        fence.check().await?;
    }
    let first = lease.status.as_ref().and_then(|s| s.policy_digest.as_ref()).is_none();
    if !first {
        // (A lease made before digests were recorded adopts the current one:
        // its role was made from it.)
        ctx.cloud.provider.update_permissions(&spec).await?;
        ensure_rbac(lease, &ctx.base.client, &rules).await?;
    }
    let digest = digest_of(identity);
    let note = format!(
        "the role's permissions follow WorkloadIdentity {} as its boundaries allow now (policy digest {})",
        identity.name_any(),
        digest.unwrap_or_default().chars().take(12).collect::<String>()
    );
    write_status(lease, ctx, LeasePhase::Ready, None, None, &note, digest).await?;
    if !first {
        tracing::info!(lease = %lease.name_any(), role = role_name, "re-applied the role's permissions");
        publish(ctx, lease, EventType::Normal, "PolicyUpdated", note).await;
    }
    Ok(())
}

/// What STS refusing a lease's role means: `None` while IAM may still be
/// propagating it (`AccessDenied` and the like, within the window), else the
/// error a user can act on. A missing IAM OIDC provider (the commonest setup
/// mistake on a new account) is named at once, with the ARN to create.
fn refusal_error(
    lease: &IdentityLease,
    cloud: &Cloud,
    identity: &WorkloadIdentity,
    code: &str,
    message: &str,
) -> Option<Error> {
    let age = lease_age(lease, Timestamp::now());
    let subject =
        format!("system:serviceaccount:{}:{}", lease.namespace().unwrap_or_default(), lease.spec.service_account);
    match code {
        "InvalidIdentityToken" => Some(Error::TokenRejected(format!(
            "STS rejects the pod's token ({message}); the account needs the IAM OIDC provider {} for the issuer \
             https://{} with client ID {}",
            cloud.provider_arn, cloud.issuer_host, identity.spec.token.audience
        ))),
        code if crate::error::THROTTLING_CODES.contains(&code) => {
            Some(Error::Cloud { operation: "AssumeRoleWithWebIdentity", message: format!("{code}: {message}") })
        }
        _ if age < cloud.propagation_window => None,
        "AccessDenied" => Some(Error::TrustDenied(format!(
            "STS still refuses the role {} after {}s ({message}); its trust policy admits only {} with sub {subject} \
             and aud {}: check the token's issuer and audience, and any SCP or permissions boundary on \
             sts:AssumeRoleWithWebIdentity",
            lease.spec.role_arn.as_deref().unwrap_or_default(),
            age.as_secs(),
            cloud.provider_arn,
            identity.spec.token.audience
        ))),
        _ => Some(Error::Cloud {
            operation: "AssumeRoleWithWebIdentity",
            message: format!("{code}: {message} (still, {}s after the lease was made)", age.as_secs()),
        }),
    }
}

/// Whether the lease still exists as this reconciliation knew it (same uid)
/// and is not being deleted. (Its Role and RoleBinding need no such care:
/// they are owned by the lease, and the garbage collector removes them.)
async fn still_live(lease: &IdentityLease, ctx: &LeaseContext) -> Result<bool> {
    let now = Api::<IdentityLease>::namespaced(ctx.base.client.clone(), &lease.namespace().unwrap_or_default())
        .get_opt(&lease.name_any())
        .await
        .map_err(Error::kube(format!("checking that IdentityLease {} is still live", lease.name_any())))?;
    Ok(now.is_some_and(|now| now.uid() == lease.uid() && now.meta().deletion_timestamp.is_none()))
}

/// When a live lease is looked at again without any event: at its expiry,
/// at the resync, or, while no pod was ever bound to it, when the holder's
/// grace period ends (a pod deleted while no controller watched, before its
/// uid was recorded, is then reaped at once instead of at the next resync).
fn next_look(lease: &IdentityLease, now: Timestamp) -> Duration {
    let until_expiry = lease.spec.expires_at.0.duration_since(now).unsigned_abs();
    let mut next = until_expiry.min(RESYNC);
    if lease.spec.holder.uid.is_none() {
        next = next.min(HOLDER_GRACE.saturating_sub(lease_age(lease, now)));
    }
    next + Duration::from_secs(1)
}

/// What the role is made of: the identity clamped to today's boundaries.
async fn role_spec(
    lease: &IdentityLease,
    identity: &WorkloadIdentity,
    role_arn: &str,
    role_name: &str,
    ctx: &LeaseContext,
) -> Result<(RoleSpec, Vec<crate::api::KubernetesRule>)> {
    let client = &ctx.base.client;
    let namespace = lease.namespace().unwrap_or_default();
    let (labels, boundaries) = namespace_and_boundaries(client, &namespace).await?;
    let eval = evaluate(&identity.spec, &labels, &boundaries);
    if eval.governing.is_empty() {
        return Err(Error::Config(format!("namespace {namespace} is governed by no IdentityBoundary")));
    }
    let governing: Vec<&IdentityBoundary> =
        boundaries.iter().filter(|b| eval.governing.contains(&b.name_any())).collect();
    let max_session = governing
        .iter()
        .filter_map(|b| b.spec.aws.as_ref().map(|a| Duration::from_secs(a.max_session_duration.as_secs())))
        .min()
        .unwrap_or(Duration::from_hours(1));
    // The path is the boundary's at admission (recorded in the ARN); the
    // name is the one `trusted_role` derived.
    let (path, _) = naming::split_role_arn(role_arn)
        .ok_or_else(|| Error::LeaseRefused(format!("spec.roleArn {role_arn:?} is not a role ARN")))?;
    let allowed: Vec<_> = eval.statements.iter().filter(|s| !s.actions.is_empty()).cloned().collect();
    let mut tags = vec![
        ("ephemera.dev/workload-identity".to_owned(), lease.spec.workload_identity.clone()),
        ("ephemera.dev/expires-at".to_owned(), lease.spec.expires_at.0.to_string()),
    ];
    if let Some(owner) = &lease.spec.owner {
        tags.push(("ephemera.dev/owner".to_owned(), owner.chars().take(256).collect()));
    }
    let spec = RoleSpec {
        name: role_name.to_owned(),
        path,
        owner: role_owner(lease, ctx),
        trust_policy: aws::trust_policy(
            &ctx.cloud.provider_arn,
            &ctx.cloud.issuer_host,
            &namespace,
            &lease.spec.service_account,
            &identity.spec.token.audience,
        ),
        policy: (!allowed.is_empty()).then(|| aws::permissions_policy(&allowed)),
        managed_policy_arns: eval.managed_policy_arns.clone(),
        permissions_boundary: eval.permissions_boundary_arns.first().cloned(),
        max_session,
        tags,
    };
    let rules = identity.spec.kubernetes.as_ref().map(|k| k.rules.clone()).unwrap_or_default();
    // Kubernetes rules outside a boundary are dropped, as AWS statements are.
    let rules = rules
        .into_iter()
        .filter(|r| {
            governing.iter().all(|b| {
                crate::policy::rule_admitted(
                    r,
                    b.spec.kubernetes.as_ref().map(|k| k.allowed_rules.as_slice()).unwrap_or_default(),
                )
            })
        })
        .collect();
    Ok((spec, rules))
}

/// Role + RoleBinding for the identity's Kubernetes rules, owned by the lease.
async fn ensure_rbac(lease: &IdentityLease, client: &Client, rules: &[crate::api::KubernetesRule]) -> Result<()> {
    if rules.is_empty() {
        return Ok(());
    }
    let namespace = lease.namespace().unwrap_or_default();
    let name = lease.name_any();
    let meta = ObjectMeta {
        name: Some(name.clone()),
        namespace: Some(namespace.clone()),
        labels: Some(BTreeMap::from([
            (LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
            (LABEL_LEASE.to_owned(), name.clone()),
        ])),
        owner_references: Some(vec![owner_ref(lease)]),
        ..ObjectMeta::default()
    };
    let role = Role {
        metadata: meta.clone(),
        rules: Some(
            rules
                .iter()
                .map(|r| PolicyRule {
                    api_groups: Some(r.api_groups.clone()),
                    resources: Some(r.resources.clone()),
                    resource_names: (!r.resource_names.is_empty()).then(|| r.resource_names.clone()),
                    verbs: r.verbs.clone(),
                    non_resource_urls: None,
                })
                .collect(),
        ),
    };
    let binding = RoleBinding {
        metadata: meta,
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name: name.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: lease.spec.service_account.clone(),
            namespace: Some(namespace.clone()),
            api_group: None,
        }]),
    };
    let params = PatchParams::apply(FIELD_MANAGER).force();
    Api::<Role>::namespaced(client.clone(), &namespace)
        .patch(&name, &params, &Patch::Apply(&role))
        .await
        .map_err(Error::kube(format!("applying Role {namespace}/{name}")))?;
    Api::<RoleBinding>::namespaced(client.clone(), &namespace)
        .patch(&name, &params, &Patch::Apply(&binding))
        .await
        .map_err(Error::kube(format!("applying RoleBinding {namespace}/{name}")))?;
    Ok(())
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

/// A short-lived token of the pod's ServiceAccount, as the kubelet projects it.
async fn token_for(client: &Client, namespace: &str, service_account: &str, audience: &str) -> Result<String> {
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![audience.to_owned()]),
            expiration_seconds: Some(600),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create_token_request(service_account, &PostParams::default(), &request)
        .await
        .map_err(Error::kube(format!("requesting a token for ServiceAccount {namespace}/{service_account}")))?
        .status
        .and_then(|s| s.token)
        .ok_or_else(|| Error::Config("TokenRequest returned no token".into()))
}

/// Records the pod's uid on the lease the first time the pod is seen, so a
/// later pod of the same name is not mistaken for it.
/// Returns whether the lease's pod uid is known (bound before or now).
async fn bind_holder_uid(lease: &IdentityLease, client: &Client, holder: &Holder) -> Result<bool> {
    if lease.spec.holder.uid.is_some() || lease.spec.holder.kind != HolderKind::Pod {
        return Ok(true);
    }
    let Some(pod) = holder.pod_of(lease) else { return Ok(false) };
    bind_uid(lease, client, pod).await?;
    Ok(true)
}

/// Writes `pod`'s uid into the lease's holder (set once: CEL refuses a change).
async fn bind_uid(lease: &IdentityLease, client: &Client, pod: &Pod) -> Result<()> {
    Api::<IdentityLease>::namespaced(client.clone(), &lease.namespace().unwrap_or_default())
        .patch(
            &lease.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"holder": {"uid": pod.uid()}}})),
        )
        .await
        .map_err(Error::kube("binding the lease to its pod's uid"))?;
    Ok(())
}

/// Removes ephemera's scheduling gate from every pod of the lease, with an
/// Event on each pod (where users look first).
/// `uid_bound`: whether the holder's uid is already recorded (else it is,
/// from the pod found here, before the gate goes).
async fn lift_gates(lease: &IdentityLease, ctx: &LeaseContext, uid_bound: bool, holder: &Holder) -> Result<()> {
    let client = &ctx.base.client;
    let namespace = lease.namespace().unwrap_or_default();
    let pods = Api::<Pod>::namespaced(client.clone(), &namespace);
    let selector = format!("{LABEL_LEASE}={}", lease.name_any());
    // A pod lease has one pod, read at the start of the reconcile (the
    // patch below tests its uid, so a pod replaced since is left alone).
    let listed;
    let candidates: Vec<&Pod> = match holder {
        Holder::Pod(_) => holder.pod_of(lease).into_iter().collect(),
        Holder::Job(_) => {
            listed = pods
                .list(&ListParams::default().labels(&selector))
                .await
                .map_err(Error::kube("listing the lease's pods"))?
                .items;
            listed.iter().collect()
        }
    };
    for pod in candidates {
        let gates = pod.spec.as_ref().and_then(|s| s.scheduling_gates.as_deref()).unwrap_or_default();
        let Some(index) = gates.iter().position(|g| g.name == SCHEDULING_GATE) else { continue };
        // Record the pod's uid before it can run: if it is deleted while no
        // controller watches, the uid is what says it is gone for good.
        if !uid_bound && lease.spec.holder.kind == HolderKind::Pod {
            bind_uid(lease, client, pod).await?;
        }
        // `test` first: if the pod was replaced or its gates changed
        // meanwhile, the patch fails and the lease is looked at again.
        let patch: json_patch::Patch = serde_json::from_value(json!([
            {"op": "test", "path": "/metadata/uid", "value": pod.uid()},
            {"op": "test", "path": format!("/spec/schedulingGates/{index}/name"), "value": SCHEDULING_GATE},
            {"op": "remove", "path": format!("/spec/schedulingGates/{index}")},
        ]))
        .map_err(|e| Error::Serialization { what: "gate patch", message: e.to_string() })?;
        match pods.patch(&pod.name_any(), &PatchParams::default(), &Patch::Json::<()>(patch)).await {
            Ok(_) => {
                let ev = Event {
                    type_: EventType::Normal,
                    reason: "IdentityReady".into(),
                    note: Some(format!(
                        "IdentityLease {} verified with STS; scheduling gate {SCHEDULING_GATE} lifted",
                        lease.name_any()
                    )),
                    action: "LiftGate".into(),
                    secondary: Some(lease.object_ref(&())),
                };
                ctx.base.events.publish(&ev, &pod.object_ref(&())).await;
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                return Err(Error::kube(format!("lifting the scheduling gate of pod {namespace}/{}", pod.name_any()))(
                    e,
                ));
            }
        }
    }
    Ok(())
}

/// When the workload ended, as the apiserver shows it (whole seconds, so
/// at most 1 s before the true end): the deletion request of a pod being
/// deleted, the last container's end of a pod that succeeded or failed, the
/// Complete/Failed condition of a Job, the expiry of an expired lease; `now`
/// when the apiserver shows nothing earlier (a pod already gone).
fn workload_ended_at(lease: &IdentityLease, holder: &Holder, now: Timestamp) -> Timestamp {
    let shown = if lease.spec.expires_at.0 <= now {
        Some(lease.spec.expires_at.0)
    } else {
        match holder {
            Holder::Pod(Some(pod)) => pod_ended_at(pod),
            Holder::Job(Some(job)) => job_ended_at(job),
            Holder::Pod(None) | Holder::Job(None) => None,
        }
    };
    shown.map_or(now, |t| t.min(now))
}

/// When a pod's workload ended (see [`workload_ended_at`]).
fn pod_ended_at(pod: &Pod) -> Option<Timestamp> {
    if let Some(deleting) = &pod.meta().deletion_timestamp {
        let grace = pod.meta().deletion_grace_period_seconds.unwrap_or(0);
        return deleting.0.checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(grace)).ok();
    }
    pod_ended(pod)?;
    let status = pod.status.as_ref()?;
    status
        .container_statuses
        .iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref().map(|t| t.finished_at.as_ref().map(|f| f.0)))
        .collect::<Option<Vec<_>>>()?
        .into_iter()
        .max()
}

/// When a Job ended: its Complete or Failed condition's transition.
fn job_ended_at(job: &Job) -> Option<Timestamp> {
    job_ended(job)?;
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    conditions
        .iter()
        .find(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")?
        .last_transition_time
        .as_ref()
        .map(|t| t.0)
}

/// Records why and when the workload ended, then deletes the lease: the
/// finalizer does the reaping.
async fn start_reaping(lease: &IdentityLease, ctx: &LeaseContext, reason: &str, ended: Timestamp) -> Result<Action> {
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
async fn reap(lease: &IdentityLease, ctx: &LeaseContext) -> Result<Action> {
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
    let since_end = |at: std::time::SystemTime| {
        ended.and_then(|e| Timestamp::try_from(at).ok().map(|at| at.duration_since(e).as_secs_f64().max(0.0)))
    };
    match ctx.cloud.provider.revoke_and_delete(&role, &role_owner(lease, ctx)).await {
        Ok(Reaped::Deleted { revoked }) => {
            if let Some(window) = since_end(revoked) {
                ctx.base.metrics.credential_window.observe(window);
            }
        }
        Ok(Reaped::Gone) => {}
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
    delete_if_owned::<RoleBinding>(client, lease, &name).await?;
    delete_if_owned::<Role>(client, lease, &name).await?;
    delete_if_owned::<ServiceAccount>(client, lease, &lease.spec.service_account).await?;
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

/// Deletes `name` if it is there and owned by `lease` (by uid; the delete
/// is conditional on the uid read, so a replacement is never hit).
async fn delete_if_owned<K>(client: &Client, lease: &IdentityLease, name: &str) -> Result<()>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    let namespace = lease.namespace().unwrap_or_default();
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    let api = Api::<K>::namespaced(client.clone(), &namespace);
    let Some(found) = api.get_opt(name).await.map_err(Error::kube(format!("reading {kind} {namespace}/{name}")))?
    else {
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

async fn write_status(
    lease: &IdentityLease,
    ctx: &LeaseContext,
    phase: LeasePhase,
    role_arn: Option<String>,
    error: Option<&Error>,
    message: &str,
    digest: Option<&str>,
) -> Result<IdentityLease> {
    let previous = lease.status.clone().unwrap_or_default();
    let ready = phase == LeasePhase::Ready;
    let reason = match (phase, error) {
        (_, Some(Error::QuotaExceeded(_))) => "QuotaExceeded",
        (_, Some(Error::LeaseRefused(_))) => "Refused",
        (_, Some(e @ (Error::RoleConflict(_) | Error::TokenRejected(_) | Error::TrustDenied(_)))) => e.reason(),
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
        role_arn: role_arn.or(previous.role_arn.clone()),
        issued_at: if ready && previous.phase != Some(LeasePhase::Ready) {
            Some(Time(Timestamp::now()))
        } else {
            previous.issued_at.clone()
        },
        revoked_at: if phase == LeasePhase::Reaping { Some(Time(Timestamp::now())) } else { None },
        last_error: error.map(ToString::to_string),
        policy_digest: digest.map(str::to_owned).or(previous.policy_digest.clone()),
        observed_generation: lease.meta().generation,
        conditions: vec![condition(&previous.conditions, cond::READY, ready, reason, message, lease.meta().generation)],
    };
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

// === Sweep ===

async fn sweep_forever(ctx: Arc<LeaseContext>) {
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
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Deletes roles tagged as this cluster's whose lease no longer exists (a
/// crash between making a role and recording it, or a lease force-removed).
async fn sweep(ctx: &LeaseContext) -> Result<usize> {
    let boundaries = Api::<IdentityBoundary>::all(ctx.base.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::kube("listing IdentityBoundaries"))?
        .items;
    let mut paths: Vec<String> =
        boundaries.iter().filter_map(|b| b.spec.aws.as_ref().map(|a| a.role_path.clone())).collect();
    paths.push("/ephemera/".into());
    paths.sort();
    paths.dedup();
    // Roles of leases in the cache are live; only the others are looked at
    // (and the apiserver decides for those).
    // (Only leases the webhook wrote: a forged spec.roleArn must not hide
    // another lease's orphaned role from the sweep.)
    let live: std::collections::HashSet<String> = ctx
        .leases
        .state()
        .iter()
        .filter(|l| trusted_role(l, &ctx.cloud.cluster, &ctx.cloud.account).is_ok())
        .filter_map(|l| l.spec.role_arn.clone())
        .collect();
    let mut deleted = 0;
    for path in paths {
        let roles = ctx
            .cloud
            .provider
            .list_owned(&path, &ctx.cloud.cluster, &ctx.cloud.issuer_host, |arn| live.contains(arn))
            .await?;
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
            tracing::info!(
                role = role.name,
                lease = role.lease,
                namespace = role.namespace,
                "deleted an orphaned role"
            );
            deleted += 1;
        }
    }
    Ok(deleted)
}

/// Drops the bookkeeping of leases that are gone; without this the maps grow
/// with every pod the process ever saw. (A pod whose event came in before
/// its lease reached the cache, in the instant before a round, is forgotten
/// too: its lease then falls back to the holder grace period.)
fn forget_gone(ctx: &LeaseContext) {
    let cached = ctx.leases.state();
    let live: std::collections::HashSet<(String, String)> =
        cached.iter().map(|l| (l.namespace().unwrap_or_default(), l.name_any())).collect();
    let uids: std::collections::HashSet<String> = cached.iter().filter_map(|l| l.uid()).collect();
    ctx.reaped.lock().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|uid| uids.contains(uid));
    ctx.ready.lock().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|uid| uids.contains(uid));
    ctx.seen_pods.lock().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|key| live.contains(key));
    ctx.failures
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .retain(|key, _| live.contains(&(key.namespace.clone().unwrap_or_default(), key.name.clone())));
}

fn update_phase_gauge(ctx: &LeaseContext) {
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
        assert_eq!(next_look(&lease(None), now), Duration::from_secs(91));
        assert_eq!(next_look(&lease(Some("u")), now), RESYNC + Duration::from_secs(1));
        let late: Timestamp = "2026-11-24T09:59:00Z".parse().unwrap();
        assert_eq!(next_look(&lease(Some("u")), late), Duration::from_secs(61), "expiry comes first");
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
