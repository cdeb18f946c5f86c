//! Crash safety under churn: pods come and go while the controller is killed
//! with SIGKILL at random moments and restarted. At the end nothing may be
//! left: no role, no ServiceAccount, no lease, and every pod got its gate
//! lifted before it ended.
//!
//! `make test` runs a few lifecycles; `make soak` runs 1000
//! (`EPHEMERA_SOAK_LIFECYCLES`, `EPHEMERA_SOAK_CONCURRENCY`; a failing run
//! prints `EPHEMERA_SOAK_SEED` to replay its kill timings).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, PostParams},
};
use serde_json::json;

use crate::{
    lifecycle::{finish, role_exists, wait_ungated_within},
    support::{ControllerProcess, TestBed, Webhook, controller_turn, ensure_crds, unique_name},
    webhook::{admitted_with_identity, boundary, env_of, identity, pod},
};
use ephemera::api::{IdentityLease, WorkloadIdentity};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// xorshift64*: reproducible kill timings from a printed seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

#[tokio::test]
async fn controller_killed_at_random_points_leaves_no_orphans() {
    let lifecycles = env_or("EPHEMERA_SOAK_LIFECYCLES", 12);
    let concurrency = usize::try_from(env_or("EPHEMERA_SOAK_CONCURRENCY", 4)).unwrap_or(4);
    let seed =
        env_or("EPHEMERA_SOAK_SEED", SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos().into()) | 1;
    eprintln!("soak: {lifecycles} lifecycles, {concurrency} at a time, EPHEMERA_SOAK_SEED={seed}");

    let _turn = controller_turn().await;
    let bed = TestBed::connect().await;
    ensure_crds(&bed.client).await;
    let webhook = Webhook::start(&bed.client).await;
    let ns = bed.namespace("e2e-soak").await;
    let team = unique_name("team");
    webhook.watch_namespace(&bed.client, &ns.name, json!({"e2e-team": team})).await;
    let _boundary = boundary(&bed.client, &team, json!({})).await;
    Api::<WorkloadIdentity>::namespaced(bed.client.clone(), &ns.name)
        .create(
            &PostParams::default(),
            &identity(
                "reader",
                json!({"aws": {"statements": [{"actions": ["s3:GetObject"], "resources": ["arn:aws:s3:::team-a-soak/*"]}]},
                       "kubernetes": {"rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]}}),
            ),
        )
        .await
        .unwrap();
    let pods = Api::<Pod>::namespaced(bed.client.clone(), &ns.name);
    // The first pod also waits for the webhook to know the identity.
    let first =
        admitted_with_identity(&pods, &pod(json!({"name": "soak-0", "labels": {"ephemera.dev/identity": "reader"}})))
            .await;
    let cluster = unique_name("soak");

    // The killer: SIGKILL after a random 0.1-1.5 s of life, restart at once.
    let done = Arc::new(AtomicBool::new(false));
    let kills = Arc::new(AtomicUsize::new(0));
    let killer = {
        let (done, kills) = (done.clone(), kills.clone());
        tokio::spawn(async move {
            let args = ["--cluster-name", cluster.as_str()];
            let mut rng = Rng(seed);
            let mut controller = ControllerProcess::start_with(&args);
            while !done.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(100 + rng.below(1400))).await;
                if done.load(Ordering::SeqCst) {
                    break;
                }
                drop(controller); // SIGKILL
                kills.fetch_add(1, Ordering::SeqCst);
                controller = ControllerProcess::start_with(&args);
            }
            controller
        })
    };

    // Lifecycles: admitted, gate lifted, then ended one of three ways.
    let started = Instant::now();
    let roles = Arc::new(std::sync::Mutex::new(Vec::new()));
    let leases_made = Arc::new(std::sync::Mutex::new(Vec::new()));
    futures::stream::iter(0..lifecycles)
        .for_each_concurrent(concurrency, |i| {
            let (pods, client, ns, roles, leases_made, first) =
                (pods.clone(), bed.client.clone(), ns.name.clone(), roles.clone(), leases_made.clone(), first.clone());
            async move {
                let name = format!("soak-{i}");
                let created = if i == 0 {
                    first
                } else {
                    let p = pod(json!({"name": name, "labels": {"ephemera.dev/identity": "reader"}}));
                    pods.create(&PostParams::default(), &p).await.unwrap_or_else(|e| panic!("creating {name}: {e}"))
                };
                roles.lock().unwrap().push(env_of(&created, "AWS_ROLE_ARN").expect("an injected role"));
                leases_made.lock().unwrap().push(created.spec.as_ref().unwrap().service_account_name.clone().unwrap());
                // Restarts cost a few seconds each; a pod held longer than this is stuck.
                wait_ungated_within(&pods, &name, Duration::from_mins(2)).await;
                match i % 3 {
                    0 => finish(&client, &ns, &name, "Succeeded").await,
                    1 => finish(&client, &ns, &name, "Failed").await,
                    _ => {
                        pods.delete(&name, &DeleteParams::default()).await.unwrap();
                    }
                }
            }
        })
        .await;
    done.store(true, Ordering::SeqCst);
    let mut controller = killer.await.expect("the killer task");
    let churn = started.elapsed();

    // Once a controller runs undisturbed, everything is reaped.
    let leases = Api::<IdentityLease>::namespaced(bed.client.clone(), &ns.name);
    let sas = Api::<ServiceAccount>::namespaced(bed.client.clone(), &ns.name);
    let settled = Instant::now();
    loop {
        let left_leases = leases.list(&ListParams::default()).await.unwrap().items;
        let left_sas =
            sas.list(&ListParams::default().labels("app.kubernetes.io/managed-by=ephemera")).await.unwrap().items;
        if left_leases.is_empty() && left_sas.is_empty() {
            break;
        }
        if settled.elapsed() > Duration::from_mins(3) {
            for l in &left_leases {
                let holder = pods.get_opt(&l.spec.holder.name).await.ok().flatten();
                eprintln!(
                    "left: lease {} deleting={} phase={:?} reap={:?}; pod {}: phase={:?} deleting={:?}",
                    l.name_any(),
                    l.metadata.deletion_timestamp.is_some(),
                    l.status.as_ref().and_then(|s| s.phase),
                    l.annotations().get("ephemera.dev/reap"),
                    l.spec.holder.name,
                    holder.as_ref().and_then(|p| p.status.as_ref()?.phase.clone()),
                    holder.as_ref().map(|p| p.metadata.deletion_timestamp.is_some()),
                );
            }
            for sa in &left_sas {
                eprintln!("left: ServiceAccount {} owners={:?}", sa.name_any(), sa.owner_references());
            }
            panic!(
                "{} leases and {} ServiceAccounts left 3 min after the churn; controller log: {}",
                left_leases.len(),
                left_sas.len(),
                controller.log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let roles = roles.lock().unwrap().clone();
    for role in &roles {
        assert!(!role_exists(&bed, role).await, "role {role} leaked; controller log: {}", controller.log.display());
    }
    // Nothing else of this namespace in IAM either (roles made before their lease, say).
    let mut marker = None;
    loop {
        let page = bed.iam.list_roles().path_prefix("/ephemera/").set_marker(marker.take()).send().await.unwrap();
        for role in &page.roles {
            let tags =
                bed.iam.list_role_tags().role_name(&role.role_name).send().await.map(|t| t.tags).unwrap_or_default();
            let of_ns = tags.iter().any(|t| t.key == "ephemera.dev/namespace" && t.value == ns.name);
            assert!(!of_ns, "role {} of the soak namespace leaked", role.role_name);
        }
        match page.marker {
            Some(next) if page.is_truncated => marker = Some(next),
            _ => break,
        }
    }
    assert!(controller.is_running(), "the last controller stopped; see {}", controller.log.display());
    eprintln!(
        "soak: {lifecycles} lifecycles ({} leases) with {} SIGKILLs in {churn:?}; all reaped {:?} later; no orphans",
        leases_made.lock().unwrap().len(),
        kills.load(Ordering::SeqCst),
        settled.elapsed(),
    );
}
