//! Validation of `WorkloadIdentity` create and update: nobody gains through
//! ephemera what they could not have granted directly.
//!
//! - AWS: everything asked for must fit every governing `IdentityBoundary`
//!   (the same matcher the controller clamps with, so a denied request is
//!   never one the controller would have admitted).
//! - Kubernetes: each rule must be held by the requesting user in the
//!   namespace, checked with one SubjectAccessReview per verb, resource and
//!   name, as RBAC's own escalation check does for Roles.

use std::collections::BTreeMap;

use k8s_openapi::api::{
    authentication::v1::UserInfo,
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::{Api, Client, api::PostParams};

use crate::{
    Error, Result,
    api::{IdentityBoundary, KubernetesRule, WorkloadIdentitySpec},
    controller::workload_identity::evaluate,
};

/// More checks than this for one identity is refused rather than run: it
/// bounds the work one request can cause (the schema caps rules at 50).
pub const MAX_ACCESS_CHECKS: usize = 500;

/// The boundary check: `Err` lists every field outside a governing boundary.
/// A namespace no boundary governs passes with a warning (the controller then
/// reports the identity as not admitted; nothing is provisioned).
///
/// # Errors
/// The denial message, one violation per line.
pub fn check_boundaries<B: std::borrow::Borrow<IdentityBoundary>>(
    spec: &WorkloadIdentitySpec,
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
    boundaries: &[B],
) -> Result<Vec<String>, String> {
    let eval = evaluate(spec, namespace_labels, boundaries);
    if eval.governing.is_empty() {
        return Ok(vec![format!(
            "no IdentityBoundary governs namespace {namespace}: pods will not get this identity until one does"
        )]);
    }
    if let Some(conflict) = eval.permissions_boundary_conflict {
        return Err(conflict);
    }
    if !eval.violations.is_empty() {
        let lines: Vec<String> = eval.violations.iter().map(ToString::to_string).collect();
        return Err(lines.join("; "));
    }
    let mut warnings = Vec::new();
    if eval.token_ttl < spec.token.ttl {
        warnings.push(format!(
            "spec.token.ttl {} is capped to {} by the maxTokenTTL of IdentityBoundary {}",
            spec.token.ttl,
            eval.token_ttl,
            eval.governing.join(", ")
        ));
    }
    Ok(warnings)
}

/// One access a rule grants: what a SubjectAccessReview asks about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    /// Index of the rule in `spec.kubernetes.rules`.
    pub rule: usize,
    /// API group (`""` for core).
    pub group: String,
    /// Resource, without subresource.
    pub resource: String,
    /// Subresource (`log` of `pods/log`).
    pub subresource: Option<String>,
    /// Verb.
    pub verb: String,
    /// Object name, when the rule is restricted to names.
    pub name: Option<String>,
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() { "core" } else { &self.group };
        let sub = self.subresource.as_ref().map(|s| format!("/{s}")).unwrap_or_default();
        let name = self.name.as_ref().map(|n| format!(" {n:?}")).unwrap_or_default();
        write!(f, "spec.kubernetes.rules[{}]: {} {}{sub}{name} ({group})", self.rule, self.verb, self.resource)
    }
}

/// Every access `rules` grant, one per verb × group × resource × name.
///
/// # Errors
/// When there are more than [`MAX_ACCESS_CHECKS`].
pub fn accesses(rules: &[KubernetesRule]) -> Result<Vec<Access>, String> {
    let mut out = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        let groups: Vec<&str> =
            if rule.api_groups.is_empty() { vec![""] } else { rule.api_groups.iter().map(String::as_str).collect() };
        let names: Vec<Option<&str>> = if rule.resource_names.is_empty() {
            vec![None]
        } else {
            rule.resource_names.iter().map(|n| Some(n.as_str())).collect()
        };
        for group in &groups {
            for resource in &rule.resources {
                let (resource, subresource) = match resource.split_once('/') {
                    Some((r, s)) => (r.to_owned(), Some(s.to_owned())),
                    None => (resource.clone(), None),
                };
                for verb in &rule.verbs {
                    for name in &names {
                        out.push(Access {
                            rule: i,
                            group: (*group).to_owned(),
                            resource: resource.clone(),
                            subresource: subresource.clone(),
                            verb: verb.clone(),
                            name: name.map(str::to_owned),
                        });
                        if out.len() > MAX_ACCESS_CHECKS {
                            return Err(format!(
                                "spec.kubernetes.rules: grants more than {MAX_ACCESS_CHECKS} verb/resource/name combinations; write fewer, broader rules"
                            ));
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The accesses in `wanted` that `user` does not hold in `namespace`.
///
/// # Errors
/// When a SubjectAccessReview cannot be made (the request is then denied:
/// failing open here would be an escalation path).
pub async fn missing_accesses(
    client: &Client,
    user: &UserInfo,
    namespace: &str,
    wanted: &[Access],
) -> Result<Vec<Access>> {
    let api = Api::<SubjectAccessReview>::all(client.clone());
    let reviews = wanted.iter().cloned().map(|access| {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username.clone(),
                uid: user.uid.clone(),
                groups: user.groups.clone(),
                extra: user.extra.clone(),
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(namespace.to_owned()),
                    group: Some(access.group.clone()),
                    resource: Some(access.resource.clone()),
                    subresource: access.subresource.clone(),
                    verb: Some(access.verb.clone()),
                    name: access.name.clone(),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let api = api.clone();
        async move {
            let answer = api
                .create(&PostParams::default(), &review)
                .await
                .map_err(Error::kube(format!("asking whether the requester may {access}")))?;
            let allowed = answer.status.is_some_and(|s| s.allowed);
            Ok::<_, Error>((!allowed).then_some(access))
        }
    });
    // A few at a time: one identity must not flood the apiserver.
    let answers: Vec<Result<Option<Access>>> =
        futures::StreamExt::collect(futures::StreamExt::buffered(futures::stream::iter(reviews), 8)).await;
    let mut missing = Vec::new();
    for answer in answers {
        if let Some(access) = answer? {
            missing.push(access);
        }
    }
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_expand_to_one_check_per_verb_resource_and_name() {
        let rules = vec![
            KubernetesRule {
                api_groups: vec![String::new(), "apps".into()],
                resources: vec!["configmaps".into(), "pods/log".into()],
                resource_names: vec![],
                verbs: vec!["get".into(), "list".into()],
            },
            KubernetesRule {
                api_groups: vec![],
                resources: vec!["secrets".into()],
                resource_names: vec!["a".into(), "b".into()],
                verbs: vec!["get".into()],
            },
        ];
        let all = accesses(&rules).unwrap();
        assert_eq!(all.len(), 2 * 2 * 2 + 2);
        let log = all.iter().find(|a| a.subresource.is_some()).unwrap();
        assert_eq!((log.resource.as_str(), log.subresource.as_deref()), ("pods", Some("log")));
        assert_eq!(all[8].to_string(), r#"spec.kubernetes.rules[1]: get secrets "a" (core)"#);
    }

    #[test]
    fn too_many_combinations_are_refused() {
        let many: Vec<String> = (0..50).map(|i| format!("r{i}")).collect();
        let rule = KubernetesRule {
            api_groups: (0..20).map(|i| format!("g{i}")).collect(),
            resources: many,
            resource_names: vec![],
            verbs: vec!["get".into()],
        };
        let err = accesses(&[rule]).unwrap_err();
        assert!(err.starts_with("spec.kubernetes.rules: grants more than 500"), "{err}");
    }
}
