//! Reaping is idempotent from every point a crash can leave it at: for each
//! state the reap sequence passes through (deny put, managed policies
//! detached, inline policy deleted, deny deleted, role deleted), with and
//! without a policy someone added by hand, `revoke_and_delete` run from the
//! start finishes the job, and running it again is a no-op. Against
//! MiniStack, with the operator's own IAM client.

use std::time::Duration;

use ephemera::cloud::aws::{
    AwsProvider, LEGACY_REVOKE_POLICY_NAME, POLICY_NAME, REVOKE_POLICY_NAME, Reaped, RoleOwner, RoleSpec, revoke_policy,
};
use serde_json::json;

use crate::{
    lifecycle::role_exists,
    support::{TestBed, unique_name},
};

/// The steps of the reap sequence, in order; a crash leaves the role after
/// any prefix of them.
const STEPS: [&str; 5] = ["put the deny", "detach managed", "delete inline", "delete the deny", "delete the role"];
const HAND_ADDED: &str = "added-by-hand";

#[tokio::test]
async fn reaping_finishes_from_any_step_a_crash_left_it_at() {
    let bed = TestBed::connect().await;
    let provider = AwsProvider::from_env(None, None).await;
    let owner = RoleOwner {
        cluster: "reap-test".into(),
        issuer: None,
        namespace: "reap".into(),
        lease: "reap-lease".into(),
        lease_uid: Some("reap-uid".into()),
    };
    let managed = bed
        .iam
        .create_policy()
        .policy_name(unique_name("ephemera-reap-managed"))
        .policy_document(document("Allow", "s3:ListBucket", None).to_string())
        .send()
        .await
        .expect("create a managed policy")
        .policy
        .and_then(|p| p.arn)
        .expect("its ARN");

    // A crash under ephemera 0.2 left its revoking policy (a deny on
    // aws:TokenIssueTime, another name): finished all the same.
    let cases =
        (0..=STEPS.len()).flat_map(|done| [(done, false, false), (done, true, false)]).chain([(1, false, true)]);
    for (done, hand_added, legacy) in cases {
        {
            let name = unique_name("ephemera-reap");
            let spec = RoleSpec {
                name: name.clone(),
                path: "/ephemera/".into(),
                trust_policy: json!({"Version": "2012-10-17", "Statement": []}),
                policy: Some(document("Allow", "s3:GetObject", None)),
                managed_policy_arns: vec![managed.clone()],
                permissions_boundary: None,
                max_session: Duration::from_hours(1),
                owner: owner.clone(),
                tags: vec![],
            };
            provider.provision(&spec).await.expect("provision");
            if hand_added {
                put_inline(&bed.iam, &name, HAND_ADDED, &document("Allow", "sqs:*", None)).await.unwrap();
            }
            // The state a crash after `done` steps leaves behind.
            for step in &STEPS[..done] {
                apply_step(&bed.iam, &name, &managed, step, hand_added, legacy)
                    .await
                    .unwrap_or_else(|e| panic!("{step} on {name}: {e}"));
            }
            let case = format!(
                "crash after [{}], hand-added policy: {hand_added}, 0.2's deny: {legacy}",
                STEPS[..done].join(", ")
            );
            let reaped = provider.revoke_and_delete(&name, &owner).await.unwrap_or_else(|e| panic!("{case}: {e}"));
            // A role the crash had already deleted is Gone; any other, Deleted.
            let deleted_now = matches!(reaped, Reaped::Deleted { .. });
            assert_eq!(deleted_now, done < STEPS.len(), "{case}: {reaped:?}");
            let arn = format!("arn:aws:iam::000000000000:role/ephemera/{name}");
            assert!(!role_exists(&bed, &arn).await, "{case}: the role is still there");
            let again =
                provider.revoke_and_delete(&name, &owner).await.unwrap_or_else(|e| panic!("{case}, again: {e}"));
            assert_eq!(again, Reaped::Gone, "{case}, run again");
        }
    }
    // The managed policy is the account's, not the role's: untouched.
    bed.iam.get_policy().policy_arn(&managed).send().await.expect("the managed policy survives reaping");
    bed.iam.delete_policy().policy_arn(&managed).send().await.unwrap();
}

fn document(effect: &str, action: &str, condition: Option<serde_json::Value>) -> serde_json::Value {
    let mut statement = json!({"Effect": effect, "Action": action, "Resource": "*"});
    if let Some(condition) = condition {
        statement["Condition"] = condition;
    }
    json!({"Version": "2012-10-17", "Statement": [statement]})
}

async fn put_inline(
    iam: &aws_sdk_iam::Client,
    role: &str,
    policy: &str,
    doc: &serde_json::Value,
) -> Result<(), String> {
    iam.put_role_policy()
        .role_name(role)
        .policy_name(policy)
        .policy_document(doc.to_string())
        .send()
        .await
        .map(|_| ())
        .map_err(|e| format!("{e:?}"))
}

async fn delete_inline(iam: &aws_sdk_iam::Client, role: &str, policy: &str) -> Result<(), String> {
    iam.delete_role_policy().role_name(role).policy_name(policy).send().await.map(|_| ()).map_err(|e| format!("{e:?}"))
}

/// One step of the reap sequence done by hand, as the controller would have
/// before a crash.
async fn apply_step(
    iam: &aws_sdk_iam::Client,
    role: &str,
    managed: &str,
    step: &str,
    hand_added: bool,
    legacy: bool,
) -> Result<(), String> {
    match step {
        "put the deny" if legacy => {
            let condition = json!({"DateLessThan": {"aws:TokenIssueTime": "2026-11-23T00:00:00Z"}});
            put_inline(iam, role, LEGACY_REVOKE_POLICY_NAME, &document("Deny", "*", Some(condition))).await
        }
        "put the deny" => put_inline(iam, role, REVOKE_POLICY_NAME, &revoke_policy()).await,
        "detach managed" => iam
            .detach_role_policy()
            .role_name(role)
            .policy_arn(managed)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| format!("{e:?}")),
        "delete inline" => delete_inline(iam, role, POLICY_NAME).await,
        "delete the deny" => delete_inline(iam, role, REVOKE_POLICY_NAME).await,
        _ => {
            if hand_added {
                delete_inline(iam, role, HAND_ADDED).await?;
            }
            iam.delete_role().role_name(role).send().await.map(|_| ()).map_err(|e| format!("{e:?}"))
        }
    }
}
