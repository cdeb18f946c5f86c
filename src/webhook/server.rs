//! The HTTP layer: decode the AdmissionReview, call the pure core, encode the
//! answer. A body that is not an AdmissionReview gets a 400 with the reason;
//! nothing in here panics on input.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::post,
};
use k8s_openapi::{
    api::core::v1::{Namespace, Pod},
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt,
    core::{
        DynamicObject,
        admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
    },
    runtime::reflector::Store,
};

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
async fn handle<'a, F, Fut>(state: &'a AppState, webhook: &'static str, body: &[u8], f: F) -> Response
where
    F: FnOnce(&'a AppState, AdmissionRequest<DynamicObject>) -> Fut,
    Fut: Future<Output = AdmissionResponse>,
{
    let start = Instant::now();
    let request = match decode(body) {
        Ok(request) => request,
        Err(message) => {
            state.metrics.admission_done(webhook, "malformed", start.elapsed());
            return (StatusCode::BAD_REQUEST, message).into_response();
        }
    };
    let response = f(state, request).await;
    let outcome = if !response.allowed {
        "denied"
    } else if response.patch.is_some() {
        "mutated"
    } else {
        "allowed"
    };
    state.metrics.admission_done(webhook, outcome, start.elapsed());
    Json(response.into_review()).into_response()
}

/// The request of an AdmissionReview, or why the body is not one.
///
/// # Errors
/// A message for the 400 answer.
pub fn decode(body: &[u8]) -> Result<AdmissionRequest<DynamicObject>, String> {
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_slice(body).map_err(|e| format!("malformed AdmissionReview: {e}"))?;
    review.try_into().map_err(|_| "malformed AdmissionReview: it has no request".to_owned())
}

/// Converts the request's object into `T`.
fn object<T: serde::de::DeserializeOwned>(req: &AdmissionRequest<DynamicObject>) -> Result<T, String> {
    let obj = req.object.as_ref().ok_or("the request carries no object")?;
    let value = serde_json::to_value(obj).map_err(|e| e.to_string())?;
    serde_json::from_value(value).map_err(|e| format!("cannot decode the {}: {e}", req.kind.kind))
}

fn with_warnings(mut response: AdmissionResponse, warnings: Vec<String>) -> AdmissionResponse {
    if !warnings.is_empty() {
        response.warnings = Some(warnings);
    }
    response
}

async fn admit_pod(state: &AppState, req: AdmissionRequest<DynamicObject>) -> AdmissionResponse {
    let allow = AdmissionResponse::from(&req);
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
    let boundaries: Vec<IdentityBoundary> = state.stores.boundaries.state().iter().map(|b| (**b).clone()).collect();
    let in_namespace = |ns: Option<String>| ns.as_deref() == Some(namespace.as_str());
    let identities: Vec<WorkloadIdentity> = state
        .stores
        .identities
        .state()
        .iter()
        .filter(|wi| in_namespace(wi.namespace()))
        .map(|wi| (**wi).clone())
        .collect();
    let leases: Vec<String> =
        state.stores.leases.state().iter().filter(|l| in_namespace(l.namespace())).map(|l| l.name_any()).collect();
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
            return with_warnings(allow, warnings);
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
    let response = if patch.0.is_empty() {
        allow
    } else {
        match allow.clone().with_patch(patch) {
            Ok(r) => r,
            Err(e) => return allow.deny(format!("cannot encode the patch: {e}")),
        }
    };
    with_warnings(response, warnings)
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

async fn validate_identity(state: &AppState, req: AdmissionRequest<DynamicObject>) -> AdmissionResponse {
    let allow = AdmissionResponse::from(&req);
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
    let boundaries: Vec<IdentityBoundary> = state.stores.boundaries.state().iter().map(|b| (**b).clone()).collect();
    let warnings = match identities::check_boundaries(&identity.spec, &namespace, &labels, &boundaries) {
        Ok(warnings) => warnings,
        Err(reason) => return allow.deny(reason),
    };
    match escalation(state, &req, &identity.spec, &namespace).await {
        Ok(()) => with_warnings(allow, warnings),
        Err(reason) => allow.deny(reason),
    }
}

/// Refuses Kubernetes rules the requester does not hold. Every update is
/// checked, not only rule changes: a new selector hands the rules to other pods.
async fn escalation(
    state: &AppState,
    req: &AdmissionRequest<DynamicObject>,
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
    use super::*;

    #[test]
    fn malformed_reviews_are_refused_with_a_reason() {
        for (body, expect) in [
            (&b""[..], "malformed AdmissionReview: EOF"),
            (b"{", "malformed AdmissionReview: EOF"),
            (b"[]", "malformed AdmissionReview: invalid type"),
            (b"{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"AdmissionReview\"}", "it has no request"),
            (b"\xff\xfe", "malformed AdmissionReview"),
        ] {
            let err = decode(body).unwrap_err();
            assert!(err.contains(expect), "{body:?}: {err}");
        }
    }
}
