//! The Helm chart's RBAC is enough, and what the chart says it is: the
//! controller and the webhook run as the chart's ServiceAccounts (tokens of
//! them, out of cluster, with the chart's own arguments and environment) and
//! carry a pod through its whole life, Kubernetes rules included, without one
//! refused API call.
//!
//! Only the chart's ServiceAccounts, `ClusterRoles`, Roles, bindings and the
//! webhook's empty TLS Secret are applied. Its webhook configurations are applied too, with one change: they
//! call the webhook on loopback instead of through the release's Service
//! (this test bed runs no pods). The webhook's self-managed certificate names
//! 127.0.0.1, so the apiserver accepts it, and the webhook publishes its CA on
//! those configurations itself, as in a real install.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration},
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
    core::v1::{Event, Namespace, Pod, ServiceAccount},
    networking::v1::NetworkPolicy,
    rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams},
    config::Kubeconfig,
    discovery::Scope,
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    lifecycle::{finish, role_exists, wait_ungated_within},
    support::{
        DeleteOnDrop, EphemeraProcess, TestBed, WEBHOOK_LABEL, controller_turn, ensure_crds, free_port, unique_name,
        wait_until,
    },
    webhook::{admitted_with_identity, boundary, env_of, identity, pod},
};
use ephemera::api::{IdentityBoundary, IdentityLease, LeasePhase, WorkloadIdentity};

const WAIT: Duration = Duration::from_mins(1);
/// Kinds of the chart applied as they are: its RBAC, and the empty Secret the
/// webhook fills with its CA (it may not create one).
const RBAC_KINDS: [&str; 6] = ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Secret"];
/// The instance-metadata NetworkPolicy (`api::well_known`).
const IMDS_POLICY: &str = "ephemera-block-instance-metadata";

#[tokio::test]
async fn the_charts_service_accounts_may_do_a_whole_pod_lifecycle_and_nothing_is_refused() {
    let _turn = controller_turn().await;
    let started = Instant::now();
    let bed = TestBed::connect().await;
    ensure_crds(&bed.client).await;
    let account =
        bed.sts.get_caller_identity().send().await.expect("STS GetCallerIdentity").account.expect("the account");

    // The release: its namespace, and the chart rendered for it. Its webhooks
    // select only namespaces labelled for this test; clusterName is the
    // release's, so the orphan sweep touches only this test's roles.
    // oidcIssuer stays unset (the default): the controller reads the issuer
    // from the discovery document, the rule the chart adds for that is used.
    let release_ns = bed.namespace("e2e-chart-rbac").await;
    let release = unique_name("ephemera-rbac");
    let webhook_id = unique_name("chart-rbac");
    let chart = Chart::render(
        &release,
        &release_ns.name,
        &[
            ("clusterName", release.as_str()),
            ("aws.accountId", &account),
            ("aws.endpoint", &env("AWS_ENDPOINT_URL")),
            ("aws.region", &env("AWS_REGION")),
            (&format!("webhook.namespaceSelector.matchLabels.{WEBHOOK_LABEL}"), &webhook_id),
        ],
    );
    let _rbac = chart.apply_rbac(&bed.client).await;
    let webhook_port = free_port();
    let _configurations = chart.apply_webhook_configurations(&bed.client, webhook_port).await;

    // A kubeconfig per ServiceAccount: the admin's server and CA, a token of
    // the account (as the kubelet would mount one).
    let secrets = TempDir::new("ephemera-chart-rbac");
    let audience = format!("https://{}", bed.issuer_host);
    let kubeconfig_of = async |component: &str| {
        let sa = chart.object("ServiceAccount", component).name_any();
        let token = bed.token(&release_ns.name, &sa, &audience, 3600).await;
        kubeconfig_with_token(&secrets.0, &sa, &token)
    };
    let webhook_kubeconfig = kubeconfig_of("webhook").await;
    let controller_kubeconfig = kubeconfig_of("controller").await;

    // The webhook, as the chart runs it: self-managed TLS in the release's
    // Secret, CA published on the release's configurations. With the account
    // given it never calls AWS, so it gets no AWS credentials.
    let webhook_args = chart.args(
        "webhook",
        &[
            ("--webhook-addr", format!("127.0.0.1:{webhook_port}")),
            ("--webhook-admin-addr", format!("127.0.0.1:{}", free_port())),
        ],
    );
    let mut webhook_env = chart.env("webhook", &release_ns.name, &format!("{release}-webhook-0"));
    webhook_env.push(("KUBECONFIG".into(), path_str(&webhook_kubeconfig)));
    let mut webhook = EphemeraProcess::spawn_with_only_env("webhook", &webhook_args, &webhook_env);
    let configuration = chart.object("MutatingWebhookConfiguration", "webhook").name_any();
    wait_for_ca_bundle(&bed.client, &configuration, &mut webhook).await;

    // The controller, as the chart runs it (leader election on), with the
    // test bed's AWS administrator standing in for its IRSA role.
    let controller_args = chart.args("controller", &[("--admin-addr", format!("127.0.0.1:{}", free_port()))]);
    assert!(controller_args.iter().any(|a| a == "--leader-elect"), "the chart elects a leader: {controller_args:?}");
    let identity_name = format!("{release}-controller-0");
    let mut controller_env = chart.env("controller", &release_ns.name, &identity_name);
    controller_env.push(("KUBECONFIG".into(), path_str(&controller_kubeconfig)));
    for key in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
        controller_env.push((key.into(), env(key)));
    }
    let mut controller = EphemeraProcess::spawn_with_only_env("controller", &controller_args, &controller_env);
    controller
        .wait_while_running("the controller to hold the leader-election Lease", WAIT, || async {
            (crate::support::leader_of(&bed.client, &release_ns.name).await.as_deref() == Some(identity_name.as_str()))
                .then_some(())
        })
        .await;
    eprintln!("controller and webhook up as the chart's ServiceAccounts: {:?}", started.elapsed());

    // A governed namespace whose boundary blocks instance metadata (the
    // controller's NetworkPolicy rules), and an identity with AWS access and
    // a Kubernetes rule (the webhook's SubjectAccessReview, the controller's
    // escalate/bind).
    let ns = bed.namespace("e2e-chart-rbac-team").await;
    let team = unique_name("team");
    Api::<Namespace>::all(bed.client.clone())
        .patch(
            &ns.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {WEBHOOK_LABEL: webhook_id, "e2e-team": team}}})),
        )
        .await
        .expect("labelling the namespace");
    let boundary_guard = boundary(&bed.client, &team, json!({"blockInstanceMetadata": true})).await;
    let boundary_name = boundary_guard.name().to_owned();
    let bucket = unique_name("team-a-reports");
    let spec = json!({
        "aws": {"statements": [{"actions": ["s3:GetObject"], "resources": [format!("arn:aws:s3:::{bucket}/*")]}]},
        "kubernetes": {"rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]},
    });
    let identities = Api::<WorkloadIdentity>::namespaced(bed.client.clone(), &ns.name);
    // Allowed by the webhook, not just created: the apiserver's view of the
    // namespace's labels may lag a moment, and an identity it did not send
    // to the webhook proves nothing about the webhook's rights.
    let validated = "ephemera_admission_requests_total{webhook=\"workloadidentities\",outcome=\"allowed\"}";
    let since = Instant::now();
    while webhook.metric(validated).await.unwrap_or_default() < 1.0 {
        match identities.create(&PostParams::default(), &identity("reader", spec.clone())).await {
            Ok(_) if webhook.metric(validated).await.unwrap_or_default() < 1.0 => {
                identities.delete("reader", &DeleteParams::default()).await.expect("deleting the unvalidated identity");
            }
            Ok(_) => {}
            Err(e) => assert!(since.elapsed() < WAIT, "the identity is refused: {e}; see {}", webhook.log.display()),
        }
        assert!(since.elapsed() < WAIT, "the webhook never validated the identity; see {}", webhook.log.display());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Admitted gated; the gate lifts once the role is proven.
    let pods = Api::<Pod>::namespaced(bed.client.clone(), &ns.name);
    let admitted = Instant::now();
    let worker =
        admitted_with_identity(&pods, &pod(json!({"name": "worker", "labels": {"ephemera.dev/identity": "reader"}})))
            .await;
    assert!(
        worker
            .spec
            .as_ref()
            .unwrap()
            .scheduling_gates
            .iter()
            .flatten()
            .any(|g| g.name == "ephemera.dev/identity-ready"),
        "the pod is admitted gated"
    );
    let worker = wait_ungated_within(&pods, "worker", WAIT).await;
    eprintln!("admission -> gate lifted: {:?}", admitted.elapsed());
    let sa = worker.spec.as_ref().and_then(|s| s.service_account_name.clone()).expect("the pod's own account");
    let role_arn = env_of(&worker, "AWS_ROLE_ARN").expect("AWS_ROLE_ARN injected");
    let identity_leases = Api::<IdentityLease>::namespaced(bed.client.clone(), &ns.name);
    let lease = identity_leases.get(&sa).await.expect("the pod's lease");
    let status = lease.status.clone().expect("the lease's status");
    assert_eq!(status.phase, Some(LeasePhase::Ready));
    assert_eq!(status.role_arn.as_deref(), Some(role_arn.as_str()));
    assert!(role_exists(&bed, &role_arn).await);

    // The Role and RoleBinding the controller made grant exactly the rule.
    let roles = Api::<Role>::namespaced(bed.client.clone(), &ns.name);
    let bindings = Api::<RoleBinding>::namespaced(bed.client.clone(), &ns.name);
    let granted = roles.get(&sa).await.expect("the lease's Role").rules.unwrap_or_default();
    assert_eq!(granted.len(), 1, "{granted:?}");
    assert_eq!(granted[0].resources.as_deref(), Some(&["configmaps".to_owned()][..]));
    assert_eq!(granted[0].verbs, ["get"]);
    let subjects = bindings.get(&sa).await.expect("the lease's RoleBinding").subjects.unwrap_or_default();
    assert!(subjects.iter().any(|s| s.kind == "ServiceAccount" && s.name == sa), "{subjects:?}");
    assert!(may(&bed.client, &ns.name, &sa, "get").await, "the pod's account may get configmaps");
    assert!(!may(&bed.client, &ns.name, &sa, "list").await, "only get was granted, yet it may list");
    // The boundary's NetworkPolicy, and the Events users read.
    let policies = Api::<NetworkPolicy>::namespaced(bed.client.clone(), &ns.name);
    let policy = wait_until("the instance-metadata NetworkPolicy", WAIT, || async {
        policies.get_opt(IMDS_POLICY).await.ok().flatten()
    })
    .await;
    let owners: Vec<(String, String)> =
        policy.owner_references().iter().map(|o| (o.kind.clone(), o.name.clone())).collect();
    assert_eq!(owners, [("IdentityBoundary".to_owned(), boundary_name.clone())], "owned by its boundary");
    // Deleted by someone, it is back within a second: its owner's reconcile
    // runs on the deletion.
    policies.delete(IMDS_POLICY, &DeleteParams::default()).await.expect("deleting the NetworkPolicy");
    let deleted = Instant::now();
    wait_until("the deleted NetworkPolicy to come back", Duration::from_secs(1), || async {
        policies.get_opt(IMDS_POLICY).await.ok()?.filter(|p| p.uid() != policy.uid())
    })
    .await;
    eprintln!("instance-metadata NetworkPolicy deleted -> back: {:?}", deleted.elapsed());
    let events = Api::<Event>::namespaced(bed.client.clone(), &ns.name);
    wait_until("an IdentityReady Event on the pod", WAIT, || async {
        let list = events.list(&ListParams::default().fields("involvedObject.name=worker")).await.ok()?;
        list.items.iter().any(|e| e.reason.as_deref() == Some("IdentityReady")).then_some(())
    })
    .await;

    // The pod succeeds: role, lease, ServiceAccount, Role and RoleBinding go.
    let ended = Instant::now();
    finish(&bed.client, &ns.name, "worker", "Succeeded").await;
    wait_until("the role to be deleted", WAIT, || async { (!role_exists(&bed, &role_arn).await).then_some(()) }).await;
    eprintln!("pod Succeeded -> role deleted: {:?}", ended.elapsed());
    let service_accounts = Api::<ServiceAccount>::namespaced(bed.client.clone(), &ns.name);
    wait_until("the lease, its ServiceAccount, Role and RoleBinding to be gone", WAIT, || async {
        let gone = identity_leases.get_opt(&sa).await.ok()?.is_none()
            && service_accounts.get_opt(&sa).await.ok()?.is_none()
            && roles.get_opt(&sa).await.ok()?.is_none()
            && bindings.get_opt(&sa).await.ok()?.is_none();
        gone.then_some(())
    })
    .await;

    // The boundary goes (no finalizer holds it); the garbage collector takes
    // the NetworkPolicy it owned along.
    let boundaries = Api::<IdentityBoundary>::all(bed.client.clone());
    boundaries.delete(&boundary_name, &DeleteParams::default()).await.expect("deleting the boundary");
    wait_until("the boundary and its NetworkPolicy to be gone", WAIT, || async {
        let gone = boundaries.get_opt(&boundary_name).await.ok()?.is_none()
            && policies.get_opt(IMDS_POLICY).await.ok()?.is_none();
        gone.then_some(())
    })
    .await;
    drop(boundary_guard);

    // Stopped as Kubernetes stops them; the controller hands its Lease back.
    controller.terminate();
    webhook.terminate();
    let controller_log = std::fs::read_to_string(&controller.log).expect("the controller's log");
    let webhook_log = std::fs::read_to_string(&webhook.log).expect("the webhook's log");
    for (what, log, path, lines) in [
        ("controller", &controller_log, &controller.log, &["became leader", "released the leader-election lease"][..]),
        ("webhook", &webhook_log, &webhook.log, &["admission webhook listening"][..]),
    ] {
        for line in lines {
            assert!(log.contains(line), "the {what} never logged {line:?}; see {}", path.display());
        }
        // RBAC refusals name the account ("... is forbidden: User
        // system:serviceaccount:... cannot ..."); other 403s (a namespace
        // another test is deleting refuses new Events) are not about the chart.
        let refused = log.lines().find(|line| {
            let line = line.to_lowercase();
            ["is forbidden: user", "unauthorized", "code: 401"].iter().any(|r| line.contains(r))
        });
        if let Some(line) = refused {
            panic!("the {what} was refused an API call; see {}:\n{line}", path.display());
        }
    }
    eprintln!("whole test: {:?}", started.elapsed());
}

/// The chart rendered with `helm template`: every object as JSON.
struct Chart {
    objects: Vec<Value>,
}

impl Chart {
    fn render(release: &str, namespace: &str, values: &[(&str, &str)]) -> Chart {
        let chart = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("charts/ephemera");
        let mut helm = Command::new("helm");
        helm.arg("template").arg(release).arg(&chart).args(["--namespace", namespace]);
        for (key, value) in values {
            helm.arg("--set-string").arg(format!("{key}={value}"));
        }
        let out = helm.output().expect("running helm (on PATH after `source .ephemera/dev.env`)");
        assert!(out.status.success(), "helm template: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).expect("helm prints UTF-8");
        let objects = serde_yaml::Deserializer::from_str(&text)
            .map(|doc| Value::deserialize(doc).expect("helm prints YAML"))
            .filter(|doc| !doc.is_null())
            .collect();
        Chart { objects }
    }

    fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> {
        self.objects.iter().filter(move |o| o["kind"] == kind)
    }

    /// The one object of `kind` of a component (`controller`, `webhook`).
    fn object(&self, kind: &str, component: &str) -> DynamicObject {
        let mut found =
            self.of_kind(kind).filter(|o| o["metadata"]["labels"]["app.kubernetes.io/component"] == component);
        let object = found.next().unwrap_or_else(|| panic!("the chart renders no {kind} of the {component}"));
        assert!(found.next().is_none(), "the chart renders several {kind}s of the {component}");
        serde_json::from_value(object.clone()).expect("a Kubernetes object")
    }

    /// The component's container, as its Deployment runs it.
    fn container(&self, component: &str) -> Value {
        let deployment = self.object("Deployment", component);
        deployment.data["spec"]["template"]["spec"]["containers"][0].clone()
    }

    /// The container's arguments, with the listen addresses in `listen`
    /// replaced (each must be one the chart passes).
    fn args(&self, component: &str, listen: &[(&str, String)]) -> Vec<String> {
        let container = self.container(component);
        let args: Vec<String> = container["args"]
            .as_array()
            .expect("the container has args")
            .iter()
            .map(|a| a.as_str().expect("string args").to_owned())
            .collect();
        for (flag, _) in listen {
            assert!(args.iter().any(|a| a.starts_with(&format!("{flag}="))), "the chart passes no {flag}: {args:?}");
        }
        args.into_iter()
            .map(|arg| match listen.iter().find(|(flag, _)| arg.starts_with(&format!("{flag}="))) {
                Some((flag, addr)) => format!("{flag}={addr}"),
                None => arg,
            })
            .collect()
    }

    /// The container's environment, its pod fields filled in. Logs are
    /// text, for people reading a failure.
    fn env(&self, component: &str, namespace: &str, pod_name: &str) -> Vec<(String, String)> {
        let container = self.container(component);
        let mut env: Vec<(String, String)> = container["env"]
            .as_array()
            .expect("the container has env")
            .iter()
            .map(|var| {
                let name = var["name"].as_str().expect("a name").to_owned();
                let value = match (var["value"].as_str(), var["valueFrom"]["fieldRef"]["fieldPath"].as_str()) {
                    (Some(value), _) => value.to_owned(),
                    (None, Some("metadata.namespace")) => namespace.to_owned(),
                    (None, Some("metadata.name")) => pod_name.to_owned(),
                    _ => panic!("the chart sets {name} from something this test does not know: {var}"),
                };
                (name, value)
            })
            .filter(|(name, _)| name != "EPHEMERA_LOG_FORMAT")
            .collect();
        env.push(("EPHEMERA_LOG_FORMAT".into(), "text".into()));
        env
    }

    /// Applies the chart's ServiceAccounts, `ClusterRoles`, Roles and bindings
    /// as the admin; the cluster-scoped ones are deleted when the guard
    /// drops (the namespaced ones go with the release namespace).
    async fn apply_rbac(&self, client: &Client) -> RbacGuard {
        let (mut roles, mut bindings) = (Vec::new(), Vec::new());
        // Hooks (the uninstall Job's RBAC) exist only while a hook runs.
        let running = self.objects.iter().filter(|o| o["metadata"]["annotations"]["helm.sh/hook"].is_null());
        for object in running.filter(|o| RBAC_KINDS.iter().any(|k| o["kind"] == *k)) {
            let applied = apply(client, object.clone()).await;
            match object["kind"].as_str() {
                Some("ClusterRole") => roles.push(DeleteOnDrop::new(&applied)),
                Some("ClusterRoleBinding") => bindings.push(DeleteOnDrop::new(&applied)),
                _ => {}
            }
        }
        assert_eq!(roles.len(), 2, "a ClusterRole each for the controller and the webhook");
        RbacGuard { _roles: roles, _bindings: bindings }
    }

    /// The chart's webhook configurations, calling the webhook on loopback
    /// `port` instead of through the release's Service.
    async fn apply_webhook_configurations(&self, client: &Client, port: u16) -> ConfigurationsGuard {
        let mut names = Vec::new();
        for kind in ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"] {
            let mut configuration =
                self.of_kind(kind).next().unwrap_or_else(|| panic!("the chart has no {kind}")).clone();
            for hook in configuration["webhooks"].as_array_mut().expect("webhooks") {
                let path = hook["clientConfig"]["service"]["path"].as_str().expect("a service path").to_owned();
                hook["clientConfig"] = json!({"url": format!("https://127.0.0.1:{port}{path}")});
            }
            names.push(apply(client, configuration).await);
        }
        ConfigurationsGuard { _mutating: DeleteOnDrop::new(&names[0]), _validating: DeleteOnDrop::new(&names[1]) }
    }
}

struct RbacGuard {
    _roles: Vec<DeleteOnDrop<ClusterRole>>,
    _bindings: Vec<DeleteOnDrop<ClusterRoleBinding>>,
}

struct ConfigurationsGuard {
    _mutating: DeleteOnDrop<MutatingWebhookConfiguration>,
    _validating: DeleteOnDrop<ValidatingWebhookConfiguration>,
}

/// Server-side applies a rendered object as the admin; returns its name.
async fn apply(client: &Client, object: Value) -> String {
    let object: DynamicObject = serde_json::from_value(object).expect("a Kubernetes object");
    let name = object.name_any();
    let types = object.types.as_ref().expect("rendered objects have apiVersion and kind");
    let gvk = GroupVersionKind::try_from(types).expect("a valid apiVersion");
    let (resource, capabilities) =
        kube::discovery::pinned_kind(client, &gvk).await.unwrap_or_else(|e| panic!("discovering {}: {e}", gvk.kind));
    let api = match capabilities.scope {
        Scope::Namespaced => Api::<DynamicObject>::namespaced_with(
            client.clone(),
            &object.namespace().expect("rendered namespaced objects name their namespace"),
            &resource,
        ),
        Scope::Cluster => Api::<DynamicObject>::all_with(client.clone(), &resource),
    };
    api.patch(&name, &PatchParams::apply("ephemera-e2e").force(), &Patch::Apply(&object))
        .await
        .unwrap_or_else(|e| panic!("applying {} {name}: {e}", gvk.kind));
    name
}

/// Waits until the webhook has published its CA on both configurations,
/// which it does once it listens with its caches filled.
async fn wait_for_ca_bundle(client: &Client, name: &str, webhook: &mut EphemeraProcess) {
    let mutating = Api::<MutatingWebhookConfiguration>::all(client.clone());
    let validating = Api::<ValidatingWebhookConfiguration>::all(client.clone());
    webhook
        .wait_while_running("the webhook to publish its CA on the chart's configurations", WAIT, || async {
            let m = mutating.get_opt(name).await.ok()??;
            let v = validating.get_opt(name).await.ok()??;
            let published = m.webhooks.iter().flatten().all(|w| w.client_config.ca_bundle.is_some())
                && v.webhooks.iter().flatten().all(|w| w.client_config.ca_bundle.is_some());
            published.then_some(())
        })
        .await;
}

/// Whether ServiceAccount `sa` may `verb` ConfigMaps in `namespace`.
async fn may(client: &Client, namespace: &str, sa: &str, verb: &str) -> bool {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(format!("system:serviceaccount:{namespace}:{sa}")),
            groups: Some(vec!["system:serviceaccounts".into(), format!("system:serviceaccounts:{namespace}")]),
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(namespace.to_owned()),
                verb: Some(verb.to_owned()),
                resource: Some("configmaps".into()),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .expect("a SubjectAccessReview")
        .status
        .is_some_and(|s| s.allowed)
}

/// A kubeconfig with the admin's server and CA that authenticates with
/// `token`, readable only by its owner.
fn kubeconfig_with_token(dir: &Path, user: &str, token: &str) -> PathBuf {
    let admin = Kubeconfig::read().expect("the admin kubeconfig ($KUBECONFIG)");
    let context = admin
        .current_context
        .as_deref()
        .and_then(|current| admin.contexts.iter().find(|c| c.name == current))
        .and_then(|c| c.context.as_ref())
        .expect("the admin kubeconfig's current context");
    let cluster = admin
        .clusters
        .iter()
        .find(|c| c.name == context.cluster)
        .and_then(|c| c.cluster.as_ref())
        .expect("the current context's cluster");
    let config = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "test-bed", "cluster": cluster}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": "test-bed", "user": user}}],
        "current-context": user,
    });
    let path = dir.join(format!("{user}.kubeconfig"));
    let mut file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).expect("a kubeconfig file")
    };
    std::io::Write::write_all(&mut file, &serde_json::to_vec(&config).expect("JSON")).expect("writing the kubeconfig");
    path
}

/// A directory only its owner reads, removed when dropped (it holds tokens).
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> TempDir {
        use std::os::unix::fs::DirBuilderExt;
        let path = std::env::temp_dir().join(unique_name(prefix));
        std::fs::DirBuilder::new().mode(0o700).create(&path).expect("a temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn path_str(path: &Path) -> String {
    path.to_str().expect("a UTF-8 temp path").to_owned()
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: source .ephemera/dev.env"))
}
