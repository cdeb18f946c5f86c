//! The identity controller against the real apiserver: identities are
//! clamped to the boundaries of their namespace, re-evaluated when an
//! identity, a boundary or a namespace's labels change, and the
//! instance-metadata NetworkPolicy follows the boundaries.

use std::time::Duration;

use k8s_openapi::api::{
    core::v1::{Event, Namespace},
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

use crate::support::{ControllerProcess, DeleteOnDrop, TestBed, controller_turn, ensure_crds, unique_name, wait_until};
use ephemera::api::{IdentityBoundary, WorkloadIdentity};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn identities_are_clamped_to_their_boundary_and_follow_its_changes() {
    let _turn = controller_turn().await;
    let bed = TestBed::connect().await;
    ensure_crds(&bed.client).await;
    let _controller = ControllerProcess::start();
    let ns = bed.namespace("e2e-identity").await;
    let team = unique_name("team");
    label_namespace(&bed.client, &ns.name, Some(&team)).await;

    let boundaries = Api::<IdentityBoundary>::all(bed.client.clone());
    let boundary_name = unique_name("e2e-boundary");
    let boundary: IdentityBoundary = serde_json::from_value(json!({
        "apiVersion": "ephemera.dev/v1alpha1", "kind": "IdentityBoundary",
        "metadata": {"name": boundary_name},
        "spec": {
            "namespaceSelector": {"matchLabels": {"e2e-team": team}},
            "aws": {"allowedActions": ["s3:Get*"], "allowedResources": ["arn:aws:s3:::team-a-*"]},
            "maxTokenTTL": "30m",
            "blockInstanceMetadata": true,
        }
    }))
    .unwrap();
    boundaries.create(&PostParams::default(), &boundary).await.expect("create the boundary");
    let _boundary_guard = DeleteOnDrop::<IdentityBoundary>::new(&boundary_name);

    let identities = Api::<WorkloadIdentity>::namespaced(bed.client.clone(), &ns.name);
    let identity: WorkloadIdentity = serde_json::from_value(json!({
        "apiVersion": "ephemera.dev/v1alpha1", "kind": "WorkloadIdentity",
        "metadata": {"name": "reader"},
        "spec": {
            "aws": {"statements": [{"actions": ["s3:GetObject"], "resources": ["arn:aws:s3:::team-a-raw/*"]}]},
            "token": {"ttl": "1h"},
        }
    }))
    .unwrap();
    identities.create(&PostParams::default(), &identity).await.expect("create the identity");

    // Within the boundary: Ready, no violation, TTL capped to the boundary's 30m.
    wait_for_condition(&identities, "Ready", "True").await;
    let status = identities.get("reader").await.unwrap().status.unwrap();
    assert_eq!(status.effective.as_ref().and_then(|e| e.token_ttl).map(|t| t.to_string()).as_deref(), Some("30m"));
    assert_eq!(status.effective.as_ref().map(|e| e.boundaries.clone()), Some(vec![boundary_name.clone()]));
    assert_eq!(condition(&status, "BoundaryViolation").map(|c| c.status), Some("False".into()));
    let policies = Api::<NetworkPolicy>::namespaced(bed.client.clone(), &ns.name);
    wait_until("the instance-metadata NetworkPolicy", WAIT, || async {
        policies.get_opt("ephemera-block-instance-metadata").await.ok().flatten()
    })
    .await;

    // Widened beyond the boundary: BoundaryViolation names the field and the action, and an Event says so.
    identities
        .patch(
            "reader",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"aws": {"statements": [
                {"actions": ["s3:GetObject", "s3:PutObject"], "resources": ["arn:aws:s3:::team-a-raw/*"]}
            ]}}})),
        )
        .await
        .unwrap();
    let violation = wait_for_condition(&identities, "BoundaryViolation", "True").await;
    assert!(
        violation
            .message
            .contains(r#"spec.aws.statements[0].actions: "s3:PutObject" is not allowed by IdentityBoundary"#),
        "the message names the field and the action: {}",
        violation.message
    );
    let events = Api::<Event>::namespaced(bed.client.clone(), &ns.name);
    wait_until("a BoundaryViolation Event", WAIT, || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items.into_iter().find(|e| e.reason.as_deref() == Some("BoundaryViolation"))
    })
    .await;

    // The boundary grows: the identity is re-evaluated without being touched.
    boundaries
        .patch(
            &boundary_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"aws": {"allowedActions": ["s3:Get*", "s3:PutObject"]}}})),
        )
        .await
        .unwrap();
    wait_for_condition(&identities, "BoundaryViolation", "False").await;

    // The namespace leaves the boundary: not governed, and the NetworkPolicy goes.
    label_namespace(&bed.client, &ns.name, Some("someone-else")).await;
    let not_ready = wait_for_condition(&identities, "Ready", "False").await;
    assert_eq!(not_ready.reason, "NotGoverned");
    wait_until("the NetworkPolicy to be removed", WAIT, || async {
        policies.get_opt("ephemera-block-instance-metadata").await.ok().and_then(|p| p.is_none().then_some(()))
    })
    .await;

    // Back under the boundary, then the boundary is deleted: its finalizer withdraws the policy.
    label_namespace(&bed.client, &ns.name, Some(&team)).await;
    wait_for_condition(&identities, "Ready", "True").await;
    wait_until("the NetworkPolicy to come back", WAIT, || async {
        policies.get_opt("ephemera-block-instance-metadata").await.ok().flatten()
    })
    .await;
    boundaries.delete(&boundary_name, &DeleteParams::default()).await.unwrap();
    wait_until("the boundary to be gone", WAIT, || async {
        boundaries.get_opt(&boundary_name).await.ok().and_then(|b| b.is_none().then_some(()))
    })
    .await;
    // The garbage collector withdraws the policy its only owner left behind.
    wait_until("the policy to be withdrawn with the boundary", WAIT, || async {
        policies.get_opt("ephemera-block-instance-metadata").await.ok()?.is_none().then_some(())
    })
    .await;
    wait_for_condition(&identities, "Ready", "False").await;
}

fn condition(
    status: &ephemera::api::WorkloadIdentityStatus,
    type_: &str,
) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    status.conditions.iter().find(|c| c.type_ == type_).cloned()
}

/// Waits until the identity `reader` has condition `type_` = `status` for its
/// current generation.
async fn wait_for_condition(
    api: &Api<WorkloadIdentity>,
    type_: &str,
    status: &str,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    wait_until(&format!("{type_}={status} on WorkloadIdentity reader"), WAIT, || async {
        let wi = api.get("reader").await.ok()?;
        let generation = wi.metadata.generation;
        let found = condition(wi.status.as_ref()?, type_)?;
        (found.status == status && found.observed_generation == generation).then_some(found)
    })
    .await
}

async fn label_namespace(client: &Client, name: &str, team: Option<&str>) {
    Api::<Namespace>::all(client.clone())
        .patch(name, &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"e2e-team": team}}})))
        .await
        .expect("label the namespace");
}

#[tokio::test]
async fn of_two_replicas_one_leads_and_the_other_takes_over_when_it_stops() {
    let _turn = controller_turn().await;
    let bed = TestBed::connect().await;
    ensure_crds(&bed.client).await;
    let ns = bed.namespace("e2e-leader").await;
    let start =
        |id: &str| ControllerProcess::start_with(&["--leader-elect", "--namespace", &ns.name, "--identity", id]);
    let mut replicas = [start("replica-a"), start("replica-b")];
    let holder = || crate::support::leader_of(&bed.client, &ns.name);
    let first = wait_until("a leader", WAIT, || async { holder().await }).await;
    let (leader, follower) = if first == "replica-a" { (0, "replica-b") } else { (1, "replica-a") };
    let follower_log = std::fs::read_to_string(&replicas[1 - leader].log).unwrap_or_default();
    assert!(!follower_log.contains("became leader"), "only one replica leads:\n{follower_log}");

    // SIGTERM: the leader stops and releases the Lease; the follower, which
    // re-checks when the lease it last saw would expire, takes over within
    // one lease duration (15 s) plus a retry.
    let start = std::time::Instant::now();
    replicas[leader].terminate();
    let leader_log = std::fs::read_to_string(&replicas[leader].log).unwrap_or_default();
    assert!(leader_log.contains("released the leader-election lease"), "graceful release:\n{leader_log}");
    wait_until("the follower to take over", Duration::from_secs(25), || async {
        (holder().await.as_deref() == Some(follower)).then_some(())
    })
    .await;
    eprintln!("handover took {:?}", start.elapsed());
}
