//! AWS SDK configuration shared by the IAM and STS clients.
//!
//! Credentials, region and endpoint come from the standard AWS chain
//! (`AWS_ENDPOINT_URL`, `AWS_REGION`, web identity, IMDS, ...), so the same code
//! talks to MiniStack in tests and to real AWS in production.

use aws_config::{BehaviorVersion, SdkConfig};
use aws_smithy_http_client::{
    Builder,
    tls::{Provider, rustls_provider::CryptoMode},
};

/// Loads the AWS configuration from the environment with an HTTPS client that
/// uses rustls with the ring provider (the one kube uses), so only one crypto
/// library is compiled into the binary.
pub async fn sdk_config() -> SdkConfig {
    let http_client = Builder::new().tls_provider(Provider::Rustls(CryptoMode::Ring)).build_https();
    aws_config::defaults(BehaviorVersion::latest()).http_client(http_client).load().await
}

/// An IAM client from [`sdk_config`].
pub async fn iam_client() -> aws_sdk_iam::Client {
    aws_sdk_iam::Client::new(&sdk_config().await)
}

/// An STS client from [`sdk_config`].
pub async fn sts_client() -> aws_sdk_sts::Client {
    aws_sdk_sts::Client::new(&sdk_config().await)
}

// === Policy documents ===

use std::time::Duration;

use aws_sdk_iam::{error::ProvideErrorMetadata, types::Tag};
use serde_json::{Value, json};

use crate::{Error, Result, api::AwsStatement};

/// Name of the inline policy holding the identity's statements.
pub const POLICY_NAME: &str = "ephemera";
/// Name of the inline policy that revokes sessions issued before reaping
/// (the name AWS's console uses for the same thing).
pub const REVOKE_POLICY_NAME: &str = "AWSRevokeOlderSessions";
/// Tag naming the cluster that owns a role; the sweep looks for it.
pub const TAG_CLUSTER: &str = "ephemera.dev/cluster";
/// Tags naming the lease a role belongs to.
pub const TAG_NAMESPACE: &str = "ephemera.dev/namespace";
/// See [`TAG_NAMESPACE`].
pub const TAG_LEASE: &str = "ephemera.dev/lease";

/// The trust policy: only this ServiceAccount's tokens, for this audience,
/// from this cluster's issuer, may assume the role.
#[must_use]
pub fn trust_policy(
    provider_arn: &str,
    issuer_host: &str,
    namespace: &str,
    service_account: &str,
    audience: &str,
) -> Value {
    json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Principal": {"Federated": provider_arn},
            "Action": "sts:AssumeRoleWithWebIdentity",
            "Condition": {"StringEquals": {
                format!("{issuer_host}:sub"): format!("system:serviceaccount:{namespace}:{service_account}"),
                format!("{issuer_host}:aud"): audience,
            }},
        }],
    })
}

/// The role's inline policy from the effective (boundary-clamped) statements.
#[must_use]
pub fn permissions_policy(statements: &[AwsStatement]) -> Value {
    let statements: Vec<Value> = statements
        .iter()
        .map(|s| {
            let mut v = json!({
                "Effect": format!("{:?}", s.effect),
                "Action": s.actions,
                "Resource": s.resources,
            });
            if let Some(sid) = &s.sid {
                v["Sid"] = sid.clone().into();
            }
            if !s.conditions.is_empty() {
                v["Condition"] = json!(s.conditions);
            }
            v
        })
        .collect();
    json!({"Version": "2012-10-17", "Statement": statements})
}

/// Denies everything to sessions issued before `now` (RFC 3339): sessions
/// already handed out stop working at once, whatever their expiry.
#[must_use]
pub fn revoke_policy(now: &str) -> Value {
    json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Deny",
            "Action": "*",
            "Resource": "*",
            "Condition": {"DateLessThan": {"aws:TokenIssueTime": now}},
        }],
    })
}

// === The provider ===

/// What a role is made from.
#[derive(Clone, Debug)]
pub struct RoleSpec {
    /// Role name (<= 64 chars, see `cloud::naming`).
    pub name: String,
    /// IAM path (`/ephemera/`).
    pub path: String,
    /// Trust policy document.
    pub trust_policy: Value,
    /// Inline policy document; `None` when the identity has no statements.
    pub policy: Option<Value>,
    /// Managed policies to attach.
    pub managed_policy_arns: Vec<String>,
    /// Permissions boundary (the first of the governing boundaries').
    pub permissions_boundary: Option<String>,
    /// `MaxSessionDuration`.
    pub max_session: Duration,
    /// Tags (cluster, namespace, lease, identity, owner, expiry).
    pub tags: Vec<(String, String)>,
}

/// A role ephemera made, as the sweep sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedRole {
    /// Role name.
    pub name: String,
    /// Namespace of its lease.
    pub namespace: String,
    /// Its lease.
    pub lease: String,
}

/// IAM and STS, through the standard AWS configuration chain.
#[derive(Clone, Debug)]
pub struct AwsProvider {
    iam: aws_sdk_iam::Client,
    sts: aws_sdk_sts::Client,
}

fn cloud_error<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug>(
    operation: &'static str,
    err: &aws_sdk_iam::error::SdkError<E, R>,
) -> Error {
    let message = match err.code() {
        Some(code) => format!("{code}: {}", err.message().unwrap_or_default()),
        None => aws_sdk_iam::error::DisplayErrorContext(err).to_string(),
    };
    Error::Cloud { operation, message }
}

fn is_code<E: ProvideErrorMetadata, R>(err: &aws_sdk_iam::error::SdkError<E, R>, code: &str) -> bool {
    err.code() == Some(code)
}

impl AwsProvider {
    /// Clients from [`sdk_config`].
    pub async fn from_env() -> AwsProvider {
        let config = sdk_config().await;
        AwsProvider { iam: aws_sdk_iam::Client::new(&config), sts: aws_sdk_sts::Client::new(&config) }
    }

    /// The account of the credentials in use.
    ///
    /// # Errors
    /// When STS cannot be reached or refuses.
    pub async fn account(&self) -> Result<String> {
        let out = self.sts.get_caller_identity().send().await.map_err(|e| Error::Cloud {
            operation: "GetCallerIdentity",
            message: aws_sdk_sts::error::DisplayErrorContext(e).to_string(),
        })?;
        out.account.ok_or_else(|| Error::Config("STS GetCallerIdentity returned no account".into()))
    }

    /// Makes the role, or brings an existing one (a retry after a crash) to
    /// `spec`. Returns its ARN.
    ///
    /// # Errors
    /// Any IAM refusal; the caller retries with backoff.
    pub async fn provision(&self, spec: &RoleSpec) -> Result<String> {
        let trust = spec.trust_policy.to_string();
        let tags: Vec<Tag> =
            spec.tags.iter().filter_map(|(k, v)| Tag::builder().key(k).value(v).build().ok()).collect();
        let max_session = i32::try_from(spec.max_session.as_secs()).unwrap_or(3600);
        let created = self
            .iam
            .create_role()
            .role_name(&spec.name)
            .path(&spec.path)
            .assume_role_policy_document(&trust)
            .max_session_duration(max_session)
            .set_permissions_boundary(spec.permissions_boundary.clone())
            .set_tags(Some(tags))
            .description("Made by ephemera for one workload; deleted when it ends")
            .send()
            .await;
        let arn = match created {
            Ok(out) => out.role.map(|r| r.arn).unwrap_or_default(),
            Err(e) if is_code(&e, "EntityAlreadyExists") => {
                self.iam
                    .update_assume_role_policy()
                    .role_name(&spec.name)
                    .policy_document(&trust)
                    .send()
                    .await
                    .map_err(|e| cloud_error("UpdateAssumeRolePolicy", &e))?;
                let role =
                    self.iam.get_role().role_name(&spec.name).send().await.map_err(|e| cloud_error("GetRole", &e))?;
                role.role.map(|r| r.arn).unwrap_or_default()
            }
            Err(e) => return Err(cloud_error("CreateRole", &e)),
        };
        if let Some(policy) = &spec.policy {
            self.iam
                .put_role_policy()
                .role_name(&spec.name)
                .policy_name(POLICY_NAME)
                .policy_document(policy.to_string())
                .send()
                .await
                .map_err(|e| cloud_error("PutRolePolicy", &e))?;
        }
        for arn in &spec.managed_policy_arns {
            self.iam
                .attach_role_policy()
                .role_name(&spec.name)
                .policy_arn(arn)
                .send()
                .await
                .map_err(|e| cloud_error("AttachRolePolicy", &e))?;
        }
        Ok(arn)
    }

    /// Proves the chain end to end: STS accepts `token` for the role. Returns
    /// whether it did (`false` also while IAM is still propagating).
    ///
    /// # Errors
    /// Only when STS cannot be reached at all.
    pub async fn verify(&self, role_arn: &str, session: &str, token: &str) -> Result<bool> {
        match self
            .sts
            .assume_role_with_web_identity()
            .role_arn(role_arn)
            .role_session_name(session)
            .web_identity_token(token)
            .duration_seconds(900)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(aws_sdk_sts::error::SdkError::ServiceError(e)) => {
                tracing::debug!(role_arn, code = ?e.err().code(), "role not assumable yet");
                Ok(false)
            }
            Err(e) => Err(Error::Cloud {
                operation: "AssumeRoleWithWebIdentity",
                message: aws_sdk_sts::error::DisplayErrorContext(e).to_string(),
            }),
        }
    }

    /// Revokes every session issued so far and deletes the role with its
    /// policies. Idempotent: a role already gone is success.
    ///
    /// # Errors
    /// Any other IAM refusal (throttling, conflicts); the caller retries.
    pub async fn revoke_and_delete(&self, role: &str, now_rfc3339: &str) -> Result<()> {
        match self
            .iam
            .put_role_policy()
            .role_name(role)
            .policy_name(REVOKE_POLICY_NAME)
            .policy_document(revoke_policy(now_rfc3339).to_string())
            .send()
            .await
        {
            Ok(_) => {}
            Err(e) if is_code(&e, "NoSuchEntity") => return Ok(()),
            Err(e) => return Err(cloud_error("PutRolePolicy", &e)),
        }
        let inline = match self.iam.list_role_policies().role_name(role).send().await {
            Ok(out) => out.policy_names,
            Err(e) if is_code(&e, "NoSuchEntity") => return Ok(()),
            Err(e) => return Err(cloud_error("ListRolePolicies", &e)),
        };
        for name in inline {
            match self.iam.delete_role_policy().role_name(role).policy_name(&name).send().await {
                Ok(_) => {}
                Err(e) if is_code(&e, "NoSuchEntity") => {}
                Err(e) => return Err(cloud_error("DeleteRolePolicy", &e)),
            }
        }
        let attached = match self.iam.list_attached_role_policies().role_name(role).send().await {
            Ok(out) => out.attached_policies.unwrap_or_default(),
            Err(e) if is_code(&e, "NoSuchEntity") => return Ok(()),
            Err(e) => return Err(cloud_error("ListAttachedRolePolicies", &e)),
        };
        for policy in attached.into_iter().filter_map(|p| p.policy_arn) {
            match self.iam.detach_role_policy().role_name(role).policy_arn(&policy).send().await {
                Ok(_) => {}
                Err(e) if is_code(&e, "NoSuchEntity") => {}
                Err(e) => return Err(cloud_error("DetachRolePolicy", &e)),
            }
        }
        match self.iam.delete_role().role_name(role).send().await {
            Ok(_) => Ok(()),
            Err(e) if is_code(&e, "NoSuchEntity") => Ok(()),
            Err(e) => Err(cloud_error("DeleteRole", &e)),
        }
    }

    /// Roles under `path` tagged as this cluster's.
    ///
    /// # Errors
    /// When IAM cannot be listed.
    pub async fn list_owned(&self, path: &str, cluster: &str) -> Result<Vec<OwnedRole>> {
        let mut roles = Vec::new();
        let mut pages = self.iam.list_roles().path_prefix(path).into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| cloud_error("ListRoles", &e))?;
            roles.extend(page.roles.into_iter().map(|r| r.role_name));
        }
        let mut owned = Vec::new();
        for name in roles {
            let tags = match self.iam.list_role_tags().role_name(&name).send().await {
                Ok(out) => out.tags,
                Err(e) if is_code(&e, "NoSuchEntity") => continue,
                Err(e) => return Err(cloud_error("ListRoleTags", &e)),
            };
            let tag = |k: &str| tags.iter().find(|t| t.key == k).map(|t| t.value.clone());
            if tag(TAG_CLUSTER).as_deref() != Some(cluster) {
                continue;
            }
            if let (Some(namespace), Some(lease)) = (tag(TAG_NAMESPACE), tag(TAG_LEASE)) {
                owned.push(OwnedRole { name, namespace, lease });
            }
        }
        Ok(owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trust_policy_admits_one_service_account_and_one_audience() {
        let p = trust_policy(
            "arn:aws:iam::1:oidc-provider/oidc.test",
            "oidc.test",
            "team-a",
            "report-x",
            "sts.amazonaws.com",
        );
        let cond = &p["Statement"][0]["Condition"]["StringEquals"];
        assert_eq!(cond["oidc.test:sub"], "system:serviceaccount:team-a:report-x");
        assert_eq!(cond["oidc.test:aud"], "sts.amazonaws.com");
        assert_eq!(p["Statement"][0]["Principal"]["Federated"], "arn:aws:iam::1:oidc-provider/oidc.test");
    }

    #[test]
    fn statements_become_an_iam_document() {
        let s: AwsStatement = serde_json::from_value(json!({
            "sid": "Read", "effect": "Deny", "actions": ["s3:GetObject"], "resources": ["arn:aws:s3:::b/*"],
            "conditions": {"StringEquals": {"aws:RequestedRegion": ["eu-west-1"]}},
        }))
        .unwrap();
        let doc = permissions_policy(&[s]);
        assert_eq!(
            doc["Statement"][0],
            json!({"Sid": "Read", "Effect": "Deny", "Action": ["s3:GetObject"], "Resource": ["arn:aws:s3:::b/*"],
                   "Condition": {"StringEquals": {"aws:RequestedRegion": ["eu-west-1"]}}})
        );
        let revoke = revoke_policy("2026-11-23T10:00:00Z");
        assert_eq!(revoke["Statement"][0]["Condition"]["DateLessThan"]["aws:TokenIssueTime"], "2026-11-23T10:00:00Z");
    }
}
