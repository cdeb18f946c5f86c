//! `ephemera inventory` (or `kubectl ephemera inventory`): every live
//! non-human identity, who owns it, what it may do and when it dies, with
//! flags for the ones that deserve a look.
//!
//! The rows are computed by a pure function ([`rows`]) from lists read once,
//! so the flags are unit-tested without a cluster.

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use k8s_openapi::{
    api::{batch::v1::Job, core::v1::Pod},
    jiff::Timestamp,
};
use kube::{Api, Client, ResourceExt, api::ListParams};
use serde::Serialize;

use crate::{
    Error, Result,
    api::{Effect, HolderKind, IdentityLease, LeasePhase, WorkloadIdentity},
    controller::lease::{HOLDER_GRACE, job_ended, lease_age, pod_ended},
};

/// A lease still Pending or Provisioning after this is flagged `stuck`.
pub const STUCK_AFTER: Duration = Duration::from_mins(5);
/// A lease still being reaped after this is flagged `reap-failing`.
pub const REAP_FAILING_AFTER: Duration = Duration::from_mins(1);

/// Output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns, for people.
    #[default]
    Table,
    /// A JSON array, for scripts.
    Json,
}

/// One live identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    /// Namespace of the lease and its workload.
    pub namespace: String,
    /// The lease (also the ServiceAccount's name).
    pub lease: String,
    /// `Pod/<name>` or `Job/<name>`.
    pub workload: String,
    /// The `WorkloadIdentity` it instantiates.
    pub identity: String,
    /// `ephemera.dev/owner` of the workload.
    pub owner: Option<String>,
    /// `ephemera.dev/purpose` of the workload.
    pub purpose: Option<String>,
    /// The IAM role.
    pub role_arn: Option<String>,
    /// Lease phase.
    pub phase: String,
    /// When the lease was made (RFC 3339).
    pub created_at: Option<String>,
    /// Seconds since then.
    pub age_seconds: u64,
    /// When it is reaped even if the workload still runs (RFC 3339).
    pub expires_at: String,
    /// Seconds until then (negative: past).
    pub expires_in_seconds: i64,
    /// Why it deserves a look (see [`flags`]).
    pub flags: Vec<String>,
}

/// What [`rows`] knows about a lease's workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Still running (or not started).
    Live,
    /// Over: the reason (`pod succeeded`, `Job completed`, `deleted`...).
    Over(String),
    /// Not found.
    Missing,
}

/// The state of each lease's holder, from the pods and Jobs listed.
#[must_use]
pub fn workload_of(lease: &IdentityLease, pods: &[Pod], jobs: &[Job], now: Timestamp) -> Workload {
    let namespace = lease.namespace();
    let holder = &lease.spec.holder;
    let same = |ns: Option<String>, name: String, uid: Option<String>| {
        ns == namespace && name == holder.name && (holder.uid.is_none() || uid == holder.uid)
    };
    match holder.kind {
        HolderKind::Pod => {
            let Some(pod) = pods.iter().find(|p| same(p.namespace(), p.name_any(), p.uid())) else {
                return Workload::Missing;
            };
            pod_ended(pod, now).map_or(Workload::Live, |how| Workload::Over(format!("pod {how}")))
        }
        HolderKind::Job => {
            let Some(job) = jobs.iter().find(|j| same(j.namespace(), j.name_any(), j.uid())) else {
                return Workload::Missing;
            };
            job_ended(job).map_or(Workload::Live, |how| Workload::Over(format!("Job {how}")))
        }
    }
}

/// Flags of one lease:
/// - `past-workload`: its workload is over or gone, yet the identity lives
///   (the controller reaps within a second; a lasting flag means it is down);
/// - `expired`: past `expiresAt`;
/// - `stuck`: not Ready after [`STUCK_AFTER`];
/// - `reap-failing`: deletion started more than [`REAP_FAILING_AFTER`] ago;
/// - `wildcard-action`, `wildcard-resource`, `wildcard-kubernetes`: its
///   identity allows `*` (an action like `s3:*`, any resource, any verb or
///   resource in the cluster).
#[must_use]
pub fn flags(
    lease: &IdentityLease,
    identity: Option<&WorkloadIdentity>,
    workload: &Workload,
    now: Timestamp,
) -> Vec<String> {
    let mut flags = Vec::new();
    let age = lease_age(lease, now);
    match workload {
        Workload::Over(_) => flags.push("past-workload"),
        Workload::Missing if lease.spec.holder.uid.is_some() || age > HOLDER_GRACE => flags.push("past-workload"),
        _ => {}
    }
    if lease.spec.expires_at.0 <= now {
        flags.push("expired");
    }
    let phase = lease.status.as_ref().and_then(|s| s.phase).unwrap_or_default();
    if matches!(phase, LeasePhase::Pending | LeasePhase::Provisioning)
        && lease.metadata.deletion_timestamp.is_none()
        && age > STUCK_AFTER
    {
        flags.push("stuck");
    }
    if let Some(deleting) = &lease.metadata.deletion_timestamp
        && now.duration_since(deleting.0).unsigned_abs() > REAP_FAILING_AFTER
    {
        flags.push("reap-failing");
    }
    if let Some(identity) = identity {
        let allowed = identity.spec.aws.iter().flat_map(|a| &a.statements).filter(|s| s.effect == Effect::Allow);
        let (mut action, mut resource) = (false, false);
        for s in allowed {
            action |= s.actions.iter().any(|a| a == "*" || a.ends_with(":*"));
            resource |= s.resources.iter().any(|r| r == "*");
        }
        if action {
            flags.push("wildcard-action");
        }
        if resource {
            flags.push("wildcard-resource");
        }
        let rules = identity.spec.kubernetes.iter().flat_map(|k| &k.rules);
        if rules.into_iter().any(|r| r.verbs.iter().chain(&r.resources).chain(&r.api_groups).any(|v| v == "*")) {
            flags.push("wildcard-kubernetes");
        }
    }
    flags.into_iter().map(str::to_owned).collect()
}

/// One row per lease, sorted by namespace and lease.
#[must_use]
pub fn rows(
    leases: &[IdentityLease],
    identities: &[WorkloadIdentity],
    pods: &[Pod],
    jobs: &[Job],
    now: Timestamp,
) -> Vec<Row> {
    let by_name: BTreeMap<(Option<String>, String), &WorkloadIdentity> =
        identities.iter().map(|wi| ((wi.namespace(), wi.name_any()), wi)).collect();
    let mut rows: Vec<Row> = leases
        .iter()
        .map(|lease| {
            let identity = by_name.get(&(lease.namespace(), lease.spec.workload_identity.clone())).copied();
            let workload = workload_of(lease, pods, jobs, now);
            let created = lease.metadata.creation_timestamp.as_ref().map(|t| t.0);
            let status = lease.status.as_ref();
            let phase = if lease.metadata.deletion_timestamp.is_some() {
                LeasePhase::Reaping
            } else {
                status.and_then(|s| s.phase).unwrap_or_default()
            };
            let kind = match lease.spec.holder.kind {
                HolderKind::Pod => "Pod",
                HolderKind::Job => "Job",
            };
            Row {
                namespace: lease.namespace().unwrap_or_default(),
                lease: lease.name_any(),
                workload: format!("{kind}/{}", lease.spec.holder.name),
                identity: lease.spec.workload_identity.clone(),
                owner: lease.spec.owner.clone(),
                purpose: lease.spec.purpose.clone(),
                role_arn: lease.spec.role_arn.clone().or_else(|| status.and_then(|s| s.role_arn.clone())),
                phase: format!("{phase:?}"),
                created_at: created.map(|t| t.to_string()),
                age_seconds: lease_age(lease, now).as_secs(),
                expires_at: lease.spec.expires_at.0.to_string(),
                expires_in_seconds: lease.spec.expires_at.0.duration_since(now).as_secs(),
                flags: flags(lease, identity, &workload, now),
            }
        })
        .collect();
    rows.sort_by(|a, b| (&a.namespace, &a.lease).cmp(&(&b.namespace, &b.lease)));
    rows
}

/// `90s`, `12m`, `3h`, `2d` (as kubectl prints ages); `-` prefix when past.
#[must_use]
pub fn short_duration(seconds: i64) -> String {
    let sign = if seconds < 0 { "-" } else { "" };
    let s = seconds.unsigned_abs();
    let text = match s {
        0..120 => format!("{s}s"),
        120..7_200 => format!("{}m", s / 60),
        7_200..172_800 => format!("{}h", s / 3_600),
        _ => format!("{}d", s / 86_400),
    };
    format!("{sign}{text}")
}

/// The rows as aligned columns.
#[must_use]
pub fn table(rows: &[Row]) -> String {
    let header =
        ["NAMESPACE", "LEASE", "WORKLOAD", "IDENTITY", "OWNER", "PURPOSE", "ROLE", "PHASE", "AGE", "EXPIRES", "FLAGS"];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let role = r.role_arn.as_deref().map_or("-", |arn| arn.rsplit('/').next().unwrap_or(arn));
            vec![
                r.namespace.clone(),
                r.lease.clone(),
                r.workload.clone(),
                r.identity.clone(),
                r.owner.clone().unwrap_or_else(|| "-".into()),
                r.purpose.clone().unwrap_or_else(|| "-".into()),
                role.to_owned(),
                r.phase.clone(),
                short_duration(i64::try_from(r.age_seconds).unwrap_or(i64::MAX)),
                short_duration(r.expires_in_seconds),
                if r.flags.is_empty() { "-".into() } else { r.flags.join(",") },
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &cells {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let lines = std::iter::once(header.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>()).chain(cells);
    for line in lines {
        let mut text = String::new();
        for (i, (cell, w)) in line.iter().zip(&widths).enumerate() {
            if i + 1 == widths.len() {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<w$}   ");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

/// `Api` for one namespace, or all.
fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Lists leases, identities, pods and Jobs (in `namespace`, or everywhere)
/// and prints the inventory to stdout.
///
/// # Errors
/// When the cluster cannot be reached or a list is refused.
pub async fn run(namespace: Option<&str>, output: Output) -> Result<()> {
    let client = Client::try_default().await.map_err(Error::KubeConfig)?;
    let lp = ListParams::default();
    let leases =
        api::<IdentityLease>(&client, namespace).list(&lp).await.map_err(Error::kube("listing IdentityLeases"))?;
    let identities = api::<WorkloadIdentity>(&client, namespace)
        .list(&lp)
        .await
        .map_err(Error::kube("listing WorkloadIdentities"))?;
    let pods = api::<Pod>(&client, namespace)
        .list(&ListParams::default().labels(crate::api::well_known::LABEL_LEASE))
        .await
        .map_err(Error::kube("listing pods with a lease"))?;
    let jobs = api::<Job>(&client, namespace).list(&lp).await.map_err(Error::kube("listing Jobs"))?;
    let rows = rows(&leases.items, &identities.items, &pods.items, &jobs.items, Timestamp::now());
    let text = match output {
        Output::Table if rows.is_empty() => "No live identities.\n".to_owned(),
        Output::Table => table(&rows),
        Output::Json => {
            let mut json = serde_json::to_string_pretty(&rows)
                .map_err(|e| Error::Serialization { what: "inventory", message: e.to_string() })?;
            json.push('\n');
            json
        }
    };
    print!("{text}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn lease(extra: &serde_json::Value) -> IdentityLease {
        let mut v = json!({
            "apiVersion": "ephemera.dev/v1alpha1", "kind": "IdentityLease",
            "metadata": {"name": "reader-abc12", "namespace": "team-a", "creationTimestamp": "2026-11-23T10:00:00Z"},
            "spec": {"holder": {"kind": "Pod", "name": "report-1", "uid": "u1"}, "workloadIdentity": "reader",
                     "serviceAccount": "reader-abc12", "expiresAt": "2026-11-23T22:00:00Z", "owner": "team-a@example.com",
                     "roleArn": "arn:aws:iam::000000000000:role/ephemera/ephemera-k-team-a-abc12"},
            "status": {"phase": "Ready"},
        });
        json_patch::merge(&mut v, extra);
        serde_json::from_value(v).unwrap()
    }

    fn pod(phase: &str) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "report-1", "namespace": "team-a", "uid": "u1"},
                                      "status": {"phase": phase}}))
        .unwrap()
    }

    fn identity(statements: &serde_json::Value) -> WorkloadIdentity {
        serde_json::from_value(json!({
            "apiVersion": "ephemera.dev/v1alpha1", "kind": "WorkloadIdentity",
            "metadata": {"name": "reader", "namespace": "team-a"},
            "spec": {"aws": {"statements": statements}},
        }))
        .unwrap()
    }

    fn at(t: &str) -> Timestamp {
        t.parse().unwrap()
    }

    #[test]
    fn a_live_narrow_identity_has_no_flags() {
        let wi = identity(&json!([{"actions": ["s3:GetObject"], "resources": ["arn:aws:s3:::b/*"]}]));
        let rows = rows(&[lease(&json!({}))], &[wi], &[pod("Running")], &[], at("2026-11-23T10:30:00Z"));
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(r.workload, "Pod/report-1");
        assert_eq!(r.phase, "Ready");
        assert_eq!(r.age_seconds, 1800);
        assert_eq!(r.expires_in_seconds, 41_400);
        assert!(r.flags.is_empty(), "{:?}", r.flags);
        let text = table(&rows);
        assert!(text.starts_with("NAMESPACE"), "{text}");
        assert!(text.contains("ephemera-k-team-a-abc12") && text.contains("30m") && text.contains("11h"), "{text}");
    }

    #[test]
    fn identities_past_their_workload_or_expiry_are_flagged() {
        let now = at("2026-11-23T10:30:00Z");
        let over = rows(&[lease(&json!({}))], &[], &[pod("Succeeded")], &[], now);
        assert_eq!(over[0].flags, ["past-workload"]);
        let gone = rows(&[lease(&json!({}))], &[], &[], &[], now);
        assert_eq!(gone[0].flags, ["past-workload"], "its pod (uid bound) is gone");
        let replaced = pod("Running");
        let mut other = replaced.clone();
        other.metadata.uid = Some("u2".into());
        assert_eq!(rows(&[lease(&json!({}))], &[], &[other], &[], now)[0].flags, ["past-workload"]);
        // A pod not created yet is not flagged within the grace period.
        let young = lease(
            &json!({"spec": {"holder": {"uid": null}}, "metadata": {"creationTimestamp": "2026-11-23T10:29:30Z"}}),
        );
        assert!(rows(&[young], &[], &[], &[], now)[0].flags.is_empty());
        let expired = rows(&[lease(&json!({}))], &[], &[pod("Running")], &[], at("2026-11-23T23:00:00Z"));
        assert_eq!(expired[0].flags, ["expired"]);
        assert!(expired[0].expires_in_seconds < 0);
        assert_eq!(short_duration(expired[0].expires_in_seconds), "-60m");
    }

    #[test]
    fn stuck_and_failing_reaps_are_flagged() {
        let now = at("2026-11-23T10:30:00Z");
        let stuck = lease(&json!({"status": {"phase": "Provisioning"}}));
        assert_eq!(rows(&[stuck], &[], &[pod("Running")], &[], now)[0].flags, ["stuck"]);
        let reaping = lease(
            &json!({"metadata": {"deletionTimestamp": "2026-11-23T10:25:00Z", "finalizers": ["ephemera.dev/reaper"]}}),
        );
        let row = &rows(&[reaping], &[], &[pod("Succeeded")], &[], now)[0];
        assert_eq!(row.phase, "Reaping");
        assert_eq!(row.flags, ["past-workload", "reap-failing"]);
    }

    #[test]
    fn broad_identities_are_flagged() {
        let now = at("2026-11-23T10:30:00Z");
        let broad = identity(&json!([
            {"actions": ["s3:*"], "resources": ["*"]},
            {"effect": "Deny", "actions": ["*"], "resources": ["*"]},
        ]));
        assert_eq!(
            rows(&[lease(&json!({}))], &[broad], &[pod("Running")], &[], now)[0].flags,
            ["wildcard-action", "wildcard-resource"]
        );
        let deny_only = identity(&json!([{"effect": "Deny", "actions": ["*"], "resources": ["arn:aws:s3:::b"]}]));
        assert!(rows(&[lease(&json!({}))], &[deny_only], &[pod("Running")], &[], now)[0].flags.is_empty());
    }

    #[test]
    fn job_leases_follow_their_job() {
        let now = at("2026-11-23T10:30:00Z");
        let l = lease(&json!({"spec": {"holder": {"kind": "Job", "name": "nightly", "uid": "j1"}}}));
        let job = |done: bool| -> Job {
            let conditions = if done { json!([{"type": "Complete", "status": "True"}]) } else { json!([]) };
            serde_json::from_value(json!({"metadata": {"name": "nightly", "namespace": "team-a", "uid": "j1"},
                                          "status": {"conditions": conditions}}))
            .unwrap()
        };
        assert!(rows(std::slice::from_ref(&l), &[], &[], &[job(false)], now)[0].flags.is_empty());
        assert_eq!(rows(&[l], &[], &[], &[job(true)], now)[0].flags, ["past-workload"]);
    }
}
