//! The whole life of a workload identity against the real apiserver and
//! MiniStack (AUTH on): admitted gated, role made and proven, gate lifted,
//! the injected env works with boto3 for exactly what the identity allows,
//! pods cannot use each other's roles, and when the pod ends the role,
//! its sessions, the ServiceAccount and the lease are gone.

use std::time::{Duration, Instant};

use k8s_openapi::api::{
    batch::v1::Job,
    core::v1::{Pod, ServiceAccount},
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

use crate::{
    support::{
        ControllerProcess, TestBed, Webhook, controller_turn, ensure_crds, two_pod_job, unique_name, wait_until,
    },
    webhook::{admitted_with_identity, boundary, env_of, governed, identity, pod},
};
use ephemera::api::{IdentityLease, LeasePhase, WorkloadIdentity};

const WAIT: Duration = Duration::from_secs(45);

/// The pod's gates, once ephemera's is gone.
async fn wait_ungated(pods: &Api<Pod>, name: &str) -> Pod {
    wait_ungated_within(pods, name, WAIT).await
}

/// [`wait_ungated`] with a longer bound.
pub async fn wait_ungated_within(pods: &Api<Pod>, name: &str, bound: Duration) -> Pod {
    wait_until(&format!("pod {name}'s scheduling gate to be lifted"), bound, || async {
        let p = pods.get(name).await.ok()?;
        let gated = p.spec.as_ref()?.scheduling_gates.iter().flatten().any(|g| g.name == "ephemera.dev/identity-ready");
        (!gated).then_some(p)
    })
    .await
}

pub async fn role_exists(bed: &TestBed, role_arn: &str) -> bool {
    let name = role_arn.rsplit('/').next().unwrap();
    match bed.iam.get_role().role_name(name).send().await {
        Ok(_) => true,
        Err(e) if aws_sdk_iam::error::ProvideErrorMetadata::code(&e) == Some("NoSuchEntity") => false,
        Err(e) => panic!("GetRole {name}: {e:?}"),
    }
}

/// Ends pod `name` in `phase`, as its kubelet would: only once it runs.
/// (kwok, playing the kubelet, would otherwise overwrite a terminal phase
/// with Running when it gets to the pod.)
pub async fn finish(client: &Client, namespace: &str, name: &str, phase: &str) {
    let pods = Api::<Pod>::namespaced(client.clone(), namespace);
    wait_until(&format!("pod {name} to run"), WAIT, || async {
        let p = pods.get(name).await.ok()?;
        (p.status?.phase.as_deref() == Some("Running")).then_some(())
    })
    .await;
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(json!({"status": {"phase": phase}})))
        .await
        .unwrap_or_else(|e| panic!("marking pod {name} {phase}: {e}"));
}

#[tokio::test]
async fn a_pod_gets_a_proven_role_for_exactly_its_access_and_loses_it_when_it_ends() {
    let _turn = controller_turn().await;
    let bed = TestBed::connect().await;
    ensure_crds(&bed.client).await;
    let webhook = Webhook::start(&bed.client).await;
    let mut controller = ControllerProcess::start_with(&["--cluster-name", "e2e"]);
    let ns = bed.namespace("e2e-lifecycle").await;
    let team = unique_name("team");
    webhook.watch_namespace(&bed.client, &ns.name, json!({"e2e-team": team})).await;
    let _boundary = boundary(&bed.client, &team, json!({})).await;
    let bucket = unique_name("team-a-logs");
    let other = unique_name("team-a-secrets");
    let allowed = format!("{bucket}/report.csv");
    let refused = format!("{other}/keys.txt");
    bed.seed_s3(&[&allowed, &refused]);
    Api::<WorkloadIdentity>::namespaced(bed.client.clone(), &ns.name)
        .create(
            &PostParams::default(),
            &identity(
                "reader",
                json!({"aws": {"statements": [{"actions": ["s3:GetObject"], "resources": [format!("arn:aws:s3:::{bucket}/*")]}]}}),
            ),
        )
        .await
        .expect("create the identity");

    let pods = Api::<Pod>::namespaced(bed.client.clone(), &ns.name);
    let leases = Api::<IdentityLease>::namespaced(bed.client.clone(), &ns.name);
    let admitted = Instant::now();
    let a =
        admitted_with_identity(&pods, &pod(json!({"name": "worker-a", "labels": {"ephemera.dev/identity": "reader"}})))
            .await;
    pods.create(
        &PostParams::default(),
        &pod(json!({"name": "worker-b", "labels": {"ephemera.dev/identity": "reader"}})),
    )
    .await
    .expect("pod b");
    assert!(
        a.spec.as_ref().unwrap().scheduling_gates.iter().flatten().any(|g| g.name == "ephemera.dev/identity-ready")
    );

    // The gate goes away once the role is proven; the lease says Ready.
    let a = wait_ungated(&pods, "worker-a").await;
    eprintln!("admission -> gate lifted: {:?}", admitted.elapsed());
    let b = wait_ungated(&pods, "worker-b").await;
    let (sa_a, sa_b) = (
        a.spec.as_ref().unwrap().service_account_name.clone().unwrap(),
        b.spec.as_ref().unwrap().service_account_name.clone().unwrap(),
    );
    let lease_a = leases.get(&sa_a).await.unwrap();
    let status = lease_a.status.clone().unwrap();
    assert_eq!(status.phase, Some(LeasePhase::Ready));
    let role_a = env_of(&a, "AWS_ROLE_ARN").unwrap();
    let role_b = env_of(&b, "AWS_ROLE_ARN").unwrap();
    assert_eq!(status.role_arn.as_deref(), Some(role_a.as_str()));
    assert_eq!(lease_a.spec.holder.uid, a.uid(), "the lease is bound to the pod's uid");
    assert!(role_exists(&bed, &role_a).await);
    // Users looking at the pod see why it was held and when it was released.
    let events = Api::<k8s_openapi::api::core::v1::Event>::namespaced(bed.client.clone(), &ns.name);
    wait_until("an IdentityReady Event on pod A", WAIT, || async {
        let list = events.list(&ListParams::default().fields("involvedObject.name=worker-a")).await.ok()?;
        list.items.iter().any(|e| e.reason.as_deref() == Some("IdentityReady")).then_some(())
    })
    .await;

    // The injected env works with boto3, for exactly what the identity allows.
    let token_a = bed.token(&ns.name, &sa_a, "sts.amazonaws.com", 600).await;
    let token_b = bed.token(&ns.name, &sa_b, "sts.amazonaws.com", 600).await;
    let seen = bed.workload(&role_a, &token_a, &[&allowed, &refused]);
    assert!(seen.ok, "{seen:?}");
    assert_eq!(seen.s3.get(&allowed).map(String::as_str), Some("ok"), "{seen:?}");
    assert_eq!(seen.s3.get(&refused).map(String::as_str), Some("AccessDenied"), "{seen:?}");
    // Pod A's token cannot assume pod B's role.
    let cross = bed.assume_with_boto3(&role_b, &token_a);
    assert!(!cross.ok, "pod A assumed pod B's role: {cross:?}");
    // Audiences keep the two worlds apart: the STS token is no Kubernetes
    // credential (401), and a Kubernetes token of the same account (it
    // authenticates: 403, the account holds no pod rights) is refused by STS.
    assert_eq!(api_status_with_token(&token_a).await, 401, "the STS token authenticated to the apiserver");
    let issuer = std::env::var("EPHEMERA_OIDC_ISSUER").expect("EPHEMERA_OIDC_ISSUER (source .ephemera/dev.env)");
    let kube_token = bed.token(&ns.name, &sa_a, &issuer, 600).await;
    assert_eq!(api_status_with_token(&kube_token).await, 403, "the apiserver-audience token should authenticate");
    let wrong_audience = bed.assume_with_boto3(&role_a, &kube_token);
    assert!(!wrong_audience.ok, "STS accepted a token meant for the apiserver: {wrong_audience:?}");
    // A session obtained before the end, to prove it is revoked.
    let session = bed
        .sts
        .assume_role_with_web_identity()
        .role_arn(&role_a)
        .role_session_name("held-session")
        .web_identity_token(&token_a)
        .send()
        .await
        .expect("assume with pod A's token")
        .credentials
        .expect("session credentials");
    assert_eq!(bed.workload_with_session(&session, &[&allowed]).s3.get(&allowed).map(String::as_str), Some("ok"));

    // Pod A succeeds: everything it had is gone, quickly.
    let ended = Instant::now();
    finish(&bed.client, &ns.name, "worker-a", "Succeeded").await;
    wait_until("pod A's role to be deleted", WAIT, || async { (!role_exists(&bed, &role_a).await).then_some(()) })
        .await;
    let ghost = ended.elapsed();
    eprintln!("pod Succeeded -> role deleted (ghost window): {ghost:?}");
    wait_until("pod A's lease to be gone", WAIT, || async {
        leases.get_opt(&sa_a).await.ok()?.is_none().then_some(())
    })
    .await;
    let sas = Api::<ServiceAccount>::namespaced(bed.client.clone(), &ns.name);
    wait_until("pod A's ServiceAccount to be gone", WAIT, || async {
        sas.get_opt(&sa_a).await.ok()?.is_none().then_some(())
    })
    .await;
    let after = bed.assume_with_boto3(&role_a, &token_a);
    assert!(!after.ok, "the reaped role still admits pod A's token: {after:?}");
    let held = bed.workload_with_session(&session, &[&allowed]);
    assert_ne!(
        held.s3.get(&allowed).map(String::as_str),
        Some("ok"),
        "a session issued before reaping still reads: {held:?}"
    );

    // No token ever reaches a log.
    for log in [controller.log.clone(), webhook.log().to_path_buf()] {
        let text = std::fs::read_to_string(&log).unwrap();
        for token in [&token_a, &token_b, &kube_token] {
            assert!(!text.contains(token.as_str()), "a token is in {}", log.display());
        }
        assert!(!text.contains("eyJhbGciOi"), "something JWT-shaped is in {}", log.display());
    }

    // Every cloud call is counted by operation and outcome.
    let calls =
        |op: &str, outcome: &str| format!("ephemera_cloud_requests_total{{operation=\"{op}\",outcome=\"{outcome}\"}}");
    for (op, at_least) in [
        ("CreateRole", 2.0),
        ("PutRolePolicy", 2.0),
        ("CreatePolicyVersion", 1.0),
        ("AssumeRoleWithWebIdentity", 2.0),
        ("DeleteRole", 1.0),
    ] {
        let n = controller.metric(&calls(op, "ok")).await.unwrap_or_default();
        assert!(n >= at_least, "{op} ok: {n} < {at_least}");
    }
    assert!(controller.metric("ephemera_ghost_window_seconds_count").await >= Some(1.0));
    assert!(controller.metric("ephemera_iam_roles_limit").await >= Some(1.0), "the account's role quota is read");

    // Pod B is untouched, until it is deleted.
    assert!(bed.workload(&role_b, &token_b, &[&allowed]).ok);
    pods.delete("worker-b", &kube::api::DeleteParams::default()).await.unwrap();
    wait_until("pod B's role to be deleted", WAIT, || async { (!role_exists(&bed, &role_b).await).then_some(()) })
        .await;
    wait_until("pod B's lease to be gone", WAIT, || async {
        leases.get_opt(&sa_b).await.ok()?.is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_job_run_shares_one_role_that_dies_with_the_job() {
    let _turn = controller_turn().await;
    let bed = TestBed::connect().await;
    ensure_crds(&bed.client).await;
    let webhook = Webhook::start(&bed.client).await;
    let mut controller = ControllerProcess::start_with(&["--cluster-name", "e2e"]);
    let batch = identity(
        "batch",
        json!({"scope": "Job", "aws": {"statements": [
            {"actions": ["s3:GetObject"], "resources": ["arn:aws:s3:::team-a-x/*"]}]}}),
    );
    let gov = governed(&bed, &webhook, "e2e-lifecycle-job", json!({}), &batch).await;
    let (ns, pods) = (&gov.ns, gov.pods.clone());
    // The probe is deleted at once: the controller must be watching by then
    // (on a busy machine it may still be starting).
    controller.wait_synced().await;
    let probe =
        admitted_with_identity(&pods, &pod(json!({"name": "probe", "labels": {"ephemera.dev/identity": "batch"}})))
            .await;
    pods.delete(&probe.name_any(), &kube::api::DeleteParams::default()).await.unwrap();
    // Deleted before the controller recorded its uid: still reaped at once,
    // not after the 2-minute grace for pods that never appeared.
    let probe_lease = probe.spec.as_ref().unwrap().service_account_name.clone().unwrap();
    let leases = Api::<IdentityLease>::namespaced(bed.client.clone(), &ns.name);
    wait_until("the deleted probe's lease to be reaped", Duration::from_secs(20), || async {
        leases.get_opt(&probe_lease).await.ok()?.is_none().then_some(())
    })
    .await;

    let job = two_pod_job("nightly", "batch");
    Api::<Job>::namespaced(bed.client.clone(), &ns.name).create(&PostParams::default(), &job).await.unwrap();
    let job_pods = wait_until("two ungated pods of the Job", WAIT, || async {
        let list = pods.list(&ListParams::default().labels("job-name=nightly")).await.ok()?;
        let ungated = list.items.iter().filter(|p| {
            !p.spec
                .as_ref()
                .is_some_and(|s| s.scheduling_gates.iter().flatten().any(|g| g.name == "ephemera.dev/identity-ready"))
        });
        (list.items.len() == 2 && ungated.count() == 2).then_some(list.items)
    })
    .await;
    let role = env_of(&job_pods[0], "AWS_ROLE_ARN").unwrap();
    assert_eq!(env_of(&job_pods[1], "AWS_ROLE_ARN").as_deref(), Some(role.as_str()));
    assert!(role_exists(&bed, &role).await);

    // One pod finishing does not end the Job run's identity; the Job completing does.
    for p in &job_pods {
        finish(&bed.client, &ns.name, &p.name_any(), "Succeeded").await;
    }
    let ended = Instant::now();
    wait_until("the Job's role to be deleted", Duration::from_mins(1), || async {
        (!role_exists(&bed, &role).await).then_some(())
    })
    .await;
    eprintln!("Job pods Succeeded -> Job complete -> role deleted: {:?}", ended.elapsed());
}

#[tokio::test]
async fn a_controller_killed_mid_life_leaves_nothing_behind() {
    let _turn = controller_turn().await;
    let bed = TestBed::connect().await;
    ensure_crds(&bed.client).await;
    let webhook = Webhook::start(&bed.client).await;
    let controller = ControllerProcess::start_with(&["--cluster-name", "e2e"]);
    let gov = governed(&bed, &webhook, "e2e-lifecycle-crash", json!({}), &identity("reader", json!({}))).await;
    let (ns, pods) = (&gov.ns, gov.pods.clone());
    admitted_with_identity(&pods, &pod(json!({"name": "worker", "labels": {"ephemera.dev/identity": "reader"}}))).await;
    let worker = wait_ungated(&pods, "worker").await;
    let role = env_of(&worker, "AWS_ROLE_ARN").unwrap();
    let lease = worker.spec.unwrap().service_account_name.unwrap();
    assert!(role_exists(&bed, &role).await);

    // SIGKILL: no cleanup of any kind. The pod ends while nobody watches.
    drop(controller);
    finish(&bed.client, &ns.name, "worker", "Failed").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(role_exists(&bed, &role).await, "nothing reaps while the controller is down");
    // The inventory shows the ghost for what it is.
    let rows = inventory(&ns.name);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["lease"], lease.as_str());
    assert_eq!(rows[0]["workload"], "Pod/worker");
    assert_eq!(rows[0]["roleArn"], role.as_str());
    assert_eq!(rows[0]["flags"], json!(["past-workload"]), "{rows:?}");

    // The next controller finds the ended pod and reaps everything.
    let _next = ControllerProcess::start_with(&["--cluster-name", "e2e"]);
    wait_until("the role to be deleted after restart", WAIT, || async {
        (!role_exists(&bed, &role).await).then_some(())
    })
    .await;
    let leases = Api::<IdentityLease>::namespaced(bed.client.clone(), &ns.name);
    wait_until("the lease to be gone", WAIT, || async { leases.get_opt(&lease).await.ok()?.is_none().then_some(()) })
        .await;
    assert!(inventory(&ns.name).is_empty());
}

/// `ephemera inventory -n <namespace> -o json`, as an operator would run it.
fn inventory(namespace: &str) -> Vec<serde_json::Value> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ephemera"))
        .args(["inventory", "-n", namespace, "-o", "json"])
        .output()
        .expect("running ephemera inventory");
    assert!(out.status.success(), "ephemera inventory: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("inventory JSON")
}

#[tokio::test]
async fn orphaned_roles_are_swept_and_expired_leases_reaped() {
    let _turn = controller_turn().await;
    let bed = TestBed::connect().await;
    ensure_crds(&bed.client).await;
    let cluster = unique_name("sweep");
    let ns = bed.namespace("e2e-sweep").await;

    // A role this cluster made for a lease that no longer exists (a crash
    // between making the role and the lease being recorded, or a lease
    // force-deleted without its finalizer).
    let orphan = unique_name("ephemera-orphan");
    let sweepable = |name: String, path: &'static str, extra: &[(&str, &str)], cluster: String| {
        let tag = |k: &str, v: &str| aws_sdk_iam::types::Tag::builder().key(k).value(v).build().unwrap();
        let mut create = bed
            .iam
            .create_role()
            .role_name(name)
            .path(path)
            .assume_role_policy_document(r#"{"Version":"2012-10-17","Statement":[]}"#)
            .tags(tag("ephemera.dev/cluster", &cluster));
        for (k, v) in extra {
            create = create.tags(tag(k, v));
        }
        create.tags(tag("ephemera.dev/namespace", &ns.name)).tags(tag("ephemera.dev/lease", "gone")).send()
    };
    sweepable(orphan.clone(), "/ephemera/", &[], cluster.clone()).await.expect("create the orphan role");
    // One under a path no boundary uses (any more): the sweep lists the
    // whole root, not today's boundaries' paths.
    let retired = unique_name("ephemera-retired");
    sweepable(retired.clone(), "/ephemera/retired-team/", &[], cluster.clone()).await.expect("create the retired role");
    // Outside the root: not ephemera's to list, whatever its tags say.
    let outside = unique_name("ephemera-outside");
    sweepable(outside.clone(), "/elsewhere/", &[], cluster.clone()).await.expect("create the outside role");
    // Another cluster's role with the same lease tags must survive.
    let foreign = unique_name("ephemera-foreign");
    sweepable(foreign.clone(), "/ephemera/", &[], "another-cluster".into()).await.expect("create the foreign role");
    // A cluster given the same name, sharing the account: its role carries
    // its own issuer and must survive too.
    let twin = unique_name("ephemera-twin");
    let other_issuer = [("ephemera.dev/issuer", "oidc.eks.eu-west-1.amazonaws.com/id/ANOTHERCLUSTER")];
    sweepable(twin.clone(), "/ephemera/", &other_issuer, cluster.clone())
        .await
        .expect("create the twin cluster's role");

    // A lease past its expiry (its workload would still be running).
    let expired: IdentityLease = serde_json::from_value(json!({
        "apiVersion": "ephemera.dev/v1alpha1", "kind": "IdentityLease",
        "metadata": {"name": "expired"},
        "spec": {"holder": {"kind": "Pod", "name": "long-runner"}, "workloadIdentity": "x",
                 "serviceAccount": "expired", "expiresAt": "2020-01-01T00:00:00Z"},
    }))
    .unwrap();
    let leases = Api::<IdentityLease>::namespaced(bed.client.clone(), &ns.name);
    leases.create(&PostParams::default(), &expired).await.unwrap();

    let _controller = ControllerProcess::start_with(&["--cluster-name", &cluster]);
    let orphan_arn = format!("arn:aws:iam::000000000000:role/ephemera/{orphan}");
    let retired_arn = format!("arn:aws:iam::000000000000:role/ephemera/retired-team/{retired}");
    wait_until("the orphaned roles to be swept", WAIT, || async {
        (!role_exists(&bed, &orphan_arn).await && !role_exists(&bed, &retired_arn).await).then_some(())
    })
    .await;
    wait_until("the expired lease to be reaped", WAIT, || async {
        leases.get_opt("expired").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(
        role_exists(&bed, &format!("arn:aws:iam::000000000000:role/ephemera/{foreign}")).await,
        "another cluster's role was swept"
    );
    assert!(
        role_exists(&bed, &format!("arn:aws:iam::000000000000:role/ephemera/{twin}")).await,
        "the role of a cluster with the same name and another issuer was swept"
    );
    assert!(
        role_exists(&bed, &format!("arn:aws:iam::000000000000:role/elsewhere/{outside}")).await,
        "a role outside the role path root was swept"
    );
    for role in [&foreign, &twin, &outside] {
        let _ = bed.iam.delete_role().role_name(role).send().await;
    }
}

#[tokio::test]
async fn a_full_role_quota_holds_new_leases_with_a_clear_condition() {
    let _turn = controller_turn().await;
    let bed = TestBed::connect().await;
    ensure_crds(&bed.client).await;
    let webhook = Webhook::start(&bed.client).await;
    // A limit of 0: the account is "full" whatever MiniStack holds.
    let mut full = ControllerProcess::start_with(&["--cluster-name", "e2e", "--aws-role-limit", "0"]);
    let gov = governed(&bed, &webhook, "e2e-quota", json!({}), &identity("reader", json!({}))).await;
    let (ns, pods) = (&gov.ns, gov.pods.clone());
    let worker =
        admitted_with_identity(&pods, &pod(json!({"name": "worker", "labels": {"ephemera.dev/identity": "reader"}})))
            .await;
    let lease = worker.spec.as_ref().unwrap().service_account_name.clone().unwrap();
    let role = env_of(&worker, "AWS_ROLE_ARN").unwrap();
    let leases = Api::<IdentityLease>::namespaced(bed.client.clone(), &ns.name);

    // The lease waits and says why; no role is made; the pod stays gated.
    let condition = wait_until("a QuotaExceeded condition on the lease", WAIT, || async {
        let status = leases.get(&lease).await.ok()?.status?;
        status.conditions.into_iter().find(|c| c.type_ == "Ready" && c.reason == "QuotaExceeded")
    })
    .await;
    assert_eq!(condition.status, "False");
    assert!(condition.message.contains("limit is 0"), "{}", condition.message);
    let events = Api::<k8s_openapi::api::core::v1::Event>::namespaced(bed.client.clone(), &ns.name);
    wait_until("a QuotaExceeded Event on the lease", WAIT, || async {
        let list = events.list(&ListParams::default().fields(&format!("involvedObject.name={lease}"))).await.ok()?;
        list.items.iter().any(|e| e.reason.as_deref() == Some("QuotaExceeded")).then_some(())
    })
    .await;
    assert!(!role_exists(&bed, &role).await, "a role was made over the limit");
    let gated = pods.get("worker").await.unwrap();
    assert!(gated.spec.unwrap().scheduling_gates.iter().flatten().any(|g| g.name == "ephemera.dev/identity-ready"));
    assert!(full.metric("ephemera_iam_roles_limit").await.is_some_and(|v| v < 0.5), "the limit is exported");
    assert!(
        full.metric("ephemera_cloud_requests_total{operation=\"CreateRole\",outcome=\"ok\"}").await.is_none(),
        "no CreateRole call while full"
    );

    // Room again (here: the default limit, the account's quota): it proceeds.
    drop(full);
    let _roomy = ControllerProcess::start_with(&["--cluster-name", "e2e"]);
    wait_ungated(&pods, "worker").await;
    assert!(role_exists(&bed, &role).await);
    finish(&bed.client, &ns.name, "worker", "Succeeded").await;
    wait_until("the role to be deleted", WAIT, || async { (!role_exists(&bed, &role).await).then_some(()) }).await;
}

/// HTTP status of listing pods in `default` with `token` as the only credential.
async fn api_status_with_token(token: &str) -> u16 {
    let mut config = kube::Config::infer().await.expect("the test bed's kubeconfig");
    config.auth_info = kube::config::AuthInfo { token: Some(token.to_owned().into()), ..Default::default() };
    let client = Client::try_from(config).expect("a client with the token");
    match Api::<Pod>::namespaced(client, "default").list(&ListParams::default()).await {
        Ok(_) => 200,
        Err(kube::Error::Api(status)) => status.code,
        Err(e) => panic!("listing pods with a token: {e}"),
    }
}

/// The first reaping step leaves the role with no usable session, old or
/// new: with the proxy holding the reap right after that step (its first
/// `DeleteRolePolicy`, while the identity's own allow is still attached), a
/// session from before the end and one assumed after the step, with the
/// pod's still-valid token, are both denied on S3. Only then does the
/// deletion go on. (Under 0.2's `aws:TokenIssueTime` deny the new session
/// read the object.)
#[tokio::test]
async fn the_first_reaping_step_denies_every_session_old_and_new() {
    let upstream = std::env::var("AWS_ENDPOINT_URL").expect("AWS_ENDPOINT_URL (source .ephemera/dev.env)");
    let proxy = crate::faults::HoldProxy::start(
        upstream.trim_start_matches("http://").trim_end_matches('/'),
        "DeleteRolePolicy",
        false,
    )
    .await;
    let _turn = controller_turn().await;
    let bed = TestBed::connect().await;
    ensure_crds(&bed.client).await;
    let webhook = Webhook::start(&bed.client).await;
    let mut controller = ControllerProcess::spawn_with_env(
        "controller",
        &["controller", "--admin-addr", "127.0.0.1:0", "--cluster-name", "e2e"],
        &[("AWS_ENDPOINT_URL", &proxy.url)],
    );
    let bucket = unique_name("team-a-revoke");
    let object = format!("{bucket}/report.csv");
    bed.seed_s3(&[&object]);
    let reader = identity(
        "reader",
        json!({"aws": {"statements": [{"actions": ["s3:GetObject"], "resources": [format!("arn:aws:s3:::{bucket}/*")]}]}}),
    );
    let gov = governed(&bed, &webhook, "e2e-revoke", json!({}), &reader).await;
    let ns = gov.ns.name.clone();
    controller.wait_synced().await;
    let worker = Worker::running(&bed, &gov).await;
    let role = worker.role.clone();
    let before = worker.assume(&bed, "before-the-end").await.expect("a session while the pod runs");
    let read =
        |creds: &aws_sdk_sts::types::Credentials| bed.workload_with_session(creds, &[&object]).s3[&object].clone();
    assert_eq!(read(&before), "ok", "the identity reads its object while the pod runs");

    // The pod ends; the reap stops right after its first step.
    proxy.hold();
    let ended = Instant::now();
    finish(&bed.client, &ns, "worker", "Succeeded").await;
    proxy.wait_held(WAIT).await;
    let revoked_within = ended.elapsed();
    assert!(role_exists(&bed, &role).await, "the role must still exist here, or this test proves nothing");
    assert_eq!(read(&before), "AccessDenied", "a session from before the end still reads");
    // The token is still valid and the role still trusts it: a new session
    // may be minted, but it can do nothing.
    match worker.assume(&bed, "after-the-first-step").await {
        Ok(after) => assert_eq!(read(&after), "AccessDenied", "a session minted after the first step reads"),
        Err(e) => eprintln!("a new session was refused outright: {e:?}"),
    }

    // Only now does the deletion go on.
    proxy.release(WAIT).await;
    wait_until("the role to be deleted", WAIT, || async { (!role_exists(&bed, &role).await).then_some(()) }).await;
    // Once per reaped role, never twice (the lane revoked, the reap did not
    // again): at most one per lease this controller reaped (other tests'
    // leftover leases of the same cluster name may be among them).
    let window = controller.metric("ephemera_credential_window_seconds_count").await.unwrap_or_default();
    let reaped = std::fs::read_to_string(&controller.log).unwrap().matches("lease::reap: reaped ").count();
    #[allow(clippy::cast_precision_loss)]
    let reaped = reaped as f64;
    assert!(
        (1.0..=reaped).contains(&window),
        "the credential window is observed once per reaped role: {window} for {reaped} reaped"
    );
    eprintln!(
        "pod Succeeded (test's clock) -> deny-all in place: under {revoked_within:?} (the credential window; \
         the reap was held after it)"
    );
}

/// A workload whose identity may write IAM roles (a boundary allowing
/// `iam:*` on the root) cannot undo its revocation ahead of time: its
/// revocation set (its role's permissions boundary) denies its own sessions
/// removing or changing that boundary and any `ephemera.dev/*` tag, while
/// the same session may write a tag of its own (so the refusals come from
/// the set, not from a missing allow). Then its end still revokes it.
#[tokio::test]
async fn a_workload_allowed_iam_cannot_undo_its_own_revocation() {
    let _turn = controller_turn().await;
    let bed = TestBed::connect().await;
    ensure_crds(&bed.client).await;
    let webhook = Webhook::start(&bed.client).await;
    let mut controller = ControllerProcess::start_with(&["--cluster-name", "e2e"]);
    let roles = "arn:aws:iam::*:role/ephemera/*";
    let actions =
        ["iam:TagRole", "iam:UntagRole", "iam:DeleteRolePermissionsBoundary", "iam:PutRolePermissionsBoundary"];
    let writer = identity("reader", json!({"aws": {"statements": [{"actions": actions, "resources": [roles]}]}}));
    let allowed = json!({"aws": {"allowedActions": ["iam:*"], "allowedResources": [roles]}});
    let gov = governed(&bed, &webhook, "e2e-untag", allowed, &writer).await;
    let ns = gov.ns.name.clone();
    controller.wait_synced().await;
    let worker = Worker::running(&bed, &gov).await;
    let name = worker.role.rsplit('/').next().unwrap().to_owned();
    let creds = worker.assume(&bed, "tamper").await.expect("a session while the pod runs");
    let iam = TestBed::iam_as(&creds).await;
    let code = |e: &dyn aws_sdk_iam::error::ProvideErrorMetadata| e.code().unwrap_or("unknown").to_owned();
    let tag = |k: &str, v: &str| aws_sdk_iam::types::Tag::builder().key(k).value(v).build().unwrap();

    iam.tag_role().role_name(&name).tags(tag("team", "a")).send().await.expect("the identity may tag its role");
    let untag = iam.untag_role().role_name(&name).tag_keys("ephemera.dev/revocation").send().await;
    assert_eq!(untag.map_err(|e| code(&e)).err().as_deref(), Some("AccessDenied"), "untagging its revocation key");
    let retag = iam.tag_role().role_name(&name).tags(tag("ephemera.dev/revocation", "none")).send().await;
    assert_eq!(retag.map_err(|e| code(&e)).err().as_deref(), Some("AccessDenied"), "rewriting its revocation key");
    let owner = iam.tag_role().role_name(&name).tags(tag("ephemera.dev/cluster", "other")).send().await;
    assert_eq!(owner.map_err(|e| code(&e)).err().as_deref(), Some("AccessDenied"), "rewriting an ownership tag");
    let unbound = iam.delete_role_permissions_boundary().role_name(&name).send().await;
    assert_eq!(unbound.map_err(|e| code(&e)).err().as_deref(), Some("AccessDenied"), "dropping its boundary");
    let role = bed.iam.get_role().role_name(&name).send().await.expect("GetRole").role.expect("the role");
    let boundary = role.permissions_boundary.and_then(|b| b.permissions_boundary_arn).unwrap_or_default();
    assert!(boundary.contains(":policy/ephemera/ephemera-revoked-"), "the role carries its set: {boundary}");
    let tags = bed.iam.list_role_tags().role_name(&name).send().await.expect("ListRoleTags").tags;
    assert!(tags.iter().any(|t| t.key == "ephemera.dev/revocation" && t.value != "none"), "{tags:?}");

    // It ends: the same session is refused what it could do a moment ago.
    finish(&bed.client, &ns, "worker", "Succeeded").await;
    wait_until("the session to be refused", WAIT, || async {
        iam.tag_role().role_name(&name).tags(tag("team", "b")).send().await.is_err().then_some(())
    })
    .await;
    wait_until("the role to be deleted", WAIT, || async { (!role_exists(&bed, &worker.role).await).then_some(()) })
        .await;
}

/// A boundary tightened under a live role reaches it within seconds: the
/// running pod's session (the same one, not a new one) loses the resource the
/// boundary no longer allows, keeps the rest, and the lease records the new
/// policy digest with a `PolicyUpdated` Event.
#[tokio::test]
async fn a_tightened_boundary_reaches_a_live_role_within_seconds() {
    let _turn = controller_turn().await;
    let bed = TestBed::connect().await;
    ensure_crds(&bed.client).await;
    let webhook = Webhook::start(&bed.client).await;
    let mut controller = ControllerProcess::start_with(&["--cluster-name", "e2e"]);
    let (keep, drop) = (unique_name("team-a-keep"), unique_name("team-a-drop"));
    let (kept, dropped) = (format!("{keep}/report.csv"), format!("{drop}/report.csv"));
    bed.seed_s3(&[&kept, &dropped]);
    let resources = [format!("arn:aws:s3:::{keep}/*"), format!("arn:aws:s3:::{drop}/*")];
    let reader =
        identity("reader", json!({"aws": {"statements": [{"actions": ["s3:GetObject"], "resources": resources}]}}));
    let gov = governed(&bed, &webhook, "e2e-follow", json!({}), &reader).await;
    let ns = gov.ns.name.clone();
    controller.wait_synced().await;
    let worker = Worker::running(&bed, &gov).await;
    let role = worker.role.clone();
    let lease_name = worker.pod.labels()["ephemera.dev/lease"].clone();
    let session = worker.assume(&bed, "running").await.expect("the pod's session");
    let seen = bed.workload_with_session(&session, &[&kept, &dropped]);
    assert_eq!((seen.s3[&kept].as_str(), seen.s3[&dropped].as_str()), ("ok", "ok"), "{seen:?}");
    let leases = Api::<IdentityLease>::namespaced(bed.client.clone(), &ns);
    let digest_of = |l: &IdentityLease| l.status.as_ref().and_then(|s| s.policy_digest.clone());
    let before = digest_of(&leases.get(&lease_name).await.unwrap());
    assert!(before.is_some(), "a Ready lease records the policy its role was made from");

    // The platform team narrows the boundary to one bucket.
    let tightened = Instant::now();
    let narrow = json!({"spec": {"aws": {"allowedResources": [format!("arn:aws:s3:::{keep}/*")]}}});
    Api::<ephemera::api::IdentityBoundary>::all(bed.client.clone())
        .patch(gov.boundary(), &PatchParams::default(), &Patch::Merge(&narrow))
        .await
        .unwrap();
    wait_until("the lease to record the narrowed policy", WAIT, || async {
        let now = digest_of(&leases.get(&lease_name).await.ok()?);
        (now.is_some() && now != before).then_some(())
    })
    .await;
    let recorded = tightened.elapsed();
    let seen = bed.workload_with_session(&session, &[&kept, &dropped]);
    assert_eq!(
        seen.s3[&dropped], "AccessDenied",
        "the running session still reads what the boundary dropped: {seen:?}"
    );
    assert_eq!(seen.s3[&kept], "ok", "the running session lost what the boundary still allows: {seen:?}");
    let events = Api::<k8s_openapi::api::core::v1::Event>::namespaced(bed.client.clone(), &ns);
    wait_until("a PolicyUpdated Event on the lease", WAIT, || async {
        let list =
            events.list(&ListParams::default().fields(&format!("involvedObject.name={lease_name}"))).await.ok()?;
        list.items.iter().any(|e| e.reason.as_deref() == Some("PolicyUpdated")).then_some(())
    })
    .await;
    eprintln!("boundary narrowed -> live role's policy re-applied and recorded: {recorded:?}");
    gov.pods.delete("worker", &kube::api::DeleteParams::default()).await.unwrap();
    wait_until("the role to be reaped", WAIT, || async { (!role_exists(&bed, &role).await).then_some(()) }).await;
}

/// The same for Kubernetes rules: a boundary that stops admitting one of a
/// live lease's rules takes it from the running pod's ServiceAccount (its
/// Role is rewritten), and one that admits none takes the Role and its
/// binding away. Before, the Role kept what it was made with until the pod
/// ended: the policy digest that makes live leases follow covered only the
/// AWS side.
#[tokio::test]
async fn a_tightened_boundary_takes_kubernetes_rules_from_a_live_lease() {
    use k8s_openapi::api::{
        authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
        rbac::v1::{Role, RoleBinding},
    };
    let _turn = controller_turn().await;
    let bed = TestBed::connect().await;
    ensure_crds(&bed.client).await;
    let webhook = Webhook::start(&bed.client).await;
    let mut controller = ControllerProcess::start_with(&["--cluster-name", "e2e"]);
    let rule = |resource: &str| json!({"apiGroups": [""], "resources": [resource], "verbs": ["get"]});
    let reader = identity(
        "reader",
        json!({"aws": {"statements": [{"actions": ["s3:GetObject"], "resources": ["arn:aws:s3:::team-a-x/*"]}]},
               "kubernetes": {"rules": [rule("configmaps"), rule("secrets")]}}),
    );
    let gov = governed(&bed, &webhook, "e2e-follow-rbac", json!({}), &reader).await;
    let ns = gov.ns.name.clone();
    controller.wait_synced().await;
    let worker = Worker::running(&bed, &gov).await;
    let lease_name = worker.pod.labels()["ephemera.dev/lease"].clone();
    let account = worker.pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap();
    let may_get = |resource: &'static str| {
        let (client, ns, user) = (bed.client.clone(), ns.clone(), format!("system:serviceaccount:{ns}:{account}"));
        async move {
            let review = SubjectAccessReview {
                spec: SubjectAccessReviewSpec {
                    user: Some(user),
                    resource_attributes: Some(ResourceAttributes {
                        namespace: Some(ns),
                        verb: Some("get".into()),
                        resource: Some(resource.into()),
                        ..ResourceAttributes::default()
                    }),
                    ..SubjectAccessReviewSpec::default()
                },
                ..SubjectAccessReview::default()
            };
            let answer = Api::<SubjectAccessReview>::all(client).create(&PostParams::default(), &review).await;
            answer.expect("a SubjectAccessReview").status.is_some_and(|s| s.allowed)
        }
    };
    assert!(may_get("configmaps").await && may_get("secrets").await, "the live lease's account holds both rules");

    // The platform team stops admitting secrets.
    let boundaries = Api::<ephemera::api::IdentityBoundary>::all(bed.client.clone());
    let narrow = json!({"spec": {"kubernetes": {"allowedRules": [rule("configmaps")]}}});
    boundaries.patch(gov.boundary(), &PatchParams::default(), &Patch::Merge(&narrow)).await.unwrap();
    let tightened = Instant::now();
    wait_until("the live account to lose secrets", WAIT, || async { (!may_get("secrets").await).then_some(()) }).await;
    let took = tightened.elapsed();
    assert!(may_get("configmaps").await, "the account lost the rule the boundary still admits");

    // And then every rule.
    let none = json!({"spec": {"kubernetes": {"allowedRules": []}}});
    boundaries.patch(gov.boundary(), &PatchParams::default(), &Patch::Merge(&none)).await.unwrap();
    let (roles, bindings) =
        (Api::<Role>::namespaced(bed.client.clone(), &ns), Api::<RoleBinding>::namespaced(bed.client.clone(), &ns));
    wait_until("the lease's Role and RoleBinding to go", WAIT, || async {
        let gone =
            roles.get_opt(&lease_name).await.ok()?.is_none() && bindings.get_opt(&lease_name).await.ok()?.is_none();
        gone.then_some(())
    })
    .await;
    assert!(!may_get("configmaps").await, "the account kept a rule no boundary admits");
    eprintln!("boundary narrowed -> the live account lost the rule after {took:?}");
    gov.pods.delete("worker", &kube::api::DeleteParams::default()).await.unwrap();
    wait_until("the role to be reaped", WAIT, || async { (!role_exists(&bed, &worker.role).await).then_some(()) })
        .await;
}

/// The commonest setup mistake on a new account, the IAM OIDC provider of
/// the cluster's issuer missing, is named at once (not left as "waiting for
/// IAM propagation" with pods gated forever): the lease's condition says
/// `TokenRejected` with the provider ARN to create, an Event says it too, and
/// once the provider exists the same pod goes on. The test bed's MiniStack
/// answers as AWS does (`InvalidIdentityToken`, e2e/ministack/launch.py).
/// Every test that assumes roles takes the controller turn, so removing the
/// shared provider for a moment touches no other test.
#[tokio::test]
async fn a_missing_oidc_provider_is_named_and_the_pod_goes_on_once_it_exists() {
    let _turn = controller_turn().await;
    let bed = TestBed::connect().await;
    ensure_crds(&bed.client).await;
    let issuer = std::env::var("EPHEMERA_OIDC_ISSUER").expect("EPHEMERA_OIDC_ISSUER (source .ephemera/dev.env)");
    let host = issuer.trim_start_matches("https://").trim_end_matches('/');
    let account = bed.sts.get_caller_identity().send().await.unwrap().account.unwrap();
    let provider_arn = format!("arn:aws:iam::{account}:oidc-provider/{host}");
    let provider = bed.iam.get_open_id_connect_provider().open_id_connect_provider_arn(&provider_arn).send().await;
    let provider = provider.expect("the test bed registers the issuer's OIDC provider");
    let webhook = Webhook::start(&bed.client).await;
    let mut controller = ControllerProcess::start_with(&["--cluster-name", "e2e"]);
    let reader = identity(
        "reader",
        json!({"aws": {"statements": [{"actions": ["s3:GetObject"], "resources": ["arn:aws:s3:::team-a-x/*"]}]}}),
    );
    let gov = governed(&bed, &webhook, "e2e-no-oidc", json!({}), &reader).await;
    controller.wait_synced().await;

    bed.iam.delete_open_id_connect_provider().open_id_connect_provider_arn(&provider_arn).send().await.unwrap();
    let restore = RestoreProvider {
        url: issuer.clone(),
        client_ids: provider.client_id_list.clone().unwrap_or_default(),
        thumbprints: provider.thumbprint_list.clone().unwrap_or_default(),
    };
    let lease_name = Worker::admit(&gov).await.labels()["ephemera.dev/lease"].clone();
    let leases = Api::<IdentityLease>::namespaced(bed.client.clone(), &gov.ns.name);
    let named = Instant::now();
    let message = wait_until("the lease to name the missing OIDC provider", WAIT, || async {
        let lease = leases.get(&lease_name).await.ok()?;
        let ready = lease.status?.conditions.into_iter().find(|c| c.type_ == "Ready")?;
        (ready.reason == "TokenRejected").then_some(ready.message)
    })
    .await;
    let took = named.elapsed();
    drop(restore);
    assert!(
        message.contains(&provider_arn) && message.contains("No OpenIDConnect provider found"),
        "the condition names the provider to create and STS's answer: {message}"
    );
    let events = Api::<k8s_openapi::api::core::v1::Event>::namespaced(bed.client.clone(), &gov.ns.name);
    let listed =
        events.list(&ListParams::default().fields(&format!("involvedObject.name={lease_name}"))).await.unwrap();
    assert!(listed.items.iter().any(|e| e.reason.as_deref() == Some("TokenRejected")), "an Event says it too");
    // With the provider back, the pod goes on (the lease backs off, so allow a while).
    wait_ungated_within(&gov.pods, "worker", Duration::from_mins(1)).await;
    eprintln!(
        "missing OIDC provider named in the lease's condition {took:?} after admission; pod ungated once it existed"
    );
}

/// Pod `worker` of identity `reader`, as the last three tests run it.
struct Worker {
    pod: Pod,
    /// Its injected `AWS_ROLE_ARN`.
    role: String,
    /// An STS-audience token of its ServiceAccount (as the kubelet projects).
    token: String,
}

impl Worker {
    /// Admits `worker` in `gov` (gated, with an identity of its own).
    async fn admit(gov: &crate::webhook::Governed) -> Pod {
        let worker = pod(json!({"name": "worker", "labels": {"ephemera.dev/identity": "reader"}}));
        admitted_with_identity(&gov.pods, &worker).await
    }

    /// Admits `worker` and waits until its gate is lifted.
    async fn running(bed: &TestBed, gov: &crate::webhook::Governed) -> Worker {
        let admitted = Self::admit(gov).await;
        let pod = wait_ungated(&gov.pods, &admitted.name_any()).await;
        let role = env_of(&pod, "AWS_ROLE_ARN").expect("an injected role");
        let sa = pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).expect("its own ServiceAccount");
        let token = bed.token(&gov.ns.name, &sa, "sts.amazonaws.com", 600).await;
        Worker { pod, role, token }
    }

    /// A session of its role with its token, as its SDK would assume one.
    async fn assume(
        &self,
        bed: &TestBed,
        session: &str,
    ) -> Result<aws_sdk_sts::types::Credentials, aws_sdk_sts::error::SdkError<AssumeError>> {
        let assumed = bed
            .sts
            .assume_role_with_web_identity()
            .role_arn(&self.role)
            .role_session_name(session)
            .web_identity_token(&self.token)
            .send()
            .await?;
        Ok(assumed.credentials.expect("session credentials"))
    }
}

type AssumeError = aws_sdk_sts::operation::assume_role_with_web_identity::AssumeRoleWithWebIdentityError;

/// Registers the test bed's OIDC provider again when dropped (also when a
/// test fails half-way: every later test needs it).
struct RestoreProvider {
    url: String,
    client_ids: Vec<String>,
    thumbprints: Vec<String>,
}

impl Drop for RestoreProvider {
    fn drop(&mut self) {
        let (url, ids, thumbs) = (self.url.clone(), self.client_ids.clone(), self.thumbprints.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            rt.block_on(async {
                let iam = ephemera::cloud::aws::iam_client().await;
                let made = iam
                    .create_open_id_connect_provider()
                    .url(url)
                    .set_client_id_list(Some(ids))
                    .set_thumbprint_list(Some(thumbs))
                    .send()
                    .await;
                if let Err(e) = made {
                    eprintln!("re-registering the OIDC provider: {e:?}");
                }
            });
        })
        .join();
    }
}
