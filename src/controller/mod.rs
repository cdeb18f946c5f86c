//! Controllers. `run` starts them under leader election:
//! - [`workload_identity`]: clamps each `WorkloadIdentity` to the boundaries
//!   of its namespace and publishes the effective identity in its status;
//! - [`boundary`]: boundary status and the instance-metadata NetworkPolicies.
//!
//! - [`lease`]: provisions each lease's role, lifts the pod's gate, reaps it
//!   when the workload ends, and sweeps orphaned roles.

pub mod boundary;
pub mod lease;
pub mod workload_identity;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::{
    api::core::v1::ObjectReference,
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Client,
    runtime::{
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        reflector::{Store, store::Writer},
    },
};

use crate::{
    Error, Result,
    api::{IdentityLease, WorkloadIdentity},
    telemetry::Metrics,
};

/// Settings of the controller process.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Where `/livez`, `/readyz` and `/metrics` are served.
    pub admin_addr: SocketAddr,
    /// Hold a coordination Lease so only one replica reconciles at a time.
    pub leader_election: bool,
    /// Namespace of the leader-election Lease (the operator's own).
    pub namespace: String,
    /// Identity of this replica in the leader election (the pod name).
    pub identity: String,
    /// Where roles are made.
    pub cloud: CloudSettings,
    /// No new role while the account holds this many; `None`: the account's
    /// IAM `RolesQuota`.
    pub aws_role_limit: Option<u64>,
    /// How long STS may refuse a new role before that is an error.
    pub propagation_window: std::time::Duration,
    /// When long-lived pods are evicted to get a fresh identity.
    pub rotation: lease::Rotation,
    /// At most this many mutating IAM calls a second, revocations first
    /// (`None`: no limit of ephemera's own).
    pub iam_writes_per_second: Option<f64>,
    /// How many revocation sets (0: each role revoked on its own).
    pub revocation_sets: usize,
}

/// Where roles are made and who trusts them; shared by controller and webhook.
#[derive(Clone, Debug)]
pub struct CloudSettings {
    /// This cluster's name (role names, tags; the sweep only touches its own).
    pub cluster: String,
    /// AWS partition (`aws`).
    pub partition: String,
    /// AWS account of the roles; `None`: asked from STS.
    pub account: Option<String>,
    /// The service-account issuer URL; `None`: read from the apiserver's
    /// OpenID discovery document.
    pub oidc_issuer: Option<String>,
    /// The IAM path every role lives under (`/ephemera/`): a boundary's
    /// `rolePath` must lie under it, and the orphan sweep lists it.
    pub role_path_root: String,
}

/// Shared by every reconciliation.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Publishes Events on the objects users look at.
    pub events: Events,
    /// Reconcile counters and timings.
    pub metrics: Arc<Metrics>,
    /// Every `IdentityLease`, as the lease controller's watch keeps it (the
    /// identity controller counts active leases here instead of listing
    /// thousands of them from the apiserver on each reconcile).
    pub leases: Store<IdentityLease>,
    /// Whether [`Context::leases`] has listed what exists.
    pub leases_ready: Ready,
    /// Every `WorkloadIdentity`, as the identity controller's watch keeps it
    /// (the lease controller reads a lease's identity here; a miss is asked
    /// of the apiserver, so a lagging cache never reads as a deletion).
    pub identities: Store<WorkloadIdentity>,
    /// Every `IdentityBoundary` and namespace, as the identity controller's
    /// watches keep them (new roles are clamped with these).
    pub boundaries: Store<crate::api::IdentityBoundary>,
    /// See [`Context::boundaries`].
    pub namespaces: Store<k8s_openapi::api::core::v1::Namespace>,
    /// Stops the controllers (SIGTERM, or leadership lost).
    pub stop: Stop,
    /// Confirms this replica still leads before it makes a role; `None`
    /// without leader election.
    pub fence: Option<Arc<Fence>>,
    /// The IAM path every role lives under ([`CloudSettings::role_path_root`]).
    pub role_path_root: String,
    /// Kubernetes client for evictions, which does not retry a 429 (a
    /// `PodDisruptionBudget` refusing the eviction).
    pub evictions: Client,
}

/// Stops every controller gracefully: reconciliations in flight finish,
/// none starts. Sent on SIGTERM and when this replica stops leading (a
/// reconciliation cut short after its role was made would leave the role to
/// the next sweep; finished, it cleans up after itself).
#[derive(Clone, Debug)]
pub struct Stop(Arc<tokio::sync::watch::Sender<Option<StopReason>>>);

/// Why the controllers stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// SIGTERM or SIGINT: a clean exit.
    Signal,
    /// Another replica leads now: exit with an error, as a replica that
    /// crashed would, and stand by again after the restart.
    LostLeadership,
}

impl Default for Stop {
    fn default() -> Self {
        Self(Arc::new(tokio::sync::watch::channel(None).0))
    }
}

impl Stop {
    /// Asks every controller to stop; the first reason given is kept.
    pub fn stop(&self, reason: StopReason) {
        let first = self.0.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = Some(reason);
            true
        });
        if first {
            tracing::info!(?reason, "stopping the controllers");
        }
    }

    /// Why the controllers were asked to stop, if they were.
    #[must_use]
    pub fn reason(&self) -> Option<StopReason> {
        *self.0.borrow()
    }

    /// Completes once [`Stop::stop`] was called (for
    /// `Controller::graceful_shutdown_on`).
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.0.subscribe();
        async move {
            // The sender lives as long as any `Stop`; if all are gone, stop too.
            let _ = rx.wait_for(Option::is_some).await;
        }
    }
}

/// Leadership as the apiserver sees it, checked before a role is made.
///
/// The leader-election task says when leadership is lost, but a replica
/// frozen past its Lease (SIGSTOP, a paused VM, a long GC-like stall) runs
/// on for a moment after it resumes before that task has looked: meanwhile
/// the new leader may have reaped a lease this replica was about to make a
/// role for. Before making one, the fence confirms the Lease still names
/// this replica and has not expired by this replica's clocks; a
/// confirmation holds until the Lease's own expiry (less a margin for clock
/// skew), so it costs one GET per renewal period, not one per role.
/// What slips past it (frozen between the check and the call) is caught
/// after the call: see `lease::apply`, which deletes a role whose lease is
/// gone or being deleted by then.
#[derive(Debug)]
pub struct Fence {
    api: kube::Api<k8s_openapi::api::coordination::v1::Lease>,
    identity: String,
    stop: Stop,
    /// Until when the last confirmation holds, by both clocks: the monotonic
    /// one keeps running while the process is stopped; the wall clock also
    /// runs while a VM is paused.
    valid_until: std::sync::Mutex<Option<(std::time::Instant, std::time::SystemTime)>>,
}

/// Taken off a Lease's expiry: the standby reads it with its own clock.
const FENCE_SKEW_MARGIN: Duration = Duration::from_secs(3);

impl Fence {
    /// Fence on the `ephemera-controller` Lease in `namespace`, held as `identity`.
    #[must_use]
    pub fn new(client: Client, namespace: &str, identity: &str, stop: Stop) -> Self {
        Self {
            api: kube::Api::namespaced(client, namespace),
            identity: identity.to_owned(),
            stop,
            valid_until: std::sync::Mutex::default(),
        }
    }

    /// `Ok` while this replica leads; [`Error::NotLeader`] otherwise (and the
    /// controllers are asked to stop when another replica holds the Lease).
    ///
    /// # Errors
    /// Not the leader, or the Lease cannot be read.
    pub async fn check(&self) -> Result<()> {
        let (now, wall) = (std::time::Instant::now(), std::time::SystemTime::now());
        if let Some((until, wall_until)) = *self.valid_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
            && now < until
            && wall < wall_until
        {
            return Ok(());
        }
        let lease = self.api.get(LEASE_NAME).await.map_err(Error::kube("reading the leader-election Lease"))?;
        let spec = lease.spec.unwrap_or_default();
        let holder = spec.holder_identity.unwrap_or_default();
        if holder != self.identity {
            self.stop.stop(StopReason::LostLeadership);
            return Err(Error::NotLeader(format!("the leader-election Lease is held by {holder:?}")));
        }
        let (Some(renewed), Some(seconds)) = (spec.renew_time, spec.lease_duration_seconds) else {
            return Err(Error::NotLeader("the leader-election Lease has no renewTime or duration".into()));
        };
        let expires = std::time::SystemTime::from(renewed.0) + Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
            - FENCE_SKEW_MARGIN;
        let left = expires
            .duration_since(std::time::SystemTime::now())
            .map_err(|_| Error::NotLeader("the leader-election Lease has expired and was not renewed yet".into()))?;
        *self.valid_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((std::time::Instant::now() + left, expires));
        Ok(())
    }
}

/// Whether a cache has listed what exists; any number of tasks may wait.
/// (kube-runtime's `Store::wait_until_ready` wakes only the last of several
/// concurrent waiters, and its own `Controller` is one of them: a second
/// waiter can leave either hanging. Nothing here calls it.)
#[derive(Clone, Debug)]
pub struct Ready(tokio::sync::watch::Receiver<bool>);

impl Ready {
    /// Not ready until the sender says so (a dropped sender: never).
    #[must_use]
    pub fn new() -> (tokio::sync::watch::Sender<bool>, Self) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        (tx, Self(rx))
    }

    /// Ready from the start (tests, prefilled caches).
    #[must_use]
    pub fn now() -> Self {
        Self(tokio::sync::watch::channel(true).1)
    }

    /// Waits until ready; `false` if that can no longer happen.
    pub async fn wait(&self) -> bool {
        let mut rx = self.0.clone();
        if *rx.borrow_and_update() {
            return true;
        }
        rx.wait_for(|ready| *ready).await.is_ok()
    }
}

/// Publishes Events. kube-runtime's `Recorder` keeps every Event it sent for
/// six minutes to count repeats into a series (and scans that cache on each
/// publish): right for warnings that recur (throttling, failures), wasted on
/// the one-off Normal Events of a lifecycle (`Ready`, `Reaped`, `IdentityReady`):
/// a burst of 5,000 pods kept some 15,000 of them, each publish scanning all.
/// One-off Events go through a recorder that is dropped at once.
///
/// An Event is sent in the background: a reconciliation does not wait for
/// the apiserver to store it (in a burst, two Events per lease were two
/// round trips on every provisioning's way to Ready). At most
/// [`EVENTS_IN_FLIGHT`] are in flight; beyond that `publish` waits for a
/// slot, so a slow apiserver slows the publisher instead of piling Events
/// up in memory.
pub struct Events {
    client: Client,
    reporter: Reporter,
    recurring: Recorder,
    in_flight: Arc<tokio::sync::Semaphore>,
}

/// Events being sent at once, at most.
pub const EVENTS_IN_FLIGHT: usize = 32;

impl Events {
    /// Events reported as `reporter` (controller name, replica).
    #[must_use]
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Self {
            recurring: Recorder::new(client.clone(), reporter.clone()),
            client,
            reporter,
            in_flight: Arc::new(tokio::sync::Semaphore::new(EVENTS_IN_FLIGHT)),
        }
    }

    /// Sends `ev` on `on` in the background, once a slot is free; a failure
    /// is logged, never fatal (an Event is a courtesy to users, not state).
    pub async fn publish(&self, ev: &Event, on: &ObjectReference) {
        let Ok(slot) = self.in_flight.clone().acquire_owned().await else { return };
        let recorder = if ev.type_ == EventType::Warning {
            self.recurring.clone()
        } else {
            Recorder::new(self.client.clone(), self.reporter.clone())
        };
        let on = on.clone();
        let ev = Event {
            type_: ev.type_,
            reason: ev.reason.clone(),
            note: ev.note.clone(),
            action: ev.action.clone(),
            secondary: ev.secondary.clone(),
        };
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&ev, &on).await {
                tracing::debug!(error = %e, reason = ev.reason, "could not publish an Event");
            }
            drop(slot);
        });
    }
}

/// How long a failed reconciliation waits before it is retried.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(15);
/// Level-triggered safety net: everything is looked at again this often.
const RESYNC: Duration = Duration::from_mins(5);
const LEASE_NAME: &str = "ephemera-controller";
/// How long in-flight reconciliations may take to finish after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Runs the controllers until SIGTERM/SIGINT, or until leadership is lost.
///
/// # Errors
/// Fails when the Kubernetes client cannot be built, the admin port cannot be
/// bound, or leader election fails.
pub async fn run(settings: Settings) -> Result<()> {
    let config = kube::Config::infer().await.map_err(|e| Error::KubeConfig(kube::Error::InferConfig(e)))?;
    let client = Client::try_from(config.clone()).map_err(Error::KubeConfig)?;
    // An eviction's 429 is a PodDisruptionBudget saying "not now", not
    // apiserver overload: the default client would retry it for minutes
    // inside the reconcile.
    let mut no_retry = config;
    no_retry.default_retry = false;
    let evictions = Client::try_from(no_retry).map_err(Error::KubeConfig)?;
    let metrics = Arc::new(Metrics::default());
    let admin = tokio::spawn(crate::telemetry::serve_admin(
        settings.admin_addr,
        metrics.clone(),
        Arc::new(std::sync::atomic::AtomicBool::new(true)),
    ));
    let reporter = Reporter { controller: "ephemera-controller".into(), instance: Some(settings.identity.clone()) };
    let lease_cache = Writer::<IdentityLease>::default();
    let (leases_listed, leases_ready) = Ready::new();
    let identity_cache = Writer::<WorkloadIdentity>::default();
    let boundary_cache = Writer::<crate::api::IdentityBoundary>::default();
    let namespace_cache = Writer::<k8s_openapi::api::core::v1::Namespace>::default();
    let stop = Stop::default();
    let fence = settings
        .leader_election
        .then(|| Arc::new(Fence::new(client.clone(), &settings.namespace, &settings.identity, stop.clone())));
    let ctx = Arc::new(Context {
        client: client.clone(),
        events: Events::new(client.clone(), reporter),
        metrics,
        leases: lease_cache.as_reader(),
        leases_ready,
        identities: identity_cache.as_reader(),
        boundaries: boundary_cache.as_reader(),
        namespaces: namespace_cache.as_reader(),
        stop: stop.clone(),
        fence,
        role_path_root: settings.cloud.role_path_root.clone(),
        evictions,
    });

    let leadership = if settings.leader_election {
        match acquire_leadership(&client, &settings).await? {
            Some(leadership) => Some(leadership),
            // SIGTERM while waiting (or just as the lease was won): handed back.
            None => return Ok(()),
        }
    } else {
        None
    };

    let cloud = lease_cloud(&client, &settings.cloud, ctx.metrics.clone(), settings.aws_role_limit).await?;
    let cloud = with_settings(cloud, &settings, ctx.fence.clone()).await;
    let controllers = async {
        tokio::join!(
            workload_identity::run(ctx.clone(), identity_cache, boundary_cache, namespace_cache),
            boundary::run(ctx.clone()),
            lease::run(ctx.clone(), cloud, lease_cache, leases_listed)
        );
    };
    // SIGTERM or leadership lost: the controllers finish what they started
    // (bounded by SHUTDOWN_GRACE), then the Lease is handed back.
    let stopper = {
        let stop = stop.clone();
        let mut leading = leadership.as_ref().map(|(rx, _)| rx.clone());
        tokio::spawn(async move {
            let lost = async {
                match leading.as_mut() {
                    Some(rx) => while rx.changed().await.is_ok() && *rx.borrow() {},
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = crate::shutdown_signal() => stop.stop(StopReason::Signal),
                () = lost => stop.stop(StopReason::LostLeadership),
            }
        })
    };
    let result = tokio::select! {
        () = controllers => Ok(()),
        // If a reconciliation hangs, exit anyway (the Lease is still released
        // below), well within the pod's termination grace period.
        () = async {
            stop.stopped().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "controllers did not stop in time; exiting anyway");
            Ok(())
        },
        res = admin => match res {
            Ok(res) => res,
            Err(join) => Err(Error::Stopped(format!("admin server stopped: {join}"))),
        },
    };
    stopper.abort();
    let result = match stop.reason() {
        Some(StopReason::LostLeadership) => result
            .and(Err(Error::NotLeader("lost the leader-election lease; exiting so a new leader takes over".into()))),
        _ => result,
    };
    if let Some(leadership) = leadership {
        release_leadership(leadership).await;
    }
    result
}

/// The lease controller's cloud, as the flags tune it: propagation window,
/// rotation, the IAM write budget and the revocation sets.
async fn with_settings(mut cloud: lease::Cloud, settings: &Settings, fence: Option<Arc<Fence>>) -> lease::Cloud {
    if let Some(rate) = settings.iam_writes_per_second {
        cloud.provider = cloud.provider.with_write_rate(rate);
        tracing::info!(rate, "IAM writes limited; revocations go first, then deletions, then provisioning");
    }
    if settings.revocation_sets > 0 {
        let scope = crate::cloud::revocation_sets::Scope {
            partition: &settings.cloud.partition,
            account: &cloud.account,
            path: &settings.cloud.role_path_root,
            cluster: &cloud.cluster,
            issuer: &cloud.issuer_host,
        };
        let sets = crate::cloud::revocation_sets::RevocationSets::load(
            cloud.provider.clone(),
            &scope,
            settings.revocation_sets,
            fence,
        )
        .await;
        match sets {
            Ok(sets) => {
                tracing::info!(sets = ?sets.names(), "revocation sets ready: one IAM write revokes every role that ended since the last");
                cloud.revocation_sets = Some(sets);
            }
            // An operator IAM policy from before the sets: roles are
            // revoked one by one, as before, until it allows them.
            Err(e) => tracing::warn!(
                error = %e,
                "cannot make or read the revocation sets (the operator's IAM policy needs iam:CreatePolicy, \
                 CreatePolicyVersion, DeletePolicyVersion, ListPolicyVersions and GetPolicyVersion on \
                 policies named ephemera-revoked-* under the role path root); revoking each role with its own deny"
            ),
        }
    }
    cloud.propagation_window = settings.propagation_window;
    cloud.rotation = settings.rotation;
    cloud
}

/// AWS clients and the issuer the roles trust.
async fn lease_cloud(
    client: &Client,
    settings: &CloudSettings,
    metrics: Arc<Metrics>,
    role_limit: Option<u64>,
) -> Result<lease::Cloud> {
    let provider = crate::cloud::aws::AwsProvider::from_env(Some(metrics), role_limit).await;
    let account = match &settings.account {
        Some(account) => account.clone(),
        None => provider.account().await?,
    };
    let issuer = match &settings.oidc_issuer {
        Some(issuer) => issuer.clone(),
        None => discover_issuer(client).await?,
    };
    let issuer_host = issuer.trim_start_matches("https://").trim_end_matches('/').to_owned();
    let provider_arn = format!("arn:{}:iam::{account}:oidc-provider/{issuer_host}", settings.partition);
    tracing::info!(issuer = %issuer, account, "roles will trust this cluster's service-account issuer");
    Ok(lease::Cloud {
        provider,
        cluster: settings.cluster.clone(),
        account,
        issuer_host,
        provider_arn,
        propagation_window: lease::PROPAGATION_WINDOW,
        rotation: lease::Rotation::default(),
        revocation_sets: None,
    })
}

/// The issuer from the apiserver's OpenID discovery document.
async fn discover_issuer(client: &Client) -> Result<String> {
    let request = http::Request::get("/.well-known/openid-configuration")
        .body(Vec::new())
        .map_err(|e| Error::Unexpected(format!("building the discovery request: {e}")))?;
    let text = client.request_text(request).await.map_err(Error::kube("reading the OpenID discovery document"))?;
    let doc: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Serialization { what: "OpenID discovery document", message: e.to_string() })?;
    doc["issuer"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| Error::Unexpected("the OpenID discovery document has no issuer; set --oidc-issuer".into()))
}

type Leadership = (
    tokio::sync::watch::Receiver<bool>,
    tokio::task::JoinHandle<Result<kube_lease_manager::LeaseManager, kube_lease_manager::LeaseManagerError>>,
);

/// Hands the Lease back on shutdown, so the next replica takes over at once
/// instead of after the lease duration.
async fn release_leadership((rx, task): Leadership) {
    // Closing the channel stops the renewal task, which returns the manager.
    drop(rx);
    match task.await {
        Ok(Ok(manager)) => match manager.release().await {
            Ok(()) => tracing::info!("released the leader-election lease (if this replica still held it)"),
            Err(e) => tracing::warn!(error = %e, "could not release the leader-election lease"),
        },
        Ok(Err(e)) => tracing::warn!(error = %e, "leader election ended with an error"),
        Err(e) => tracing::warn!(error = %e, "leader election task failed"),
    }
}

/// Blocks until this replica holds the `ephemera-controller` Lease; the
/// returned channel turns `false` if it is lost. `None` when SIGTERM came
/// first: whatever the manager had won by then is released.
async fn acquire_leadership(client: &Client, settings: &Settings) -> Result<Option<Leadership>> {
    let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), LEASE_NAME)
        .with_namespace(&settings.namespace)
        .with_identity(&settings.identity)
        .with_duration(15)
        .with_grace(5)
        .build()
        .await
        .map_err(|e| Error::LeaderElection(e.to_string()))?;
    let (mut rx, task) = manager.watch().await;
    tracing::info!(lease = LEASE_NAME, namespace = %settings.namespace, "waiting for leadership");
    let won = async {
        while !*rx.borrow_and_update() {
            rx.changed().await.map_err(|_| Error::LeaderElection("the election task stopped".into()))?;
        }
        Ok::<_, Error>(())
    };
    tokio::select! {
        res = won => res?,
        () = crate::shutdown_signal() => {
            tracing::info!("stopping before leading");
            release_leadership((rx, task)).await;
            return Ok(None);
        }
    }
    tracing::info!(identity = %settings.identity, "became leader");
    Ok(Some((rx, task)))
}

/// Drives a kube-runtime controller stream to the end, logging each result.
async fn drain<S, T, E, Q>(name: &'static str, stream: S)
where
    S: futures::Stream<Item = Result<T, kube::runtime::controller::Error<E, Q>>>,
    T: std::fmt::Debug,
    E: std::error::Error + 'static,
    Q: std::error::Error + 'static,
{
    stream
        .for_each(|res| async move {
            match res {
                Ok(obj) => tracing::debug!(controller = name, ?obj, "reconciled"),
                // A watched pod or Job whose lease is gone (or not cached yet):
                // nothing to do, and no reason to alarm anyone.
                Err(kube::runtime::controller::Error::ObjectNotFound(obj)) => {
                    tracing::debug!(controller = name, %obj, "no such object in the cache; skipped");
                }
                Err(e) => tracing::warn!(controller = name, error = %e, "reconcile failed"),
            }
        })
        .await;
}

/// The `Action` after a failed reconciliation, with the error counted.
fn retry(ctx: &Context, controller: &'static str, error: &Error) -> Action {
    ctx.metrics.reconcile_failed(controller, error);
    Action::requeue(RETRY_AFTER_ERROR)
}

/// A condition, keeping the previous transition time when its status did not
/// change (so `kubectl describe` shows when it really changed).
#[must_use]
pub fn condition(
    previous: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_owned();
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| Time(Timestamp::now()), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_owned(),
        status,
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// Whether a condition of `type_` is `True` in `conditions`.
#[must_use]
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions.iter().any(|c| c.type_ == type_ && c.status == "True")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::test_support::fake_apiserver;

    const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/ephemera-system/leases/ephemera-controller";

    fn election(holder: &str, renewed_ago: Duration) -> serde_json::Value {
        let renewed = Timestamp::now() - jiff_span(renewed_ago);
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
               "metadata": {"name": LEASE_NAME, "namespace": "ephemera-system"},
               "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                        "renewTime": renewed.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()}})
    }

    fn jiff_span(d: Duration) -> k8s_openapi::jiff::SignedDuration {
        k8s_openapi::jiff::SignedDuration::try_from(d).unwrap()
    }

    #[tokio::test]
    async fn the_fence_passes_a_leader_and_asks_again_only_near_the_lease_expiry() {
        let (client, mut apiserver) = fake_apiserver::client();
        let fence = Fence::new(client, "ephemera-system", "replica-a", Stop::default());
        let checking = tokio::spawn(async move {
            fence.check().await.expect("the holder of a fresh Lease leads");
            // Confirmed until the Lease expires: no second GET (the fake
            // apiserver would never answer one, and the test would hang).
            fence.check().await.expect("still confirmed");
            fence
        });
        fake_apiserver::expect(&mut apiserver, "GET", PATH, election("replica-a", Duration::from_secs(1))).await;
        let fence = tokio::time::timeout(Duration::from_secs(5), checking).await.unwrap().unwrap();
        assert_eq!(fence.stop.reason(), None);
    }

    /// One check by a fresh fence of `replica-a`, the apiserver answering `lease`.
    async fn check_once(lease: serde_json::Value) -> (Result<()>, Stop) {
        let (client, mut apiserver) = fake_apiserver::client();
        let stop = Stop::default();
        let fence = Fence::new(client, "ephemera-system", "replica-a", stop.clone());
        let checking = tokio::spawn(async move { fence.check().await });
        fake_apiserver::expect(&mut apiserver, "GET", PATH, lease).await;
        (checking.await.unwrap(), stop)
    }

    #[tokio::test]
    async fn the_fence_stops_a_replica_whose_lease_another_holds() {
        let (checked, stop) = check_once(election("replica-b", Duration::from_secs(1))).await;
        let err = checked.expect_err("another replica leads");
        assert!(matches!(err, Error::NotLeader(_)), "{err}");
        assert!(err.to_string().contains("replica-b"), "{err}");
        assert_eq!(stop.reason(), Some(StopReason::LostLeadership));
        tokio::time::timeout(Duration::from_secs(1), stop.stopped()).await.expect("the controllers are told to stop");
    }

    #[tokio::test]
    async fn the_fence_refuses_a_lease_that_expired_while_this_replica_was_frozen() {
        // Still named holder, but not renewed for 14 s of its 15: within the
        // skew margin of its expiry, a standby may already be taking over.
        let (checked, stop) = check_once(election("replica-a", Duration::from_secs(14))).await;
        let err = checked.expect_err("an expiring Lease is not leadership");
        assert!(err.to_string().contains("expired"), "{err}");
        // The renewal task decides whether it is lost; nothing stops yet.
        assert_eq!(stop.reason(), None);
    }

    #[tokio::test]
    async fn a_replica_that_no_longer_leads_writes_no_revocation_set() {
        use crate::cloud::revocation_sets::{RevocationSets, Revoked, Scope, key_of};
        let iam = crate::test_support::fake_iam::FakeIam::start().await;
        let (client, mut apiserver) = fake_apiserver::client();
        let fence = Arc::new(Fence::new(client, "ephemera-system", "replica-a", Stop::default()));
        let scope =
            Scope { partition: "aws", account: "111122223333", path: "/ephemera/", cluster: "c", issuer: "oidc/1" };
        let sets = RevocationSets::load(iam.provider().await, &scope, 1, Some(fence)).await.unwrap();
        let revoking = tokio::spawn(async move { sets.revoke(&key_of("uid-1")).await });
        // Another replica leads now: its list may hold keys this one's lacks.
        fake_apiserver::expect(&mut apiserver, "GET", PATH, election("replica-b", Duration::from_secs(1))).await;
        let answer = tokio::time::timeout(Duration::from_secs(5), revoking).await.unwrap().unwrap();
        assert!(matches!(answer, Revoked::Failed(ref why) if why.contains("replica-b")), "{answer:?}");
        assert!(!iam.calls().iter().any(|c| c == "CreatePolicyVersion"), "{:?}", iam.calls());
    }

    #[test]
    fn the_first_reason_to_stop_is_kept() {
        let stop = Stop::default();
        stop.stop(StopReason::Signal);
        stop.stop(StopReason::LostLeadership);
        assert_eq!(stop.reason(), Some(StopReason::Signal));
    }
}
