//! The lease controller's steps against a fake apiserver (tower-test) and a
//! fake IAM: which calls each step makes, in which order, and what it
//! leaves alone. The e2e tests run the same steps against the real
//! apiserver and MiniStack.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{controller::Action, reflector::store::Writer, watcher};
use serde_json::json;

use super::*;
use crate::{
    cloud::naming,
    test_support::{
        fake_apiserver::{self, Apiserver},
        fake_iam::FakeIam,
    },
};

const CLUSTER: &str = "c";
const ACCOUNT: &str = "111122223333";

/// A lease controller's context over the fakes, its caches holding
/// `leases` and `identities`.
async fn context(
    iam: &FakeIam,
    leases: &[IdentityLease],
    identities: &[WorkloadIdentity],
) -> (Arc<LeaseContext>, Apiserver) {
    context_with_sets(iam, leases, identities, None).await
}

/// [`context`] with revocation sets.
async fn context_with_sets(
    iam: &FakeIam,
    leases: &[IdentityLease],
    identities: &[WorkloadIdentity],
    revocation_sets: Option<Arc<crate::cloud::revocation_sets::RevocationSets>>,
) -> (Arc<LeaseContext>, Apiserver) {
    let (client, apiserver) = fake_apiserver::client();
    let writer = filled(leases);
    let reporter = kube::runtime::events::Reporter { controller: "test".into(), instance: None };
    let base = Arc::new(Context {
        client: client.clone(),
        events: crate::controller::Events::new(client.clone(), reporter),
        metrics: Arc::default(),
        leases: writer.as_reader(),
        leases_ready: crate::controller::Ready::now(),
        identities: filled(identities).as_reader(),
        // Not filled: the scenarios answer the reads themselves.
        boundaries: kube::runtime::reflector::store().0,
        namespaces: kube::runtime::reflector::store().0,
        stop: crate::controller::Stop::default(),
        fence: None,
        role_path_root: naming::ROLE_PATH_ROOT.into(),
        evictions: client,
    });
    let ctx = LeaseContext {
        base,
        cloud: Cloud {
            provider: iam.provider().await,
            cluster: CLUSTER.into(),
            account: ACCOUNT.into(),
            issuer_host: "oidc.example/id/1".into(),
            provider_arn: format!("arn:aws:iam::{ACCOUNT}:oidc-provider/oidc.example/id/1"),
            propagation_window: PROPAGATION_WINDOW,
            rotation: Rotation::default(),
            revocation_sets,
        },
        leases: writer.as_reader(),
        failures: std::sync::Mutex::default(),
        seen_pods: Arc::default(),
        reaped: std::sync::Mutex::default(),
        ready: std::sync::Mutex::default(),
        revocations: std::sync::Mutex::default(),
        // Not filled: the identity controller's cache above serves.
        identities: kube::runtime::reflector::store().0,
        turns: tokio::sync::Semaphore::new(LEASE_CONCURRENCY),
    };
    (Arc::new(ctx), apiserver)
}

fn filled<K>(objects: &[K]) -> Writer<K>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let mut writer = Writer::<K>::default();
    writer.apply_watcher_event(&watcher::Event::Init);
    for object in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(object.clone()));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    writer
}

/// The identity `reader`, without managed policies.
fn reader() -> WorkloadIdentity {
    serde_json::from_value(json!({"apiVersion": "ephemera.dev/v1alpha1", "kind": "WorkloadIdentity",
                                  "metadata": {"name": "reader", "namespace": "team-a"}, "spec": {}}))
    .unwrap()
}

/// The apiserver's 404.
fn not_found() -> serde_json::Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": "not found", "reason": "NotFound", "code": 404})
}

fn role_of(lease: &str) -> String {
    naming::role_name("ephemera", CLUSTER, "team-a", lease)
}

fn lease(name: &str, role_arn: &str, ready: bool) -> IdentityLease {
    let mut lease: IdentityLease = serde_json::from_value(json!({
        "apiVersion": "ephemera.dev/v1alpha1", "kind": "IdentityLease",
        "metadata": {"name": name, "namespace": "team-a", "uid": format!("{name}-uid"),
                     "creationTimestamp": "2026-11-23T10:00:00Z", "finalizers": [FINALIZER_REAPER]},
        "spec": {"holder": {"kind": "Pod", "name": "worker", "uid": "pod-uid"}, "workloadIdentity": "reader",
                 "serviceAccount": name, "roleArn": role_arn, "expiresAt": "2099-01-01T00:00:00Z"},
    }))
    .unwrap();
    if ready {
        lease.status = Some(serde_json::from_value(json!({"phase": "Ready", "roleArn": role_arn})).unwrap());
    }
    lease
}

fn own_arn(lease: &str) -> String {
    format!("arn:aws:iam::{ACCOUNT}:role/ephemera/{}", role_of(lease))
}

fn owner_tags(lease: &str) -> Vec<(&'static str, String)> {
    vec![
        ("ephemera.dev/cluster", CLUSTER.to_owned()),
        ("ephemera.dev/issuer", "oidc.example/id/1".to_owned()),
        ("ephemera.dev/namespace", "team-a".to_owned()),
        ("ephemera.dev/lease", lease.to_owned()),
        ("ephemera.dev/lease-uid", format!("{lease}-uid")),
    ]
}

fn pod(phase: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "worker", "namespace": "team-a", "uid": "pod-uid",
                     "labels": {"ephemera.dev/lease": "reader-x7k2p"}},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]},
        "status": {"phase": phase},
    }))
    .unwrap()
}

#[tokio::test]
async fn an_ended_pods_lease_is_deleted_with_why_and_when() {
    let iam = FakeIam::start().await;
    let l = lease("reader-x7k2p", &own_arn("reader-x7k2p"), true);
    let (ctx, mut apiserver) = context(&iam, std::slice::from_ref(&l), &[]).await;
    let run = tokio::spawn({
        let (l, ctx) = (l.clone(), ctx.clone());
        async move { provision::apply(&l, &ctx).await }
    });
    // The identity is not cached: the apiserver says whether it exists.
    let identity = json!({"apiVersion": "ephemera.dev/v1alpha1", "kind": "WorkloadIdentity",
                          "metadata": {"name": "reader", "namespace": "team-a"}, "spec": {}});
    fake_apiserver::expect(
        &mut apiserver,
        "GET",
        "/apis/ephemera.dev/v1alpha1/namespaces/team-a/workloadidentities/reader",
        identity,
    )
    .await;
    fake_apiserver::expect(
        &mut apiserver,
        "GET",
        "/api/v1/namespaces/team-a/pods/worker",
        serde_json::to_value(pod("Succeeded")).unwrap(),
    )
    .await;
    let lease_path = "/apis/ephemera.dev/v1alpha1/namespaces/team-a/identityleases/reader-x7k2p";
    let patch = fake_apiserver::expect(&mut apiserver, "PATCH", lease_path, serde_json::to_value(&l).unwrap()).await;
    let note: serde_json::Value =
        serde_json::from_str(patch["metadata"]["annotations"]["ephemera.dev/reap"].as_str().unwrap()).unwrap();
    assert_eq!(note["reason"], "pod worker succeeded");
    fake_apiserver::expect(&mut apiserver, "DELETE", lease_path, serde_json::to_value(&l).unwrap()).await;
    assert_eq!(run.await.unwrap().unwrap(), Action::await_change());
    assert!(iam.calls().is_empty(), "ending a lease touches no role: {:?}", iam.calls());
}

#[tokio::test]
async fn a_ready_leases_role_is_revoked_first_then_deleted_without_a_second_look() {
    let iam = FakeIam::start().await;
    let name = "reader-x7k2p";
    iam.add_role(&role_of(name), "/ephemera/", &[]);
    let mut l = lease(name, &own_arn(name), true);
    l.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    let (ctx, mut apiserver) = context(&iam, std::slice::from_ref(&l), &[reader()]).await;
    let run = tokio::spawn({
        let (l, ctx) = (l.clone(), ctx.clone());
        async move { reap::reap(&l, &ctx).await }
    });
    // RBAC and the ServiceAccount: read (at once), and deleted only when
    // owned (the RBAC is not there: no Role for an identity without rules).
    let sa = json!({"apiVersion": "v1", "kind": "ServiceAccount",
                    "metadata": {"name": name, "namespace": "team-a", "uid": "sa-uid",
                                 "ownerReferences": [{"apiVersion": "ephemera.dev/v1alpha1", "kind": "IdentityLease",
                                                      "name": name, "uid": format!("{name}-uid")}]}});
    fake_apiserver::expect_each_status(
        &mut apiserver,
        &[
            ("GET", "/apis/rbac.authorization.k8s.io/v1/namespaces/team-a/rolebindings/reader-x7k2p", 404, not_found()),
            ("GET", "/apis/rbac.authorization.k8s.io/v1/namespaces/team-a/roles/reader-x7k2p", 404, not_found()),
            ("GET", "/api/v1/namespaces/team-a/serviceaccounts/reader-x7k2p", 200, sa.clone()),
        ],
    )
    .await;
    let delete =
        fake_apiserver::expect(&mut apiserver, "DELETE", "/api/v1/namespaces/team-a/serviceaccounts/reader-x7k2p", sa)
            .await;
    assert_eq!(delete["preconditions"]["uid"], "sa-uid", "a ServiceAccount made again since is not hit");
    let event =
        fake_apiserver::expect(&mut apiserver, "POST", "/apis/events.k8s.io/v1/namespaces/team-a/events", json!({}))
            .await;
    assert_eq!(event["reason"], "Reaped");
    assert_eq!(run.await.unwrap().unwrap(), Action::await_change());
    // Made and proven by this controller: no tag read; the deny first.
    assert_eq!(
        iam.calls(),
        [
            "PutRolePolicy:ephemera-revoked",
            "DeleteRolePolicy:ephemera",
            "DeleteRolePolicy:ephemera-revoked",
            "DeleteRole",
        ]
    );
    assert!(!iam.has_role(&role_of(name)));
}

#[tokio::test]
async fn a_lease_the_webhook_did_not_write_is_reaped_without_touching_what_it_names() {
    let iam = FakeIam::start().await;
    // Someone else's role, named in a forged spec.roleArn.
    iam.add_role("admin", "/ephemera/", &[]);
    let mut l = lease("reader-x7k2p", &format!("arn:aws:iam::{ACCOUNT}:role/ephemera/admin"), true);
    l.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    let (ctx, mut apiserver) = context(&iam, std::slice::from_ref(&l), &[reader()]).await;
    let run = tokio::spawn({
        let (l, ctx) = (l.clone(), ctx.clone());
        async move { reap::reap(&l, &ctx).await }
    });
    let event =
        fake_apiserver::expect(&mut apiserver, "POST", "/apis/events.k8s.io/v1/namespaces/team-a/events", json!({}))
            .await;
    assert_eq!(event["reason"], "LeaseRefused");
    assert!(event["note"].as_str().unwrap().contains("spec.roleArn"), "{event}");
    assert_eq!(run.await.unwrap().unwrap(), Action::await_change());
    assert!(iam.calls().is_empty(), "{:?}", iam.calls());
    assert!(iam.has_role("admin"));
}

#[tokio::test]
async fn the_sweep_deletes_only_this_clusters_roles_whose_lease_is_gone() {
    let iam = FakeIam::start().await;
    let tags = |lease: &str| owner_tags(lease);
    let as_refs = |t: &[(&'static str, String)]| t.iter().map(|(k, v)| (*k, v.clone())).collect::<Vec<_>>();
    let add = |name: &str, path: &str, tags: Vec<(&'static str, String)>| {
        let tags: Vec<(&str, &str)> = tags.iter().map(|(k, v)| (*k, v.as_str())).collect();
        iam.add_role(name, path, &tags);
    };
    // Its lease is gone; under a path no boundary names (any more).
    add(&role_of("gone-aaaaaaaa"), "/ephemera/retired/", as_refs(&tags("gone-aaaaaaaa")));
    // Its lease is live.
    add(&role_of("live-bbbbbbbb"), "/ephemera/", as_refs(&tags("live-bbbbbbbb")));
    // Another cluster's, with the same lease name.
    let mut other = as_refs(&tags("gone-aaaaaaaa"));
    other[0].1 = "another".into();
    add("other-cluster-role", "/ephemera/", other);
    // Outside the root: not listed at all.
    add("outside", "/elsewhere/", as_refs(&tags("gone-aaaaaaaa")));

    let (ctx, mut apiserver) = context(&iam, &[], &[]).await;
    let run = tokio::spawn({
        let ctx = ctx.clone();
        async move { sweep::sweep(&ctx).await }
    });
    // The apiserver, not the cache, says which leases exist (in role-name order).
    let mut answered = 0;
    while answered < 2 {
        let next = tokio::time::timeout(std::time::Duration::from_secs(10), apiserver.next_request());
        let (request, responder) = next.await.expect("a lease lookup within 10 s").expect("a lease lookup");
        let path = request.uri().path().to_owned();
        assert!(path.starts_with("/apis/ephemera.dev/v1alpha1/namespaces/team-a/identityleases/"), "{path}");
        let response = if path.ends_with("/live-bbbbbbbb") {
            let live = lease("live-bbbbbbbb", &own_arn("live-bbbbbbbb"), true);
            http::Response::builder().status(200).body(kube::client::Body::from(serde_json::to_vec(&live).unwrap()))
        } else {
            http::Response::builder()
                .status(404)
                .body(kube::client::Body::from(serde_json::to_vec(&not_found()).unwrap()))
        };
        responder.send_response(response.unwrap());
        answered += 1;
    }
    assert_eq!(run.await.unwrap().unwrap(), 1, "one orphan deleted");
    assert!(!iam.has_role(&role_of("gone-aaaaaaaa")));
    assert!(iam.has_role(&role_of("live-bbbbbbbb")), "a live lease's role stays");
    assert!(iam.has_role("other-cluster-role"), "another cluster's role stays");
    assert!(iam.has_role("outside"), "a role outside the root is not listed");
    let calls = iam.calls();
    assert_eq!(calls[0], "ListRoles");
    // The orphan's tags are read again before anything is deleted; the deny first.
    let deleting: Vec<&str> = calls.iter().skip_while(|c| *c != "GetRole").map(String::as_str).collect();
    assert_eq!(
        deleting,
        [
            "GetRole",
            "PutRolePolicy:ephemera-revoked",
            "ListAttachedRolePolicies",
            "DeleteRolePolicy:ephemera",
            "DeleteRolePolicy:ephemera-revoked",
            "DeleteRole",
        ]
    );
}

/// The apiserver's side of reaping a lease without RBAC: reads of the
/// RoleBinding and Role (none), the owned ServiceAccount read and deleted,
/// the `Reaped` Event.
async fn serve_reap(apiserver: &mut Apiserver, name: &str) {
    let rbac = "/apis/rbac.authorization.k8s.io/v1/namespaces/team-a";
    let sa = json!({"apiVersion": "v1", "kind": "ServiceAccount",
                    "metadata": {"name": name, "namespace": "team-a", "uid": "sa-uid",
                                 "ownerReferences": [{"apiVersion": "ephemera.dev/v1alpha1", "kind": "IdentityLease",
                                                      "name": name, "uid": format!("{name}-uid")}]}});
    let path = format!("/api/v1/namespaces/team-a/serviceaccounts/{name}");
    fake_apiserver::expect_each_status(
        apiserver,
        &[
            ("GET", &format!("{rbac}/rolebindings/{name}"), 404, not_found()),
            ("GET", &format!("{rbac}/roles/{name}"), 404, not_found()),
            ("GET", &path, 200, sa.clone()),
        ],
    )
    .await;
    fake_apiserver::expect(apiserver, "DELETE", &path, sa).await;
    let event =
        fake_apiserver::expect(apiserver, "POST", "/apis/events.k8s.io/v1/namespaces/team-a/events", json!({})).await;
    assert_eq!(event["reason"], "Reaped");
}

#[tokio::test]
async fn a_role_is_revoked_through_its_set_only_when_that_is_the_set_its_key_maps_to_today() {
    use crate::cloud::revocation_sets::{RevocationSets, Scope, key_of};
    let name = "reader-x7k2p";
    for recorded_is_todays in [true, false] {
        let iam = FakeIam::start().await;
        iam.add_role(&role_of(name), "/ephemera/", &[]);
        let sets = RevocationSets::load(
            iam.provider().await,
            &Scope {
                partition: "aws",
                account: ACCOUNT,
                path: "/ephemera/",
                cluster: CLUSTER,
                issuer: "oidc.example/id/1",
            },
            2,
            None,
        )
        .await
        .unwrap();
        let todays = sets.arn_for(&key_of(&format!("{name}-uid"))).to_owned();
        // Made when the key mapped elsewhere (the number of sets changed).
        let recorded = if recorded_is_todays {
            todays.clone()
        } else {
            sets.arns().iter().find(|a| **a != todays).unwrap().clone()
        };
        let mut l = lease(name, &own_arn(name), true);
        l.status.as_mut().unwrap().revocation_set = Some(recorded);
        l.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        let loaded = iam.calls().len();
        let (ctx, mut apiserver) = context_with_sets(&iam, std::slice::from_ref(&l), &[reader()], Some(sets)).await;
        let run = tokio::spawn({
            let (l, ctx) = (l.clone(), ctx.clone());
            async move { reap::reap(&l, &ctx).await }
        });
        serve_reap(&mut apiserver, name).await;
        assert_eq!(run.await.unwrap().unwrap(), Action::await_change());
        let calls = iam.calls()[loaded..].to_vec();
        if recorded_is_todays {
            assert_eq!(calls[0], "CreatePolicyVersion", "revoked by its set: {calls:?}");
            assert!(!calls.iter().any(|c| c.contains("ephemera-revoked")), "no deny of its own: {calls:?}");
        } else {
            assert_eq!(
                calls[0], "PutRolePolicy:ephemera-revoked",
                "a set it does not carry revokes nothing: {calls:?}"
            );
            assert!(!calls.iter().any(|c| c == "CreatePolicyVersion"), "{calls:?}");
        }
        assert!(calls.iter().any(|c| c == "DeleteRole"), "{calls:?}");
        assert!(!iam.has_role(&role_of(name)));
    }
}
