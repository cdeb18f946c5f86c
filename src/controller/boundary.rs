//! The boundary controller: counts the namespaces each `IdentityBoundary`
//! governs, and keeps the instance-metadata NetworkPolicy in exactly the
//! namespaces some boundary with `blockInstanceMetadata` governs.
//!
//! Each policy names the boundaries that want it as its owners, so the
//! apiserver's garbage collector withdraws it when the last of them is
//! deleted, with or without ephemera running (no finalizer: a boundary never
//! outlives the operator's uninstall stuck), and a deleted or edited policy
//! wakes its boundaries' reconcile, which puts it back at once.
//!
//! The NetworkPolicy allows all egress except the instance metadata service,
//! so pods cannot fall back to the node's instance role. NetworkPolicies are
//! additive: another policy in the namespace that explicitly allows
//! 169.254.169.254 re-opens it (documented in the README).

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::{
    api::{core::v1::Namespace, networking::v1::NetworkPolicy},
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
    core::{Selector, SelectorExt},
    runtime::{Controller, controller::Action, reflector::ObjectRef, watcher},
};
use serde_json::json;

use super::{Context, RESYNC, condition, drain, retry};
use crate::{
    Error, Result,
    api::{
        IdentityBoundary, IdentityBoundaryStatus,
        well_known::{
            FIELD_MANAGER, LABEL_MANAGED_BY, LEGACY_FINALIZER_BOUNDARY, MANAGED_BY, NETWORK_POLICY_BLOCK_IMDS,
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
    if boundary.metadata.deletion_timestamp.is_some() {
        // Only a boundary of an older ephemera waits here, on its finalizer:
        // withdraw what it protected, then let it go.
        sync_network_policies(&ctx).await?;
        release_legacy_finalizer(&ctx.client, &boundary).await?;
        return Ok(Action::await_change());
    }
    release_legacy_finalizer(&ctx.client, &boundary).await?;
    apply(&boundary, &ctx).await
}

/// Removes `ephemera.dev/boundary-cleanup`, which ephemera 0.1 put on every
/// boundary (owner references do its work now); whether there was one.
///
/// # Errors
/// When the patch is refused.
pub async fn release_legacy_finalizer(client: &kube::Client, boundary: &IdentityBoundary) -> Result<bool> {
    let Some(index) = boundary.finalizers().iter().position(|f| f == LEGACY_FINALIZER_BOUNDARY) else {
        return Ok(false);
    };
    // Test, then remove by index: a concurrent change fails the patch
    // instead of removing someone else's finalizer.
    let patch: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": format!("/metadata/finalizers/{index}"), "value": LEGACY_FINALIZER_BOUNDARY},
        {"op": "remove", "path": format!("/metadata/finalizers/{index}")},
    ]))
    .map_err(|e| Error::Serialization { what: "finalizer patch", message: e.to_string() })?;
    Api::<IdentityBoundary>::all(client.clone())
        .patch(&boundary.name_any(), &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
        .map_err(Error::kube(format!("removing the old finalizer of IdentityBoundary {}", boundary.name_any())))?;
    Ok(true)
}

async fn apply(boundary: &IdentityBoundary, ctx: &Context) -> Result<Action> {
    let namespaces = list_namespaces(ctx).await?;
    let previous = boundary.status.clone().unwrap_or_default();
    let generation = boundary.metadata.generation;
    let root = &ctx.role_path_root;
    let outside_root = boundary
        .spec
        .aws
        .as_ref()
        .map(|a| a.role_path.as_str())
        .filter(|path| !crate::cloud::naming::is_under_root(path, root));
    let status = match Selector::try_from(boundary.spec.namespace_selector.clone()) {
        Ok(selector) => {
            let governed = namespaces.iter().filter(|ns| selector.matches(ns.labels())).count();
            let (ready, why, message) = match outside_root {
                Some(path) => (
                    false,
                    reason::ROLE_PATH_OUTSIDE_ROOT,
                    format!(
                        "spec.aws.rolePath {path:?} is outside the operator's role path root {root:?}: pods this \
                         boundary governs are refused (set a rolePath under it, or install with another root)"
                    ),
                ),
                None => (true, reason::RECONCILED, format!("governs {governed} namespace(s)")),
            };
            IdentityBoundaryStatus {
                observed_generation: generation,
                governed_namespaces: Some(i32::try_from(governed).unwrap_or(i32::MAX)),
                conditions: vec![condition(&previous.conditions, cond::READY, ready, why, message, generation)],
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
    sync_network_policies(ctx).await?;
    Ok(Action::requeue(RESYNC))
}

/// Makes the set of namespaces holding the metadata NetworkPolicy equal to the
/// set some live boundary with `blockInstanceMetadata` governs, each policy
/// owned by exactly those boundaries.
async fn sync_network_policies(ctx: &Context) -> Result<()> {
    let boundaries = Api::<IdentityBoundary>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::kube("listing IdentityBoundaries"))?
        .items;
    let namespaces = list_namespaces(ctx).await?;
    let wanted = namespaces_to_protect(&boundaries, &namespaces);

    let policies = Api::<NetworkPolicy>::all(ctx.client.clone())
        .list(&ListParams::default().labels(&managed_selector()))
        .await
        .map_err(Error::kube("listing ephemera's NetworkPolicies"))?;
    for policy in policies.items.iter().filter(|p| p.name_any() == NETWORK_POLICY_BLOCK_IMDS) {
        let ns = policy.namespace().unwrap_or_default();
        if !wanted.contains_key(&ns) {
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
    for (ns, owners) in &wanted {
        Api::<NetworkPolicy>::namespaced(ctx.client.clone(), ns)
            .patch(
                NETWORK_POLICY_BLOCK_IMDS,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(block_imds_policy(ns, owners)),
            )
            .await
            .map_err(Error::kube(format!("applying NetworkPolicy {ns}/{NETWORK_POLICY_BLOCK_IMDS}")))?;
    }
    Ok(())
}

/// Namespaces governed by a live (not deleting) boundary that asks for the
/// metadata service to be blocked, each with those boundaries as owners.
#[must_use]
pub fn namespaces_to_protect(
    boundaries: &[IdentityBoundary],
    namespaces: &[Namespace],
) -> BTreeMap<String, Vec<OwnerReference>> {
    let blocking: Vec<(Selector, OwnerReference)> = boundaries
        .iter()
        .filter(|b| b.spec.block_instance_metadata && b.metadata.deletion_timestamp.is_none())
        // Owner, not controller, references: several boundaries may want the
        // same policy, and it goes only when all of them are gone.
        .filter_map(|b| Some((Selector::try_from(b.spec.namespace_selector.clone()).ok()?, b.owner_ref(&())?)))
        .collect();
    namespaces
        .iter()
        .filter(|ns| ns.metadata.deletion_timestamp.is_none())
        .filter_map(|ns| {
            let owners: Vec<OwnerReference> =
                blocking.iter().filter(|(s, _)| s.matches(ns.labels())).map(|(_, o)| o.clone()).collect();
            (!owners.is_empty()).then(|| (ns.name_any(), owners))
        })
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
fn block_imds_policy(namespace: &str, owners: &[OwnerReference]) -> serde_json::Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": NETWORK_POLICY_BLOCK_IMDS,
            "namespace": namespace,
            "labels": {LABEL_MANAGED_BY: MANAGED_BY},
            "ownerReferences": owners,
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
            "metadata": {"name": name, "uid": format!("uid-{name}")},
            "spec": {"namespaceSelector": {"matchLabels": {"team": team}}, "blockInstanceMetadata": block},
        }))
        .unwrap()
    }

    fn namespace(name: &str, team: &str) -> Namespace {
        serde_json::from_value(json!({"metadata": {"name": name, "labels": {"team": team}}})).unwrap()
    }

    #[test]
    fn policies_go_where_a_blocking_boundary_governs_owned_by_every_such_boundary() {
        let boundaries = [boundary("a", "a", true), boundary("b", "b", false), boundary("a2", "a", true)];
        let namespaces = [namespace("a1", "a"), namespace("b1", "b"), namespace("c1", "c")];
        let wanted = namespaces_to_protect(&boundaries, &namespaces);
        assert_eq!(wanted.keys().collect::<Vec<_>>(), ["a1"]);
        let owners: Vec<(&str, &str, &str)> =
            wanted["a1"].iter().map(|o| (o.kind.as_str(), o.name.as_str(), o.uid.as_str())).collect();
        assert_eq!(owners, [("IdentityBoundary", "a", "uid-a"), ("IdentityBoundary", "a2", "uid-a2")]);
        assert!(wanted["a1"].iter().all(|o| o.controller.is_none()), "no single controller: any owner keeps it");

        let mut deleting = boundaries[0].clone();
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        let wanted = namespaces_to_protect(&[deleting], &namespaces);
        assert!(wanted.is_empty(), "a boundary being deleted protects nothing");
    }
}
