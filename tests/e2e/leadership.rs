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

use std::{
    convert::Infallible,
    sync::Arc,
    time::{Duration, Instant},
};

use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Bytes};
use kube::{Api, Client, ResourceExt};

use crate::{
    faults::{forward, serve},
    lifecycle::{finish, role_exists, wait_ungated_within},
    soak::{Churn, assert_reaped_once},
    support::{ControllerProcess, controller_turn, leader_of, unique_name, wait_until},
    webhook::env_of,
};
use ephemera::api::IdentityLease;

/// Forwards IAM/STS calls, holding every `CreateRole` until released.
struct HoldProxy {
    url: String,
    state: Arc<Hold>,
    task: tokio::task::JoinHandle<()>,
}

struct Hold {
    upstream: String,
    /// `CreateRole` calls that arrived while holding.
    held: tokio::sync::watch::Sender<u64>,
    /// Whether held calls may go on.
    released: tokio::sync::watch::Sender<bool>,
    /// Held calls forwarded and answered by the upstream.
    forwarded: tokio::sync::watch::Sender<u64>,
}

impl Drop for HoldProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HoldProxy {
    async fn start(upstream: &str) -> HoldProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binding the proxy");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Hold {
            upstream: upstream.to_owned(),
            held: tokio::sync::watch::channel(0).0,
            released: tokio::sync::watch::channel(false).0,
            forwarded: tokio::sync::watch::channel(0).0,
        });
        let task = serve(listener, state.clone(), handle);
        HoldProxy { url, state, task }
    }

    /// Waits until a `CreateRole` call is held.
    async fn wait_held(&self, timeout: Duration) {
        let mut held = self.state.held.subscribe();
        tokio::time::timeout(timeout, held.wait_for(|n| *n > 0))
            .await
            .expect("no CreateRole call reached the proxy in time")
            .unwrap();
    }

    /// Lets held calls go on; waits until the first was answered upstream.
    async fn release(&self, timeout: Duration) {
        self.state.released.send_replace(true);
        let mut forwarded = self.state.forwarded.subscribe();
        tokio::time::timeout(timeout, forwarded.wait_for(|n| *n > 0))
            .await
            .expect("the held CreateRole was not answered in time")
            .unwrap();
    }
}

async fn handle(req: Request<hyper::body::Incoming>, state: Arc<Hold>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(http_body_util::Collected::to_bytes).unwrap_or_default();
    let create_role = body.windows(b"Action=CreateRole".len()).any(|w| w == b"Action=CreateRole");
    let held = create_role && !*state.released.borrow();
    if held {
        state.held.send_modify(|n| *n += 1);
        let mut released = state.released.subscribe();
        let _ = released.wait_for(|r| *r).await;
    }
    let response = forward(&state.upstream, parts, body).await;
    if held {
        state.forwarded.send_modify(|n| *n += 1);
    }
    Ok(response
        .unwrap_or_else(|e| Response::builder().status(502).body(Full::new(Bytes::from(e))).expect("a valid response")))
}

async fn wait_leader(client: &Client, namespace: &str, identity: &str) {
    wait_until(&format!("{identity} to lead"), Duration::from_mins(1), move || async move {
        (leader_of(client, namespace).await.as_deref() == Some(identity)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_leader_frozen_past_its_lease_deletes_the_role_it_made_for_a_reaped_lease() {
    let upstream = std::env::var("AWS_ENDPOINT_URL").expect("AWS_ENDPOINT_URL (source .ephemera/dev.env)");
    let proxy = HoldProxy::start(upstream.trim_start_matches("http://").trim_end_matches('/')).await;
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
    let status = loop {
        if let Some(status) = frozen.exit_status() {
            break status;
        }
        assert!(resumed.elapsed() < Duration::from_secs(40), "it still runs; see {}", frozen.log.display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
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
