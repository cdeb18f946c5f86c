//! The admission webhook against the real apiserver: pods in governed
//! namespaces lose the default token and get their own ServiceAccount, lease
//! and projected STS token; dry runs make nothing; Job pods share one lease;
//! identities cannot escalate; malformed reviews get a 400.
//!
//! Each test runs its own webhook, registered under its own configuration
//! name and only for namespaces carrying its own label, so tests (and a
//! crashed run's leftovers) never intercept each other's pods.

use std::time::Duration;

use k8s_openapi::api::{
    batch::v1::Job,
    core::v1::{Pod, ServiceAccount},
    rbac::v1::PolicyRule,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

use crate::support::{DeleteOnDrop, TestBed, Webhook, ensure_crds, two_pod_job, unique_name, wait_until};
use ephemera::api::{HolderKind, IdentityBoundary, IdentityLease, WorkloadIdentity};

const WAIT: Duration = Duration::from_secs(30);

pub async fn boundary(client: &Client, team: &str, extra: serde_json::Value) -> DeleteOnDrop<IdentityBoundary> {
    let name = unique_name("e2e-wh-boundary");
    let mut spec = json!({
        "namespaceSelector": {"matchLabels": {"e2e-team": team}},
        "aws": {"allowedActions": ["s3:Get*"], "allowedResources": ["arn:aws:s3:::team-a-*"]},
        "kubernetes": {"allowedRules": [{"apiGroups": [""], "resources": ["configmaps", "secrets", "nodes"], "verbs": ["get", "list"]}]},
        "maxTokenTTL": "30m",
        "blockInstanceMetadata": false,
    });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    let b: IdentityBoundary = serde_json::from_value(json!({
        "apiVersion": "ephemera.dev/v1alpha1", "kind": "IdentityBoundary",
        "metadata": {"name": name}, "spec": spec,
    }))
    .unwrap();
    Api::<IdentityBoundary>::all(client.clone()).create(&PostParams::default(), &b).await.expect("create the boundary");
    DeleteOnDrop::new(&name)
}

/// A namespace under `webhook`, governed by a fresh boundary (its spec
/// extended by `boundary_extra`), holding one `WorkloadIdentity`.
pub struct Governed {
    // Fields drop in order: the boundary before the namespace.
    boundary: DeleteOnDrop<IdentityBoundary>,
    pub ns: crate::support::TestNamespace,
    pub pods: Api<Pod>,
}

impl Governed {
    /// Name of the namespace's boundary.
    pub fn boundary(&self) -> &str {
        self.boundary.name()
    }
}

pub async fn governed(
    bed: &TestBed,
    webhook: &Webhook,
    prefix: &str,
    boundary_extra: serde_json::Value,
    workload_identity: &WorkloadIdentity,
) -> Governed {
    let ns = bed.namespace(prefix).await;
    let team = unique_name("team");
    webhook.watch_namespace(&bed.client, &ns.name, json!({"e2e-team": team})).await;
    let boundary = boundary(&bed.client, &team, boundary_extra).await;
    Api::<WorkloadIdentity>::namespaced(bed.client.clone(), &ns.name)
        .create(&PostParams::default(), workload_identity)
        .await
        .expect("create the identity");
    let pods = Api::<Pod>::namespaced(bed.client.clone(), &ns.name);
    Governed { boundary, ns, pods }
}

pub fn identity(name: &str, spec: serde_json::Value) -> WorkloadIdentity {
    let mut value =
        json!({"apiVersion": "ephemera.dev/v1alpha1", "kind": "WorkloadIdentity", "metadata": {"name": name}});
    value["spec"] = spec;
    serde_json::from_value(value).unwrap()
}

pub fn pod(meta: serde_json::Value) -> Pod {
    let mut value = json!({
        "apiVersion": "v1", "kind": "Pod",
        "spec": {"containers": [{"name": "main", "image": "busybox"}], "initContainers": [
            {"name": "sidecar", "image": "busybox", "restartPolicy": "Always"}
        ]},
    });
    value["metadata"] = meta;
    serde_json::from_value(value).unwrap()
}

fn volume_names(pod: &Pod) -> Vec<String> {
    pod.spec.as_ref().and_then(|s| s.volumes.clone()).unwrap_or_default().into_iter().map(|v| v.name).collect()
}

pub fn env_of(pod: &Pod, name: &str) -> Option<String> {
    pod.spec.as_ref()?.containers[0].env.as_ref()?.iter().find(|e| e.name == name)?.value.clone()
}

/// Waits until the webhook's caches have seen `identity` (they are watches,
/// so a just-created identity is not there at once).
pub async fn admitted_with_identity(pods: &Api<Pod>, probe: &Pod) -> Pod {
    wait_until("the webhook to know the new WorkloadIdentity", WAIT, || async {
        let created = pods.create(&PostParams::default(), probe).await.ok()?;
        if created.labels().contains_key("ephemera.dev/lease") {
            Some(created)
        } else {
            let _ = pods.delete(&created.name_any(), &kube::api::DeleteParams::default()).await;
            None
        }
    })
    .await
}

#[tokio::test]
async fn pods_get_their_own_identity_and_lose_the_default_token() {
    let bed = TestBed::connect().await;
    ensure_crds(&bed.client).await;
    let webhook = Webhook::start(&bed.client).await;
    let ns = bed.namespace("e2e-webhook").await;
    let team = unique_name("team");
    webhook.watch_namespace(&bed.client, &ns.name, json!({"e2e-team": team})).await;
    let _boundary = boundary(&bed.client, &team, json!({})).await;
    let identities = Api::<WorkloadIdentity>::namespaced(bed.client.clone(), &ns.name);
    identities
        .create(
            &PostParams::default(),
            &identity(
                "report",
                json!({
                    "selector": {"matchLabels": {"app": "report"}},
                    "aws": {"statements": [{"actions": ["s3:GetObject"], "resources": ["arn:aws:s3:::team-a-logs/*"]}]},
                    "token": {"ttl": "20m"},
                }),
            ),
        )
        .await
        .expect("create the identity");
    let pods = Api::<Pod>::namespaced(bed.client.clone(), &ns.name);
    let leases = Api::<IdentityLease>::namespaced(bed.client.clone(), &ns.name);

    // A generateName pod matching the identity's selector.
    let created = admitted_with_identity(
        &pods,
        &pod(json!({"generateName": "report-", "labels": {"app": "report"}, "annotations": {"ephemera.dev/purpose": "nightly report"}})),
    )
    .await;
    let name = created.name_any();
    let lease_name = created.labels()["ephemera.dev/lease"].clone();
    let spec = created.spec.clone().unwrap();
    assert!(name.starts_with("report-"), "{name}");
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert_eq!(spec.service_account_name.as_deref(), Some(lease_name.as_str()));
    let volumes = volume_names(&created);
    assert!(!volumes.iter().any(|v| v.starts_with("kube-api-access-")), "default token still mounted: {volumes:?}");
    let token = spec.volumes.iter().flatten().find(|v| v.name == "ephemera-token").expect("the token volume");
    let projection =
        token.projected.as_ref().unwrap().sources.as_ref().unwrap()[0].service_account_token.clone().unwrap();
    assert_eq!(projection.audience.as_deref(), Some("sts.amazonaws.com"));
    assert_eq!(projection.expiration_seconds, Some(1200));
    for c in spec.containers.iter().chain(spec.init_containers.iter().flatten()) {
        let mounts: Vec<_> = c.volume_mounts.iter().flatten().map(|m| m.mount_path.as_str()).collect();
        assert_eq!(mounts, ["/var/run/secrets/ephemera.dev"], "container {}", c.name);
    }
    let role_arn = env_of(&created, "AWS_ROLE_ARN").expect("AWS_ROLE_ARN");
    assert!(role_arn.starts_with("arn:aws:iam::000000000000:role/ephemera/ephemera-"), "{role_arn}");
    let digest = ephemera::cloud::naming::role_digest("e2e", &ns.name, &lease_name);
    assert!(role_arn.ends_with(&format!("{lease_name}-{digest}")), "{role_arn}");
    assert_eq!(env_of(&created, "AWS_WEB_IDENTITY_TOKEN_FILE").as_deref(), Some("/var/run/secrets/ephemera.dev/token"));
    assert_eq!(
        spec.scheduling_gates.unwrap_or_default().iter().map(|g| g.name.as_str()).collect::<Vec<_>>(),
        ["ephemera.dev/identity-ready"]
    );
    // The lease and the ServiceAccount exist, tied to each other and the pod.
    let lease = leases.get(&lease_name).await.expect("the lease");
    assert_eq!(lease.spec.holder.kind, HolderKind::Pod);
    assert_eq!(lease.spec.holder.name, name);
    assert_eq!(lease.spec.workload_identity, "report");
    assert_eq!(lease.spec.purpose.as_deref(), Some("nightly report"));
    let sa = Api::<ServiceAccount>::namespaced(bed.client.clone(), &ns.name).get(&lease_name).await.expect("the SA");
    assert_eq!(sa.owner_references()[0].uid, lease.uid().unwrap());
    assert_eq!(sa.automount_service_account_token, Some(false));

    // The projected token's ServiceAccount is real: the kubelet could mint it.
    let minted = bed.token(&ns.name, &lease_name, "sts.amazonaws.com", 600).await;
    assert!(minted.split('.').count() == 3, "a JWT");

    // Dry run: the pod comes back mutated, nothing is made (so it keeps its
    // own ServiceAccount, which the ServiceAccount plugin checks even then).
    let before = leases.list(&ListParams::default()).await.unwrap().items.len();
    let dry = pods
        .create(
            &PostParams { dry_run: true, ..PostParams::default() },
            &pod(json!({"name": "dry", "labels": {"app": "report"}})),
        )
        .await
        .expect("dry-run create");
    assert!(dry.labels().contains_key("ephemera.dev/lease"));
    assert!(volume_names(&dry).contains(&"ephemera-token".to_owned()));
    assert_eq!(dry.spec.as_ref().unwrap().service_account_name.as_deref(), Some("default"));
    assert_eq!(leases.list(&ListParams::default()).await.unwrap().items.len(), before, "a dry run made a lease");

    // A pod without identity only loses the default token.
    let plain = pods.create(&PostParams::default(), &pod(json!({"name": "plain"}))).await.expect("plain pod");
    assert_eq!(plain.spec.as_ref().unwrap().service_account_name.as_deref(), Some("default"));
    assert!(!volume_names(&plain).iter().any(|v| v.starts_with("kube-api-access-")));
    assert!(!volume_names(&plain).contains(&"ephemera-token".to_owned()));

    // Borrowing another pod's ServiceAccount is refused.
    let mut borrower = pod(json!({"name": "borrower"}));
    borrower.spec.as_mut().unwrap().service_account_name = Some(lease_name.clone());
    let err = pods.create(&PostParams::default(), &borrower).await.expect_err("borrowing must be refused");
    assert!(err.to_string().contains("belongs to another workload's IdentityLease"), "{err}");

    // Asking for an identity that does not exist is refused, naming the label.
    let err = pods
        .create(&PostParams::default(), &pod(json!({"name": "lost", "labels": {"ephemera.dev/identity": "nope"}})))
        .await
        .expect_err("unknown identity");
    assert!(err.to_string().contains("metadata.labels[ephemera.dev/identity]: no WorkloadIdentity \"nope\""), "{err}");

    // A namespace under the webhook but governed by no boundary is untouched.
    let free = bed.namespace("e2e-webhook-free").await;
    webhook.watch_namespace(&bed.client, &free.name, json!({})).await;
    let untouched = Api::<Pod>::namespaced(bed.client.clone(), &free.name)
        .create(&PostParams::default(), &pod(json!({"name": "untouched", "labels": {"app": "report"}})))
        .await
        .expect("pod in a free namespace");
    assert!(volume_names(&untouched).iter().any(|v| v.starts_with("kube-api-access-")));
    assert_eq!(untouched.spec.unwrap().automount_service_account_token, None);
}

/// A boundary's `maxLeases` refuses the pod that would make one lease too
/// many, naming the field, and admits again once a lease is gone: the
/// webhook counts each namespace's leases from its lease watch (an
/// admission reads one number, not every lease in the cluster).
#[tokio::test]
async fn max_leases_refuses_one_lease_too_many_and_frees_up_when_one_goes() {
    let bed = TestBed::connect().await;
    ensure_crds(&bed.client).await;
    let webhook = Webhook::start(&bed.client).await;
    let gov =
        governed(&bed, &webhook, "e2e-webhook-quota", json!({"maxLeases": 2}), &identity("capped", json!({}))).await;
    let pods = gov.pods.clone();
    let labelled = |name: &str| pod(json!({"name": name, "labels": {"ephemera.dev/identity": "capped"}}));
    admitted_with_identity(&pods, &labelled("one")).await;
    pods.create(&PostParams::default(), &labelled("two")).await.expect("the second lease is within maxLeases");
    // The webhook learns of leases from its watch (milliseconds); give it
    // ample time before asking for a third.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let refused = pods.create(&PostParams::default(), &labelled("three")).await.expect_err("a third lease");
    let message = refused.to_string();
    assert!(message.contains("holds 2 IdentityLeases") && message.contains("spec.maxLeases"), "{message}");
    let leases = Api::<IdentityLease>::namespaced(bed.client.clone(), &gov.ns.name);
    assert_eq!(leases.list(&ListParams::default()).await.unwrap().items.len(), 2, "the refused pod made no lease");

    // One lease goes (no controller runs here: its finalizer is taken off by hand).
    let two = pods.get("two").await.unwrap().labels()["ephemera.dev/lease"].clone();
    let no_finalizer = json!({"metadata": {"finalizers": null}});
    leases.patch(&two, &PatchParams::default(), &Patch::Merge(&no_finalizer)).await.unwrap();
    leases.delete(&two, &kube::api::DeleteParams::default()).await.unwrap();
    wait_until("the webhook to admit a pod again", WAIT, || async {
        pods.create(&PostParams::default(), &labelled("three")).await.ok()
    })
    .await;
}

#[tokio::test]
async fn pods_of_one_job_run_share_one_identity() {
    let bed = TestBed::connect().await;
    ensure_crds(&bed.client).await;
    let webhook = Webhook::start(&bed.client).await;
    let gov = governed(&bed, &webhook, "e2e-webhook-job", json!({}), &identity("batch", json!({"scope": "Job"}))).await;
    let ns = &gov.ns;
    // The webhook's cache must know the identity before the Job controller
    // makes pods: wait for a labelled probe pod to be mutated.
    let pods = gov.pods.clone();
    let probe =
        admitted_with_identity(&pods, &pod(json!({"name": "probe", "labels": {"ephemera.dev/identity": "batch"}})))
            .await;
    pods.delete(&probe.name_any(), &kube::api::DeleteParams::default()).await.unwrap();

    let job = two_pod_job("nightly", "batch");
    let job = Api::<Job>::namespaced(bed.client.clone(), &ns.name).create(&PostParams::default(), &job).await.unwrap();
    let job_pods = wait_until("two pods of the Job", WAIT, || async {
        let list = pods.list(&ListParams::default().labels("job-name=nightly")).await.ok()?;
        (list.items.len() == 2).then_some(list.items)
    })
    .await;
    let accounts: Vec<_> =
        job_pods.iter().map(|p| p.spec.as_ref().unwrap().service_account_name.clone().unwrap()).collect();
    assert_eq!(accounts[0], accounts[1], "Job pods must share the Job run's identity");
    let lease = Api::<IdentityLease>::namespaced(bed.client.clone(), &ns.name).get(&accounts[0]).await.unwrap();
    assert_eq!(lease.spec.holder.kind, HolderKind::Job);
    assert_eq!(lease.spec.holder.name, "nightly");
    assert_eq!(lease.spec.holder.uid, job.uid());
}

#[tokio::test]
async fn workload_identities_cannot_escalate() {
    let bed = TestBed::connect().await;
    ensure_crds(&bed.client).await;
    let webhook = Webhook::start(&bed.client).await;
    let ns = bed.namespace("e2e-webhook-rbac").await;
    let team = unique_name("team");
    webhook.watch_namespace(&bed.client, &ns.name, json!({"e2e-team": team})).await;
    let _boundary = boundary(&bed.client, &team, json!({})).await;

    // alice may manage WorkloadIdentities and read ConfigMaps, not Secrets.
    let user = unique_name("alice");
    let rules = vec![
        PolicyRule {
            api_groups: Some(vec!["ephemera.dev".into()]),
            resources: Some(vec!["workloadidentities".into()]),
            verbs: vec!["create".into(), "update".into(), "patch".into(), "get".into()],
            ..PolicyRule::default()
        },
        PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["configmaps".into()]),
            verbs: vec!["get".into(), "list".into()],
            ..PolicyRule::default()
        },
    ];
    let as_alice = crate::support::user_with_role(&bed, &ns.name, &user, "identity-author", rules).await;
    let alice = Api::<WorkloadIdentity>::namespaced(as_alice, &ns.name);

    let configmaps =
        json!({"kubernetes": {"rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]}});
    // The webhook's namespace cache may lag the label: retry until it governs.
    wait_until("alice's own rights to be grantable", WAIT, || async {
        alice.create(&PostParams::default(), &identity("reads-config", configmaps.clone())).await.ok()
    })
    .await;

    let secrets =
        json!({"kubernetes": {"rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list"]}]}});
    let err = alice.create(&PostParams::default(), &identity("reads-secrets", secrets.clone())).await.unwrap_err();
    let message = err.to_string();
    assert!(message.contains(&format!("{user} may not grant what they do not hold")), "{message}");
    assert!(message.contains("spec.kubernetes.rules[0]: get secrets (core)"), "{message}");
    // The cluster admin holds it, so the same identity is fine from them.
    Api::<WorkloadIdentity>::namespaced(bed.client.clone(), &ns.name)
        .create(&PostParams::default(), &identity("reads-secrets", secrets))
        .await
        .expect("the admin may grant secrets");
    // Updating an identity whose rules alice does not hold is refused too
    // (a new selector would hand the rules to her pods).
    let err = alice
        .patch(
            "reads-secrets",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"selector": {"matchLabels": {"app": "mine"}}}})),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("may not grant"), "{err}");

    // Cluster-scoped resources she cannot read are refused too (a Role could
    // not grant them anyway, but the attempt is an escalation and says so).
    let nodes = json!({"kubernetes": {"rules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["list"]}]}});
    let err = alice.create(&PostParams::default(), &identity("lists-nodes", nodes)).await.unwrap_err();
    assert!(err.to_string().contains("spec.kubernetes.rules[0]: list nodes (core)"), "{err}");

    // Beyond the boundary: refused, naming the field, whoever asks.
    let wide = json!({"aws": {"statements": [{"actions": ["iam:*"], "resources": ["*"]}]}});
    let err = Api::<WorkloadIdentity>::namespaced(bed.client.clone(), &ns.name)
        .create(&PostParams::default(), &identity("too-wide", wide))
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(message.contains("spec.aws.statements[0].actions"), "{message}");
    assert!(message.contains("is not allowed by IdentityBoundary"), "{message}");
}

#[tokio::test]
async fn malformed_reviews_get_a_400_and_wrong_kinds_are_denied() {
    let bed = TestBed::connect().await;
    ensure_crds(&bed.client).await;
    let webhook = Webhook::start(&bed.client).await;
    let curl = |path: &str, body: &str| {
        let out = std::process::Command::new("curl")
            .args(["-sk", "-o", "-", "-w", "\n%{http_code}", "-H", "Content-Type: application/json", "--data-binary"])
            .arg(body)
            .arg(format!("{}{path}", webhook.url))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let answer = curl("/mutate/pods", "{not json");
    assert!(answer.ends_with("\n400"), "{answer}");
    assert!(answer.starts_with("malformed AdmissionReview"), "{answer}");
    let answer = curl("/mutate/pods", r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#);
    assert!(answer.ends_with("\n400") && answer.contains("no request"), "{answer}");

    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "u1", "kind": {"group": "", "version": "v1", "kind": "ConfigMap"},
            "resource": {"group": "", "version": "v1", "resource": "configmaps"},
            "operation": "CREATE", "userInfo": {"username": "x"}, "namespace": "default",
            "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}},
        }
    });
    let answer = curl("/mutate/pods", &review.to_string());
    assert!(answer.ends_with("\n200"), "{answer}");
    let body: serde_json::Value = serde_json::from_str(answer.rsplit_once('\n').unwrap().0).unwrap();
    assert_eq!(body["response"]["uid"], "u1");
    assert_eq!(body["response"]["allowed"], false);
    assert!(body["response"]["status"]["message"].as_str().unwrap().contains("admits Pods, not /ConfigMap"), "{body}");
}

#[tokio::test]
async fn a_self_managed_certificate_is_kept_in_a_secret_and_published_as_ca_bundle() {
    use ephemera::webhook::configuration::{Target, mutating, validating};
    use k8s_openapi::api::{
        admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration},
        core::v1::Secret,
    };

    let bed = TestBed::connect().await;
    ensure_crds(&bed.client).await;
    let operator = bed.namespace("e2e-webhook-tls").await;
    let id = unique_name("wh-tls");
    let url = format!("https://127.0.0.1:{}", crate::support::free_port());
    let only = (crate::support::WEBHOOK_LABEL.to_owned(), id.clone());
    // What the chart installs: the configurations, without a CA yet.
    let target = Target::Url(url.clone());
    let configs = Api::<MutatingWebhookConfiguration>::all(bed.client.clone());
    configs.create(&PostParams::default(), &mutating(&id, &target, "", &operator.name, Some(&only))).await.unwrap();
    let _m = DeleteOnDrop::<MutatingWebhookConfiguration>::new(&id);
    Api::<ValidatingWebhookConfiguration>::all(bed.client.clone())
        .create(&PostParams::default(), &validating(&id, &target, "", Some(&only)))
        .await
        .unwrap();
    let _v = DeleteOnDrop::<ValidatingWebhookConfiguration>::new(&id);

    let args = |addr: &str| {
        vec![
            "webhook".to_owned(),
            "--webhook-addr".into(),
            addr.to_owned(),
            "--webhook-admin-addr".into(),
            "127.0.0.1:0".into(),
            "--namespace".into(),
            operator.name.clone(),
            "--webhook-configuration".into(),
            id.clone(),
            "--cluster-name".into(),
            "e2e".into(),
        ]
    };
    let addr = url.trim_start_matches("https://").to_owned();
    let start = |a: Vec<String>| {
        crate::support::EphemeraProcess::spawn("webhook-tls", &a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let secrets = Api::<Secret>::namespaced(bed.client.clone(), &operator.name);

    stops_without_its_secret(start(args(&addr))).await;

    // An earlier release's webhook made its own Secret (ephemera-webhook-tls,
    // kubernetes.io/tls). The chart now makes an empty one; the webhook takes
    // the earlier CA over, so the caBundle old replicas serve under stays
    // valid, and deletes the earlier Secret.
    let earlier =
        ephemera::webhook::tls::generate(&["localhost".into()], &[std::net::IpAddr::from([127, 0, 0, 1])]).unwrap();
    secrets.create(&PostParams::default(), &earlier_release_secret(&earlier)).await.unwrap();
    secrets.create(&PostParams::default(), &charts_placeholder()).await.unwrap();
    let mut with_adopt = args(&addr);
    with_adopt.extend(["--tls-secret-adopt-from".to_owned(), "ephemera-webhook-tls".to_owned()]);
    let mut process = start(with_adopt);
    let published = || async {
        let secret = secrets.get_opt("ephemera-webhook-certs").await.ok()??;
        let ca = secret.data.as_ref()?.get("ca.crt")?.0.clone();
        let config = configs.get(&id).await.ok()?;
        let bundle = config.webhooks?.first()?.client_config.ca_bundle.clone()?.0;
        (bundle == ca).then_some(secret)
    };
    let secret = wait_until("the CA in the Secret and in the caBundle", WAIT, published).await;
    assert_eq!(secret.data.as_ref().unwrap()["ca.crt"].0, earlier.ca_cert.as_bytes(), "the earlier CA is kept");
    assert_eq!(secret.type_.as_deref(), Some("Opaque"), "the chart's type is kept");
    assert_eq!(secret.annotations()["meta.helm.sh/release-name"], "ephemera", "Helm's metadata is kept");
    for key in ["ca.crt", "ca.key", "tls.crt", "tls.key"] {
        assert!(secret.data.as_ref().unwrap().contains_key(key), "{key}");
    }
    wait_until("the earlier Secret to be deleted", WAIT, || async {
        secrets.get_opt("ephemera-webhook-tls").await.ok()?.is_none().then_some(())
    })
    .await;
    // Its expiry is exported, for the certificate alert.
    let not_after: f64 = secret.annotations()["ephemera.dev/not-after"].parse().unwrap();
    let exported = process.metric("ephemera_webhook_certificate_expiry_timestamp_seconds").await;
    assert!(exported.is_some_and(|t| (t - not_after).abs() < 1.0), "{exported:?} != {not_after}");

    // The apiserver trusts it: pods in a governed namespace are mutated.
    let ns = bed.namespace("e2e-webhook-tls-pods").await;
    let team = unique_name("team");
    Api::<k8s_openapi::api::core::v1::Namespace>::all(bed.client.clone())
        .patch(
            &ns.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {crate::support::WEBHOOK_LABEL: id, "e2e-team": team}}})),
        )
        .await
        .unwrap();
    let _boundary = boundary(&bed.client, &team, json!({})).await;
    let pods = Api::<Pod>::namespaced(bed.client.clone(), &ns.name);
    let created = wait_until("a pod mutated through the self-managed certificate", WAIT, || async {
        let p = pods.create(&PostParams::default(), &pod(json!({"generateName": "p-"}))).await.ok()?;
        (p.spec.as_ref()?.automount_service_account_token == Some(false)).then_some(p)
    })
    .await;
    assert!(!volume_names(&created).iter().any(|v| v.starts_with("kube-api-access-")));

    // A restart (or a second replica) reuses the stored CA and certificate.
    drop(process);
    let _again = start(args(&addr));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = secrets.get("ephemera-webhook-certs").await.unwrap();
    assert_eq!(after.metadata.resource_version, secret.metadata.resource_version, "the Secret was rewritten");
    wait_until("the restarted webhook to mutate pods", WAIT, || async {
        let p = pods.create(&PostParams::default(), &pod(json!({"generateName": "p-"}))).await.ok()?;
        (p.spec.as_ref()?.automount_service_account_token == Some(false)).then_some(())
    })
    .await;
}

/// The webhook may not create Secrets: without the chart's empty one it
/// stops at once and says how to make it.
async fn stops_without_its_secret(mut process: crate::support::EphemeraProcess) {
    process.exited_by(std::time::Instant::now() + WAIT, "the webhook without its Secret").await;
    let log = std::fs::read_to_string(&process.log).unwrap();
    assert!(
        log.contains("ephemera-webhook-certs does not exist") && log.contains("create secret generic"),
        "the error names the Secret and how to make it: {log}"
    );
}

/// The chart's empty TLS Secret (with Helm's metadata, which must survive).
fn charts_placeholder() -> k8s_openapi::api::core::v1::Secret {
    serde_json::from_value(json!({"metadata": {"name": "ephemera-webhook-certs",
        "annotations": {"meta.helm.sh/release-name": "ephemera"}}, "type": "Opaque"}))
    .unwrap()
}

/// The Secret a webhook of ephemera 0.2 made for itself, holding `bundle`.
fn earlier_release_secret(bundle: &ephemera::webhook::tls::CertBundle) -> k8s_openapi::api::core::v1::Secret {
    let data: std::collections::BTreeMap<String, k8s_openapi::ByteString> =
        [("ca.crt", &bundle.ca_cert), ("ca.key", &bundle.ca_key), ("tls.crt", &bundle.cert), ("tls.key", &bundle.key)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), k8s_openapi::ByteString(v.as_bytes().to_vec())))
            .collect();
    let mut secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": {
            "name": "ephemera-webhook-tls",
            "labels": {"app.kubernetes.io/managed-by": "ephemera"},
            "annotations": {"ephemera.dev/not-after": bundle.not_after.to_string()},
        },
        "type": "kubernetes.io/tls",
    }))
    .unwrap();
    secret.data = Some(data);
    secret
}

/// What the README promises when the webhook is down: pod creation in a
/// governed namespace fails (fail closed), and kube-system is never sent to
/// the webhook, even if it carries the governing label.
#[tokio::test]
async fn a_webhook_that_is_down_fails_closed_but_never_blocks_kube_system() {
    use ephemera::webhook::configuration::{Target, mutating};
    use k8s_openapi::api::{admissionregistration::v1::MutatingWebhookConfiguration, core::v1::Namespace};

    let bed = TestBed::connect().await;
    let id = unique_name("down");
    let label = ("ephemera-e2e-down".to_owned(), id.clone());
    // The configuration the operator registers, pointing at a port nobody serves.
    let dead = Target::Url(format!("https://127.0.0.1:{}", crate::support::free_port()));
    let config = mutating(&id, &dead, "", "ephemera-system", Some(&label));
    Api::<MutatingWebhookConfiguration>::all(bed.client.clone())
        .create(&PostParams::default(), &config)
        .await
        .expect("registering the dead webhook");
    let _config = DeleteOnDrop::<MutatingWebhookConfiguration>::new(&id);
    let ns = bed.namespace("e2e-down").await;
    let namespaces = Api::<Namespace>::all(bed.client.clone());
    let labelled = json!({"metadata": {"labels": {&label.0: &label.1}}});
    namespaces.patch(&ns.name, &PatchParams::default(), &Patch::Merge(&labelled)).await.unwrap();
    namespaces.patch("kube-system", &PatchParams::default(), &Patch::Merge(&labelled)).await.unwrap();
    let unlabel = json!({"metadata": {"labels": {&label.0: null}}});

    let dry_run = PostParams { dry_run: true, ..PostParams::default() };
    let probe = pod(json!({"name": "probe"}));
    // The apiserver needs a moment to see the new configuration.
    let refused = wait_until("the dead webhook to refuse pods in the governed namespace", WAIT, || async {
        match Api::<Pod>::namespaced(bed.client.clone(), &ns.name).create(&dry_run, &probe).await {
            Err(kube::Error::Api(status)) => Some(status.message),
            _ => None,
        }
    })
    .await;
    assert!(refused.contains("pods.ephemera.dev"), "the refusal names the webhook: {refused}");
    let system = Api::<Pod>::namespaced(bed.client.clone(), "kube-system").create(&dry_run, &probe).await;
    namespaces.patch("kube-system", &PatchParams::default(), &Patch::Merge(&unlabel)).await.unwrap();
    system.expect("kube-system pods are admitted while the webhook is down");
}
