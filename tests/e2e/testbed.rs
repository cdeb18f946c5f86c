//! Proof that the test bed is real: pods are scheduled onto kwok nodes and
//! run, the Job controller reacts to pod status as it would to a kubelet's,
//! and MiniStack's STS trusts exactly the ServiceAccount a role's trust policy
//! names, and nothing once the role is gone.

use std::time::Duration;

use aws_sdk_sts::error::ProvideErrorMetadata;
use k8s_openapi::api::{apps::v1::Deployment, batch::v1::Job, core::v1::Pod};
use kube::{
    Api, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

use crate::support::{TestBed, unique_name, wait_until};

const AUDIENCE: &str = "sts.amazonaws.com";
const WAIT: Duration = Duration::from_mins(1);

#[tokio::test]
async fn deployment_and_job_pods_run_on_a_kwok_node_and_the_job_completes() {
    let bed = TestBed::connect().await;
    let ns = bed.namespace("e2e-workloads").await;
    let deployments = Api::<Deployment>::namespaced(bed.client.clone(), &ns.name);
    let jobs = Api::<Job>::namespaced(bed.client.clone(), &ns.name);
    let pods = Api::<Pod>::namespaced(bed.client.clone(), &ns.name);

    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "registry.invalid/web:1"}]}
            }
        }
    }))
    .expect("valid Deployment");
    deployments.create(&PostParams::default(), &deployment).await.expect("create Deployment");

    let job: Job = serde_json::from_value(json!({
        "metadata": {"name": "batch"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"app": "batch"}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "main", "image": "registry.invalid/batch:1"}]
                }
            }
        }
    }))
    .expect("valid Job");
    jobs.create(&PostParams::default(), &job).await.expect("create Job");

    // Controller-manager makes the pods, the scheduler binds them to the
    // kwok node, kwok reports them Running.
    for (selector, want) in [("app=web", 2), ("app=batch", 1)] {
        let running = wait_until(&format!("{want} Running pod(s) with {selector}"), WAIT, || async {
            let list = pods.list(&ListParams::default().labels(selector)).await.ok()?;
            let running: Vec<Pod> = list.items.into_iter().filter(is_running).collect();
            (running.len() == want).then_some(running)
        })
        .await;
        for pod in &running {
            let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
            assert_eq!(node, Some("kwok-node-0"), "pod {} bound to the kwok node", pod.name_any());
        }
    }

    // The test plays the kubelet: the Job's pod exits 0.
    let job_pod = pods.list(&ListParams::default().labels("app=batch")).await.expect("list Job pods").items.remove(0);
    pods.patch_status(&job_pod.name_any(), &PatchParams::default(), &Patch::Merge(succeeded_status(&job_pod)))
        .await
        .expect("set the Job pod's phase to Succeeded");
    wait_until("Job batch Complete", WAIT, || async {
        let job = jobs.get("batch").await.ok()?;
        let conditions = job.status?.conditions?;
        conditions.iter().any(|c| c.type_ == "Complete" && c.status == "True").then_some(())
    })
    .await;
}

#[tokio::test]
async fn sts_admits_only_the_service_account_in_the_trust_policy_and_nothing_after_the_role_is_deleted() {
    // (A test that removes the OIDC provider for a moment holds the turn.)
    let _turn = crate::support::controller_turn().await;
    let bed = TestBed::connect().await;
    let ns = bed.namespace("e2e-sts").await;
    let alice = bed.service_account(&ns.name, "alice").await;
    let bob = bed.service_account(&ns.name, "bob").await;
    let alice_token = bed.token(&ns.name, &alice, AUDIENCE, 600).await;
    let bob_token = bed.token(&ns.name, &bob, AUDIENCE, 600).await;
    let alice_wrong_audience = bed.token(&ns.name, &alice, "vault", 600).await;

    let role_name = unique_name("e2e-alice");
    let trust = json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Principal": {"Federated": bed.oidc_provider_arn},
            "Action": "sts:AssumeRoleWithWebIdentity",
            "Condition": {"StringEquals": {
                format!("{}:sub", bed.issuer_host): format!("system:serviceaccount:{}:{alice}", ns.name),
                format!("{}:aud", bed.issuer_host): AUDIENCE,
            }}
        }]
    });
    let role_arn = bed
        .iam
        .create_role()
        .role_name(&role_name)
        .assume_role_policy_document(trust.to_string())
        .send()
        .await
        .expect("create the IAM role")
        .role
        .expect("CreateRole returns the role")
        .arn;

    // From Rust with aws-sdk-sts.
    let creds = assume(&bed, &role_arn, &alice_token).await.expect("alice's token assumes alice's role");
    assert!(creds.contains(&format!("assumed-role/{role_name}/")), "assumed-role ARN, got {creds}");
    assert_eq!(
        assume(&bed, &role_arn, &bob_token).await.unwrap_err(),
        "AccessDenied",
        "bob's token must not assume alice's role"
    );
    assert_eq!(
        assume(&bed, &role_arn, &alice_wrong_audience).await.unwrap_err(),
        "AccessDenied",
        "a token for another audience must not assume the role"
    );

    // From Python boto3, reading AWS_ROLE_ARN / AWS_WEB_IDENTITY_TOKEN_FILE like an app.
    let app = bed.assume_with_boto3(&role_arn, &alice_token);
    assert!(app.ok, "boto3 with alice's token: {app:?}");
    assert!(app.arn.as_deref().is_some_and(|a| a.contains(&format!("assumed-role/{role_name}/"))), "{app:?}");
    let app = bed.assume_with_boto3(&role_arn, &bob_token);
    assert!(!app.ok, "boto3 with bob's token must be refused: {app:?}");
    assert_eq!(app.error.as_deref(), Some("AccessDenied"), "{app:?}");

    bed.iam.delete_role().role_name(&role_name).send().await.expect("delete the IAM role");

    let err = assume(&bed, &role_arn, &alice_token).await.expect_err("a deleted role cannot be assumed");
    assert!(matches!(err.as_str(), "AccessDenied" | "NoSuchEntity"), "deleted role: got {err}");
    let app = bed.assume_with_boto3(&role_arn, &alice_token);
    assert!(!app.ok, "boto3 must be refused a deleted role: {app:?}");
}

/// `AssumeRoleWithWebIdentity`: `Ok(assumed-role ARN)` or `Err(AWS error code)`.
async fn assume(bed: &TestBed, role_arn: &str, token: &str) -> Result<String, String> {
    bed.sts
        .assume_role_with_web_identity()
        .role_arn(role_arn)
        .role_session_name("e2e-rust")
        .web_identity_token(token)
        .send()
        .await
        .map(|out| out.assumed_role_user.map(|u| u.arn).unwrap_or_default())
        .map_err(|err| err.into_service_error().code().unwrap_or("unknown").to_owned())
}

fn is_running(pod: &Pod) -> bool {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

/// The status a kubelet reports when every container exited 0.
fn succeeded_status(pod: &Pod) -> serde_json::Value {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let containers: Vec<_> = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .map(|c| {
            json!({
                "name": c.name, "image": c.image, "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": now, "finishedAt": now}}
            })
        })
        .collect();
    json!({"status": {"phase": "Succeeded", "containerStatuses": containers}})
}
