//! Lifecycle benchmark (`make bench`; ignored by `make test`) against the
//! test bed, in two parts:
//! - one at a time: `EPHEMERA_BENCH_SEQUENTIAL` pods (default 100), each
//!   created, ungated, run and ended before the next: the latency a
//!   workload sees on a quiet cluster;
//! - burst: `EPHEMERA_BENCH_LEASES` pods (default 100) created 16 at a time,
//!   then all ended at once: throughput and tail under load, and the
//!   controller's RSS with that many live leases.
//!
//! Provision latency is pod created -> gate lifted; credential window is
//! pod Succeeded -> a session of its role, taken while the pod ran, is
//! refused (IAM `ListAccountAliases`, which the identity allows, polled
//! every 5 ms one at a time and every 20 ms for a sample of 10 pods in the
//! burst); ghost window is pod Succeeded -> lease gone (which happens only
//! after the role is deleted). The IAM and STS calls a lifecycle costs are
//! read from the controller's metrics.
//! Figures, not assertions: the only checks are that every lifecycle
//! completes and nothing leaks.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{StreamExt, TryStreamExt};
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;

use crate::{
    support::{ControllerProcess, TestBed, Webhook, controller_turn, ensure_crds},
    webhook::{admitted_with_identity, governed, identity, pod},
};
use ephemera::api::IdentityLease;

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

/// MiniStack reports a quota of 1,000 roles; the limit is raised for large
/// runs. Leader election on, as the chart runs it (the fence before each
/// role is part of what is measured); one identity, so the restarted
/// controller takes the Lease its predecessor handed back.
const CONTROLLER_ARGS: &[&str] = &[
    "--cluster-name",
    "bench",
    "--aws-role-limit",
    "100000",
    "--leader-elect",
    "--namespace",
    "default",
    "--identity",
    "bench",
];

#[tokio::test]
#[ignore = "benchmark: run with `make bench`"]
async fn lifecycle_latencies() {
    let n: usize = std::env::var("EPHEMERA_BENCH_LEASES").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let _turn = controller_turn().await;
    let bed = TestBed::connect().await;
    ensure_crds(&bed.client).await;
    let webhook = Webhook::start_for(&bed.client, "bench").await;
    let iam_model = IamModel::from_env().await;
    let mut controller = iam_model.controller();
    // ListAccountAliases: an action the sessions may call, to see when
    // they may no more.
    let worker = identity(
        "worker",
        json!({"aws": {"statements": [
            {"actions": ["s3:GetObject"], "resources": ["arn:aws:s3:::team-a-x/*"]},
            {"actions": ["iam:ListAccountAliases"], "resources": ["*"]},
        ]}}),
    );
    let boundary = json!({"maxLeases": 10000, "aws": {
        "allowedActions": ["s3:Get*", "iam:ListAccountAliases"], "allowedResources": ["arn:aws:s3:::team-a-*", "*"],
    }});
    let gov = governed(&bed, &webhook, "e2e-bench", boundary, &worker).await;
    let (ns, pods) = (&gov.ns, gov.pods.clone());
    let probe =
        admitted_with_identity(&pods, &pod(json!({"name": "probe", "labels": {"ephemera.dev/identity": "worker"}})))
            .await;
    pods.delete(&probe.metadata.name.unwrap(), &kube::api::DeleteParams::default()).await.unwrap();
    let leases = Api::<IdentityLease>::namespaced(bed.client.clone(), &ns.name);

    // One at a time.
    let sequential: usize = std::env::var("EPHEMERA_BENCH_SEQUENTIAL").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let (mut provision, mut credential, mut ghost) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..sequential {
        let name = format!("one-{i}");
        let t = Instant::now();
        let created = pods
            .create(&PostParams::default(), &pod(json!({"name": name, "labels": {"ephemera.dev/identity": "worker"}})))
            .await
            .expect("create pod");
        let lease = created.metadata.labels.unwrap()["ephemera.dev/lease"].clone();
        poll(|| async {
            let p = pods.get(&name).await.ok()?;
            p.spec?.scheduling_gates.unwrap_or_default().is_empty().then_some(())
        })
        .await;
        provision.push(t.elapsed());
        poll(|| async { (pods.get(&name).await.ok()?.status?.phase.as_deref() == Some("Running")).then_some(()) })
            .await;
        let session = Session::of(&bed, &ns.name, &lease).await;
        let t = Instant::now();
        pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(json!({"status": {"phase": "Succeeded"}})))
            .await
            .expect("end pod");
        credential.push(session.refused_after(t, Duration::from_millis(5)).await.0);
        poll(|| async { leases.get_opt(&lease).await.ok()?.is_none().then_some(()) }).await;
        ghost.push(t.elapsed());
    }
    if sequential > 0 {
        provision.sort();
        credential.sort();
        ghost.sort();
        println!(
            "lifecycle benchmark, one at a time: {sequential} pods, each created, ungated, run and ended before the next"
        );
        println!(
            "  provision latency (pod created -> gate lifted): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            percentile(&provision, 0.5),
            percentile(&provision, 0.99),
            percentile(&provision, 1.0)
        );
        println!(
            "  credential window (pod Succeeded -> its session refused): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            percentile(&credential, 0.5),
            percentile(&credential, 0.99),
            percentile(&credential, 1.0)
        );
        println!(
            "  ghost window (pod Succeeded -> role deleted, lease gone): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            percentile(&ghost, 0.5),
            percentile(&ghost, 0.99),
            percentile(&ghost, 1.0)
        );
        println!("  cloud calls: {}", per_lifecycle(cloud_calls(&controller.metrics_text().await), sequential));
    }
    let before_burst = cloud_calls(&controller.metrics_text().await);

    // Gate lifted: watch the pods.
    let mut created: HashMap<String, Instant> = HashMap::new();
    let gate_watch = watcher(pods.clone(), watcher::Config::default().labels("bench=lifecycle")).applied_objects();
    let gates = tokio::spawn(async move {
        let mut lifted: HashMap<String, Instant> = HashMap::new();
        let mut stream = std::pin::pin!(gate_watch);
        while let Some(Ok(p)) = stream.next().await {
            let gated = p.spec.as_ref().and_then(|s| s.scheduling_gates.as_ref()).is_some_and(|g| !g.is_empty());
            if !gated {
                lifted.entry(p.metadata.name.clone().unwrap()).or_insert_with(Instant::now);
                if lifted.len() == n {
                    break;
                }
            }
        }
        lifted
    });
    let cpu_before =
        CpuUse::sample(&[("ephemera", &[controller.pid(), webhook.pid()]), ("this benchmark", &[std::process::id()])]);
    let start = Instant::now();
    let create_times = futures::stream::iter(0..n)
        .map(|i| {
            let pods = pods.clone();
            async move {
                let name = format!("w-{i}");
                let t = Instant::now();
                pods.create(
                    &PostParams::default(),
                    &pod(json!({"name": name, "labels": {"ephemera.dev/identity": "worker", "bench": "lifecycle"}})),
                )
                .await
                .expect("create pod");
                (name, t)
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    created.extend(create_times);
    let all_created = start.elapsed();
    let lifted = tokio::time::timeout(Duration::from_mins(10), gates).await.expect("all gates lifted").unwrap();
    let all_ready = start.elapsed();
    let cpu_burst =
        CpuUse::sample(&[("ephemera", &[controller.pid(), webhook.pid()]), ("this benchmark", &[std::process::id()])])
            .since(&cpu_before);
    let mut provision: Vec<Duration> = lifted.iter().map(|(k, t)| t.duration_since(created[k])).collect();
    provision.sort();
    let rss_peak = controller.rss_mib();
    let provisioning = controller.metrics_text().await;
    print_where_time_went(&format!("provisioning {n} pods"), &provisioning);
    let (iam, sts) = cloud_calls(&provisioning);
    println!("  provisioning: {}", per_lifecycle((iam - before_burst.0, sts - before_burst.1), n));

    // A new leader (after a crash, an upgrade or a lost election) lists every
    // lease and looks at each once before it is caught up.
    controller.terminate();
    let mut controller = iam_model.controller();
    let restarted = Instant::now();
    let (target, mut reconciled) = (f64::from(u32::try_from(n).unwrap()), 0.0);
    while reconciled < target {
        assert!(controller.is_running(), "the restarted controller stopped; see {}", controller.log.display());
        assert!(restarted.elapsed() < Duration::from_mins(10), "the restarted controller did not catch up in 10 min");
        tokio::time::sleep(Duration::from_millis(100)).await;
        reconciled = controller.metric(r#"ephemera_reconciles_total{controller="lease"}"#).await.unwrap_or(0.0);
    }
    let relist = restarted.elapsed();
    let rss_relisted = controller.rss_mib();
    // For profiling: keep every lease live a while (other controller builds
    // may be started against them meanwhile: a live lease's reconcile only
    // reads).
    if let Some(hold) = std::env::var("EPHEMERA_BENCH_HOLD_SECS").ok().and_then(|v| v.parse().ok()) {
        println!("holding {n} live leases for {hold} s (EPHEMERA_BENCH_HOLD_SECS)");
        tokio::time::sleep(Duration::from_secs(hold)).await;
    }

    // End them all, once running (kwok would overwrite an earlier phase);
    // the lease disappears only after its role is deleted.
    poll(|| async {
        let list = pods.list(&ListParams::default().labels("bench=lifecycle")).await.ok()?;
        list.items.iter().all(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")).then_some(())
    })
    .await;
    let lease_of: HashMap<String, String> = pods
        .list(&ListParams::default().labels("bench=lifecycle"))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|p| (p.metadata.labels.unwrap()["ephemera.dev/lease"].clone(), p.metadata.name.unwrap()))
        .collect();
    // Sessions of a sample of the pods, taken while they run.
    let mut sampled: Vec<(String, Session)> = Vec::new();
    for (lease, pod) in lease_of.iter().step_by((lease_of.len() / SAMPLED).max(1)).take(SAMPLED) {
        sampled.push((pod.clone(), Session::of(&bed, &ns.name, lease).await));
    }
    let lease_watch = watcher(leases.clone(), watcher::Config::default());
    let total = lease_of.len();
    let deletions = tokio::spawn(async move {
        let mut gone: HashMap<String, Instant> = HashMap::new();
        let mut stream = std::pin::pin!(lease_watch);
        while let Ok(Some(event)) = stream.try_next().await {
            if let watcher::Event::Delete(l) = event {
                gone.insert(l.metadata.name.unwrap(), Instant::now());
                if gone.len() == total {
                    break;
                }
            }
        }
        gone
    });
    tokio::time::sleep(Duration::from_millis(500)).await; // the watch is established
    let end_at: Arc<std::sync::Mutex<HashMap<String, Instant>>> = Arc::default();
    let refusals = futures::future::join_all(sampled.into_iter().map(|(pod, session)| {
        let end_at = end_at.clone();
        async move {
            // From the moment its own end was recorded.
            let ended = loop {
                if let Some(t) = end_at.lock().unwrap().get(&pod).copied() {
                    break t;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            };
            session.refused_after(ended, Duration::from_millis(20)).await
        }
    }));
    let refusals = tokio::spawn(refusals);
    let mut ended: HashMap<String, Instant> = HashMap::new();
    let end_times = futures::stream::iter(lease_of.values().cloned())
        .map(|name| {
            let (pods, end_at) = (pods.clone(), end_at.clone());
            async move {
                pods.patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": {"phase": "Succeeded"}})),
                )
                .await
                .expect("end pod");
                let t = Instant::now();
                end_at.lock().unwrap().insert(name.clone(), t);
                (name, t)
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    ended.extend(end_times);
    let gone = tokio::time::timeout(Duration::from_mins(10), deletions).await.expect("all leases reaped").unwrap();
    let mut ghost: Vec<Duration> =
        gone.iter().map(|(lease, t)| t.saturating_duration_since(ended[&lease_of[lease]])).collect();
    ghost.sort();
    let (mut credential, mut answers): (Vec<Duration>, Vec<Duration>) = refusals.await.unwrap().into_iter().unzip();
    credential.sort();
    answers.sort();
    // Every role is gone once its lease is (the probe's too, deleted early).
    let roles_left = || async {
        bed.iam
            .list_roles()
            .path_prefix("/ephemera/")
            .send()
            .await
            .unwrap()
            .roles
            .iter()
            .filter(|r| r.role_name.contains(&ns.name))
            .map(|r| r.role_name.clone())
            .collect::<Vec<_>>()
    };
    let settle = Instant::now();
    let mut remaining = roles_left().await;
    while !remaining.is_empty() && settle.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        remaining = roles_left().await;
    }
    println!("lifecycle benchmark, burst: {n} pods with identities, created 16 at a time, then all ended");
    println!(
        "  provision latency (pod created -> gate lifted): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; all {n} ready after {:.1} s (all created after {:.1} s)",
        percentile(&provision, 0.5),
        percentile(&provision, 0.99),
        percentile(&provision, 1.0),
        all_ready.as_secs_f64(),
        all_created.as_secs_f64()
    );
    cpu_burst.print(&format!("CPU while the burst was provisioned (first pod created -> all {n} ready)"), all_ready, n);
    println!(
        "  credential window (pod Succeeded -> its session refused; {} sampled pods): p50 {:.0} ms, max {:.0} ms (the refusing call itself took p50 {:.0} ms, max {:.0} ms)",
        credential.len(),
        percentile(&credential, 0.5),
        percentile(&credential, 1.0),
        percentile(&answers, 0.5),
        percentile(&answers, 1.0)
    );
    println!(
        "  ghost window (pod Succeeded -> role deleted, lease gone): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        percentile(&ghost, 0.5),
        percentile(&ghost, 0.99),
        percentile(&ghost, 1.0)
    );
    println!(
        "  controller RSS with {n} live leases: {rss_peak:.1} MiB after the burst (debug build unless run with --release)"
    );
    println!(
        "  full relist: a restarted controller looked at all {n} leases after {:.1} s; RSS then {rss_relisted:.1} MiB",
        relist.as_secs_f64()
    );
    let reaping = controller.metrics_text().await;
    print_where_time_went("the restarted controller: relist, then reaping", &reaping);
    println!("  relist and reaping: {}", per_lifecycle(cloud_calls(&reaping), n));
    assert!(remaining.is_empty(), "roles left behind: {remaining:?}");
}

/// CPU time (user + system) the machine and the test bed's processes spent,
/// from `/proc`: the test bed shares this machine, so a phase's figure is
/// what it cost the whole cluster, and which process paid. Clock ticks are
/// `USER_HZ`, 100 a second on Linux.
struct CpuUse {
    machine: u64,
    by_process: Vec<(String, u64)>,
}

impl CpuUse {
    /// The machine's busy time, each test-bed process's (from the bed's pid
    /// files, `.ephemera/pids/`, as the soak suite finds the apiserver) and
    /// each of `extra`'s (name, pids).
    fn sample(extra: &[(&str, &[u32])]) -> CpuUse {
        let ticks_of = |pid: u32| -> u64 {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
            // Fields after the parenthesised command: utime and stime are the 12th and 13th.
            let fields: Vec<&str> =
                stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default().split_whitespace().collect();
            fields.get(11..13).map_or(0, |t| t.iter().filter_map(|v| v.parse::<u64>().ok()).sum())
        };
        // `cpu` line: user nice system idle iowait irq softirq, then steal
        // (time the hypervisor gave elsewhere: not work done here, left out;
        // guest time is already in user).
        let machine = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                let f: Vec<u64> =
                    s.lines().next()?.split_whitespace().skip(1).take(7).filter_map(|v| v.parse().ok()).collect();
                Some(f.iter().sum::<u64>() - f.get(3)? - f.get(4)?)
            })
            .unwrap_or(0);
        let mut by_process: Vec<(String, u64)> = Vec::new();
        let pids = std::fs::read_dir(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".ephemera/pids"));
        for entry in pids.into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().trim_end_matches(".pid").to_owned();
            let pid = std::fs::read_to_string(entry.path()).ok().and_then(|p| p.trim().parse().ok());
            by_process.push((name, pid.map_or(0, ticks_of)));
        }
        for (name, pids) in extra {
            by_process.push(((*name).to_owned(), pids.iter().map(|p| ticks_of(*p)).sum()));
        }
        CpuUse { machine, by_process }
    }

    fn since(&self, before: &CpuUse) -> CpuUse {
        let earlier = |name: &str| before.by_process.iter().find(|(n, _)| n == name).map_or(0, |(_, t)| *t);
        CpuUse {
            machine: self.machine.saturating_sub(before.machine),
            by_process: self.by_process.iter().map(|(n, t)| (n.clone(), t.saturating_sub(earlier(n)))).collect(),
        }
    }

    #[allow(clippy::cast_precision_loss)]
    fn print(&self, phase: &str, took: Duration, n: usize) {
        let secs = |ticks: u64| ticks as f64 / 100.0;
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let mut rows = self.by_process.clone();
        rows.sort_by_key(|(_, t)| std::cmp::Reverse(*t));
        let listed: u64 = rows.iter().map(|(_, t)| t).sum();
        let rows: Vec<String> =
            rows.iter().filter(|(_, t)| *t > 0).map(|(name, t)| format!("{name} {:.1}", secs(*t))).collect();
        println!(
            "  {phase}: machine {:.1} core-s of {:.1} ({:.0} %), {:.1} ms per pod; {}, rest {:.1} (core-s)",
            secs(self.machine),
            took.as_secs_f64() * cores as f64,
            secs(self.machine) / (took.as_secs_f64() * cores as f64) * 100.0,
            secs(self.machine) * 1e3 / n as f64,
            rows.join(", "),
            secs(self.machine.saturating_sub(listed)),
        );
    }
}

/// Calls and mean latencies by cloud operation and by controller, from a
/// controller's `/metrics`.
fn print_where_time_went(phase: &str, metrics: &str) {
    println!("  where the time went, {phase} (calls, mean latency):");
    for (family, label) in [
        ("ephemera_cloud_request_duration_seconds", "operation"),
        ("ephemera_reconcile_duration_seconds", "controller"),
    ] {
        let mut rows: Vec<(String, f64, f64)> = Vec::new();
        for line in metrics.lines().filter(|l| l.starts_with(&format!("{family}_count{{"))) {
            let Some((key, value)) = line.rsplit_once(' ') else { continue };
            let name = key.split(&format!("{label}=\"")).nth(1).and_then(|r| r.split('"').next()).unwrap_or("?");
            let count: f64 = value.parse().unwrap_or(0.0);
            let sum_key = key.replacen("_count{", "_sum{", 1);
            let sum: f64 = metrics.lines().find_map(|l| l.strip_prefix(&sum_key)?.trim().parse().ok()).unwrap_or(0.0);
            rows.push((name.to_owned(), count, sum));
        }
        rows.sort_by(|a, b| b.2.total_cmp(&a.2));
        for (name, count, sum) in rows {
            println!("    {label} {name}: {count:.0} x {:.1} ms = {sum:.1} s", sum / count.max(1.0) * 1e3);
        }
    }
}

/// IAM as the controller meets it: MiniStack as it is, or, with
/// `EPHEMERA_BENCH_IAM_WRITES=N`, behind a proxy that lets N mutating calls
/// through a second and throttles the rest, as IAM does per account
/// (`EPHEMERA_BENCH_CONTROLLER_ARGS` adds controller flags, e.g.
/// `--iam-writes-per-second N`).
struct IamModel {
    proxy: Option<crate::faults::BudgetProxy>,
    extra: Vec<String>,
}

impl IamModel {
    async fn from_env() -> IamModel {
        let extra = std::env::var("EPHEMERA_BENCH_CONTROLLER_ARGS")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let Some(rate) = std::env::var("EPHEMERA_BENCH_IAM_WRITES").ok().and_then(|v| v.parse::<f64>().ok()) else {
            return IamModel { proxy: None, extra };
        };
        let upstream = std::env::var("AWS_ENDPOINT_URL").expect("AWS_ENDPOINT_URL (source .ephemera/dev.env)");
        let proxy =
            crate::faults::BudgetProxy::start(upstream.trim_start_matches("http://").trim_end_matches('/'), rate).await;
        println!("IAM writes limited to {rate}/s by a proxy (throttled above), controller flags {extra:?}");
        IamModel { proxy: Some(proxy), extra }
    }

    fn controller(&self) -> ControllerProcess {
        let mut args = vec!["controller", "--admin-addr", "127.0.0.1:0"];
        args.extend_from_slice(CONTROLLER_ARGS);
        args.extend(self.extra.iter().map(String::as_str));
        let env: Vec<(&str, &str)> = self.proxy.iter().map(|p| ("AWS_ENDPOINT_URL", p.url.as_str())).collect();
        ControllerProcess::spawn_with_env("controller", &args, &env)
    }
}

/// Pods of the burst whose credential window is measured (each polls IAM
/// every 20 ms from its end until refused; more would load the emulator the
/// controller is measured against).
const SAMPLED: usize = 10;

/// A session of a lease's role, taken with a token of its ServiceAccount as
/// the pod's SDK would.
struct Session(aws_sdk_iam::Client);

impl Session {
    async fn of(bed: &TestBed, namespace: &str, lease: &str) -> Session {
        let leases = Api::<IdentityLease>::namespaced(bed.client.clone(), namespace);
        let role = leases.get(lease).await.expect("the lease").spec.role_arn.expect("a role ARN");
        let token = bed.token(namespace, lease, "sts.amazonaws.com", 600).await;
        let out = bed
            .sts
            .assume_role_with_web_identity()
            .role_arn(role)
            .role_session_name("bench")
            .web_identity_token(token)
            .send()
            .await
            .expect("AssumeRoleWithWebIdentity while the pod runs");
        let session = Session(TestBed::iam_as(&out.credentials.expect("session credentials")).await);
        assert!(session.usable().await, "a fresh session may call ListAccountAliases");
        session
    }

    async fn usable(&self) -> bool {
        self.0.list_account_aliases().send().await.is_ok()
    }

    /// How long after `since` the session is first refused, polling every
    /// `every`, and how long that refusing call itself took (the emulator's
    /// answer time, part of the first figure).
    async fn refused_after(&self, since: Instant, every: Duration) -> (Duration, Duration) {
        poll(|| async {
            let sent = Instant::now();
            if self.usable().await {
                tokio::time::sleep(every).await;
                None
            } else {
                Some((since.elapsed(), sent.elapsed()))
            }
        })
        .await
    }
}

/// IAM and STS calls a controller made, from its `/metrics`.
fn cloud_calls(metrics: &str) -> (f64, f64) {
    let (mut iam, mut sts) = (0.0, 0.0);
    for line in metrics.lines().filter(|l| l.starts_with("ephemera_cloud_request_duration_seconds_count{")) {
        let Some((key, value)) = line.rsplit_once(' ') else { continue };
        let count: f64 = value.parse().unwrap_or(0.0);
        if key.contains("operation=\"AssumeRoleWithWebIdentity\"") || key.contains("operation=\"GetCallerIdentity\"") {
            sts += count;
        } else {
            iam += count;
        }
    }
    (iam, sts)
}

fn per_lifecycle((iam, sts): (f64, f64), lifecycles: usize) -> String {
    #[allow(clippy::cast_precision_loss)]
    let n = lifecycles.max(1) as f64;
    format!("{:.2} IAM and {:.2} STS calls per lifecycle ({iam:.0} and {sts:.0} for {lifecycles})", iam / n, sts / n)
}

/// Polls `probe` every 10 ms until it answers (10 minutes at most).
async fn poll<T, F, Fut>(mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(start.elapsed() < Duration::from_mins(10), "benchmark step did not finish in 10 minutes");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
