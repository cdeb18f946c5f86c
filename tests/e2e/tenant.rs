//! A tenant attacks: a namespace admin (a wildcard Role in their own
//! namespaces, impersonated as user `mallory`) tries to take or destroy what
//! is not theirs through ephemera. Each attack is refused or neutralised,
//! against the real apiserver and MiniStack, and the victims' roles (trust
//! policy and tags) and the namespace's ServiceAccounts are compared before
//! and after.
//!
//! - A lease made at all: the chart's lease-writers policy refuses it and
//!   says who may (here in a namespace it covers; `real_node` proves it
//!   on the real install too).
//! - Where that policy is missing (a cluster below 1.30, a manifest applied
//!   by hand), forged leases reach the controller, which acts only on what a
//!   lease derives from its own identity and on roles whose tags name it:
//!   - one naming another namespace's (and cluster's) role by ARN is refused;
//!   - one whose name makes ephemera 0.1's readable role name of another
//!     namespace's lease (`team` + `a-report` reads as `team-a` + `report`)
//!     finds that role and leaves it (its tags say another lease);
//!   - one named after a ServiceAccount of the namespace neither binds nor
//!     deletes it.
//! - A pod whose own volume or mount stands in for ephemera's token is
//!   refused with the field named.
//! - A pod labelled `ephemera.dev/skip` is governed as usual unless the
//!   boundary sets `allowSkip`; both outcomes are counted.
//! - A bare pod naming a real Job in its `ownerReferences` gets an identity
//!   of its own, not the Job run's (only the Job controller's pods join it).
//! - A fixed pod name reused after a later admission step refused the first
//!   create: the first create's lease is reaped at once.

use std::{collections::BTreeMap, process::Command, time::Duration};

use k8s_openapi::api::{
    batch::v1::Job,
    core::v1::{Pod, ServiceAccount},
    rbac::v1::PolicyRule,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, PostParams},
};
use serde_json::json;

use crate::{
    support::{
        ControllerProcess, TestBed, Webhook, controller_turn, ensure_crds, two_pod_job, unique_name, user_with_role,
        wait_until,
    },
    webhook::{governed, identity},
};
use ephemera::{
    api::{HolderKind, IdentityLease, WorkloadIdentity},
    cloud::naming,
};

const WAIT: Duration = Duration::from_secs(45);
const ACCOUNT: &str = "000000000000";
/// The host-process controller's and webhook's cluster name (`support`).
const CLUSTER: &str = "e2e";
const ATTACKER: &str = "mallory";
/// The victims' cluster: another cluster sharing the AWS account.
const ELSEWHERE: &str = "e2e-elsewhere";

#[tokio::test]
async fn a_namespace_admin_cannot_take_or_touch_what_is_not_theirs() {
    let _turn = controller_turn().await;
    let bed = TestBed::connect().await;
    ensure_crds(&bed.client).await;
    let mut webhook = Webhook::start(&bed.client).await;
    let mut controller = ControllerProcess::start_with(&["--cluster-name", CLUSTER]);
    let reader = identity(
        "reader",
        json!({"aws": {"statements": [{"actions": ["s3:GetObject"], "resources": ["arn:aws:s3:::team-a-x/*"]}]}}),
    );
    let gov = governed(&bed, &webhook, "e2e-tenant", json!({}), &reader).await;
    let ns = gov.ns.name.clone();
    let mallory = namespace_admin(&bed, &ns).await;
    controller.wait_synced().await;

    // The victims: roles ephemera made for leases of another namespace, one
    // named as this version names roles, one as 0.1 did. They are tagged as
    // another cluster's sharing the account (this cluster's sweep would
    // rightly delete roles of this cluster whose lease does not exist).
    let victim_ns = format!("{ns}-a");
    let victim = naming::role_name("ephemera", ELSEWHERE, &victim_ns, "report-x");
    let legacy_victim = format!("ephemera-{victim_ns}-report-x");
    for role in [&victim, &legacy_victim] {
        make_role(&bed, role, &victim_ns, "report-x").await;
    }
    let roles_before = [role_state(&bed, &victim).await, role_state(&bed, &legacy_victim).await];
    let sas = Api::<ServiceAccount>::namespaced(bed.client.clone(), &ns);
    let app_sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "app"}})).unwrap();
    sas.create(&PostParams::default(), &app_sa).await.expect("the namespace's own ServiceAccount");
    let sas_before = service_accounts(&sas).await;

    // 1. A lease naming another namespace's role: refused, nothing provisioned.
    let leases = Api::<IdentityLease>::namespaced(mallory.clone(), &ns);
    let arn = |role: &str| format!("arn:aws:iam::{ACCOUNT}:role/ephemera/{role}");
    leases.create(&PostParams::default(), &forged("reader-steal", "reader-steal", &arn(&victim))).await.unwrap();
    let why = refused_with(&bed, &ns, "reader-steal", "Refused").await;
    assert!(why.contains("spec.roleArn") && why.contains("does not name the role of"), "{why}");

    // 2. ephemera 0.1's readable name of the victim's lease, reached from a
    // lease named so that it reads the same; the ServiceAccount is made
    // (owned by the forged lease) so that only the role's tags stand between
    // the attacker and the victim's role.
    let lookalike =
        leases.create(&PostParams::default(), &forged("a-report-x", "a-report-x", &arn(&legacy_victim))).await.unwrap();
    let owned_sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "a-report-x", "ownerReferences": [
        {"apiVersion": "ephemera.dev/v1alpha1", "kind": "IdentityLease", "name": "a-report-x", "uid": lookalike.uid()}
    ]}}))
    .unwrap();
    Api::<ServiceAccount>::namespaced(mallory.clone(), &ns).create(&PostParams::default(), &owned_sa).await.unwrap();
    let why = refused_with(&bed, &ns, "a-report-x", "RoleConflict").await;
    assert!(why.contains(&legacy_victim) && why.contains(&format!("ephemera.dev/namespace={victim_ns}")), "{why}");

    // 3. A lease named after the namespace's ServiceAccount: refused, and
    // reaping it (the attacker deletes it) leaves the ServiceAccount.
    let own_role = naming::role_name("ephemera", CLUSTER, &ns, "app");
    leases.create(&PostParams::default(), &forged("app", "app", &arn(&own_role))).await.unwrap();
    let why = refused_with(&bed, &ns, "app", "Refused").await;
    assert!(why.contains("ServiceAccount") && why.contains("not owned by this lease"), "{why}");
    for lease in ["reader-steal", "a-report-x", "app"] {
        leases.delete(lease, &DeleteParams::default()).await.unwrap();
    }
    no_leases_left(&bed, &ns, "the forged leases to be gone").await;
    assert!(!crate::lifecycle::role_exists(&bed, &arn(&own_role)).await, "no role was made for the forged lease");

    // 4. A pod whose own volume or mount takes the token's place.
    let pods = Api::<Pod>::namespaced(mallory.clone(), &ns);
    let volume = pod_with(&json!([{"name": "ephemera-token", "emptyDir": {}}]), &json!([]));
    let refused = create_refused(&pods, &volume).await;
    assert!(refused.contains("spec.volumes[0].name"), "{refused}");
    let mount = pod_with(
        &json!([{"name": "data", "emptyDir": {}}]),
        &json!([{"name": "data", "mountPath": "/var/run/secrets/ephemera.dev"}]),
    );
    let refused = create_refused(&pods, &mount).await;
    assert!(refused.contains("spec.containers[0].volumeMounts[0]"), "{refused}");

    // 5. A pod asking to be left alone (`ephemera.dev/skip`, to keep the
    // default token and escape its boundary): governed as usual until the
    // platform team's boundary sets allowSkip; counted either way.
    let skipper = |name: &str| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"ephemera.dev/identity": "reader", "ephemera.dev/skip": "true"}},
            "spec": {"containers": [{"name": "main", "image": "busybox"}]},
        }))
        .unwrap()
    };
    let governed_anyway = pods.create(&PostParams::default(), &skipper("skip-refused")).await.unwrap();
    let spec = governed_anyway.spec.as_ref().unwrap();
    assert_eq!(spec.automount_service_account_token, Some(false), "the skip label took the default token back");
    assert!(governed_anyway.labels().contains_key("ephemera.dev/lease"), "governed: an identity of its own");
    let allow_skip = serde_json::json!({"spec": {"allowSkip": true}});
    Api::<ephemera::api::IdentityBoundary>::all(bed.client.clone())
        .patch(gov.boundary(), &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&allow_skip))
        .await
        .unwrap();
    let dry_run = PostParams { dry_run: true, ..PostParams::default() };
    wait_until("the webhook to see allowSkip", WAIT, || async {
        let p = pods.create(&dry_run, &skipper("skip-probe")).await.ok()?;
        (p.spec?.automount_service_account_token.is_none()).then_some(())
    })
    .await;
    let left_alone = pods.create(&PostParams::default(), &skipper("skipped")).await.unwrap();
    assert!(!left_alone.labels().contains_key("ephemera.dev/lease"), "a skipped pod gets no identity");
    assert!(
        left_alone.spec.as_ref().unwrap().volumes.iter().flatten().any(|v| v.name.starts_with("kube-api-access-")),
        "a skipped pod keeps the default token, as its boundary allows"
    );
    let sample = |outcome: &str| format!("ephemera_pod_opt_outs_total{{namespace=\"{ns}\",outcome=\"{outcome}\"}}");
    assert_eq!(webhook.metric(&sample("refused")).await, Some(1.0), "the refused opt-out is counted");
    assert_eq!(webhook.metric(&sample("skipped")).await, Some(1.0), "the skipped pod is counted (dry runs are not)");
    for name in ["skip-refused", "skipped"] {
        pods.delete(name, &DeleteParams::default()).await.unwrap();
    }
    no_leases_left(&bed, &ns, "the governed skip pod's lease to be reaped").await;

    // Nothing of anyone else's changed.
    let roles_after = [role_state(&bed, &victim).await, role_state(&bed, &legacy_victim).await];
    assert_eq!(roles_before, roles_after, "a victim's role changed");
    let mut sas_after = service_accounts(&sas).await;
    sas_after.remove("a-report-x"); // the attacker's own, gone with its lease
    assert_eq!(sas_before, sas_after, "the namespace's ServiceAccounts changed");
    for role in [&victim, &legacy_victim] {
        let _ = bed.iam.delete_role().role_name(role.as_str()).send().await;
    }

    // 6. A bare pod naming a real Job (its name and uid) in ownerReferences:
    // a pod of its own, not a member of that Job run's identity.
    Api::<WorkloadIdentity>::namespaced(bed.client.clone(), &ns)
        .create(&PostParams::default(), &identity("batch", json!({"scope": "Job"})))
        .await
        .unwrap();
    let jobs = Api::<Job>::namespaced(mallory.clone(), &ns);
    let job = jobs.create(&PostParams::default(), &two_pod_job("nightly", "batch")).await.unwrap();
    let all_pods = Api::<Pod>::namespaced(bed.client.clone(), &ns);
    let job_lease = wait_until("the Job's pods to get the Job run's identity", WAIT, || async {
        let made = all_pods.list(&ListParams::default().labels("job-name=nightly")).await.ok()?.items;
        made.first()?.labels().get("ephemera.dev/lease").cloned()
    })
    .await;
    let stowaway: Pod = serde_json::from_value(json!({
        "metadata": {"name": "stowaway", "labels": {"ephemera.dev/identity": "batch"}, "ownerReferences": [
            {"apiVersion": "batch/v1", "kind": "Job", "name": "nightly", "uid": job.uid(), "controller": true}]},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]},
    }))
    .unwrap();
    let stowaway = pods.create(&PostParams::default(), &stowaway).await.expect("a pod of its own is admitted");
    let its_lease = stowaway.labels().get("ephemera.dev/lease").cloned().expect("an identity of its own");
    assert_ne!(its_lease, job_lease, "the stowaway joined the Job run's identity");
    let lease = Api::<IdentityLease>::namespaced(bed.client.clone(), &ns).get(&its_lease).await.unwrap();
    assert_eq!(lease.spec.holder.kind, HolderKind::Pod, "held by the pod, not the Job");
    jobs.delete("nightly", &DeleteParams::background()).await.unwrap();
    let _ = pods.delete("stowaway", &DeleteParams::default()).await; // or gone with its "Job" already
    // Reaped before the policy below (it would refuse this test's
    // host-process controller, which does not run as the chart's account).
    no_leases_left(&bed, &ns, "the Job's and the stowaway's leases to be reaped").await;

    // 7. A fixed pod name reused after a later admission step refused the
    // first create: the first lease sees a pod that is not its own and is
    // reaped at once, not after the holder grace (2 min).
    let later_step = refusing_policy(&ns);
    let fixed = |refuse: bool| -> Pod {
        let mut pod = json!({"metadata": {"name": "fixed", "labels": {"ephemera.dev/identity": "reader"}},
                             "spec": {"containers": [{"name": "main", "image": "busybox"}]}});
        if refuse {
            pod["metadata"]["annotations"] = json!({"e2e/refuse": "yes"});
        }
        serde_json::from_value(pod).unwrap()
    };
    let refused = create_refused(&pods, &fixed(true)).await;
    assert!(refused.contains("refused by a later admission step"), "{refused}");
    let ghosts: Vec<String> = Api::<IdentityLease>::namespaced(bed.client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter(|l| l.spec.holder.name == "fixed")
        .map(ResourceExt::name_any)
        .collect();
    assert!(!ghosts.is_empty(), "the refused create left its lease (what this step is about)");
    // (A create that got through before the policy was in force was deleted
    // above: the name may take a moment to be free.)
    let again = wait_until("the pod, made again", WAIT, || async {
        pods.create(&PostParams::default(), &fixed(false)).await.ok()
    })
    .await;
    let own = again.labels().get("ephemera.dev/lease").cloned().expect("its own lease");
    assert!(!ghosts.contains(&own), "the pod made again has a new lease");
    let made_again = std::time::Instant::now();
    wait_until("the ghost leases to be reaped", Duration::from_secs(20), || async {
        let left = Api::<IdentityLease>::namespaced(bed.client.clone(), &ns).list(&ListParams::default()).await.ok()?;
        (!left.items.iter().any(|l| ghosts.contains(&l.name_any()))).then_some(())
    })
    .await;
    eprintln!("[tenant] ghost lease of a refused create reaped {:?} after the name was reused", made_again.elapsed());
    drop(later_step);
    pods.delete("fixed", &DeleteParams::default()).await.unwrap();
    no_leases_left(&bed, &ns, "the reused pod's lease to be reaped").await;

    // 8. With the chart's lease-writers policy over the namespace, the
    // attacker cannot make a lease at all, and is told who may.
    let (_policy, release_ns) = lease_writers_policy(&ns);
    let refused = wait_until("the lease-writers policy to be in force", WAIT, || async {
        match leases.create(&PostParams::default(), &forged("reader-late", "reader-late", &arn(&own_role))).await {
            Ok(made) => {
                let _ = leases.delete(&made.name_any(), &DeleteParams::default()).await;
                None
            }
            Err(e) => Some(e.to_string()),
        }
    })
    .await;
    assert!(
        refused.contains(&format!("made only by ephemera's webhook (system:serviceaccount:{release_ns}:"))
            && refused.contains(&format!("{ATTACKER} may not create one")),
        "{refused}"
    );
}

/// A lease as an attacker would write it.
fn forged(name: &str, service_account: &str, role_arn: &str) -> IdentityLease {
    serde_json::from_value(json!({
        "apiVersion": "ephemera.dev/v1alpha1", "kind": "IdentityLease",
        "metadata": {"name": name},
        "spec": {"holder": {"kind": "Pod", "name": format!("{name}-pod")}, "workloadIdentity": "reader",
                 "serviceAccount": service_account, "roleArn": role_arn, "expiresAt": "2099-01-01T00:00:00Z"},
    }))
    .unwrap()
}

/// Waits until `ns` holds no lease (`what` names the wait).
async fn no_leases_left(bed: &TestBed, ns: &str, what: &str) {
    let leases = Api::<IdentityLease>::namespaced(bed.client.clone(), ns);
    wait_until(what, WAIT, || async { leases.list(&ListParams::default()).await.ok()?.items.is_empty().then_some(()) })
        .await;
}

/// Waits for the lease's Ready condition to carry `reason`; its message.
async fn refused_with(bed: &TestBed, ns: &str, lease: &str, reason: &str) -> String {
    let leases = Api::<IdentityLease>::namespaced(bed.client.clone(), ns);
    wait_until(&format!("lease {lease} to be refused ({reason})"), WAIT, || async {
        let found = leases.get(lease).await.ok()?;
        let ready = found.status?.conditions.into_iter().find(|c| c.type_ == "Ready")?;
        (ready.reason == reason).then_some(ready.message)
    })
    .await
}

/// User `mallory`, admin of `ns` through a wildcard Role.
async fn namespace_admin(bed: &TestBed, ns: &str) -> Client {
    let everything = PolicyRule {
        api_groups: Some(vec!["*".into()]),
        resources: Some(vec!["*".into()]),
        verbs: vec!["*".into()],
        ..PolicyRule::default()
    };
    user_with_role(bed, ns, ATTACKER, "admin-of-everything", vec![everything]).await
}

/// A role as ephemera makes one for lease `namespace/lease` of cluster
/// [`ELSEWHERE`].
async fn make_role(bed: &TestBed, name: &str, namespace: &str, lease: &str) {
    let tag = |k: &str, v: &str| aws_sdk_iam::types::Tag::builder().key(k).value(v).build().unwrap();
    bed.iam
        .create_role()
        .role_name(name)
        .path("/ephemera/")
        .assume_role_policy_document(
            json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Federated": "victim"},
                "Action": "sts:AssumeRoleWithWebIdentity"}]})
            .to_string(),
        )
        .tags(tag("ephemera.dev/cluster", ELSEWHERE))
        .tags(tag("ephemera.dev/namespace", namespace))
        .tags(tag("ephemera.dev/lease", lease))
        .tags(tag("ephemera.dev/lease-uid", "victim-uid"))
        .send()
        .await
        .expect("create the victim's role");
}

/// A role's trust policy, tags and inline policies.
async fn role_state(bed: &TestBed, name: &str) -> (String, Vec<(String, String)>, Vec<String>) {
    let role = bed.iam.get_role().role_name(name).send().await.expect("the role").role.expect("a role");
    let tags = bed.iam.list_role_tags().role_name(name).send().await.expect("its tags").tags;
    let inline = bed.iam.list_role_policies().role_name(name).send().await.expect("its policies").policy_names;
    let mut tags: Vec<(String, String)> = tags.into_iter().map(|t| (t.key, t.value)).collect();
    tags.sort();
    (role.assume_role_policy_document.unwrap_or_default(), tags, inline)
}

/// Every ServiceAccount of a namespace: name -> uid.
async fn service_accounts(api: &Api<ServiceAccount>) -> BTreeMap<String, String> {
    api.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|sa| (sa.name_any(), sa.uid().unwrap_or_default()))
        .collect()
}

fn pod_with(volumes: &serde_json::Value, mounts: &serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"generateName": "takeover-", "labels": {"ephemera.dev/identity": "reader"}},
        "spec": {"volumes": volumes, "containers": [{"name": "main", "image": "busybox", "volumeMounts": mounts}]},
    }))
    .unwrap()
}

/// The refusal of a pod create (retried while the webhook may not know the
/// identity yet, which would admit the pod without one).
async fn create_refused(pods: &Api<Pod>, pod: &Pod) -> String {
    wait_until("the webhook to refuse the pod", WAIT, || async {
        match pods.create(&PostParams::default(), pod).await {
            Ok(made) => {
                let _ = pods.delete(&made.name_any(), &DeleteParams::default()).await;
                None
            }
            Err(e) => Some(e.to_string()),
        }
    })
    .await
}

/// Objects applied with kubectl from a manifest, deleted on drop.
struct Applied {
    manifest: String,
}

impl Applied {
    fn apply(manifest: String) -> Applied {
        kubectl(&["apply", "-f", "-"], &manifest);
        Applied { manifest }
    }
}

impl Drop for Applied {
    fn drop(&mut self) {
        kubectl(&["delete", "--ignore-not-found", "-f", "-"], &self.manifest);
    }
}

/// The chart's lease-writers `ValidatingAdmissionPolicy` and its binding, as
/// `helm template` renders them for a release of its own, bound to the one
/// namespace `ns` (other tests' webhooks run as host processes, not as the
/// chart's ServiceAccount); and the release's namespace.
fn lease_writers_policy(ns: &str) -> (Applied, String) {
    let release = unique_name("tenant");
    let namespace = format!("{release}-ops");
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/ephemera");
    let out = Command::new("helm")
        .args(["template", &release, chart, "-n", &namespace])
        .args(["--set", &format!("clusterName={release}"), "--set-string", &format!("aws.accountId={ACCOUNT}")])
        .args(["--set", &format!("leaseWriters.namespaceSelector.matchLabels.kubernetes\\.io/metadata\\.name={ns}")])
        .args(["--show-only", "templates/controller/lease-writers.yaml"])
        .output()
        .expect("helm template");
    assert!(out.status.success(), "helm template: {}", String::from_utf8_lossy(&out.stderr));
    (Applied::apply(String::from_utf8(out.stdout).unwrap()), namespace)
}

/// A later admission step that refuses pods annotated `e2e/refuse` in `ns`
/// (a `ValidatingAdmissionPolicy`: it runs after every mutating webhook, so
/// ephemera has made the lease by then).
fn refusing_policy(ns: &str) -> Applied {
    Applied::apply(format!(
        r#"apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {{name: {ns}-refuse}}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules: [{{apiGroups: [""], apiVersions: [v1], operations: [CREATE], resources: [pods]}}]
  validations:
    - expression: "!has(object.metadata.annotations) || !('e2e/refuse' in object.metadata.annotations)"
      message: refused by a later admission step (e2e)
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {{name: {ns}-refuse}}
spec:
  policyName: {ns}-refuse
  validationActions: [Deny]
  matchResources:
    namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {ns}}}}}
"#
    ))
}

fn kubectl(args: &[&str], stdin: &str) {
    use std::io::Write;
    let mut child = Command::new("kubectl")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("kubectl");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "kubectl {args:?}");
}
