//! Pod admission: decide what a new pod gets (pure: [`decide`]), make its
//! ServiceAccount and `IdentityLease` (side effects: [`provision`]), then
//! patch it ([`super::mutate`]).
//!
//! Names come from the admission request's uid, which the apiserver keeps for
//! every webhook call of one request, reinvocation included: a second call
//! lands on the same lease and ServiceAccount instead of making new ones. Job
//! pods share a lease named from the Job's uid.

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::{
    api::core::v1::{Pod, ServiceAccount},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time},
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::PostParams,
    core::{Selector, SelectorExt},
};

use super::mutate::{Admission, ResolvedIdentity};
use crate::{
    Error, Result,
    api::{
        Holder, HolderKind, IdentityBoundary, IdentityLease, IdentityLeaseSpec, Scope, WorkloadIdentity,
        well_known::{
            ANNOTATION_DEFAULT_TOKEN, ANNOTATION_OWNER, ANNOTATION_PURPOSE, DEFAULT_AUDIENCE, LABEL_IDENTITY,
            LABEL_LEASE, LABEL_MANAGED_BY, LABEL_SKIP, MANAGED_BY,
        },
    },
    cloud::naming,
    controller::workload_identity::{evaluate_under, governing_boundaries},
};

/// What the webhook knows besides the pod.
#[derive(Clone, Debug)]
pub struct Environment<'a> {
    /// Uid of the admission request (stable across reinvocation).
    pub request_uid: &'a str,
    /// The pod's namespace.
    pub namespace: &'a str,
    /// Its labels.
    pub namespace_labels: &'a BTreeMap<String, String>,
    /// Every `IdentityBoundary`, as the cache holds them (shared, not copied).
    pub boundaries: &'a [Arc<IdentityBoundary>],
    /// The `WorkloadIdentity`s of the namespace.
    pub identities: &'a [Arc<WorkloadIdentity>],
    /// The `IdentityLease`s of the namespace, looked up by name.
    pub leases: &'a dyn NamespaceLeases,
    /// AWS account, partition and cluster name for role ARNs.
    pub aws: &'a AwsTarget,
    /// Now, for lease expiry.
    pub now: Timestamp,
    /// Who asks (`request.userInfo.username`): only the Job controller's
    /// pods join a Job run's identity.
    pub requester: &'a str,
}

/// Usernames the Job controller creates pods as: its own ServiceAccount
/// (`--use-service-account-credentials`, as EKS, kubeadm and the test bed run
/// it) or the controller manager's identity.
pub const JOB_CONTROLLER_USERS: [&str; 2] =
    ["system:serviceaccount:kube-system:job-controller", "system:kube-controller-manager"];

/// Where roles are made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AwsTarget {
    /// `aws`, `aws-cn`, `aws-us-gov`.
    pub partition: String,
    /// The AWS account id.
    pub account: String,
    /// This cluster's name (tags and name digests of roles).
    pub cluster: String,
    /// The IAM path every role lives under.
    pub role_path_root: String,
}

/// What admission decided.
#[derive(Clone, Debug)]
pub enum Decision {
    /// Not a governed namespace: the pod is left exactly as it is.
    Ignore,
    /// Admit with this mutation; `lease` is what to create first (absent for
    /// pods without an identity).
    Admit { admission: Admission, lease: Option<Box<IdentityLease>>, warnings: Vec<String> },
    /// Refuse the pod, with a reason naming the field.
    Deny(String),
    /// The pod asked to be skipped (`ephemera.dev/skip`) and every governing
    /// boundary allows it: admitted unchanged.
    Skip { warnings: Vec<String> },
}

/// The pod asks to be admitted unchanged (`ephemera.dev/skip: "true"`).
#[must_use]
pub fn asks_to_skip(pod: &Pod) -> bool {
    pod.labels().get(LABEL_SKIP).map(String::as_str) == Some("true")
}

/// The `IdentityLease`s of the pod's namespace, as admission asks about
/// them: looked up by name in the cache rather than listed on every request
/// (a namespace may hold thousands).
pub trait NamespaceLeases: std::fmt::Debug + Sync {
    /// Whether a lease of this name exists.
    fn contains(&self, name: &str) -> bool;
    /// How many there are (asked only when a boundary caps them).
    fn count(&self) -> usize;
}

/// A list of lease names (tests and tools).
impl NamespaceLeases for Vec<String> {
    fn contains(&self, name: &str) -> bool {
        self.iter().any(|l| l == name)
    }

    fn count(&self) -> usize {
        self.len()
    }
}

/// Decides what `pod` gets. Pure: everything it reads is in `env`.
#[must_use]
pub fn decide(pod: &Pod, env: &Environment<'_>) -> Decision {
    let (governing, _) = governing_boundaries(env.namespace_labels, env.boundaries);
    if governing.is_empty() {
        return Decision::Ignore;
    }
    let mut warnings = Vec::new();
    let mut admission = Admission::default();

    if asks_to_skip(pod) {
        match skip(pod, &governing, env) {
            Ok(decision) => return decision,
            Err(ignored) => warnings.push(ignored),
        }
    }

    if pod.annotations().get(ANNOTATION_DEFAULT_TOKEN).map(String::as_str) == Some("keep") {
        let (keep, warning) = keep_default_token(&governing);
        admission.keep_default_token = keep;
        warnings.push(warning);
    }

    let identity = match select_identity(pod, env) {
        Ok(Some(identity)) => identity,
        Ok(None) => {
            if let Some(reason) = foreign_service_account(pod, env, None) {
                return Decision::Deny(reason);
            }
            return Decision::Admit { admission, lease: None, warnings };
        }
        Err(reason) => return Decision::Deny(reason),
    };

    let eval = evaluate_under(&identity.spec, &governing);
    if let Some(conflict) = eval.permissions_boundary_conflict {
        return Decision::Deny(format!("WorkloadIdentity {} can get no role: {conflict}", identity.name_any()));
    }
    if !eval.violations.is_empty() {
        warnings.push(format!(
            "WorkloadIdentity {} is narrowed by its boundaries ({} violation(s)); see its status",
            identity.name_any(),
            eval.violations.len()
        ));
    }
    let identity_name = identity.name_any();
    let (suffix, holder) = match holder(pod, identity, env, &mut admission, &mut warnings) {
        Ok(found) => found,
        Err(reason) => return Decision::Deny(reason),
    };
    let lease_name = naming::lease_name(&identity_name, &suffix);

    if let Some(reason) = foreign_service_account(pod, env, Some(&lease_name)) {
        return Decision::Deny(reason);
    }
    let is_new = !env.leases.contains(&lease_name);
    if is_new && let Some(reason) = over_lease_quota(&governing, env) {
        return Decision::Deny(reason);
    }

    let role_arn = match role_arn(&governing, env, &lease_name) {
        Ok(arn) => arn,
        Err(reason) => return Decision::Deny(reason),
    };
    let lifetime = governing.iter().map(|b| b.spec.max_lifetime).min().unwrap_or_default();
    let expires_at = env
        .now
        .checked_add(SignedDuration::from_secs(i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX)))
        .unwrap_or(Timestamp::MAX);

    admission.identity = Some(ResolvedIdentity {
        lease: lease_name.clone(),
        service_account: lease_name.clone(),
        role_arn: role_arn.clone(),
        session_name: naming::session_name(env.namespace, &holder.name),
        audience: if identity.spec.token.audience.is_empty() {
            DEFAULT_AUDIENCE.to_owned()
        } else {
            identity.spec.token.audience.clone()
        },
        ttl_seconds: i64::try_from(eval.token_ttl.as_secs()).unwrap_or(i64::MAX),
        kubernetes_token: identity.spec.kubernetes.as_ref().is_some_and(|k| !k.rules.is_empty()),
    });
    if let Some(reason) = admission.identity.as_ref().and_then(|identity| super::mutate::token_conflict(pod, identity))
    {
        return Decision::Deny(reason);
    }
    let annotations = pod.annotations();
    let lease = IdentityLease {
        metadata: ObjectMeta {
            name: Some(lease_name.clone()),
            namespace: Some(env.namespace.to_owned()),
            labels: Some(managed_labels(&lease_name, &identity_name)),
            // Made with the controller's finalizer: the controller's first
            // look then goes straight to provisioning, without a patch (and
            // the watch event and reconcile it costs) to add it.
            finalizers: Some(vec![crate::api::well_known::FINALIZER_REAPER.to_owned()]),
            ..ObjectMeta::default()
        },
        spec: IdentityLeaseSpec {
            holder,
            workload_identity: identity_name,
            service_account: lease_name,
            role_arn: Some(role_arn),
            expires_at: Time(expires_at),
            purpose: annotations.get(ANNOTATION_PURPOSE).cloned(),
            owner: annotations.get(ANNOTATION_OWNER).cloned(),
        },
        status: None,
    };
    Decision::Admit { admission, lease: Some(Box::new(lease)), warnings }
}

/// Who holds the identity (the pod, or its Job for scope `Job`) and the
/// suffix of the lease name. Names a `generateName` pod.
fn holder(
    pod: &Pod,
    identity: &WorkloadIdentity,
    env: &Environment<'_>,
    admission: &mut Admission,
    warnings: &mut Vec<String>,
) -> Result<(String, Holder), String> {
    if identity.spec.scope == Scope::Job {
        match job_owner(pod) {
            // Only the Job controller makes a Job's pods: anyone else can
            // write any Job's name and uid into ownerReferences, and would
            // join that run's role.
            Some(job) if JOB_CONTROLLER_USERS.contains(&env.requester) => {
                let holder = Holder { kind: HolderKind::Job, name: job.name, uid: Some(job.uid.clone()) };
                return Ok((naming::short_id(&job.uid, naming::LEASE_SUFFIX_LEN), holder));
            }
            Some(job) => warnings.push(format!(
                "metadata.ownerReferences: names Job {} but the pod was created by {}, not the Job controller: \
                 it gets an identity of its own, not the Job run's",
                job.name, env.requester
            )),
            None => warnings.push(format!(
                "WorkloadIdentity {} has scope Job but this pod has no Job owner: it gets an identity of its own",
                identity.name_any()
            )),
        }
    }
    let suffix = naming::short_id(env.request_uid, naming::LEASE_SUFFIX_LEN);
    let name = match (pod.metadata.name.as_deref(), pod.metadata.generate_name.as_deref()) {
        (Some(name), _) if !name.is_empty() => name.to_owned(),
        (_, Some(prefix)) if !prefix.is_empty() => {
            let name = format!("{prefix}{suffix}");
            admission.assign_name = Some(name.clone());
            name
        }
        _ => return Err("metadata.name: a pod needs a name or generateName".into()),
    };
    Ok((suffix, Holder { kind: HolderKind::Pod, name, uid: None }))
}

/// Makes the lease and its ServiceAccount (owned by the lease, so garbage
/// collection backs up the reaper). Both may exist already: reinvocation,
/// a retried request, or another pod of the same Job.
///
/// # Errors
/// Fails when the apiserver refuses either object; the pod is then denied.
pub async fn provision(client: &Client, lease: &IdentityLease) -> Result<()> {
    let namespace = lease.namespace().unwrap_or_default();
    let name = lease.name_any();
    let leases = Api::<IdentityLease>::namespaced(client.clone(), &namespace);
    let stored = match leases.create(&PostParams::default(), lease).await {
        Ok(created) => created,
        Err(kube::Error::Api(s)) if s.is_already_exists() => {
            let existing =
                leases.get(&name).await.map_err(Error::kube(format!("reading IdentityLease {namespace}/{name}")))?;
            // The same workload asking again (reinvocation, a retried
            // request, another pod of the same Job run) shares the lease;
            // anything else is a name collision and must never share an
            // identity: the pod is refused and its creator retries under a
            // new name.
            let same_holder = existing.spec.holder.kind == lease.spec.holder.kind
                && existing.spec.holder.name == lease.spec.holder.name
                && (lease.spec.holder.uid.is_none() || existing.spec.holder.uid == lease.spec.holder.uid);
            if existing.spec.workload_identity != lease.spec.workload_identity
                || !same_holder
                || existing.meta().deletion_timestamp.is_some()
            {
                return Err(Error::Conflict(format!(
                    "IdentityLease {namespace}/{name} exists for another workload or is being reaped; retry"
                )));
            }
            existing
        }
        Err(e) => return Err(Error::kube(format!("creating IdentityLease {namespace}/{name}"))(e)),
    };
    let owner = OwnerReference {
        api_version: "ephemera.dev/v1alpha1".into(),
        kind: "IdentityLease".into(),
        name: name.clone(),
        uid: stored.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: None,
    };
    let account = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(lease.spec.service_account.clone()),
            namespace: Some(namespace.clone()),
            labels: lease.metadata.labels.clone(),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        // Nothing mounts a token of this account but the projections ephemera adds.
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    };
    match Api::<ServiceAccount>::namespaced(client.clone(), &namespace).create(&PostParams::default(), &account).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(()),
        Err(e) => Err(Error::kube(format!("creating ServiceAccount {namespace}/{}", lease.spec.service_account))(e)),
    }
}

/// Labels on every per-workload object.
fn managed_labels(lease: &str, identity: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
        (LABEL_LEASE.to_owned(), lease.to_owned()),
        (LABEL_IDENTITY.to_owned(), identity.to_owned()),
    ])
}

/// The identity a pod asks for: by label (which must exist) or by the
/// identities' selectors (at most one may match).
fn select_identity<'a>(pod: &Pod, env: &Environment<'a>) -> Result<Option<&'a WorkloadIdentity>, String> {
    let live = || env.identities.iter().map(|wi| &**wi).filter(|wi| wi.meta().deletion_timestamp.is_none());
    if let Some(name) = pod.labels().get(LABEL_IDENTITY) {
        return live().find(|wi| wi.name_any() == *name).map(Some).ok_or_else(|| {
            format!("metadata.labels[{LABEL_IDENTITY}]: no WorkloadIdentity {name:?} in namespace {}", env.namespace)
        });
    }
    let labels = pod.labels();
    let matching: Vec<&WorkloadIdentity> = live()
        .filter(|wi| {
            wi.spec.selector.as_ref().is_some_and(|s| Selector::try_from(s.clone()).is_ok_and(|s| s.matches(labels)))
        })
        .collect();
    match matching.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one)),
        many => Err(format!(
            "metadata.labels: the pod matches several WorkloadIdentities ({}); label it {LABEL_IDENTITY}=<name> to choose",
            many.iter().map(|wi| wi.name_any()).collect::<Vec<_>>().join(", ")
        )),
    }
}

/// A pod may not borrow another workload's ServiceAccount (and with it that
/// workload's role): `serviceAccountName` naming a lease other than the one
/// this request gets is refused.
/// A pod asking to keep the default token: whether it may, and the warning
/// saying so.
fn keep_default_token(governing: &[&IdentityBoundary]) -> (bool, String) {
    let refusing: Vec<String> =
        governing.iter().filter(|b| !b.spec.allow_default_token).map(|b| b.name_any()).collect();
    if refusing.is_empty() {
        (
            true,
            format!(
                "metadata.annotations[{ANNOTATION_DEFAULT_TOKEN}]: the pod keeps the default ServiceAccount token, as its boundaries allow"
            ),
        )
    } else {
        (
            false,
            format!(
                "metadata.annotations[{ANNOTATION_DEFAULT_TOKEN}]: ignored, IdentityBoundary {} does not set allowDefaultToken; the default token is removed",
                refusing.join(", ")
            ),
        )
    }
}

/// A pod asking to be skipped: [`Decision::Skip`] (or a denial) when every
/// governing boundary allows it, else the warning saying it is ignored.
fn skip(pod: &Pod, governing: &[&IdentityBoundary], env: &Environment<'_>) -> Result<Decision, String> {
    let refusing: Vec<String> = governing.iter().filter(|b| !b.spec.allow_skip).map(|b| b.name_any()).collect();
    if !refusing.is_empty() {
        return Err(format!(
            "metadata.labels[{LABEL_SKIP}]: ignored, IdentityBoundary {} does not set allowSkip; the pod is governed as usual",
            refusing.join(", ")
        ));
    }
    // Skipped pods still may not run as another workload's account.
    if let Some(reason) = foreign_service_account(pod, env, None) {
        return Ok(Decision::Deny(reason));
    }
    let allowing: Vec<String> = governing.iter().map(|b| b.name_any()).collect();
    Ok(Decision::Skip {
        warnings: vec![format!(
            "metadata.labels[{LABEL_SKIP}]: admitted unchanged, without an identity and with the default ServiceAccount token, as IdentityBoundary {} allows",
            allowing.join(", ")
        )],
    })
}

fn foreign_service_account(pod: &Pod, env: &Environment<'_>, own: Option<&str>) -> Option<String> {
    let sa = pod.spec.as_ref()?.service_account_name.as_deref()?;
    (env.leases.contains(sa) && Some(sa) != own).then(|| {
        format!(
            "spec.serviceAccountName: {sa:?} belongs to another workload's IdentityLease; identities are not shared"
        )
    })
}

/// The ARN of the lease's role: the first governing boundary with AWS
/// settings names it (the controller makes it under the same name), under
/// a path that must lie beneath the role path root. `Err`: the denial.
fn role_arn(governing: &[&IdentityBoundary], env: &Environment<'_>, lease_name: &str) -> Result<String, String> {
    let root = env.aws.role_path_root.as_str();
    let aws = governing.iter().find_map(|b| b.spec.aws.as_ref().map(|a| (b, a)));
    let (prefix, path) = aws.map_or(("ephemera", root), |(_, a)| (a.role_name_prefix.as_str(), a.role_path.as_str()));
    if let Some((boundary, _)) = aws.filter(|_| !naming::is_under_root(path, root)) {
        return Err(format!(
            "IdentityBoundary {}'s spec.aws.rolePath {path:?} is outside ephemera's role path root {root:?} \
             (--role-path-root): roles are made only under it, where the orphan sweep finds them",
            boundary.name_any()
        ));
    }
    let role = naming::role_name(prefix, &env.aws.cluster, env.namespace, lease_name);
    Ok(naming::role_arn(&env.aws.partition, &env.aws.account, path, &role))
}

/// The namespace holds as many leases as a boundary's `maxLeases` allows.
fn over_lease_quota(governing: &[&IdentityBoundary], env: &Environment<'_>) -> Option<String> {
    let mut held = None;
    governing.iter().find_map(|b| {
        let max = usize::try_from(b.spec.max_leases?).unwrap_or(0);
        let held = *held.get_or_insert_with(|| env.leases.count());
        (held >= max).then(|| {
            format!(
                "namespace {} holds {held} IdentityLeases, the most IdentityBoundary {} allows (spec.maxLeases)",
                env.namespace,
                b.name_any()
            )
        })
    })
}

/// The Job controlling this pod, if any.
struct JobRef {
    name: String,
    uid: String,
}

fn job_owner(pod: &Pod) -> Option<JobRef> {
    pod.owner_references()
        .iter()
        .find(|o| o.kind == "Job" && o.api_version.starts_with("batch/") && o.controller == Some(true))
        .map(|o| JobRef { name: o.name.clone(), uid: o.uid.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boundary(yaml: &str) -> IdentityBoundary {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn team_a_boundary() -> IdentityBoundary {
        boundary(
            r"
apiVersion: ephemera.dev/v1alpha1
kind: IdentityBoundary
metadata: {name: team-a}
spec:
  namespaceSelector: {matchLabels: {team: a}}
  maxTokenTTL: 30m
  maxLifetime: 2h
  maxLeases: 3
  aws:
    allowedActions: ['s3:Get*']
    allowedResources: ['arn:aws:s3:::team-a-*']
    roleNamePrefix: eph
",
        )
    }

    fn identity(yaml: &str) -> WorkloadIdentity {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn report() -> WorkloadIdentity {
        identity(
            r"
apiVersion: ephemera.dev/v1alpha1
kind: WorkloadIdentity
metadata: {name: report, namespace: team-a}
spec:
  selector: {matchLabels: {app: report}}
  token: {ttl: 1h}
  aws:
    statements:
    - {effect: Allow, actions: ['s3:GetObject'], resources: ['arn:aws:s3:::team-a-logs/*']}
",
        )
    }

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).unwrap()
    }

    struct Fixture {
        labels: BTreeMap<String, String>,
        boundaries: Vec<IdentityBoundary>,
        identities: Vec<WorkloadIdentity>,
        leases: Vec<String>,
        aws: AwsTarget,
        requester: &'static str,
    }

    impl Fixture {
        fn new() -> Self {
            Fixture {
                labels: BTreeMap::from([("team".to_owned(), "a".to_owned())]),
                boundaries: vec![team_a_boundary()],
                identities: vec![report()],
                leases: vec![],
                aws: AwsTarget {
                    partition: "aws".into(),
                    account: "000000000000".into(),
                    cluster: "test".into(),
                    role_path_root: "/ephemera/".into(),
                },
                requester: JOB_CONTROLLER_USERS[0],
            }
        }

        fn decide(&self, pod: &Pod) -> Decision {
            decide(
                pod,
                &Environment {
                    request_uid: "req-1",
                    namespace: "team-a",
                    namespace_labels: &self.labels,
                    boundaries: &self.boundaries.iter().cloned().map(Arc::new).collect::<Vec<_>>(),
                    identities: &self.identities.iter().cloned().map(Arc::new).collect::<Vec<_>>(),
                    leases: &self.leases,
                    aws: &self.aws,
                    now: "2026-11-23T10:00:00Z".parse().unwrap(),
                    requester: self.requester,
                },
            )
        }
    }

    const PLAIN: &str = "
metadata: {name: p, namespace: team-a, labels: {app: report}}
spec: {containers: [{name: main, image: busybox}]}
";

    fn admitted(d: Decision) -> (Admission, Option<Box<IdentityLease>>, Vec<String>) {
        match d {
            Decision::Admit { admission, lease, warnings } => (admission, lease, warnings),
            other => panic!("expected Admit, got {other:?}"),
        }
    }

    #[test]
    fn a_pod_whose_boundaries_disagree_on_the_permissions_boundary_is_refused() {
        let mut f = Fixture::new();
        let mut second = team_a_boundary();
        second.metadata.name = Some("team-a-audit".into());
        for (b, policy) in f.boundaries.iter_mut().chain(std::iter::once(&mut second)).zip(["pb-1", "pb-2"]) {
            b.spec.aws.as_mut().unwrap().permissions_boundary_arn =
                Some(format!("arn:aws:iam::000000000000:policy/{policy}"));
        }
        f.boundaries.push(second);
        let Decision::Deny(reason) = f.decide(&pod(PLAIN)) else { panic!("admitted despite the conflict") };
        assert!(
            reason.starts_with("WorkloadIdentity report can get no role: spec.aws.permissionsBoundaryArn"),
            "{reason}"
        );
        assert!(reason.contains("team-a-audit sets arn:aws:iam::000000000000:policy/pb-2"), "{reason}");
    }

    #[test]
    fn roles_are_made_only_under_the_role_path_root() {
        let mut f = Fixture::new();
        f.boundaries[0].spec.aws.as_mut().unwrap().role_path = "/ephemera/batch/".into();
        let (admission, _, _) = admitted(f.decide(&pod(PLAIN)));
        assert!(admission.identity.unwrap().role_arn.starts_with("arn:aws:iam::000000000000:role/ephemera/batch/eph-"));
        // `/ephemera-batch/` shares the root's first characters, not its path.
        for outside in ["/ephemera-batch/", "/", "/other/ephemera/"] {
            f.boundaries[0].spec.aws.as_mut().unwrap().role_path = outside.into();
            let Decision::Deny(reason) = f.decide(&pod(PLAIN)) else { panic!("admitted under {outside}") };
            assert!(
                reason.contains(&format!("IdentityBoundary team-a's spec.aws.rolePath {outside:?} is outside")),
                "{reason}"
            );
        }
        // A root of `/` admits every path.
        f.aws.role_path_root = "/".into();
        assert!(matches!(f.decide(&pod(PLAIN)), Decision::Admit { .. }));
    }

    #[test]
    fn ungoverned_namespaces_are_left_alone() {
        let mut f = Fixture::new();
        f.labels.clear();
        assert!(matches!(f.decide(&pod(PLAIN)), Decision::Ignore));
    }

    #[test]
    fn a_matching_pod_gets_a_clamped_identity_and_a_lease() {
        let f = Fixture::new();
        let (admission, lease, warnings) = admitted(f.decide(&pod(PLAIN)));
        assert!(warnings.is_empty(), "{warnings:?}");
        let id = admission.identity.unwrap();
        let lease = lease.unwrap();
        assert_eq!(id.lease, lease.name_any());
        assert!(id.lease.starts_with("report-"), "{}", id.lease);
        assert_eq!(id.service_account, id.lease);
        assert_eq!(id.ttl_seconds, 1800, "1h capped by the boundary's 30m");
        let role = format!("eph-team-a-{}-{}", id.lease, naming::role_digest(&f.aws.cluster, "team-a", &id.lease));
        assert_eq!(id.role_arn, format!("arn:aws:iam::000000000000:role/ephemera/{role}"));
        // The controller trusts exactly what the webhook wrote.
        let mut stored = lease.clone();
        stored.metadata.namespace = Some("team-a".into());
        assert_eq!(crate::controller::lease::trusted_role(&stored, &f.aws.cluster, "000000000000"), Ok(role));
        assert_eq!(id.session_name, "team-a.p");
        assert_eq!(lease.spec.holder, Holder { kind: HolderKind::Pod, name: "p".into(), uid: None });
        assert_eq!(lease.spec.expires_at.0.to_string(), "2026-11-23T12:00:00Z");
        assert_eq!(lease.labels()[LABEL_MANAGED_BY], MANAGED_BY);
        // Same request (reinvocation): same names.
        let (again, _, _) = admitted(f.decide(&pod(PLAIN)));
        assert_eq!(again.identity.unwrap().lease, id.lease);
    }

    #[tokio::test]
    async fn a_lease_name_taken_by_another_workload_is_refused_not_shared() {
        let f = Fixture::new();
        let (_, lease, _) = admitted(f.decide(&pod(PLAIN)));
        let lease = *lease.unwrap();
        let mut theirs = serde_json::to_value(&lease).unwrap();
        theirs["metadata"]["uid"] = serde_json::json!("u-theirs");
        theirs["spec"]["holder"]["name"] = serde_json::json!("another-pod");
        let (client, mut apiserver) = crate::test_support::fake_apiserver::client();
        let provisioning = tokio::spawn(async move { provision(&client, &lease).await });
        let conflict = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists",
                              "code": 409, "message": "identityleases.ephemera.dev already exists"});
        let path = "/apis/ephemera.dev/v1alpha1/namespaces/team-a/identityleases";
        crate::test_support::fake_apiserver::expect_status(&mut apiserver, "POST", path, 409, conflict).await;
        crate::test_support::fake_apiserver::expect(&mut apiserver, "GET", path, theirs).await;
        let err = provisioning.await.unwrap().expect_err("a collision must be refused");
        assert!(matches!(err, Error::Conflict(_)), "{err}");
        // What the pod's creator reads: what happened, not "invalid configuration".
        assert!(err.to_string().starts_with("conflict: IdentityLease team-a/"), "{err}");
        assert!(err.to_string().contains("exists for another workload"), "{err}");
    }

    #[test]
    fn generate_name_pods_are_named_by_the_webhook() {
        let f = Fixture::new();
        let p = pod("
metadata: {generateName: report-, namespace: team-a, labels: {app: report}}
spec: {containers: [{name: main}]}
");
        let (admission, lease, _) = admitted(f.decide(&p));
        let name = admission.assign_name.unwrap();
        assert!(name.starts_with("report-") && name.len() == "report-".len() + naming::LEASE_SUFFIX_LEN, "{name}");
        assert_eq!(lease.unwrap().spec.holder.name, name);
    }

    #[test]
    fn job_pods_share_one_lease_per_job_run() {
        let mut f = Fixture::new();
        f.identities[0].spec.scope = Scope::Job;
        let job_pod = |name: &str| {
            pod(&format!(
                "
metadata:
  name: {name}
  namespace: team-a
  labels: {{app: report}}
  ownerReferences: [{{apiVersion: batch/v1, kind: Job, name: nightly, uid: job-uid-1, controller: true}}]
spec: {{containers: [{{name: main}}]}}
"
            ))
        };
        let (a, la, _) = admitted(f.decide(&job_pod("nightly-abc")));
        let (b, _, _) = admitted(f.decide(&job_pod("nightly-def")));
        let job_lease = a.identity.unwrap().lease;
        assert_eq!(job_lease, b.identity.unwrap().lease);
        assert_eq!(
            la.unwrap().spec.holder,
            Holder { kind: HolderKind::Job, name: "nightly".into(), uid: Some("job-uid-1".into()) }
        );
        // A Job-scoped identity on a bare pod: its own identity, with a warning.
        let (_, lease, warnings) = admitted(f.decide(&pod(PLAIN)));
        assert_eq!(lease.unwrap().spec.holder.kind, HolderKind::Pod);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        // The controller manager's own identity makes a Job's pods too.
        f.requester = JOB_CONTROLLER_USERS[1];
        let (c, _, _) = admitted(f.decide(&job_pod("nightly-ghi")));
        assert_eq!(c.identity.unwrap().lease, job_lease);
        // Anyone else naming the Job in ownerReferences: a pod of its own.
        f.requester = "mallory";
        let (forged, lease, warnings) = admitted(f.decide(&job_pod("nightly-forged")));
        assert_ne!(forged.identity.unwrap().lease, job_lease);
        assert_eq!(
            lease.unwrap().spec.holder,
            Holder { kind: HolderKind::Pod, name: "nightly-forged".into(), uid: None }
        );
        assert!(warnings[0].contains("created by mallory, not the Job controller"), "{warnings:?}");
    }

    #[test]
    fn explicit_identity_labels_must_exist_and_ambiguity_is_refused() {
        let mut f = Fixture::new();
        let p = pod("
metadata: {name: p, namespace: team-a, labels: {ephemera.dev/identity: nope}}
spec: {containers: [{name: main}]}
");
        let Decision::Deny(reason) = f.decide(&p) else { panic!("must deny") };
        assert!(reason.starts_with("metadata.labels[ephemera.dev/identity]: no WorkloadIdentity \"nope\""), "{reason}");

        let mut twin = report();
        twin.metadata.name = Some("twin".into());
        f.identities.push(twin);
        let Decision::Deny(reason) = f.decide(&pod(PLAIN)) else { panic!("must deny") };
        assert!(reason.contains("several WorkloadIdentities (report, twin)"), "{reason}");
    }

    #[test]
    fn pods_without_identity_only_lose_the_default_token() {
        let f = Fixture::new();
        let (admission, lease, _) = admitted(f.decide(&pod("
metadata: {name: p, namespace: team-a}
spec: {containers: [{name: main}]}
")));
        assert_eq!(admission, Admission::default());
        assert!(lease.is_none());
    }

    #[test]
    fn keeping_the_default_token_needs_every_boundary_to_allow_it() {
        let mut f = Fixture::new();
        let p = pod("
metadata: {name: p, namespace: team-a, annotations: {ephemera.dev/default-token: keep}}
spec: {containers: [{name: main}]}
");
        let (admission, _, warnings) = admitted(f.decide(&p));
        assert!(!admission.keep_default_token);
        assert!(
            warnings[0].contains("ignored, IdentityBoundary team-a does not set allowDefaultToken"),
            "{warnings:?}"
        );
        f.boundaries[0].spec.allow_default_token = true;
        let (admission, _, _) = admitted(f.decide(&p));
        assert!(admission.keep_default_token);
    }

    #[test]
    fn skipping_needs_every_boundary_to_allow_it_and_never_lends_a_lease_account() {
        let mut f = Fixture::new();
        let p = pod("
metadata: {name: p, namespace: team-a, labels: {app: report, ephemera.dev/skip: 'true'}}
spec: {containers: [{name: main}]}
");
        // Not allowed: governed as usual (this pod matches an identity).
        let (admission, lease, warnings) = admitted(f.decide(&p));
        assert!(admission.identity.is_some() && lease.is_some());
        assert!(warnings[0].contains("ignored, IdentityBoundary team-a does not set allowSkip"), "{warnings:?}");
        // Allowed: unchanged, with a warning that says why.
        f.boundaries[0].spec.allow_skip = true;
        let Decision::Skip { warnings } = f.decide(&p) else { panic!("must skip") };
        assert!(warnings[0].contains("admitted unchanged") && warnings[0].contains("team-a"), "{warnings:?}");
        // Any other value is not a request to skip.
        let other = pod("
metadata: {name: p, namespace: team-a, labels: {app: report, ephemera.dev/skip: 'yes'}}
spec: {containers: [{name: main}]}
");
        assert!(matches!(f.decide(&other), Decision::Admit { .. }));
        // A skipped pod still may not run as a lease's ServiceAccount.
        f.leases.push("report-zzzzz".into());
        let thief = pod("
metadata: {name: p, namespace: team-a, labels: {ephemera.dev/skip: 'true'}}
spec: {serviceAccountName: report-zzzzz, containers: [{name: main}]}
");
        let Decision::Deny(reason) = f.decide(&thief) else { panic!("must deny") };
        assert!(reason.contains("belongs to another workload's IdentityLease"), "{reason}");
    }

    #[test]
    fn another_workloads_service_account_is_refused() {
        let mut f = Fixture::new();
        f.leases.push("report-zzzzz".into());
        let p = pod("
metadata: {name: p, namespace: team-a}
spec: {serviceAccountName: report-zzzzz, containers: [{name: main}]}
");
        let Decision::Deny(reason) = f.decide(&p) else { panic!("must deny") };
        assert!(reason.starts_with("spec.serviceAccountName: \"report-zzzzz\" belongs to another"), "{reason}");
    }

    #[test]
    fn max_leases_is_enforced_for_new_leases_only() {
        let mut f = Fixture::new();
        f.leases = vec!["a".into(), "b".into(), "c".into()];
        let Decision::Deny(reason) = f.decide(&pod(PLAIN)) else { panic!("must deny") };
        assert!(reason.contains("holds 3 IdentityLeases, the most IdentityBoundary team-a allows"), "{reason}");
        // Reinvocation of an admitted pod: its lease already counts.
        let (admission, _, _) = admitted(Fixture::new().decide(&pod(PLAIN)));
        f.leases[0] = admission.identity.unwrap().lease;
        assert!(matches!(f.decide(&pod(PLAIN)), Decision::Admit { .. }));
    }
}
