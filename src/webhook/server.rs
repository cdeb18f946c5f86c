//! The HTTP layer: decode the AdmissionReview, call the pure core, encode the
//! answer. A body that is not an AdmissionReview gets a 400 with the reason;
//! nothing in here panics on input.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::post,
};
use base64::Engine;
use k8s_openapi::{
    api::{
        authentication::v1::UserInfo,
        core::v1::{Namespace, Pod},
    },
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt,
    core::{GroupVersionKind, admission::Operation},
    runtime::reflector::{ObjectRef, Store},
};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{
    configuration::{MUTATE_PODS_PATH, VALIDATE_IDENTITIES_PATH},
    identities,
    mutate::{self, mutate},
    pods::{self, AwsTarget, Decision},
};
use crate::{
    Error,
    api::{IdentityBoundary, IdentityLease, WorkloadIdentity, WorkloadIdentitySpec},
    telemetry::Metrics,
};

/// Largest AdmissionReview accepted. A pod is at most ~1.5 MiB (etcd's
/// limit), and the review carries it once (twice for updates).
const MAX_BODY: usize = 4 * 1024 * 1024;

/// What the handlers share.
pub struct AppState {
    /// Kubernetes client (ServiceAccounts, leases, SubjectAccessReviews).
    pub client: Client,
    /// Caches of what admission reads on every request.
    pub stores: Stores,
    /// Where roles live.
    pub aws: AwsTarget,
    /// Pod mutation settings.
    pub settings: mutate::Settings,
    /// Request counters and latencies.
    pub metrics: Arc<Metrics>,
}

/// Reflector caches, so that admitting a pod costs no apiserver read.
#[derive(Clone)]
pub struct Stores {
    /// Namespaces (labels decide which boundaries govern).
    pub namespaces: Store<Namespace>,
    /// Every `IdentityBoundary`.
    pub boundaries: Store<IdentityBoundary>,
    /// Every `WorkloadIdentity`.
    pub identities: Store<WorkloadIdentity>,
    /// Every `IdentityLease`.
    pub leases: Store<IdentityLease>,
    /// How many of them each namespace holds (kept from the same watch).
    pub lease_counts: Arc<LeaseCounts>,
}

/// How many `IdentityLease`s each namespace holds, kept up to date from the
/// lease watch as it fills [`Stores::leases`], so that a boundary's
/// `maxLeases` costs admission one map read instead of a scan of every
/// lease in the cluster.
///
/// [`LeaseCounts::observe`] sees each event just before the store applies
/// it: an object the store does not hold yet is new, one it holds that is
/// deleted is gone. A relist (`Init` .. `InitDone`) counts afresh and takes
/// the place of the old counts when the store swaps its contents.
#[derive(Debug, Default)]
pub struct LeaseCounts {
    counts: std::sync::Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    live: std::collections::HashMap<String, usize>,
    relisting: Option<std::collections::HashMap<String, usize>>,
}

impl LeaseCounts {
    /// Leases of `namespace`.
    #[must_use]
    pub fn of(&self, namespace: &str) -> usize {
        self.lock().live.get(namespace).copied().unwrap_or(0)
    }

    /// Counts `event`, before `store` applies it.
    pub fn observe(&self, event: &kube::runtime::watcher::Event<IdentityLease>, store: &Store<IdentityLease>) {
        use kube::runtime::watcher::Event;
        let namespace = |lease: &IdentityLease| lease.metadata.namespace.clone().unwrap_or_default();
        let mut counts = self.lock();
        match event {
            Event::Apply(lease) if store.get(&ObjectRef::from_obj(lease)).is_none() => {
                *counts.live.entry(namespace(lease)).or_default() += 1;
            }
            Event::Delete(lease) if store.get(&ObjectRef::from_obj(lease)).is_some() => {
                let key = namespace(lease);
                if let Some(n) = counts.live.get_mut(&key) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        counts.live.remove(&key);
                    }
                }
            }
            Event::Apply(_) | Event::Delete(_) => {}
            Event::Init => counts.relisting = Some(std::collections::HashMap::new()),
            Event::InitApply(lease) => {
                *counts.relisting.get_or_insert_with(Default::default).entry(namespace(lease)).or_default() += 1;
            }
            Event::InitDone => {
                counts.live = counts.relisting.take().unwrap_or_default();
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The webhook's routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route(MUTATE_PODS_PATH, post(mutate_pods))
        .route(VALIDATE_IDENTITIES_PATH, post(validate_identities))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

async fn mutate_pods(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    handle(&state, "pods", &body, admit_pod).await
}

async fn validate_identities(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    handle(&state, "workloadidentities", &body, validate_identity).await
}

/// Decodes, dispatches and counts one review.
async fn handle<'a, F, Fut>(state: &'a AppState, webhook: &'static str, body: &'a [u8], f: F) -> Response
where
    F: FnOnce(&'a AppState, Request<'a>) -> Fut,
    Fut: Future<Output = Verdict>,
{
    let start = Instant::now();
    let (api_version, request) = match decode(body) {
        Ok(decoded) => decoded,
        Err(message) => {
            state.metrics.admission_done(webhook, "malformed", start.elapsed());
            return (StatusCode::BAD_REQUEST, message).into_response();
        }
    };
    let uid = request.uid.clone();
    let verdict = f(state, request).await;
    let outcome = if !verdict.allowed {
        "denied"
    } else if verdict.patch.is_some() {
        "mutated"
    } else {
        "allowed"
    };
    let response = encode(&api_version, &uid, &verdict);
    state.metrics.admission_done(webhook, outcome, start.elapsed());
    response
}

/// An AdmissionReview's request. Its object stays undecoded until the
/// handler knows its kind: a Pod goes straight into [`Pod`], not through a
/// JSON tree first.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request<'a> {
    /// Copied into the answer.
    pub uid: String,
    /// The object's kind.
    pub kind: GroupVersionKind,
    /// `status`, `ephemeralcontainers`, ...
    #[serde(default)]
    pub sub_resource: Option<String>,
    /// CREATE, UPDATE, ...
    pub operation: Operation,
    /// The object's namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Who asks.
    #[serde(default)]
    pub user_info: UserInfo,
    /// Nothing may be made for a dry run.
    #[serde(default)]
    pub dry_run: bool,
    /// The object, as JSON.
    #[serde(default, borrow)]
    pub object: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Review<'a> {
    #[serde(default)]
    api_version: String,
    #[serde(borrow)]
    request: Option<Request<'a>>,
}

/// The AdmissionReview's `apiVersion` and its request, or why the body is
/// not one.
///
/// # Errors
/// A message for the 400 answer.
pub fn decode(body: &[u8]) -> Result<(String, Request<'_>), String> {
    let review: Review<'_> = serde_json::from_slice(body).map_err(|e| format!("malformed AdmissionReview: {e}"))?;
    let request = review.request.ok_or("malformed AdmissionReview: it has no request")?;
    let version = if review.api_version.is_empty() { "admission.k8s.io/v1".to_owned() } else { review.api_version };
    Ok((version, request))
}

/// Decodes the request's object as `T`.
fn object<T: serde::de::DeserializeOwned>(req: &Request<'_>) -> Result<T, String> {
    let obj = req.object.ok_or("the request carries no object")?;
    serde_json::from_str(obj.get()).map_err(|e| format!("cannot decode the {}: {e}", req.kind.kind))
}

/// What a handler answers: allowed or denied (with the reason), and the
/// JSON patch and warnings, if any.
#[derive(Clone, Debug, Default)]
pub struct Verdict {
    allowed: bool,
    reason: Option<String>,
    patch: Option<Vec<u8>>,
    warnings: Vec<String>,
}

impl Verdict {
    fn allow() -> Self {
        Self { allowed: true, ..Self::default() }
    }

    fn deny(self, reason: impl Into<String>) -> Self {
        Self { allowed: false, reason: Some(reason.into()), patch: None, warnings: self.warnings }
    }

    fn with_warnings(mut self, warnings: Vec<String>) -> Self {
        self.warnings.extend(warnings);
        self
    }
}

/// The answer as `admission.k8s.io/v1` specifies it. kube-core's
/// `AdmissionResponse` writes the patch's bytes as a JSON array of numbers
/// (kube-rs#1781); the API's `patch` is a base64 string (a third of the size).
fn encode(api_version: &str, uid: &str, verdict: &Verdict) -> Response {
    match answer(api_version, uid, verdict) {
        Ok(body) => ([(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode the answer: {e}")).into_response(),
    }
}

/// The AdmissionReview answer's JSON text, written in one pass: strings
/// through `serde_json` (which escapes them), the base64 patch as it is
/// (base64 has nothing to escape). Members in the order the API lists them:
/// `uid`, `allowed`, `status`, `patch`, `patchType`, `warnings`.
fn answer(api_version: &str, uid: &str, verdict: &Verdict) -> serde_json::Result<Vec<u8>> {
    let engine = &base64::engine::general_purpose::STANDARD;
    let patch_len = verdict.patch.as_ref().map_or(0, |p| p.len().div_ceil(3) * 4);
    let mut out = Vec::with_capacity(128 + api_version.len() + uid.len() + patch_len);
    out.extend_from_slice(br#"{"apiVersion":"#);
    serde_json::to_writer(&mut out, api_version)?;
    out.extend_from_slice(br#","kind":"AdmissionReview","response":{"uid":"#);
    serde_json::to_writer(&mut out, uid)?;
    out.extend_from_slice(if verdict.allowed { br#","allowed":true"# } else { br#","allowed":false"# });
    if !verdict.allowed {
        out.extend_from_slice(br#","status":{"code":403,"message":"#);
        serde_json::to_writer(&mut out, verdict.reason.as_deref().unwrap_or_default())?;
        out.push(b'}');
    }
    if let Some(patch) = &verdict.patch {
        out.extend_from_slice(br#","patch":""#);
        let at = out.len();
        out.resize(at + patch_len, 0);
        let written = engine.encode_slice(patch, &mut out[at..]).map_err(serde::ser::Error::custom)?;
        out.truncate(at + written);
        out.extend_from_slice(br#"","patchType":"JSONPatch""#);
    }
    if !verdict.warnings.is_empty() {
        out.extend_from_slice(br#","warnings":"#);
        serde_json::to_writer(&mut out, &verdict.warnings)?;
    }
    out.extend_from_slice(b"}}");
    Ok(out)
}

async fn admit_pod(state: &AppState, req: Request<'_>) -> Verdict {
    let allow = Verdict::allow();
    if !req.kind.group.is_empty() || req.kind.kind != "Pod" {
        return allow.deny(format!("this webhook admits Pods, not {}/{}", req.kind.group, req.kind.kind));
    }
    if req.operation != Operation::Create || req.sub_resource.is_some() {
        return allow;
    }
    let pod: Pod = match object(&req) {
        Ok(pod) => pod,
        Err(e) => return allow.deny(e),
    };
    let namespace = req.namespace.clone().or_else(|| pod.namespace()).unwrap_or_default();
    let labels = match namespace_labels(state, &namespace).await {
        Ok(labels) => labels,
        Err(e) => return allow.deny(format!("cannot read namespace {namespace}: {e}")),
    };
    let boundaries = state.stores.boundaries.state();
    let identities: Vec<Arc<WorkloadIdentity>> = state
        .stores
        .identities
        .state()
        .into_iter()
        .filter(|wi| wi.metadata.namespace.as_deref() == Some(namespace.as_str()))
        .collect();
    let leases =
        CachedLeases { store: &state.stores.leases, counts: &state.stores.lease_counts, namespace: &namespace };
    let env = pods::Environment {
        request_uid: &req.uid,
        namespace: &namespace,
        namespace_labels: &labels,
        boundaries: &boundaries,
        identities: &identities,
        leases: &leases,
        aws: &state.aws,
        now: Timestamp::now(),
        requester: req.user_info.username.as_deref().unwrap_or_default(),
    };
    let decision = pods::decide(&pod, &env);
    if pods::asks_to_skip(&pod) && !req.dry_run {
        match &decision {
            Decision::Ignore => {}
            Decision::Skip { .. } => state.metrics.opt_out(&namespace, "skipped"),
            Decision::Admit { .. } | Decision::Deny(_) => state.metrics.opt_out(&namespace, "refused"),
        }
    }
    let (mut admission, lease, mut warnings) = match decision {
        Decision::Ignore => return allow,
        Decision::Deny(reason) => return allow.deny(reason),
        Decision::Skip { warnings } => {
            tracing::info!(
                namespace,
                pod = pod.metadata.name.as_deref().or(pod.metadata.generate_name.as_deref()).unwrap_or_default(),
                "admitted a pod unchanged, as its boundaries allow (ephemera.dev/skip)"
            );
            return allow.with_warnings(warnings);
        }
        Decision::Admit { admission, lease, warnings } => (admission, lease, warnings),
    };
    // A dry run makes nothing, and the ServiceAccount plugin still checks
    // that the pod's account exists: keep the pod's own account and say so.
    if req.dry_run
        && let Some(identity) = admission.identity.as_mut()
    {
        let own = pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into());
        warnings.push(format!(
            "dry run: the pod would run as its own ServiceAccount {}, which a dry run does not make; shown with {own}",
            identity.service_account
        ));
        identity.service_account = own;
    }
    if let Some(lease) = &lease
        && !req.dry_run
        && let Err(e) = pods::provision(&state.client, lease).await
    {
        tracing::warn!(namespace, lease = %lease.name_any(), error = %e, "could not make the pod's identity");
        return allow.deny(format!("could not make the pod's identity: {e}"));
    }
    let patch = match mutate(&pod, &admission, &state.settings) {
        Ok(patch) => patch,
        Err(e) => return allow.deny(e.to_string()),
    };
    if let Some(identity) = &admission.identity {
        tracing::info!(namespace, lease = %identity.lease, dry_run = req.dry_run, "admitted a pod with its own identity");
    }
    let verdict = if patch.is_empty() { allow } else { Verdict { patch: Some(patch.into_json()), ..allow } };
    verdict.with_warnings(warnings)
}

/// A namespace's leases in the webhook's cache: a lookup by name costs one
/// hash-map read, whatever the cluster holds.
#[derive(Debug)]
struct CachedLeases<'a> {
    store: &'a Store<IdentityLease>,
    counts: &'a LeaseCounts,
    namespace: &'a str,
}

impl pods::NamespaceLeases for CachedLeases<'_> {
    fn contains(&self, name: &str) -> bool {
        self.store.get(&ObjectRef::new(name).within(self.namespace)).is_some()
    }

    fn count(&self) -> usize {
        self.counts.of(self.namespace)
    }
}

/// The namespace's labels, from the cache or (for a namespace created a
/// moment ago) from the apiserver.
async fn namespace_labels(state: &AppState, namespace: &str) -> Result<BTreeMap<String, String>, Error> {
    let key = kube::runtime::reflector::ObjectRef::<Namespace>::new(namespace);
    if let Some(ns) = state.stores.namespaces.get(&key) {
        return Ok(ns.labels().clone());
    }
    let ns = Api::<Namespace>::all(state.client.clone())
        .get(namespace)
        .await
        .map_err(Error::kube(format!("reading namespace {namespace}")))?;
    Ok(ns.labels().clone())
}

async fn validate_identity(state: &AppState, req: Request<'_>) -> Verdict {
    let allow = Verdict::allow();
    if req.kind.group != crate::api::GROUP || req.kind.kind != "WorkloadIdentity" {
        return allow
            .deny(format!("this webhook validates WorkloadIdentities, not {}/{}", req.kind.group, req.kind.kind));
    }
    if !matches!(req.operation, Operation::Create | Operation::Update) {
        return allow;
    }
    let identity: WorkloadIdentity = match object(&req) {
        Ok(wi) => wi,
        Err(e) => return allow.deny(e),
    };
    let namespace = req.namespace.clone().unwrap_or_default();
    let labels = match namespace_labels(state, &namespace).await {
        Ok(labels) => labels,
        Err(e) => return allow.deny(format!("cannot read namespace {namespace}: {e}")),
    };
    let boundaries = state.stores.boundaries.state();
    let warnings = match identities::check_boundaries(&identity.spec, &namespace, &labels, &boundaries) {
        Ok(warnings) => warnings,
        Err(reason) => return allow.deny(reason),
    };
    match escalation(state, &req, &identity.spec, &namespace).await {
        Ok(()) => allow.with_warnings(warnings),
        Err(reason) => allow.deny(reason),
    }
}

/// Refuses Kubernetes rules the requester does not hold. Every update is
/// checked, not only rule changes: a new selector hands the rules to other pods.
async fn escalation(
    state: &AppState,
    req: &Request<'_>,
    spec: &WorkloadIdentitySpec,
    namespace: &str,
) -> Result<(), String> {
    let rules = spec.kubernetes.as_ref().map(|k| k.rules.as_slice()).unwrap_or_default();
    if rules.is_empty() {
        return Ok(());
    }
    let wanted = identities::accesses(rules)?;
    let missing = identities::missing_accesses(&state.client, &req.user_info, namespace, &wanted)
        .await
        .map_err(|e| format!("cannot check the requester's own access, so the rules are refused: {e}"))?;
    if missing.is_empty() {
        return Ok(());
    }
    let user = req.user_info.username.as_deref().unwrap_or("the requester");
    let shown: Vec<String> = missing.iter().take(5).map(ToString::to_string).collect();
    let more = if missing.len() > 5 { format!(" and {} more", missing.len() - 5) } else { String::new() };
    Err(format!("{user} may not grant what they do not hold in namespace {namespace}: {}{more}", shown.join("; ")))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever a verdict holds, the hand-written answer is JSON that
        /// says exactly that: the strings as they were, the patch's bytes
        /// back from base64.
        #[test]
        fn any_verdict_is_answered_as_what_it_says(
            api_version in ".{0,20}",
            uid in ".{0,40}",
            allowed in any::<bool>(),
            reason in ".{0,60}",
            patch in prop::option::of(prop::collection::vec(any::<u8>(), 0..200)),
            warnings in prop::collection::vec(".{0,30}", 0..3),
        ) {
            let verdict = Verdict { allowed, reason: Some(reason.clone()), patch: patch.clone(), warnings: warnings.clone() };
            let body = super::answer(&api_version, &uid, &verdict).unwrap();
            let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap();
            prop_assert_eq!(&parsed["apiVersion"], &serde_json::json!(api_version));
            prop_assert_eq!(&parsed["kind"], "AdmissionReview");
            let response = &parsed["response"];
            prop_assert_eq!(&response["uid"], &serde_json::json!(uid));
            prop_assert_eq!(&response["allowed"], &serde_json::json!(allowed));
            if allowed {
                prop_assert!(response.get("status").is_none());
            } else {
                prop_assert_eq!(&response["status"], &serde_json::json!({"code": 403, "message": reason}));
            }
            match &patch {
                Some(bytes) => {
                    let encoded = response["patch"].as_str().unwrap();
                    prop_assert_eq!(&base64::engine::general_purpose::STANDARD.decode(encoded).unwrap(), bytes);
                    prop_assert_eq!(&response["patchType"], "JSONPatch");
                }
                None => prop_assert!(response.get("patch").is_none() && response.get("patchType").is_none()),
            }
            if warnings.is_empty() {
                prop_assert!(response.get("warnings").is_none());
            } else {
                prop_assert_eq!(&response["warnings"], &serde_json::json!(warnings));
            }
        }
    }

    fn lease(namespace: &str, name: &str) -> IdentityLease {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "ephemera.dev/v1alpha1", "kind": "IdentityLease",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"holder": {"kind": "Pod", "name": name}, "workloadIdentity": "report",
                     "serviceAccount": name, "expiresAt": "2026-12-06T10:00:00Z"},
        }))
        .unwrap()
    }

    #[test]
    fn a_namespaces_leases_are_looked_up_in_the_cache_by_name() {
        use pods::NamespaceLeases;
        let (store, mut writer) = kube::runtime::reflector::store::<IdentityLease>();
        let counts = LeaseCounts::default();
        for (ns, name) in [("team-a", "one"), ("team-a", "two"), ("team-b", "three")] {
            let event = kube::runtime::watcher::Event::Apply(lease(ns, name));
            counts.observe(&event, &store);
            writer.apply_watcher_event(&event);
        }
        let team_a = CachedLeases { store: &store, counts: &counts, namespace: "team-a" };
        assert!(team_a.contains("one") && team_a.contains("two"));
        assert!(!team_a.contains("three"), "another namespace's lease is not this one's");
        assert_eq!(team_a.count(), 2);
        assert_eq!(CachedLeases { store: &store, counts: &counts, namespace: "team-c" }.count(), 0);
    }

    /// A watch event: 0-2 apply, 3 delete, 4 a relist of the listed leases.
    fn watch_step() -> impl Strategy<Value = (u8, Vec<(u8, u8)>)> {
        (0u8..5, prop::collection::vec((0u8..3, 0u8..4), 0..6))
    }

    proptest! {
        /// The counts kept from the watch are what scanning the store says,
        /// after every event of any sequence (updates, deletes of leases
        /// never seen, relists that drop and add).
        #[test]
        fn lease_counts_kept_from_the_watch_match_a_scan(steps in prop::collection::vec(watch_step(), 1..40)) {
            use kube::runtime::watcher::Event;
            let (store, mut writer) = kube::runtime::reflector::store::<IdentityLease>();
            let counts = LeaseCounts::default();
            let name = |(ns, n): (u8, u8)| lease(&format!("ns-{ns}"), &format!("l-{n}"));
            let mut apply = |event: Event<IdentityLease>| {
                counts.observe(&event, &store);
                writer.apply_watcher_event(&event);
            };
            for (kind, leases) in steps {
                match kind {
                    0..=2 => leases.iter().for_each(|l| apply(Event::Apply(name(*l)))),
                    3 => leases.iter().for_each(|l| apply(Event::Delete(name(*l)))),
                    _ => {
                        apply(Event::Init);
                        let mut listed = leases.clone();
                        listed.sort_unstable();
                        listed.dedup();
                        for l in listed {
                            apply(Event::InitApply(name(l)));
                        }
                        apply(Event::InitDone);
                    }
                }
                for ns in 0..3 {
                    let ns = format!("ns-{ns}");
                    let scanned =
                        store.state().iter().filter(|l| l.metadata.namespace.as_deref() == Some(ns.as_str())).count();
                    prop_assert_eq!(counts.of(&ns), scanned, "namespace {}", ns);
                }
            }
        }
    }

    #[test]
    fn malformed_reviews_are_refused_with_a_reason() {
        for (body, expect) in [
            (&b""[..], "malformed AdmissionReview: EOF"),
            (b"{", "malformed AdmissionReview: EOF"),
            (b"[]", "malformed AdmissionReview: invalid length"),
            (b"{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"AdmissionReview\"}", "it has no request"),
            (b"\xff\xfe", "malformed AdmissionReview"),
        ] {
            let err = decode(body).unwrap_err();
            assert!(err.contains(expect), "{body:?}: {err}");
        }
    }

    #[test]
    fn a_patch_goes_out_as_base64_as_the_api_specifies() {
        let verdict = Verdict { patch: Some(br#"[{"op":"add","path":"/a","value":1}]"#.to_vec()), ..Verdict::allow() };
        let response = encode("admission.k8s.io/v1", "u1", &verdict);
        let body = futures::executor::block_on(axum::body::to_bytes(response.into_body(), usize::MAX)).unwrap();
        let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(answer["kind"], "AdmissionReview");
        assert_eq!(answer["response"]["uid"], "u1");
        assert_eq!(answer["response"]["allowed"], true);
        assert_eq!(answer["response"]["patchType"], "JSONPatch");
        assert_eq!(answer["response"]["patch"], "W3sib3AiOiJhZGQiLCJwYXRoIjoiL2EiLCJ2YWx1ZSI6MX1d");
        assert!(answer["response"].get("status").is_none(), "{answer}");

        let denied = encode("admission.k8s.io/v1", "u2", &Verdict::allow().deny("spec.volumes[0]: no"));
        let body = futures::executor::block_on(axum::body::to_bytes(denied.into_body(), usize::MAX)).unwrap();
        let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(answer["response"]["allowed"], false);
        assert_eq!(answer["response"]["status"]["code"], 403);
        assert_eq!(answer["response"]["status"]["message"], "spec.volumes[0]: no");
        assert!(answer["response"].get("patch").is_none(), "{answer}");

        // Whatever a request's uid or a warning holds comes back as the same
        // string, escaped, in JSON that parses.
        let odd = "u\"3\\\n\u{1}é";
        let verdict = Verdict {
            patch: Some(b"[]".to_vec()),
            warnings: vec!["a \"quoted\" warning".into(), "ünïcode\t".into()],
            ..Verdict::allow()
        };
        let body = super::answer("admission.k8s.io/v1", odd, &verdict).unwrap();
        let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(parsed["response"]["uid"], odd);
        assert_eq!(parsed["response"]["patch"], "W10=");
        assert_eq!(parsed["response"]["warnings"], serde_json::json!(["a \"quoted\" warning", "ünïcode\t"]));
        let denied = Verdict::allow().with_warnings(vec!["w".into()]).deny("no \"way\"");
        let parsed: serde_json::Value =
            serde_json::from_slice(&super::answer("admission.k8s.io/v1", "u4", &denied).unwrap()).unwrap();
        assert_eq!(
            parsed,
            serde_json::json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": {
                "uid": "u4", "allowed": false, "status": {"code": 403, "message": "no \"way\""}, "warnings": ["w"]}})
        );
    }
}
