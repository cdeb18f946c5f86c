//! Rotation: ahead of a lease's expiry, a Deployment's pod is evicted
//! through the Eviction API and replaced by a pod with a fresh identity; a
//! `PodDisruptionBudget` holds the eviction back; a bare pod, which nothing
//! would replace, is told (`Expiring`) instead of evicted.

use std::time::Duration;

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Event, Pod},
    policy::v1::PodDisruptionBudget,
};
use kube::{
    Api, ResourceExt,
    api::{ListParams, PostParams},
};
use serde_json::json;

use crate::{
    lifecycle::role_exists,
    support::{ControllerProcess, TestBed, Webhook, controller_turn, ensure_crds, wait_until},
    webhook::{admitted_with_identity, governed, identity, pod},
};
use ephemera::api::{IdentityLease, LeasePhase};

/// A lease lives 10 minutes (the shortest `maxLifetime`); rotated at 95 %
/// of it, its pod is evicted 30 s after admission.
const ROTATE_AT: Duration = Duration::from_secs(30);
const WAIT: Duration = Duration::from_secs(45);

fn deployment(name: &str) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name, "ephemera.dev/identity": "svc"}},
                "spec": {"containers": [{"name": "main", "image": "busybox"}]},
            },
        },
    }))
    .unwrap()
}

/// The reason of the lease's `Expiring` condition, once it has one.
fn expiring(lease: &IdentityLease) -> Option<String> {
    let status = lease.status.as_ref()?;
    status.conditions.iter().find(|c| c.type_ == "Expiring" && c.status == "True").map(|c| c.reason.clone())
}

/// The Ready lease of the one live pod of Deployment `app`.
async fn ready_lease_of(pods: &Api<Pod>, leases: &Api<IdentityLease>, app: &str, not: Option<&str>) -> IdentityLease {
    wait_until(&format!("a pod of {app} with a Ready lease (other than {not:?})"), WAIT + ROTATE_AT, || async {
        let list = pods.list(&ListParams::default().labels(&format!("app={app}"))).await.ok()?;
        let pod = list.items.into_iter().find(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.labels().get("ephemera.dev/lease").is_some_and(|l| Some(l.as_str()) != not)
        })?;
        let lease = leases.get(pod.labels().get("ephemera.dev/lease")?).await.ok()?;
        (lease.status.as_ref()?.phase == Some(LeasePhase::Ready)).then_some(lease)
    })
    .await
}

#[tokio::test]
async fn a_long_lived_pod_is_replaced_with_a_fresh_identity_before_its_lease_expires() {
    let _turn = controller_turn().await;
    let bed = TestBed::connect().await;
    ensure_crds(&bed.client).await;
    let webhook = Webhook::start(&bed.client).await;
    let _controller = ControllerProcess::start_with(&[
        "--cluster-name",
        "e2e",
        "--rotation-lead-fraction",
        "0.95",
        "--rotation-lead-min",
        "0s",
    ]);
    let wi = identity(
        "svc",
        json!({"aws": {"statements": [{"actions": ["s3:GetObject"], "resources": ["arn:aws:s3:::team-a-x/*"]}]}}),
    );
    let g = governed(&bed, &webhook, "e2e-rotation", json!({"maxLifetime": "10m"}), &wi).await;
    let ns = &g.ns.name;
    let leases = Api::<IdentityLease>::namespaced(bed.client.clone(), ns);

    // A bare pod: nothing would make it again.
    let bare =
        admitted_with_identity(&g.pods, &pod(json!({"name": "bare", "labels": {"ephemera.dev/identity": "svc"}})))
            .await;
    let bare_lease = bare.labels()["ephemera.dev/lease"].clone();
    // Two Deployments; the second one's PodDisruptionBudget allows no eviction.
    let deployments = Api::<Deployment>::namespaced(bed.client.clone(), ns);
    for name in ["web", "held"] {
        deployments.create(&PostParams::default(), &deployment(name)).await.expect("create the Deployment");
    }
    let pdb: PodDisruptionBudget = serde_json::from_value(json!({
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "held"},
        "spec": {"maxUnavailable": 0, "selector": {"matchLabels": {"app": "held"}}},
    }))
    .unwrap();
    Api::<PodDisruptionBudget>::namespaced(bed.client.clone(), ns)
        .create(&PostParams::default(), &pdb)
        .await
        .expect("create the PodDisruptionBudget");

    let first = ready_lease_of(&g.pods, &leases, "web", None).await;
    let first_pod = first.spec.holder.name.clone();
    let first_role = first.status.as_ref().and_then(|s| s.role_arn.clone()).expect("a Ready lease has a role");
    let held = ready_lease_of(&g.pods, &leases, "held", None).await;

    // Rotation: the pod is evicted (the lease says why, with an Event), and
    // the ReplicaSet's replacement gets an identity of its own.
    let rotating = wait_until("the first web pod's lease to say Rotating", WAIT + ROTATE_AT, || async {
        let lease = leases.get_opt(&first.name_any()).await.ok()?;
        // Reaped already (the eviction, then kwok, were quick): the Event tells.
        match lease {
            Some(l) => (expiring(&l).as_deref() == Some("Rotating")).then_some(Some(l)),
            None => Some(None),
        }
    })
    .await;
    if let Some(lease) = rotating {
        let message =
            &lease.status.as_ref().unwrap().conditions.iter().find(|c| c.type_ == "Expiring").unwrap().message;
        assert!(message.contains(&first_pod) && message.contains("ReplicaSet"), "{message}");
    }
    let events = Api::<Event>::namespaced(bed.client.clone(), ns);
    wait_until("a Rotating Event on the first web lease", WAIT, || async {
        let list = events
            .list(&ListParams::default().fields(&format!("involvedObject.name={}", first.name_any())))
            .await
            .ok()?;
        list.items.iter().any(|e| e.reason.as_deref() == Some("Rotating")).then_some(())
    })
    .await;
    let second = ready_lease_of(&g.pods, &leases, "web", Some(&first.name_any())).await;
    assert_ne!(second.spec.holder.name, first_pod, "a new pod");
    assert_ne!(second.status.as_ref().and_then(|s| s.role_arn.clone()), Some(first_role.clone()), "a new role");
    // The evicted pod's identity ends with it.
    wait_until("the first web lease to be reaped", WAIT, || async {
        leases.get_opt(&first.name_any()).await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(!role_exists(&bed, &first_role).await, "the rotated pod's role is deleted");

    // The PodDisruptionBudget holds: the pod stays, the lease says why.
    let blocked = wait_until("the held lease to say EvictionBlocked", WAIT, || async {
        let l = leases.get(&held.name_any()).await.ok()?;
        (expiring(&l).as_deref() == Some("EvictionBlocked")).then_some(l)
    })
    .await;
    let message = &blocked.status.as_ref().unwrap().conditions.iter().find(|c| c.type_ == "Expiring").unwrap().message;
    assert!(message.contains("disruption budget"), "{message}");
    let held_pod = g.pods.get(&held.spec.holder.name).await.expect("the held pod is still there");
    assert!(held_pod.metadata.deletion_timestamp.is_none(), "a PodDisruptionBudget holds the eviction");

    // The bare pod is told, not evicted.
    let told = wait_until("the bare pod's lease to say NotRotated", WAIT, || async {
        let l = leases.get(&bare_lease).await.ok()?;
        (expiring(&l).as_deref() == Some("NotRotated")).then_some(l)
    })
    .await;
    let message = &told.status.as_ref().unwrap().conditions.iter().find(|c| c.type_ == "Expiring").unwrap().message;
    assert!(message.contains("no controller") && message.contains("loses its identity"), "{message}");
    assert_eq!(told.status.as_ref().unwrap().phase, Some(LeasePhase::Ready), "it keeps its identity until expiry");
    let bare_now = g.pods.get("bare").await.expect("the bare pod is not evicted");
    assert!(bare_now.metadata.deletion_timestamp.is_none());
}
