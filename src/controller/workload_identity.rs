//! The identity controller: clamps each `WorkloadIdentity` to the
//! `IdentityBoundary`s governing its namespace and publishes the result
//! (effective TTL, permissions boundaries, policy digest, conditions) in its
//! status. Any boundary change, or a namespace's labels changing, re-evaluates
//! the identities it may affect.

use std::{borrow::Borrow, collections::BTreeMap, sync::Arc};

use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Resource, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    core::{Selector, SelectorExt},
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        events::{Event, EventType},
        reflector::{ObjectRef, store::Writer},
        watcher,
    },
};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::{Context, RESYNC, condition, drain, is_true, retry};
use crate::{
    Error, Result,
    api::{
        AwsStatement, Duration, EffectiveIdentity, IdentityBoundary, KubernetesRule, WorkloadIdentity,
        WorkloadIdentitySpec, WorkloadIdentityStatus,
        well_known::{FIELD_MANAGER, condition as cond, reason},
    },
    policy::{self, Violation},
};

const CONTROLLER: &str = "workload_identity";

/// Runs the identity controller until shutdown.
pub async fn run(
    ctx: Arc<Context>,
    writer: Writer<WorkloadIdentity>,
    boundary_cache: Writer<IdentityBoundary>,
    namespace_cache: Writer<Namespace>,
) {
    let client = ctx.client.clone();
    let store = writer.as_reader();
    let identities = watcher(Api::<WorkloadIdentity>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects();
    let controller = Controller::for_stream(identities, store.clone());
    let by_boundary = store.clone();
    let by_namespace = store.clone();
    let stream = controller
        // A boundary change may affect any identity (its selector can match any namespace).
        // (Both watches fill the caches the lease controller clamps new roles
        // with, instead of a read and a list per lease.)
        .watches_stream(
            watcher(Api::<IdentityBoundary>::all(client.clone()), watcher::Config::default())
                .default_backoff()
                .reflect(boundary_cache)
                .touched_objects(),
            move |_| by_boundary.state().iter().map(|wi| ObjectRef::from_obj(&**wi)).collect::<Vec<_>>(),
        )
        // A namespace's labels decide which boundaries govern its identities.
        .watches_stream(
            watcher(Api::<Namespace>::all(client.clone()), watcher::Config::default())
                .default_backoff()
                .reflect(namespace_cache)
                .touched_objects(),
            move |ns| {
                let name = ns.name_any();
                by_namespace
                    .state()
                    .iter()
                    .filter(|wi| wi.namespace().as_deref() == Some(name.as_str()))
                    .map(|wi| ObjectRef::from_obj(&**wi))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(ctx.stop.stopped())
        .run(reconcile, |_, err, ctx| retry(&ctx, CONTROLLER, err), ctx);
    drain(CONTROLLER, stream).await;
}

async fn reconcile(identity: Arc<WorkloadIdentity>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started(CONTROLLER);
    let namespace = identity.namespace().unwrap_or_default();
    let name = identity.name_any();
    let client = &ctx.client;

    let (labels, boundaries) = namespace_and_boundaries(client, &namespace).await?;
    // Counted from the lease controller's cache once it is filled.
    if !ctx.leases_ready.wait().await {
        return Err(Error::Stopped("the lease cache stopped before it was filled".into()));
    }
    let active_leases = ctx
        .leases
        .state()
        .iter()
        .filter(|l| l.spec.workload_identity == name && l.namespace().as_deref() == Some(namespace.as_str()))
        .count();

    let evaluation = evaluate(&identity.spec, &labels, &boundaries);
    let previous = identity.status.clone().unwrap_or_default();
    let status = status_for(&evaluation, &previous, identity.meta().generation, active_leases);

    publish_transitions(&ctx, &identity, &previous, &status, &evaluation).await;
    Api::<WorkloadIdentity>::namespaced(client.clone(), &namespace)
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(json!({
                "apiVersion": "ephemera.dev/v1alpha1",
                "kind": "WorkloadIdentity",
                "status": status,
            })),
        )
        .await
        .map_err(Error::kube(format!("writing the status of WorkloadIdentity {namespace}/{name}")))?;
    Ok(Action::requeue(RESYNC))
}

/// [`namespace_and_boundaries`] from the identity controller's caches once
/// they have listed what exists; a namespace they do not hold yet (made a
/// moment ago), or caches still filling, are asked of the apiserver. (A
/// boundary changed a moment ago reaches the role anyway: the identity's
/// policy digest changes and live roles follow it.)
///
/// # Errors
/// When the apiserver has to be asked and cannot answer.
pub async fn cached_namespace_and_boundaries(
    ctx: &Context,
    namespace: &str,
) -> Result<(BTreeMap<String, String>, Vec<IdentityBoundary>)> {
    use futures::FutureExt;
    let filled = |ready: Option<Result<(), _>>| ready.is_some_and(|r: Result<(), _>| r.is_ok());
    if filled(ctx.boundaries.wait_until_ready().now_or_never())
        && filled(ctx.namespaces.wait_until_ready().now_or_never())
        && let Some(ns) = ctx.namespaces.get(&ObjectRef::new(namespace))
    {
        let boundaries = ctx.boundaries.state().iter().map(|b| (**b).clone()).collect();
        return Ok((ns.labels().clone(), boundaries));
    }
    namespace_and_boundaries(&ctx.client, namespace).await
}

/// What clamping an identity in `namespace` reads: the namespace's labels
/// and every `IdentityBoundary`.
///
/// # Errors
/// When either cannot be read.
pub async fn namespace_and_boundaries(
    client: &kube::Client,
    namespace: &str,
) -> Result<(BTreeMap<String, String>, Vec<IdentityBoundary>)> {
    let labels = Api::<Namespace>::all(client.clone())
        .get(namespace)
        .await
        .map_err(Error::kube(format!("reading namespace {namespace}")))?
        .labels()
        .clone();
    let boundaries = Api::<IdentityBoundary>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::kube("listing IdentityBoundaries"))?
        .items;
    Ok((labels, boundaries))
}

/// Events for what a user should notice: a violation appearing or going
/// away, the namespace becoming (un)governed.
async fn publish_transitions(
    ctx: &Context,
    identity: &WorkloadIdentity,
    previous: &WorkloadIdentityStatus,
    next: &WorkloadIdentityStatus,
    evaluation: &Evaluation,
) {
    let was_violating = is_true(&previous.conditions, cond::BOUNDARY_VIOLATION);
    let is_violating = is_true(&next.conditions, cond::BOUNDARY_VIOLATION);
    let was_ready = is_true(&previous.conditions, cond::READY);
    let is_ready = is_true(&next.conditions, cond::READY);
    let event = if is_violating && (!was_violating || previous.effective != next.effective) {
        Some((EventType::Warning, reason::BOUNDARY_VIOLATION, violation_message(&evaluation.violations)))
    } else if was_violating && !is_violating {
        Some((EventType::Normal, reason::WITHIN_BOUNDARY, "everything requested is within the boundaries".to_owned()))
    } else if let Some(conflict) = evaluation
        .permissions_boundary_conflict
        .as_ref()
        .filter(|_| !previous.conditions.iter().any(|c| c.reason == reason::PERMISSIONS_BOUNDARY_CONFLICT))
    {
        Some((EventType::Warning, reason::PERMISSIONS_BOUNDARY_CONFLICT, conflict.clone()))
    } else if !is_ready && (was_ready || previous.conditions.is_empty()) {
        Some((EventType::Warning, reason::NOT_GOVERNED, not_governed_message()))
    } else if is_ready && !was_ready {
        Some((EventType::Normal, reason::WITHIN_BOUNDARY, format!("governed by {}", evaluation.governing.join(", "))))
    } else {
        None
    };
    if let Some((type_, reason, note)) = event {
        let ev = Event { type_, reason: reason.into(), note: Some(note), action: "Evaluate".into(), secondary: None };
        ctx.events.publish(&ev, &identity.object_ref(&())).await;
    }
}

/// What a `WorkloadIdentity` really gets in its namespace.
#[derive(Debug, Default, PartialEq)]
pub struct Evaluation {
    /// Names of the boundaries governing the namespace, sorted.
    pub governing: Vec<String>,
    /// Boundaries whose selector is invalid (skipped).
    pub invalid_selectors: Vec<String>,
    /// The AWS statements after clamping to every governing boundary.
    pub statements: Vec<AwsStatement>,
    /// Managed policies every governing boundary allows.
    pub managed_policy_arns: Vec<String>,
    /// The Kubernetes rules every governing boundary admits (a rule is kept
    /// or dropped whole), as the lease's Role grants them.
    pub kubernetes_rules: Vec<KubernetesRule>,
    /// Token lifetime after every boundary's cap.
    pub token_ttl: Duration,
    /// Permissions boundaries the governing boundaries name (distinct). A
    /// role takes one: with more than one the identity is refused
    /// ([`Evaluation::permissions_boundary_conflict`]).
    pub permissions_boundary_arns: Vec<String>,
    /// Why the identity gets no role at all: its boundaries name different
    /// permissions boundaries. IAM attaches one per role and the intersection
    /// of two managed policies cannot be written as a third, so ephemera
    /// refuses rather than silently keep one of them.
    pub permissions_boundary_conflict: Option<String>,
    /// Everything asked for that some boundary refused.
    pub violations: Vec<Violation>,
}

/// Clamps `spec` to the boundaries among `boundaries` that govern a namespace
/// with `labels`. Several boundaries: the identity gets what all of them allow.
#[must_use]
pub fn evaluate<B: Borrow<IdentityBoundary>>(
    spec: &WorkloadIdentitySpec,
    labels: &BTreeMap<String, String>,
    boundaries: &[B],
) -> Evaluation {
    let (governing, invalid) = governing_boundaries(labels, boundaries);
    let mut eval = evaluate_under(spec, &governing);
    eval.invalid_selectors = invalid;
    eval
}

/// [`evaluate`] for boundaries already known to govern the namespace (as
/// [`governing_boundaries`] returns them): admission has them in hand.
#[must_use]
pub fn evaluate_under(spec: &WorkloadIdentitySpec, governing: &[&IdentityBoundary]) -> Evaluation {
    let mut eval = Evaluation { token_ttl: spec.token.ttl, ..Evaluation::default() };
    let requested = spec.aws.as_ref().map(|a| a.statements.as_slice()).unwrap_or_default();
    eval.managed_policy_arns = spec.aws.as_ref().map(|a| a.managed_policy_arns.clone()).unwrap_or_default();
    let rules = spec.kubernetes.as_ref().map(|k| k.rules.as_slice()).unwrap_or_default();
    eval.kubernetes_rules = rules.to_vec();
    if governing.is_empty() {
        eval.statements = requested.to_vec();
    }
    let mut boundary_arns: Vec<(String, String)> = Vec::new();

    for (nth, boundary) in governing.iter().enumerate() {
        let name = boundary.name_any();
        let (allowed_actions, allowed_resources, allowed_managed) =
            boundary.spec.aws.as_ref().map_or((&[][..], &[][..], &[][..]), |a| {
                (a.allowed_actions.as_slice(), a.allowed_resources.as_slice(), a.allowed_managed_policy_arns.as_slice())
            });
        // Violations are reported against the statements as written, so the
        // field paths match the user's YAML; the effective set narrows in turn
        // (under the first boundary it is the same clamp).
        let (narrowed, violations) = policy::clamp_statements(requested, &name, allowed_actions, allowed_resources);
        eval.violations.extend(violations);
        eval.statements = if nth == 0 {
            narrowed
        } else {
            policy::clamp_statements(&eval.statements, &name, allowed_actions, allowed_resources).0
        };

        let requested_managed = spec.aws.as_ref().map(|a| a.managed_policy_arns.as_slice()).unwrap_or_default();
        for (i, arn) in requested_managed.iter().enumerate() {
            if !allowed_managed.contains(arn) {
                eval.violations.push(Violation {
                    field: format!("spec.aws.managedPolicyArns[{i}]"),
                    value: arn.clone(),
                    boundary: name.clone(),
                });
            }
        }
        eval.managed_policy_arns.retain(|arn| allowed_managed.contains(arn));

        let allowed_rules = boundary.spec.kubernetes.as_ref().map(|k| k.allowed_rules.as_slice()).unwrap_or_default();
        eval.kubernetes_rules.retain(|rule| policy::rule_admitted(rule, allowed_rules));
        for (i, rule) in rules.iter().enumerate() {
            if !policy::rule_admitted(rule, allowed_rules) {
                eval.violations.push(Violation {
                    field: format!("spec.kubernetes.rules[{i}]"),
                    value: format!(
                        "{} {} ({})",
                        rule.verbs.join(","),
                        rule.resources.join(","),
                        rule.api_groups.join(",")
                    ),
                    boundary: name.clone(),
                });
            }
        }

        eval.token_ttl = eval.token_ttl.min(boundary.spec.max_token_ttl);
        if let Some(arn) = boundary.spec.aws.as_ref().and_then(|a| a.permissions_boundary_arn.clone()) {
            if !eval.permissions_boundary_arns.contains(&arn) {
                eval.permissions_boundary_arns.push(arn.clone());
            }
            boundary_arns.push((name.clone(), arn));
        }
        eval.governing.push(name);
    }
    if eval.permissions_boundary_arns.len() > 1 {
        let named: Vec<String> =
            boundary_arns.iter().map(|(b, arn)| format!("IdentityBoundary {b} sets {arn}")).collect();
        eval.permissions_boundary_conflict = Some(format!(
            "spec.aws.permissionsBoundaryArn differs between the boundaries governing this namespace ({}): an IAM \
             role takes one permissions boundary and ephemera will not drop the others, so no role is made until \
             the boundaries name the same one (or only one names any)",
            named.join(", ")
        ));
    }
    eval
}

/// The boundaries (not being deleted) whose namespace selector matches a
/// namespace with `labels`, sorted by name, and the names of those whose
/// selector cannot be evaluated.
#[must_use]
pub fn governing_boundaries<'a, B: Borrow<IdentityBoundary>>(
    labels: &BTreeMap<String, String>,
    boundaries: &'a [B],
) -> (Vec<&'a IdentityBoundary>, Vec<String>) {
    let mut governing: Vec<&IdentityBoundary> = Vec::new();
    let mut invalid = Vec::new();
    for boundary in boundaries.iter().map(Borrow::borrow).filter(|b| b.meta().deletion_timestamp.is_none()) {
        match Selector::try_from(boundary.spec.namespace_selector.clone()) {
            Ok(selector) if selector.matches(labels) => governing.push(boundary),
            Ok(_) => {}
            Err(_) => invalid.push(boundary.name_any()),
        }
    }
    governing.sort_by_key(|b| b.name_any());
    (governing, invalid)
}

/// The status for an evaluation.
fn status_for(
    eval: &Evaluation,
    previous: &WorkloadIdentityStatus,
    generation: Option<i64>,
    active_leases: usize,
) -> WorkloadIdentityStatus {
    let governed = !eval.governing.is_empty();
    let ready = if let Some(conflict) = &eval.permissions_boundary_conflict {
        condition(
            &previous.conditions,
            cond::READY,
            false,
            reason::PERMISSIONS_BOUNDARY_CONFLICT,
            conflict.clone(),
            generation,
        )
    } else if governed {
        condition(
            &previous.conditions,
            cond::READY,
            true,
            reason::WITHIN_BOUNDARY,
            format!("governed by {}", eval.governing.join(", ")),
            generation,
        )
    } else {
        condition(&previous.conditions, cond::READY, false, reason::NOT_GOVERNED, not_governed_message(), generation)
    };
    let violation = if eval.violations.is_empty() {
        condition(
            &previous.conditions,
            cond::BOUNDARY_VIOLATION,
            false,
            reason::WITHIN_BOUNDARY,
            String::new(),
            generation,
        )
    } else {
        condition(
            &previous.conditions,
            cond::BOUNDARY_VIOLATION,
            true,
            reason::BOUNDARY_VIOLATION,
            violation_message(&eval.violations),
            generation,
        )
    };
    let degraded = if eval.invalid_selectors.is_empty() {
        condition(&previous.conditions, cond::DEGRADED, false, reason::RECONCILED, String::new(), generation)
    } else {
        let message =
            format!("skipped IdentityBoundary {} (invalid namespaceSelector)", eval.invalid_selectors.join(", "));
        condition(&previous.conditions, cond::DEGRADED, true, reason::INVALID_SELECTOR, message, generation)
    };
    WorkloadIdentityStatus {
        observed_generation: generation,
        conditions: vec![ready, violation, degraded],
        active_leases: Some(i32::try_from(active_leases).unwrap_or(i32::MAX)),
        effective: governed.then(|| EffectiveIdentity {
            boundaries: eval.governing.clone(),
            token_ttl: Some(eval.token_ttl),
            permissions_boundary_arns: eval.permissions_boundary_arns.clone(),
            policy_digest: Some(policy_digest(eval)),
        }),
    }
}

fn not_governed_message() -> String {
    "no IdentityBoundary governs this namespace: ephemera gives its pods no identity".to_owned()
}

fn violation_message(violations: &[Violation]) -> String {
    let shown: Vec<String> = violations.iter().map(ToString::to_string).collect();
    format!("narrowed to what the boundaries allow: {}", shown.join("; "))
}

/// SHA-256 of the effective permissions, hex: a short way to see they
/// changed, and the signal that makes live leases follow. It covers the AWS
/// statements, the managed policies and the Kubernetes rules. (Identities
/// without Kubernetes rules digest the same document as before the rules
/// were covered, so upgrading re-applies nothing for them.)
#[must_use]
pub fn policy_digest(eval: &Evaluation) -> String {
    let (statements, managed) = (&eval.statements, &eval.managed_policy_arns);
    let document = if eval.kubernetes_rules.is_empty() {
        json!({ "statements": statements, "managedPolicyArns": managed })
    } else {
        json!({ "statements": statements, "managedPolicyArns": managed, "kubernetesRules": eval.kubernetes_rules })
    };
    let digest = Sha256::digest(document.to_string().as_bytes());
    digest.iter().fold(String::with_capacity(64), |mut hex, b| {
        use std::fmt::Write;
        let _ = write!(hex, "{b:02x}");
        hex
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    use super::*;

    fn boundary(name: &str, team: &str, actions: &[&str], resources: &[&str], max_ttl: &str) -> IdentityBoundary {
        serde_json::from_value(json!({
            "apiVersion": "ephemera.dev/v1alpha1", "kind": "IdentityBoundary",
            "metadata": {"name": name},
            "spec": {
                "namespaceSelector": {"matchLabels": {"team": team}},
                "aws": {"allowedActions": actions, "allowedResources": resources},
                "maxTokenTTL": max_ttl,
            }
        }))
        .unwrap()
    }

    fn identity(actions: &[&str], resources: &[&str], ttl: &str) -> WorkloadIdentitySpec {
        serde_json::from_value(json!({
            "aws": {"statements": [{"actions": actions, "resources": resources}]},
            "token": {"ttl": ttl},
        }))
        .unwrap()
    }

    fn labels(team: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("team".to_owned(), team.to_owned())])
    }

    #[test]
    fn an_identity_within_its_boundary_gets_what_it_asks_for_with_the_ttl_capped() {
        let b = boundary("a", "a", &["s3:Get*"], &["arn:aws:s3:::team-a-*"], "30m");
        let eval = evaluate(&identity(&["s3:GetObject"], &["arn:aws:s3:::team-a-raw/*"], "1h"), &labels("a"), &[b]);
        assert_eq!(eval.governing, ["a"]);
        assert!(eval.violations.is_empty(), "{:?}", eval.violations);
        assert_eq!(eval.statements[0].actions, ["s3:GetObject"]);
        assert_eq!(eval.token_ttl.to_string(), "30m");
    }

    #[test]
    fn kubernetes_rules_are_kept_whole_only_where_every_boundary_admits_them_and_move_the_digest() {
        let with_rules = |name: &str, allowed: serde_json::Value| -> IdentityBoundary {
            let mut b = boundary(name, "a", &["s3:*"], &["*"], "1h");
            b.spec.kubernetes = serde_json::from_value(json!({"allowedRules": allowed})).unwrap();
            b
        };
        let configmaps = json!({"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]});
        let secrets = json!({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]});
        let mut spec = identity(&["s3:GetObject"], &["*"], "15m");
        spec.kubernetes = serde_json::from_value(json!({"rules": [configmaps, secrets]})).unwrap();

        let both = evaluate(&spec, &labels("a"), &[with_rules("x", json!([configmaps, secrets]))]);
        assert_eq!(both.kubernetes_rules.len(), 2);
        let narrowed = evaluate(
            &spec,
            &labels("a"),
            &[with_rules("x", json!([configmaps, secrets])), with_rules("y", json!([configmaps]))],
        );
        assert_eq!(narrowed.kubernetes_rules.len(), 1);
        assert_eq!(narrowed.kubernetes_rules[0].resources, ["configmaps"]);
        let none = evaluate(&spec, &labels("a"), &[with_rules("x", json!([]))]);
        assert!(none.kubernetes_rules.is_empty());
        assert_eq!(none.violations.len(), 2, "{:?}", none.violations);

        // Narrowing the rules alone changes the digest, so live leases follow.
        let digests = [policy_digest(&both), policy_digest(&narrowed), policy_digest(&none)];
        assert!(digests[0] != digests[1] && digests[1] != digests[2] && digests[0] != digests[2], "{digests:?}");
        // Without rules the digest is the document digested before rules
        // were covered: an upgrade re-applies nothing to those leases.
        let old = json!({"statements": none.statements, "managedPolicyArns": none.managed_policy_arns});
        assert_eq!(digests[2], crate::cloud::naming::hex_digest(&old.to_string(), 64));
    }

    #[test]
    fn several_boundaries_intersect_and_unmatched_namespaces_are_not_governed() {
        let wide = boundary("wide", "a", &["s3:*"], &["*"], "1h");
        let narrow = boundary("narrow", "a", &["s3:GetObject"], &["arn:aws:s3:::team-a-raw/*"], "20m");
        let other = boundary("other", "b", &["*"], &["*"], "12h");
        let spec = identity(&["s3:GetObject", "s3:PutObject"], &["arn:aws:s3:::team-a-raw/*"], "1h");
        let eval = evaluate(&spec, &labels("a"), &[wide, narrow, other]);
        assert_eq!(eval.governing, ["narrow", "wide"]);
        assert_eq!(eval.statements[0].actions, ["s3:GetObject"]);
        assert_eq!(eval.token_ttl.to_string(), "20m");
        assert_eq!(eval.violations.len(), 1);
        assert_eq!(
            eval.violations[0].to_string(),
            r#"spec.aws.statements[0].actions: "s3:PutObject" is not allowed by IdentityBoundary narrow"#
        );

        let eval = evaluate::<IdentityBoundary>(&spec, &labels("c"), &[]);
        assert!(eval.governing.is_empty());
        let status = status_for(&eval, &WorkloadIdentityStatus::default(), Some(1), 0);
        assert!(!is_true(&status.conditions, cond::READY));
        assert_eq!(status.conditions[0].reason, reason::NOT_GOVERNED);
        assert!(status.effective.is_none());
    }

    #[test]
    fn boundaries_naming_different_permissions_boundaries_refuse_the_identity() {
        let with_pb = |name: &str, arn: Option<&str>| {
            let mut b = boundary(name, "a", &["s3:*"], &["*"], "1h");
            b.spec.aws.as_mut().unwrap().permissions_boundary_arn = arn.map(str::to_owned);
            b
        };
        let spec = identity(&["s3:GetObject"], &["*"], "15m");
        let (pb1, pb2) = ("arn:aws:iam::111122223333:policy/pb-1", "arn:aws:iam::111122223333:policy/pb-2");

        // One names one, the other none: the role gets that one.
        let eval = evaluate(&spec, &labels("a"), &[with_pb("x", Some(pb1)), with_pb("y", None)]);
        assert_eq!(
            (eval.permissions_boundary_arns.as_slice(), &eval.permissions_boundary_conflict),
            (&[pb1.to_owned()][..], &None)
        );
        // Both name the same one: that one.
        let eval = evaluate(&spec, &labels("a"), &[with_pb("x", Some(pb1)), with_pb("y", Some(pb1))]);
        assert!(eval.permissions_boundary_conflict.is_none());

        // Different ones: refused, naming both boundaries and both ARNs.
        let eval = evaluate(&spec, &labels("a"), &[with_pb("x", Some(pb1)), with_pb("y", Some(pb2))]);
        let conflict = eval.permissions_boundary_conflict.clone().expect("a conflict");
        for part in [
            "IdentityBoundary x sets arn:aws:iam::111122223333:policy/pb-1",
            "IdentityBoundary y sets arn:aws:iam::111122223333:policy/pb-2",
            "spec.aws.permissionsBoundaryArn",
        ] {
            assert!(conflict.contains(part), "{conflict}");
        }
        let status = status_for(&eval, &WorkloadIdentityStatus::default(), Some(1), 0);
        let ready = &status.conditions[0];
        assert_eq!(
            (ready.type_.as_str(), ready.status.as_str(), ready.reason.as_str()),
            ("Ready", "False", "PermissionsBoundaryConflict")
        );
        assert_eq!(ready.message, conflict);
        // The validating webhook refuses it with the same reason.
        let refused = crate::webhook::identities::check_boundaries(
            &spec,
            "team-a",
            &labels("a"),
            &[with_pb("x", Some(pb1)), with_pb("y", Some(pb2))],
        );
        assert_eq!(refused, Err(conflict));
    }

    #[test]
    fn an_invalid_boundary_selector_is_reported_not_fatal() {
        let mut bad = boundary("bad", "a", &["*"], &["*"], "1h");
        bad.spec.namespace_selector = serde_json::from_value::<LabelSelector>(
            json!({"matchExpressions": [{"key": "team", "operator": "Near", "values": ["a"]}]}),
        )
        .unwrap();
        let eval = evaluate(&identity(&["s3:GetObject"], &["*"], "15m"), &labels("a"), &[bad]);
        assert_eq!(eval.invalid_selectors, ["bad"]);
        let status = status_for(&eval, &WorkloadIdentityStatus::default(), Some(1), 0);
        assert!(is_true(&status.conditions, cond::DEGRADED));
    }

    use crate::test_support::fake_apiserver;

    /// A filled lease cache with one lease per (namespace, identity).
    fn lease_cache(leases: &[(&str, &str)]) -> kube::runtime::reflector::Store<crate::api::IdentityLease> {
        use kube::runtime::watcher::Event;
        let mut writer = kube::runtime::reflector::store::Writer::default();
        writer.apply_watcher_event(&Event::Init);
        for (i, (namespace, identity)) in leases.iter().enumerate() {
            let lease = serde_json::from_value(json!({
                "apiVersion": "ephemera.dev/v1alpha1", "kind": "IdentityLease",
                "metadata": {"name": format!("l{i}"), "namespace": namespace},
                "spec": {"holder": {"kind": "Pod", "name": "p"}, "workloadIdentity": identity,
                         "serviceAccount": format!("l{i}"), "expiresAt": "2026-11-24T10:00:00Z"},
            }))
            .unwrap();
            writer.apply_watcher_event(&Event::InitApply(lease));
        }
        writer.apply_watcher_event(&Event::InitDone);
        writer.as_reader()
    }

    #[tokio::test]
    async fn reconcile_publishes_the_violation_in_status_and_an_event() {
        let (client, mut apiserver) = fake_apiserver::client();
        let reporter = kube::runtime::events::Reporter { controller: "test".into(), instance: None };
        let ctx = Arc::new(Context {
            client: client.clone(),
            events: crate::controller::Events::new(client.clone(), reporter),
            leases: lease_cache(&[
                ("team-a", "reader"),
                ("team-a", "reader"),
                ("team-a", "writer"),
                ("team-b", "reader"),
            ]),
            identities: kube::runtime::reflector::store().0,
            boundaries: kube::runtime::reflector::store().0,
            namespaces: kube::runtime::reflector::store().0,
            leases_ready: crate::controller::Ready::now(),
            metrics: Arc::default(),
            stop: crate::controller::Stop::default(),
            fence: None,
            role_path_root: crate::cloud::naming::ROLE_PATH_ROOT.into(),
            evictions: client,
        });
        let identity: WorkloadIdentity = serde_json::from_value(json!({
            "apiVersion": "ephemera.dev/v1alpha1", "kind": "WorkloadIdentity",
            "metadata": {"name": "reader", "namespace": "team-a", "generation": 3, "uid": "u1"},
            "spec": {"aws": {"statements": [{"actions": ["s3:GetObject", "iam:PassRole"], "resources": ["*"]}]}},
        }))
        .unwrap();
        let b = boundary("team-a", "a", &["s3:Get*"], &["*"], "1h");

        let reconciler = tokio::spawn(reconcile(Arc::new(identity), ctx.clone()));
        fake_apiserver::expect(
            &mut apiserver,
            "GET",
            "/api/v1/namespaces/team-a",
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a", "labels": {"team": "a"}}}),
        )
        .await;
        fake_apiserver::expect(&mut apiserver, "GET", "/apis/ephemera.dev/v1alpha1/identityboundaries",
            json!({"apiVersion": "ephemera.dev/v1alpha1", "kind": "IdentityBoundaryList", "metadata": {}, "items": [b]})).await;
        // The Event goes in the background: in either order.
        let written = fake_apiserver::expect_each(&mut apiserver, &[
            ("POST", "/apis/events.k8s.io/v1/namespaces/team-a/events", json!({})),
            ("PATCH", "/apis/ephemera.dev/v1alpha1/namespaces/team-a/workloadidentities/reader/status",
             json!({"apiVersion": "ephemera.dev/v1alpha1", "kind": "WorkloadIdentity", "metadata": {"name": "reader"}, "spec": {}})),
        ])
        .await;
        let (event, patch) = (&written[0], &written[1]);
        assert_eq!(event["reason"], "BoundaryViolation");
        assert_eq!(event["type"], "Warning");
        let conditions = patch["status"]["conditions"].as_array().unwrap();
        let violation = conditions.iter().find(|c| c["type"] == "BoundaryViolation").unwrap();
        assert_eq!(violation["status"], "True");
        assert!(
            violation["message"]
                .as_str()
                .unwrap()
                .contains(r#""iam:PassRole" is not allowed by IdentityBoundary team-a"#)
        );
        assert_eq!(patch["status"]["observedGeneration"], 3);
        assert_eq!(patch["status"]["activeLeases"], 2, "leases of this identity in its namespace, from the cache");
        assert_eq!(patch["status"]["effective"]["tokenTTL"], "15m");

        let action = reconciler.await.unwrap().unwrap();
        assert_eq!(action, Action::requeue(RESYNC));
        assert_eq!(
            ctx.metrics.reconciles.get_or_create(&crate::telemetry::ControllerLabels { controller: CONTROLLER }).get(),
            1
        );
    }

    #[test]
    fn transition_times_only_move_when_a_condition_changes() {
        let b = boundary("a", "a", &["s3:Get*"], &["*"], "1h");
        let eval = evaluate(&identity(&["s3:GetObject"], &["*"], "15m"), &labels("a"), &[b]);
        let first = status_for(&eval, &WorkloadIdentityStatus::default(), Some(1), 2);
        let mut aged = first.clone();
        aged.conditions[0].last_transition_time = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(1_700_000_000).unwrap(),
        );
        let second = status_for(&eval, &aged, Some(2), 2);
        assert_eq!(second.conditions[0].last_transition_time, aged.conditions[0].last_transition_time);
        assert_eq!(second.observed_generation, Some(2));
        assert_eq!(second.active_leases, Some(2));
    }
}
