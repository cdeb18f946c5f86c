//! Provisioning: the lease's role made (or brought to its identity's
//! current policy), proven with STS through a token of the pod's own
//! ServiceAccount, its RBAC applied, and the pod's scheduling gate lifted.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    api::{
        authentication::v1::{TokenRequest, TokenRequestSpec},
        core::v1::{Pod, ServiceAccount},
        rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
    runtime::{
        controller::Action,
        events::{Event, EventType},
    },
};
use serde_json::json;

use super::{
    Cloud, Holder, LeaseContext, Made,
    end_of_life::{end_reason, lease_age, next_look, workload_ended_at},
    owned_by, owner_ref, publish, read_trusting_cache_if,
    reap::start_reaping,
    refuse, role_owner,
    rotate::rotate_if_due,
    trusted_role, write_status,
};
use crate::{
    Error, Result,
    api::{
        HolderKind, IdentityBoundary, IdentityLease, LeasePhase, WorkloadIdentity,
        well_known::{FIELD_MANAGER, LABEL_LEASE, LABEL_MANAGED_BY, MANAGED_BY, SCHEDULING_GATE},
    },
    cloud::{
        aws::{self, RoleSpec, Verdict},
        naming, revocation_sets,
    },
    controller::workload_identity::{cached_namespace_and_boundaries, evaluate, policy_digest},
};

/// How often a role that is not assumable yet (IAM propagation) is retried.
pub(super) const VERIFY_RETRY: Duration = Duration::from_millis(500);
/// The lease's ServiceAccount as the apiserver has it now (read beside the
/// holder, before anything is made for it).
async fn read_service_account(lease: &IdentityLease, ctx: &LeaseContext) -> Result<Option<ServiceAccount>> {
    let namespace = lease.namespace().unwrap_or_default();
    let accounts = Api::<ServiceAccount>::namespaced(ctx.base.client.clone(), &namespace);
    read_trusting_cache_if(&accounts, &lease.spec.service_account, |sa| owned_by(sa, lease))
        .await
        .map_err(Error::kube(format!("reading ServiceAccount {namespace}/{}", lease.spec.service_account)))
}

/// The lease's ServiceAccount must be the one the webhook made for it
/// (owned by the lease's uid): someone else's of that name is never bound
/// to or deleted. `Some`: what to do instead of provisioning.
pub(super) async fn check_service_account(
    lease: &IdentityLease,
    ctx: &LeaseContext,
    found: Option<ServiceAccount>,
) -> Result<Option<Action>> {
    match found {
        Some(sa) if owned_by(&sa, lease) => Ok(None),
        Some(_) => {
            let why = format!(
                "ServiceAccount {}/{} is not owned by this lease: it was not made for it",
                lease.namespace().unwrap_or_default(),
                lease.spec.service_account
            );
            refuse(lease, ctx, why).await.map(Some)
        }
        // The webhook makes it right after the lease: look again shortly.
        None => Ok(Some(Action::requeue(VERIFY_RETRY))),
    }
}

pub(super) async fn apply(lease: &IdentityLease, ctx: &LeaseContext) -> Result<Action> {
    let client = &ctx.base.client;
    let namespace = lease.namespace().unwrap_or_default();
    let name = lease.name_any();
    let now = Timestamp::now();

    let seen_version = ctx
        .seen_pods
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&(namespace.clone(), name.clone()))
        .cloned();
    let seen = seen_version.is_some();
    let status = lease.status.clone().unwrap_or_default();
    let ready = status.phase == Some(LeasePhase::Ready)
        || lease
            .uid()
            .is_some_and(|uid| ctx.ready.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains(&uid));
    // The reads this pass needs, at once: the identity (when not cached
    // yet, the apiserver decides whether it exists), the holder, and, for a
    // lease still to provision, its ServiceAccount.
    let identity = async {
        match ctx.identity(lease) {
            Some(identity) => Ok(Some(WorkloadIdentity::clone(&identity))),
            None => Api::<WorkloadIdentity>::namespaced(client.clone(), &namespace)
                .get_opt(&lease.spec.workload_identity)
                .await
                .map_err(Error::kube(format!("reading WorkloadIdentity {namespace}/{}", lease.spec.workload_identity))),
        }
    };
    let account = async { if ready { Ok(None) } else { read_service_account(lease, ctx).await.map(Some) } };
    let (identity, holder, account) =
        tokio::try_join!(identity, Holder::read(lease, client, seen_version.as_deref()), account)?;
    if let Some(reason) = end_reason(lease, identity.as_ref(), &holder, now, seen) {
        // (A refused lease goes too, and its reap touches nothing it names.)
        return start_reaping(lease, ctx, &reason, workload_ended_at(lease, &holder, now)).await;
    }
    let role_name = match trusted_role(lease, &ctx.cloud.cluster, &ctx.cloud.account) {
        Ok(role) => role,
        Err(why) => return refuse(lease, ctx, why).await,
    };
    let Some(identity) = identity else { return Ok(Action::await_change()) };

    if ready {
        let uid_bound = bind_holder_uid(lease, client, &holder).await?;
        // Pods of a Job may arrive after the first one: lift their gates too.
        lift_gates(lease, ctx, uid_bound, &holder).await?;
        if status.phase == Some(LeasePhase::Ready) && identity_moved(&status, &identity) {
            follow_policy(lease, ctx, &identity, &role_name).await?;
        }
        let next = next_look(lease, &holder, &ctx.cloud.rotation, now);
        return Ok(match rotate_if_due(lease, ctx, &holder, now).await? {
            Some(retry) => Action::requeue(retry.min(next)),
            None => Action::requeue(next),
        });
    }

    // No "Provisioning" write on the way: a lease whose role is made and
    // proven in one pass goes from Pending to Ready (one status write, one
    // reconcile fewer per pod); Provisioning shows while something waits.
    let role_arn = lease.spec.role_arn.clone().unwrap_or_default(); // checked by `trusted_role`
    if let Some(wait) = check_service_account(lease, ctx, account.flatten()).await? {
        return Ok(wait);
    }
    let (spec, rules, digest) = match role_spec(lease, &identity, &role_arn, &role_name, ctx).await {
        Ok(found) => found,
        Err(e) => {
            write_status(lease, ctx, LeasePhase::Provisioning, None, Some(&e), "cannot provision", None).await?;
            return Err(e);
        }
    };
    // A replica that no longer leads makes nothing (see `Fence`).
    if let Some(fence) = &ctx.base.fence {
        fence.check().await?;
    }
    // The role exists after this (unless making it failed). Every way out of
    // here either confirms the lease was still live after the role was made
    // (the Ready status write answers with the lease) or asks the apiserver;
    // a lease gone or being deleted by then was reaped while the role was
    // being made (by another replica, while this one was frozen past its
    // leadership), and its role would otherwise wait for the sweep.
    let role = RolePlan { spec: &spec, rules: &rules, digest, arn: &role_arn };
    let outcome = Box::pin(make_and_prove(lease, ctx, &identity, role, &holder)).await?;
    let live = match &outcome {
        Ok(Proven::Ready { deleting }) => !deleting,
        // Cannot tell (apiserver unreachable): keep the role, report the
        // original outcome; the lease is looked at again (or swept).
        Ok(Proven::Waiting) | Err(_) => still_live(lease, ctx).await.unwrap_or(true),
    };
    if !live {
        ctx.cloud.provider.revoke_and_delete(&spec.name, &spec.owner).await?;
        tracing::warn!(
            namespace,
            lease = name,
            role = spec.name,
            "the lease was reaped while its role was being made; role deleted"
        );
        return Ok(Action::await_change());
    }
    match outcome? {
        Proven::Waiting => Ok(Action::requeue(VERIFY_RETRY)),
        Proven::Ready { .. } => {
            if let Some(uid) = lease.uid() {
                ctx.ready.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(uid);
            }
            // From the pod's creation, as the user sees it (the lease's, made in
            // the same admission call, for a Job run), to the gate lifted.
            let pod_created = holder.pod_of(lease).and_then(|p| p.meta().creation_timestamp.clone());
            if let Some(created) = pod_created.or_else(|| lease.meta().creation_timestamp.clone()) {
                let took = Timestamp::now().duration_since(created.0).as_secs_f64().max(0.0);
                ctx.base.metrics.provision_latency.observe(took);
            }
            // (The pod's `IdentityReady` Event, naming the lease, says it
            // where users look; the lease's Ready condition records it.)
            tracing::info!(namespace, lease = name, role = role_arn, "lease ready");
            Ok(Action::requeue(next_look(lease, &holder, &ctx.cloud.rotation, now)))
        }
    }
}

/// What a lease's role is made of (see [`role_spec`]).
struct RolePlan<'a> {
    spec: &'a RoleSpec,
    rules: &'a [crate::api::KubernetesRule],
    digest: String,
    arn: &'a str,
}

/// Makes the role and proves it. What depends on nothing else goes at once:
/// the role, the pod's uid recorded on the lease (before its gate can go),
/// a token of the pod's account to prove the role with, and the RBAC.
/// `Err`: the role could not be made; else how far proving it got.
async fn make_and_prove(
    lease: &IdentityLease,
    ctx: &LeaseContext,
    identity: &WorkloadIdentity,
    role: RolePlan<'_>,
    holder: &Holder,
) -> Result<Result<Proven>> {
    let client = &ctx.base.client;
    let namespace = lease.namespace().unwrap_or_default();
    let (made, uid_bound, token, rbac) = tokio::join!(
        make_role(lease, ctx, role.spec, &role.digest),
        bind_holder_uid(lease, client, holder),
        token_for(client, &namespace, &lease.spec.service_account, &identity.spec.token.audience),
        ensure_rbac(lease, client, role.rules),
    );
    let made = Made::of(made?, role.arn, &ctx.cloud, role.digest);
    Ok(match (uid_bound, token, rbac) {
        (Ok(uid_bound), Ok(token), Ok(())) => {
            prove_and_lift(lease, ctx, identity, &made, &token, uid_bound, holder).await
        }
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => Err(e),
    })
}

impl Made {
    /// What the Ready status records of a role with permissions boundary
    /// `boundary` (the one IAM says it has), made from the policy of
    /// `policy_digest`: its ARN, its revocation set when that is its
    /// boundary, and the digest.
    fn of(boundary: Option<String>, role_arn: &str, cloud: &Cloud, policy_digest: String) -> Made {
        let revocation_set = boundary.filter(|pb| cloud.revocation_sets.as_ref().is_some_and(|s| s.is_set(pb)));
        Made { role_arn: role_arn.to_owned(), revocation_set, policy_digest }
    }
}

/// How far [`prove_and_lift`] got.
pub(super) enum Proven {
    /// STS accepts the pod's token: gates lifted, Ready written; whether the
    /// lease, as that write returned it, is being deleted.
    Ready { deleting: bool },
    /// STS does not accept the role yet (IAM propagation): look again soon.
    Waiting,
}

/// With the role made and the RBAC applied: Ready only once STS really
/// accepts `token` (one of the pod's account); then the gates go.
pub(super) async fn prove_and_lift(
    lease: &IdentityLease,
    ctx: &LeaseContext,
    identity: &WorkloadIdentity,
    made: &Made,
    token: &str,
    uid_bound: bool,
    holder: &Holder,
) -> Result<Proven> {
    let (role_arn, digest) = (made.role_arn.as_str(), made.policy_digest.as_str());
    let namespace = lease.namespace().unwrap_or_default();
    let session = naming::session_name(&namespace, &format!("ephemera-verify-{}", lease.name_any()));
    if let Verdict::Refused { code, message } = ctx.cloud.provider.verify(role_arn, &session, token).await? {
        if let Some(e) = refusal_error(lease, &ctx.cloud, identity, &code, &message) {
            write_status(lease, ctx, LeasePhase::Provisioning, None, Some(&e), "role made; STS refuses it", None)
                .await?;
            publish(ctx, lease, EventType::Warning, e.reason(), e.to_string()).await;
            return Err(e);
        }
        tracing::debug!(lease = %lease.name_any(), code, "STS does not accept the new role yet");
        let status = lease.status.clone().unwrap_or_default();
        if status.phase != Some(LeasePhase::Provisioning) || status.policy_digest.as_deref() != Some(digest) {
            let waiting = "role made; waiting for STS to accept it (IAM propagation)";
            write_status(lease, ctx, LeasePhase::Provisioning, None, None, waiting, Some(digest)).await?;
        }
        return Ok(Proven::Waiting);
    }
    // Both at once: a gate that failed to go is lifted by the next pass,
    // which finds the lease Ready.
    let ready = write_status(lease, ctx, LeasePhase::Ready, Some(made), None, "role verified usable", Some(digest));
    let ((), written) = tokio::try_join!(lift_gates(lease, ctx, uid_bound, holder), ready)?;
    Ok(Proven::Ready { deleting: written.meta().deletion_timestamp.is_some() })
}

/// Makes the role, or brings it to `spec`. A role made and brought to this
/// policy on an earlier pass (waiting for STS to accept it) is not rewritten
/// on every retry (rewriting its trust policy would only restart IAM's
/// propagation): one read tells that it is still there and ours. Returns
/// the permissions boundary the role has (made before, it keeps its own).
pub(super) async fn make_role(
    lease: &IdentityLease,
    ctx: &LeaseContext,
    spec: &RoleSpec,
    digest: &str,
) -> Result<Option<String>> {
    let status = lease.status.clone().unwrap_or_default();
    if status.phase == Some(LeasePhase::Provisioning)
        && status.policy_digest.as_deref() == Some(digest)
        && let Some(boundary) = ctx.cloud.provider.owned_role_boundary(&spec.name, &spec.owner).await?
    {
        tracing::debug!(lease = %lease.name_any(), "role made on an earlier pass; proving it again");
        return Ok(boundary);
    }
    match ctx.cloud.provider.provision(spec).await {
        Ok((_, boundary)) => Ok(boundary),
        Err(e) => {
            write_status(lease, ctx, LeasePhase::Provisioning, None, Some(&e), "cannot provision", None).await?;
            let reason = match e.reason() {
                "Error" => "ProvisionFailed",
                named => named,
            };
            publish(ctx, lease, EventType::Warning, reason, e.to_string()).await;
            Err(e)
        }
    }
}

/// Whether the identity's effective permissions differ from those the
/// lease's role was made from. (An identity its controller has not digested
/// yet has nothing to follow: the role was made from the same clamp.)
fn identity_moved(status: &crate::api::IdentityLeaseStatus, identity: &WorkloadIdentity) -> bool {
    digest_of(identity).is_some_and(|d| status.policy_digest.as_deref() != Some(d))
}

/// The identity's effective permissions, as its controller digested them
/// (`status.effective.policyDigest`); `None` until it has.
pub(super) fn digest_of(identity: &WorkloadIdentity) -> Option<&str> {
    identity.status.as_ref()?.effective.as_ref()?.policy_digest.as_deref()
}

/// Brings a live role's policies and the lease's RBAC to what the identity
/// and its boundaries allow now (a boundary or identity changed), records
/// the digest and says so in an Event.
pub(super) async fn follow_policy(
    lease: &IdentityLease,
    ctx: &LeaseContext,
    identity: &WorkloadIdentity,
    role_name: &str,
) -> Result<()> {
    let role_arn = lease.spec.role_arn.clone().unwrap_or_default(); // checked by `trusted_role`
    let (spec, rules, digest) = match role_spec(lease, identity, &role_arn, role_name, ctx).await {
        Ok(found) => found,
        Err(e) => {
            // The live role keeps the permissions it has; the user is told why
            // they do not follow (the reconcile backs off and tries again).
            let note = format!("the role keeps its permissions as they were: {e}");
            publish(ctx, lease, EventType::Warning, e.reason(), note).await;
            return Err(e);
        }
    };
    if let Some(fence) = &ctx.base.fence {
        fence.check().await?;
    }
    let first = lease.status.as_ref().and_then(|s| s.policy_digest.as_ref()).is_none();
    if !first {
        // (A lease made before digests were recorded adopts the current one:
        // its role was made from it.)
        ctx.cloud.provider.update_permissions(&spec).await?;
        if rules.is_empty() {
            // Every rule was taken away (from the identity, or by a
            // boundary): the Role and its binding go, not just stay as
            // they were.
            remove_rbac(lease, &ctx.base.client).await?;
        } else {
            ensure_rbac(lease, &ctx.base.client, &rules).await?;
        }
    }
    let note = format!(
        "the role's permissions follow WorkloadIdentity {} as its boundaries allow now (policy digest {})",
        identity.name_any(),
        digest.chars().take(12).collect::<String>()
    );
    write_status(lease, ctx, LeasePhase::Ready, None, None, &note, Some(&digest)).await?;
    if !first {
        tracing::info!(lease = %lease.name_any(), role = role_name, "re-applied the role's permissions");
        publish(ctx, lease, EventType::Normal, "PolicyUpdated", note).await;
    }
    Ok(())
}

/// What STS refusing a lease's role means: `None` while IAM may still be
/// propagating it (`AccessDenied` and the like, within the window), else the
/// error a user can act on. A missing IAM OIDC provider (the commonest setup
/// mistake on a new account) is named at once, with the ARN to create.
pub(super) fn refusal_error(
    lease: &IdentityLease,
    cloud: &Cloud,
    identity: &WorkloadIdentity,
    code: &str,
    message: &str,
) -> Option<Error> {
    let age = lease_age(lease, Timestamp::now());
    let subject =
        format!("system:serviceaccount:{}:{}", lease.namespace().unwrap_or_default(), lease.spec.service_account);
    match code {
        "InvalidIdentityToken" => Some(Error::TokenRejected(format!(
            "STS rejects the pod's token ({message}); the account needs the IAM OIDC provider {} for the issuer \
             https://{} with client ID {}",
            cloud.provider_arn, cloud.issuer_host, identity.spec.token.audience
        ))),
        code if crate::error::THROTTLING_CODES.contains(&code) => {
            Some(Error::Cloud { operation: "AssumeRoleWithWebIdentity", message: format!("{code}: {message}") })
        }
        _ if age < cloud.propagation_window => None,
        "AccessDenied" => Some(Error::TrustDenied(format!(
            "STS still refuses the role {} after {}s ({message}); its trust policy admits only {} with sub {subject} \
             and aud {}: check the token's issuer and audience, and any SCP or permissions boundary on \
             sts:AssumeRoleWithWebIdentity",
            lease.spec.role_arn.as_deref().unwrap_or_default(),
            age.as_secs(),
            cloud.provider_arn,
            identity.spec.token.audience
        ))),
        _ => Some(Error::Cloud {
            operation: "AssumeRoleWithWebIdentity",
            message: format!("{code}: {message} (still, {}s after the lease was made)", age.as_secs()),
        }),
    }
}

/// Whether the lease still exists as this reconciliation knew it (same uid)
/// and is not being deleted. (Its Role and RoleBinding need no such care:
/// they are owned by the lease, and the garbage collector removes them.)
pub(super) async fn still_live(lease: &IdentityLease, ctx: &LeaseContext) -> Result<bool> {
    let now = Api::<IdentityLease>::namespaced(ctx.base.client.clone(), &lease.namespace().unwrap_or_default())
        .get_opt(&lease.name_any())
        .await
        .map_err(Error::kube(format!("checking that IdentityLease {} is still live", lease.name_any())))?;
    Ok(now.is_some_and(|now| now.uid() == lease.uid() && now.meta().deletion_timestamp.is_none()))
}

/// What the role is made of: the identity clamped to today's boundaries,
/// its Kubernetes rules, and the policy digest the lease records: the
/// identity's, as its controller wrote it, or, for an identity made a moment
/// ago that it has not digested yet, that of this clamp (the same function
/// of the same inputs), so a Ready lease always says what its role was made
/// from.
pub(super) async fn role_spec(
    lease: &IdentityLease,
    identity: &WorkloadIdentity,
    role_arn: &str,
    role_name: &str,
    ctx: &LeaseContext,
) -> Result<(RoleSpec, Vec<crate::api::KubernetesRule>, String)> {
    let namespace = lease.namespace().unwrap_or_default();
    let (labels, boundaries) = cached_namespace_and_boundaries(&ctx.base, &namespace).await?;
    let eval = evaluate(&identity.spec, &labels, &boundaries);
    if eval.governing.is_empty() {
        return Err(Error::NotGoverned(format!("namespace {namespace} is governed by no IdentityBoundary")));
    }
    if let Some(conflict) = eval.permissions_boundary_conflict {
        return Err(Error::PermissionsBoundaryConflict(conflict));
    }
    let governing: Vec<&IdentityBoundary> =
        boundaries.iter().filter(|b| eval.governing.contains(&b.name_any())).collect();
    let max_session = governing
        .iter()
        .filter_map(|b| b.spec.aws.as_ref().map(|a| Duration::from_secs(a.max_session_duration.as_secs())))
        .min()
        .unwrap_or(Duration::from_hours(1));
    // The path is the boundary's at admission (recorded in the ARN); the
    // name is the one `trusted_role` derived.
    let (path, _) = naming::split_role_arn(role_arn)
        .ok_or_else(|| Error::LeaseRefused(format!("spec.roleArn {role_arn:?} is not a role ARN")))?;
    let allowed: Vec<_> = eval.statements.iter().filter(|s| !s.actions.is_empty()).cloned().collect();
    let mut tags = vec![
        ("ephemera.dev/workload-identity".to_owned(), lease.spec.workload_identity.clone()),
        ("ephemera.dev/expires-at".to_owned(), lease.spec.expires_at.0.to_string()),
    ];
    if let Some(owner) = &lease.spec.owner {
        tags.push(("ephemera.dev/owner".to_owned(), owner.chars().take(256).collect()));
    }
    // A role takes one permissions boundary: the boundaries' own, or else
    // this cluster's revocation set for the lease's key (one write revokes
    // every role that ended since the last).
    let permissions_boundary = match (eval.permissions_boundary_arns.first(), &ctx.cloud.revocation_sets, lease.uid()) {
        (Some(own), _, _) => Some(own.clone()),
        (None, Some(sets), Some(uid)) => {
            let key = revocation_sets::key_of(&uid);
            let arn = sets.arn_for(&key).to_owned();
            tags.push((revocation_sets::TAG_REVOCATION.to_owned(), key));
            Some(arn)
        }
        (None, _, _) => None,
    };
    let spec = RoleSpec {
        name: role_name.to_owned(),
        path,
        owner: role_owner(lease, ctx),
        trust_policy: aws::trust_policy(
            &ctx.cloud.provider_arn,
            &ctx.cloud.issuer_host,
            &namespace,
            &lease.spec.service_account,
            &identity.spec.token.audience,
        ),
        policy: (!allowed.is_empty()).then(|| aws::permissions_policy(&allowed)),
        managed_policy_arns: eval.managed_policy_arns.clone(),
        // At most one: several are refused above.
        permissions_boundary,
        max_session,
        tags,
    };
    // Kubernetes rules outside a boundary are dropped, as AWS statements are.
    let digest = digest_of(identity).map_or_else(|| policy_digest(&eval), str::to_owned);
    let rules = eval.kubernetes_rules;
    Ok((spec, rules, digest))
}

/// Role + RoleBinding for the identity's Kubernetes rules, owned by the lease.
pub(super) async fn ensure_rbac(
    lease: &IdentityLease,
    client: &Client,
    rules: &[crate::api::KubernetesRule],
) -> Result<()> {
    if rules.is_empty() {
        return Ok(());
    }
    let namespace = lease.namespace().unwrap_or_default();
    let name = lease.name_any();
    let meta = ObjectMeta {
        name: Some(name.clone()),
        namespace: Some(namespace.clone()),
        labels: Some(BTreeMap::from([
            (LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
            (LABEL_LEASE.to_owned(), name.clone()),
        ])),
        owner_references: Some(vec![owner_ref(lease)]),
        ..ObjectMeta::default()
    };
    let role = Role {
        metadata: meta.clone(),
        rules: Some(
            rules
                .iter()
                .map(|r| PolicyRule {
                    api_groups: Some(r.api_groups.clone()),
                    resources: Some(r.resources.clone()),
                    resource_names: (!r.resource_names.is_empty()).then(|| r.resource_names.clone()),
                    verbs: r.verbs.clone(),
                    non_resource_urls: None,
                })
                .collect(),
        ),
    };
    let binding = RoleBinding {
        metadata: meta,
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name: name.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: lease.spec.service_account.clone(),
            namespace: Some(namespace.clone()),
            api_group: None,
        }]),
    };
    let params = PatchParams::apply(FIELD_MANAGER).force();
    Api::<Role>::namespaced(client.clone(), &namespace)
        .patch(&name, &params, &Patch::Apply(&role))
        .await
        .map_err(Error::kube(format!("applying Role {namespace}/{name}")))?;
    Api::<RoleBinding>::namespaced(client.clone(), &namespace)
        .patch(&name, &params, &Patch::Apply(&binding))
        .await
        .map_err(Error::kube(format!("applying RoleBinding {namespace}/{name}")))?;
    Ok(())
}

/// Deletes the lease's RoleBinding and Role, if it has them (owned by the
/// lease: checked by uid before each delete).
pub(super) async fn remove_rbac(lease: &IdentityLease, client: &Client) -> Result<()> {
    let name = lease.name_any();
    super::reap::delete_if_owned::<RoleBinding>(client, lease, &name, false).await?;
    super::reap::delete_if_owned::<Role>(client, lease, &name, false).await
}

/// A short-lived token of the pod's ServiceAccount, as the kubelet projects it.
pub(super) async fn token_for(
    client: &Client,
    namespace: &str,
    service_account: &str,
    audience: &str,
) -> Result<String> {
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![audience.to_owned()]),
            expiration_seconds: Some(600),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create_token_request(service_account, &PostParams::default(), &request)
        .await
        .map_err(Error::kube(format!("requesting a token for ServiceAccount {namespace}/{service_account}")))?
        .status
        .and_then(|s| s.token)
        .ok_or_else(|| Error::Unexpected("TokenRequest returned no token".into()))
}

/// Records the pod's uid on the lease the first time the pod is seen, so a
/// later pod of the same name is not mistaken for it.
/// Returns whether the lease's pod uid is known (bound before or now).
pub(super) async fn bind_holder_uid(lease: &IdentityLease, client: &Client, holder: &Holder) -> Result<bool> {
    if lease.spec.holder.uid.is_some() || lease.spec.holder.kind != HolderKind::Pod {
        return Ok(true);
    }
    let Some(pod) = holder.pod_of(lease) else { return Ok(false) };
    bind_uid(lease, client, pod).await?;
    Ok(true)
}

/// Writes `pod`'s uid into the lease's holder (set once: CEL refuses a change).
pub(super) async fn bind_uid(lease: &IdentityLease, client: &Client, pod: &Pod) -> Result<()> {
    Api::<IdentityLease>::namespaced(client.clone(), &lease.namespace().unwrap_or_default())
        .patch(
            &lease.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"holder": {"uid": pod.uid()}}})),
        )
        .await
        .map_err(Error::kube("binding the lease to its pod's uid"))?;
    Ok(())
}

/// Removes ephemera's scheduling gate from every pod of the lease, with an
/// Event on each pod (where users look first).
/// `uid_bound`: whether the holder's uid is already recorded (else it is,
/// from the pod found here, before the gate goes).
pub(super) async fn lift_gates(
    lease: &IdentityLease,
    ctx: &LeaseContext,
    uid_bound: bool,
    holder: &Holder,
) -> Result<()> {
    let client = &ctx.base.client;
    let namespace = lease.namespace().unwrap_or_default();
    let pods = Api::<Pod>::namespaced(client.clone(), &namespace);
    let selector = format!("{LABEL_LEASE}={}", lease.name_any());
    // A pod lease has one pod, read at the start of the reconcile (the
    // patch below tests its uid, so a pod replaced since is left alone).
    let listed;
    let candidates: Vec<&Pod> = match holder {
        Holder::Pod(_) => holder.pod_of(lease).into_iter().collect(),
        Holder::Job(_) => {
            listed = pods
                .list(&ListParams::default().labels(&selector))
                .await
                .map_err(Error::kube("listing the lease's pods"))?
                .items;
            listed.iter().collect()
        }
    };
    for pod in candidates {
        let gates = pod.spec.as_ref().and_then(|s| s.scheduling_gates.as_deref()).unwrap_or_default();
        let Some(index) = gates.iter().position(|g| g.name == SCHEDULING_GATE) else { continue };
        // Record the pod's uid before it can run: if it is deleted while no
        // controller watches, the uid is what says it is gone for good.
        if !uid_bound && lease.spec.holder.kind == HolderKind::Pod {
            bind_uid(lease, client, pod).await?;
        }
        // `test` first: if the pod was replaced or its gates changed
        // meanwhile, the patch fails and the lease is looked at again.
        let patch: json_patch::Patch = serde_json::from_value(json!([
            {"op": "test", "path": "/metadata/uid", "value": pod.uid()},
            {"op": "test", "path": format!("/spec/schedulingGates/{index}/name"), "value": SCHEDULING_GATE},
            {"op": "remove", "path": format!("/spec/schedulingGates/{index}")},
        ]))
        .map_err(|e| Error::Serialization { what: "gate patch", message: e.to_string() })?;
        match pods.patch(&pod.name_any(), &PatchParams::default(), &Patch::Json::<()>(patch)).await {
            Ok(_) => {
                let ev = Event {
                    type_: EventType::Normal,
                    reason: "IdentityReady".into(),
                    note: Some(format!(
                        "IdentityLease {} verified with STS; scheduling gate {SCHEDULING_GATE} lifted",
                        lease.name_any()
                    )),
                    action: "LiftGate".into(),
                    secondary: Some(lease.object_ref(&())),
                };
                ctx.base.events.publish(&ev, &pod.object_ref(&())).await;
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                return Err(Error::kube(format!("lifting the scheduling gate of pod {namespace}/{}", pod.name_any()))(
                    e,
                ));
            }
        }
    }
    Ok(())
}
