//! The boundary controller: counts the namespaces each `IdentityBoundary`
//! governs, and keeps the instance-metadata NetworkPolicy in exactly the
//! namespaces some boundary with `blockInstanceMetadata` governs. A finalizer
//! withdraws the policies of a deleted boundary.
//!
//! The NetworkPolicy allows all egress except the instance metadata service,
//! so pods cannot fall back to the node's instance role. NetworkPolicies are
//! additive: another policy in the namespace that explicitly allows
//! 169.254.169.254 re-opens it (documented in the README).

use std::{collections::BTreeSet, sync::Arc};

use k8s_openapi::api::{core::v1::Namespace, networking::v1::NetworkPolicy};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
    core::{Selector, SelectorExt},
    runtime::{
        Controller, controller::Action, finalizer, finalizer::Event as Finalizer, reflector::ObjectRef, watcher,
    },
};
use serde_json::json;

use super::{Context, RESYNC, condition, drain, retry};
use crate::{
    Error, Result,
    api::{
        IdentityBoundary, IdentityBoundaryStatus,
        well_known::{
            FIELD_MANAGER, FINALIZER_BOUNDARY, LABEL_MANAGED_BY, MANAGED_BY, NETWORK_POLICY_BLOCK_IMDS,
            condition as cond, reason,
        },
    },
};

const CONTROLLER: &str = "boundary";

/// Runs the boundary controller until shutdown.
pub async fn run(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    let controller = Controller::new(Api::<IdentityBoundary>::all(client.clone()), watcher::Config::default());
    let store = controller.store();
    let stream = controller
        // Namespace labels decide what each boundary governs.
        .watches(Api::<Namespace>::all(client.clone()), watcher::Config::default(), move |_| {
            store.state().iter().map(|b| ObjectRef::from_obj(&**b)).collect::<Vec<_>>()
        })
        .owns(Api::<NetworkPolicy>::all(client.clone()), watcher::Config::default().labels(&managed_selector()))
        .graceful_shutdown_on(ctx.stop.stopped())
        .run(reconcile, |_, err, ctx| retry(&ctx, CONTROLLER, err), ctx);
    drain(CONTROLLER, stream).await;
}

async fn reconcile(boundary: Arc<IdentityBoundary>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started(CONTROLLER);
    let api = Api::<IdentityBoundary>::all(ctx.client.clone());
    finalizer(&api, FINALIZER_BOUNDARY, boundary, |event| async {
        match event {
            Finalizer::Apply(b) => apply(&b, &ctx).await,
            Finalizer::Cleanup(b) => {
                sync_network_policies(&ctx, Some(&b.name_any())).await?;
                Ok(Action::await_change())
            }
        }
    })
    .await
    .map_err(|e| match e {
        finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
        other => Error::Config(format!("finalizer {FINALIZER_BOUNDARY}: {other}")),
    })
}

async fn apply(boundary: &IdentityBoundary, ctx: &Context) -> Result<Action> {
    let namespaces = list_namespaces(ctx).await?;
    let previous = boundary.status.clone().unwrap_or_default();
    let generation = boundary.metadata.generation;
    let status = match Selector::try_from(boundary.spec.namespace_selector.clone()) {
        Ok(selector) => {
            let governed = namespaces.iter().filter(|ns| selector.matches(ns.labels())).count();
            IdentityBoundaryStatus {
                observed_generation: generation,
                governed_namespaces: Some(i32::try_from(governed).unwrap_or(i32::MAX)),
                conditions: vec![condition(
                    &previous.conditions,
                    cond::READY,
                    true,
                    reason::RECONCILED,
                    format!("governs {governed} namespace(s)"),
                    generation,
                )],
            }
        }
        Err(e) => IdentityBoundaryStatus {
            observed_generation: generation,
            governed_namespaces: Some(0),
            conditions: vec![condition(
                &previous.conditions,
                cond::READY,
                false,
                reason::INVALID_SELECTOR,
                format!("namespaceSelector cannot be evaluated: {e}"),
                generation,
            )],
        },
    };
    Api::<IdentityBoundary>::all(ctx.client.clone())
        .patch_status(
            &boundary.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(json!({"apiVersion": "ephemera.dev/v1alpha1", "kind": "IdentityBoundary", "status": status})),
        )
        .await
        .map_err(Error::kube(format!("writing the status of IdentityBoundary {}", boundary.name_any())))?;
    sync_network_policies(ctx, None).await?;
    Ok(Action::requeue(RESYNC))
}

/// Makes the set of namespaces holding the metadata NetworkPolicy equal to the
/// set some live boundary with `blockInstanceMetadata` governs. `leaving` is a
/// boundary being deleted, which no longer counts.
async fn sync_network_policies(ctx: &Context, leaving: Option<&str>) -> Result<()> {
    let boundaries = Api::<IdentityBoundary>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::kube("listing IdentityBoundaries"))?
        .items;
    let namespaces = list_namespaces(ctx).await?;
    let wanted = namespaces_to_protect(&boundaries, &namespaces, leaving);

    let policies = Api::<NetworkPolicy>::all(ctx.client.clone())
        .list(&ListParams::default().labels(&managed_selector()))
        .await
        .map_err(Error::kube("listing ephemera's NetworkPolicies"))?;
    for policy in policies.items.iter().filter(|p| p.name_any() == NETWORK_POLICY_BLOCK_IMDS) {
        let ns = policy.namespace().unwrap_or_default();
        if !wanted.contains(&ns) {
            match Api::<NetworkPolicy>::namespaced(ctx.client.clone(), &ns)
                .delete(NETWORK_POLICY_BLOCK_IMDS, &DeleteParams::default())
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(e) => {
                    return Err(Error::kube(format!("deleting NetworkPolicy {ns}/{NETWORK_POLICY_BLOCK_IMDS}"))(e));
                }
            }
            tracing::info!(namespace = %ns, "removed the instance-metadata NetworkPolicy");
        }
    }
    for ns in &wanted {
        Api::<NetworkPolicy>::namespaced(ctx.client.clone(), ns)
            .patch(
                NETWORK_POLICY_BLOCK_IMDS,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(block_imds_policy(ns)),
            )
            .await
            .map_err(Error::kube(format!("applying NetworkPolicy {ns}/{NETWORK_POLICY_BLOCK_IMDS}")))?;
    }
    Ok(())
}

/// Namespaces governed by a live (not deleting, not `leaving`) boundary that
/// asks for the metadata service to be blocked.
#[must_use]
pub fn namespaces_to_protect(
    boundaries: &[IdentityBoundary],
    namespaces: &[Namespace],
    leaving: Option<&str>,
) -> BTreeSet<String> {
    let selectors: Vec<Selector> = boundaries
        .iter()
        .filter(|b| b.spec.block_instance_metadata)
        .filter(|b| b.metadata.deletion_timestamp.is_none() && Some(b.name_any().as_str()) != leaving)
        .filter_map(|b| Selector::try_from(b.spec.namespace_selector.clone()).ok())
        .collect();
    namespaces
        .iter()
        .filter(|ns| ns.metadata.deletion_timestamp.is_none())
        .filter(|ns| selectors.iter().any(|s| s.matches(ns.labels())))
        .map(ResourceExt::name_any)
        .collect()
}

async fn list_namespaces(ctx: &Context) -> Result<Vec<Namespace>> {
    Ok(Api::<Namespace>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::kube("listing namespaces"))?
        .items)
}

fn managed_selector() -> String {
    format!("{LABEL_MANAGED_BY}={MANAGED_BY}")
}

/// All egress allowed except the instance metadata service (IPv4 and the
/// Nitro IPv6 address), for every pod of the namespace.
fn block_imds_policy(namespace: &str) -> serde_json::Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": NETWORK_POLICY_BLOCK_IMDS,
            "namespace": namespace,
            "labels": {LABEL_MANAGED_BY: MANAGED_BY},
        },
        "spec": {
            "podSelector": {},
            "policyTypes": ["Egress"],
            "egress": [{"to": [
                {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.169.254/32"]}},
                {"ipBlock": {"cidr": "::/0", "except": ["fd00:ec2::254/128"]}},
            ]}],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boundary(name: &str, team: &str, block: bool) -> IdentityBoundary {
        serde_json::from_value(json!({
            "apiVersion": "ephemera.dev/v1alpha1", "kind": "IdentityBoundary",
            "metadata": {"name": name},
            "spec": {"namespaceSelector": {"matchLabels": {"team": team}}, "blockInstanceMetadata": block},
        }))
        .unwrap()
    }

    fn namespace(name: &str, team: &str) -> Namespace {
        serde_json::from_value(json!({"metadata": {"name": name, "labels": {"team": team}}})).unwrap()
    }

    #[test]
    fn policies_go_where_a_blocking_boundary_governs_and_leave_with_it() {
        let boundaries = [boundary("a", "a", true), boundary("b", "b", false)];
        let namespaces = [namespace("a1", "a"), namespace("a2", "a"), namespace("b1", "b"), namespace("c1", "c")];
        let wanted = namespaces_to_protect(&boundaries, &namespaces, None);
        assert_eq!(wanted.into_iter().collect::<Vec<_>>(), ["a1", "a2"]);
        assert!(
            namespaces_to_protect(&boundaries, &namespaces, Some("a")).is_empty(),
            "a deleted boundary protects nothing"
        );
    }
}
