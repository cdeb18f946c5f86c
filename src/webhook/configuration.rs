//! The webhook configurations ephemera needs: what the apiserver sends it and
//! how it fails. The Helm chart renders the same shape with a Service as the
//! target; `ephemera run --register-url` applies them pointing at a URL for
//! local development and the e2e suite.

use k8s_openapi::{
    ByteString,
    api::admissionregistration::v1::{
        MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ServiceReference, ValidatingWebhook,
        ValidatingWebhookConfiguration, WebhookClientConfig,
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement, ObjectMeta},
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};

use crate::{
    Error, Result,
    api::well_known::{FIELD_MANAGER, LABEL_MANAGED_BY, MANAGED_BY},
};

/// Path of the pod mutation.
pub const MUTATE_PODS_PATH: &str = "/mutate/pods";
/// Path of the `WorkloadIdentity` validation.
pub const VALIDATE_IDENTITIES_PATH: &str = "/validate/workloadidentities";
/// Namespaces never sent to the webhook, besides the operator's own: a broken
/// webhook must never stop the control plane's own pods.
pub const ALWAYS_EXCLUDED: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];

/// Where the apiserver reaches the webhook.
#[derive(Clone, Debug)]
pub enum Target {
    /// `https://host:port` (local development, out-of-cluster runs).
    Url(String),
    /// A Service in the cluster.
    Service { namespace: String, name: String, port: i32 },
}

impl Target {
    fn client_config(&self, path: &str, ca_bundle: &str) -> WebhookClientConfig {
        let ca_bundle = Some(ByteString(ca_bundle.as_bytes().to_vec()));
        match self {
            Target::Url(base) => WebhookClientConfig {
                url: Some(format!("{}{path}", base.trim_end_matches('/'))),
                ca_bundle,
                service: None,
            },
            Target::Service { namespace, name, port } => WebhookClientConfig {
                service: Some(ServiceReference {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    path: Some(path.to_owned()),
                    port: Some(*port),
                }),
                ca_bundle,
                url: None,
            },
        }
    }
}

/// Namespaces the webhook never sees: kube-system & co and `own`; with
/// `only`, also every namespace without that label.
fn namespace_selector(own: &str, only: Option<&(String, String)>) -> LabelSelector {
    let mut excluded: Vec<String> = ALWAYS_EXCLUDED.iter().map(|s| (*s).to_owned()).collect();
    excluded.push(own.to_owned());
    LabelSelector {
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "kubernetes.io/metadata.name".into(),
            operator: "NotIn".into(),
            values: Some(excluded),
        }]),
        match_labels: only.map(|(k, v)| [(k.clone(), v.clone())].into()),
    }
}

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        labels: Some([(LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned())].into()),
        ..ObjectMeta::default()
    }
}

/// The mutating configuration: pod CREATE, fail closed (an unmutated pod in a
/// governed namespace would run with a standing token), reinvoked once if a
/// later webhook changes the pod, side effects (the ServiceAccount and lease)
/// skipped on dry runs.
#[must_use]
pub fn mutating(
    name: &str,
    target: &Target,
    ca_bundle: &str,
    own_namespace: &str,
    only: Option<&(String, String)>,
) -> MutatingWebhookConfiguration {
    MutatingWebhookConfiguration {
        metadata: meta(name),
        webhooks: Some(vec![MutatingWebhook {
            name: "pods.ephemera.dev".into(),
            admission_review_versions: vec!["v1".into()],
            client_config: target.client_config(MUTATE_PODS_PATH, ca_bundle),
            failure_policy: Some("Fail".into()),
            match_policy: Some("Equivalent".into()),
            namespace_selector: Some(namespace_selector(own_namespace, only)),
            reinvocation_policy: Some("IfNeeded".into()),
            rules: Some(vec![RuleWithOperations {
                api_groups: Some(vec![String::new()]),
                api_versions: Some(vec!["v1".into()]),
                operations: Some(vec!["CREATE".into()]),
                resources: Some(vec!["pods".into()]),
                scope: Some("Namespaced".into()),
            }]),
            side_effects: "NoneOnDryRun".into(),
            timeout_seconds: Some(10),
            ..MutatingWebhook::default()
        }]),
    }
}

/// The validating configuration: `WorkloadIdentity` CREATE and UPDATE, fail
/// closed (failing open would let anyone escalate while the webhook is down).
#[must_use]
pub fn validating(
    name: &str,
    target: &Target,
    ca_bundle: &str,
    only: Option<&(String, String)>,
) -> ValidatingWebhookConfiguration {
    ValidatingWebhookConfiguration {
        metadata: meta(name),
        webhooks: Some(vec![ValidatingWebhook {
            name: "workloadidentities.ephemera.dev".into(),
            admission_review_versions: vec!["v1".into()],
            client_config: target.client_config(VALIDATE_IDENTITIES_PATH, ca_bundle),
            failure_policy: Some("Fail".into()),
            match_policy: Some("Equivalent".into()),
            namespace_selector: only.map(|(k, v)| LabelSelector {
                match_labels: Some([(k.clone(), v.clone())].into()),
                match_expressions: None,
            }),
            rules: Some(vec![RuleWithOperations {
                api_groups: Some(vec![crate::api::GROUP.into()]),
                api_versions: Some(vec![crate::api::VERSION.into()]),
                operations: Some(vec!["CREATE".into(), "UPDATE".into()]),
                resources: Some(vec!["workloadidentities".into()]),
                scope: Some("Namespaced".into()),
            }]),
            side_effects: "None".into(),
            timeout_seconds: Some(10),
            ..ValidatingWebhook::default()
        }]),
    }
}

/// Applies both configurations (server-side apply, so re-running converges).
///
/// # Errors
/// When the apiserver refuses them.
pub async fn register(
    client: &Client,
    name: &str,
    target: &Target,
    ca_bundle: &str,
    own_namespace: &str,
    only: Option<&(String, String)>,
) -> Result<()> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let m = mutating(name, target, ca_bundle, own_namespace, only);
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .patch(name, &params, &Patch::Apply(&m))
        .await
        .map_err(Error::kube(format!("applying MutatingWebhookConfiguration {name}")))?;
    let v = validating(name, target, ca_bundle, only);
    Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .patch(name, &params, &Patch::Apply(&v))
        .await
        .map_err(Error::kube(format!("applying ValidatingWebhookConfiguration {name}")))?;
    tracing::info!(configuration = name, ?target, "registered the admission webhooks");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_control_plane_and_the_operator_namespace_are_never_sent() {
        let m = mutating("ephemera", &Target::Url("https://127.0.0.1:1".into()), "CA", "ephemera-system", None);
        let hook = &m.webhooks.unwrap()[0];
        let excluded =
            hook.namespace_selector.as_ref().unwrap().match_expressions.as_ref().unwrap()[0].values.clone().unwrap();
        for ns in ["kube-system", "kube-public", "kube-node-lease", "ephemera-system"] {
            assert!(excluded.contains(&ns.to_owned()), "{ns}");
        }
        assert_eq!(hook.failure_policy.as_deref(), Some("Fail"));
        assert_eq!(hook.side_effects, "NoneOnDryRun");
        assert_eq!(hook.reinvocation_policy.as_deref(), Some("IfNeeded"));
        assert_eq!(hook.client_config.url.as_deref(), Some("https://127.0.0.1:1/mutate/pods"));
    }
}
