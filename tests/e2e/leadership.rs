//! A leader frozen past its Lease (SIGSTOP, a paused VM) while it makes a
//! role, resumed after the new leader has reaped that role's lease: it must
//! delete the role it made, not leave it for the next sweep (5 minutes
//! later), and then stop leading.
//!
//! To make the moment exact, the frozen replica talks to IAM through a
//! proxy that holds its `CreateRole` calls until the test releases them; the
//! test freezes the replica as soon as its call is held, and releases the
//! call (which then makes the role in MiniStack) only after the new leader
//! has reaped the lease.

use std::time::{Duration, Instant};

use kube::{Api, Client, ResourceExt};

use crate::{
    faults::HoldProxy,
    lifecycle::{finish, role_exists, wait_ungated_within},
    soak::{Churn, assert_reaped_once},
    support::{ControllerProcess, controller_turn, leader_of, unique_name, wait_until},
    webhook::env_of,
};
use ephemera::api::IdentityLease;

async fn wait_leader(client: &Client, namespace: &str, identity: &str) {
    wait_until(&format!("{identity} to lead"), Duration::from_mins(1), move || async move {
        (leader_of(client, namespace).await.as_deref() == Some(identity)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_leader_frozen_past_its_lease_deletes_the_role_it_made_for_a_reaped_lease() {
    let upstream = std::env::var("AWS_ENDPOINT_URL").expect("AWS_ENDPOINT_URL (source .ephemera/dev.env)");
    let proxy =
        HoldProxy::start(upstream.trim_start_matches("http://").trim_end_matches('/'), "CreateRole", true).await;
    let _turn = controller_turn().await;
    // Churn admits pod churn-0 (gated, its lease waiting for a role).
    let cluster = unique_name("frozen");
    let churn = Churn::new("e2e-frozen", &cluster).await;
    let client = churn.bed.client.clone();
    let ns = churn.gov.ns.name.clone();
    let replica = |id: &str, env: &[(&str, &str)]| {
        ControllerProcess::spawn_with_env(
            id,
            &[
                "controller",
                "--admin-addr",
                "127.0.0.1:0",
                "--cluster-name",
                &cluster,
                "--aws-account-id",
                "000000000000",
                "--leader-elect",
                "--namespace",
                &ns,
                "--identity",
                id,
            ],
            env,
        )
    };
    let mut frozen = replica("replica-a", &[("AWS_ENDPOINT_URL", &proxy.url)]);
    wait_leader(&client, &ns, "replica-a").await;
    let mut standby = replica("replica-b", &[]);

    // The leader calls CreateRole for churn-0's lease; freeze it right there.
    proxy.wait_held(Duration::from_mins(1)).await;
    frozen.signal("STOP");
    let stopped = Instant::now();
    wait_leader(&client, &ns, "replica-b").await;
    let took_over = stopped.elapsed();

    // The new leader provisions the lease; the pod runs and ends; the lease
    // is reaped (its role deleted) while the old leader is still frozen.
    let role = env_of(&churn.first, "AWS_ROLE_ARN").expect("an injected role");
    let lease = churn.first.labels()["ephemera.dev/lease"].clone();
    wait_ungated_within(&churn.gov.pods, "churn-0", Duration::from_mins(1)).await;
    finish(&client, &ns, "churn-0", "Succeeded").await;
    let (leases, name) = (&Api::<IdentityLease>::namespaced(client.clone(), &ns), &lease);
    wait_until("the new leader to reap the lease", Duration::from_mins(1), move || async move {
        leases.get_opt(name).await.unwrap().is_none().then_some(())
    })
    .await;
    assert!(!role_exists(&churn.bed, &role).await, "the new leader reaped the lease, and its role with it");

    // The frozen leader's CreateRole goes through now: a role without a lease.
    proxy.release(Duration::from_secs(10)).await;
    assert!(
        role_exists(&churn.bed, &role).await,
        "the held CreateRole must make the role again (else this test proves nothing)"
    );
    frozen.signal("CONT");
    let resumed = Instant::now();
    // Without a fix it stays until the new leader's next sweep, 5 min away.
    let (bed, arn) = (&churn.bed, &role);
    wait_until("the resumed replica to delete the role it made", Duration::from_secs(30), move || async move {
        (!role_exists(bed, arn).await).then_some(())
    })
    .await;
    let deleted_after = resumed.elapsed();
    // It no longer leads: it finishes what it started and exits with an error.
    let status = frozen.exited_by(resumed + Duration::from_secs(40), "the resumed replica").await;
    let log = std::fs::read_to_string(&frozen.log).unwrap_or_default();
    assert!(!status.success(), "a replica that lost its Lease exits with an error; see {}", frozen.log.display());
    assert!(log.contains("role deleted"), "it says what it cleaned up; see {}", frozen.log.display());

    churn.assert_nothing_left(std::slice::from_ref(&role), &mut standby).await;
    assert_reaped_once(&churn, &[lease]).await;
    eprintln!(
        "frozen leader: the standby led {took_over:?} after SIGSTOP; once resumed, the old leader deleted the role \
         it made for the reaped lease after {deleted_after:?} and exited ({status})"
    );
}
