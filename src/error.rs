//! The crate's error type. Every variant says which object or call failed and
//! maps to a short, stable label for the `*_errors_total` metrics.

/// Error codes AWS uses for rate limiting.
pub const THROTTLING_CODES: &[&str] =
    &["Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests", "TooManyRequestsException"];

/// Errors raised by ephemera's controllers, webhook and cloud providers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("kubernetes API call failed while {context}: {source}")]
    Kube {
        context: String,
        #[source]
        source: kube::Error,
    },

    /// The Kubernetes client could not be configured (no kubeconfig, bad credentials).
    #[error("cannot configure the Kubernetes client: {0}")]
    KubeConfig(#[source] kube::Error),

    /// A cloud provider call failed.
    #[error("cloud call {operation} failed: {message}")]
    Cloud { operation: &'static str, message: String },

    /// Invalid configuration given on the command line or in the environment.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The webhook's serving certificate, key or TLS Secret cannot be used.
    #[error("TLS: {0}")]
    Tls(String),

    /// A server, watch or task this process needs has stopped.
    #[error("stopped: {0}")]
    Stopped(String),

    /// What this process needs is not there yet (its caches not filled).
    #[error("not ready: {0}")]
    NotReady(String),

    /// Someone else holds what was asked for (a lease name another workload
    /// has, a Secret changing under us): retried, never shared.
    #[error("conflict: {0}")]
    Conflict(String),

    /// The namespace is governed by no `IdentityBoundary` (any more).
    #[error("not governed: {0}")]
    NotGoverned(String),

    /// Several boundaries governing a namespace attach different IAM
    /// permissions boundaries; a role has room for only one, and ephemera
    /// never picks one silently.
    #[error("permissions boundaries conflict: {0}")]
    PermissionsBoundaryConflict(String),

    /// Leader election could not run.
    #[error("leader election: {0}")]
    LeaderElection(String),

    /// An API answered without what it must return (no token in a
    /// TokenRequest, no account from STS).
    #[error("unexpected answer: {0}")]
    Unexpected(String),

    /// Serialising or parsing YAML/JSON failed.
    #[error("cannot serialise {what}: {message}")]
    Serialization { what: &'static str, message: String },

    /// A local I/O operation (files, sockets) failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// The cloud account has no room for another identity (IAM roles
    /// quota); new leases wait, existing ones are unaffected.
    #[error("quota exceeded: {0}")]
    QuotaExceeded(String),

    /// An IAM role under the name a lease derives exists but its tags say
    /// it is another lease's (or another cluster's): it is neither adopted
    /// nor deleted.
    #[error("role conflict: {0}")]
    RoleConflict(String),

    /// An `IdentityLease` names something other than what its own identity
    /// derives (a role, a ServiceAccount): it was not written by ephemera's
    /// webhook, and the controller acts on none of it.
    #[error("lease refused: {0}")]
    LeaseRefused(String),

    /// STS rejects the workload's token itself (`InvalidIdentityToken`): most
    /// often the account has no IAM OIDC provider for the cluster's issuer.
    #[error("token rejected: {0}")]
    TokenRejected(String),

    /// STS still refuses to let the token assume the role after IAM had
    /// time to propagate it (`AccessDenied`): the trust policy does not
    /// match the token, or a policy outside ephemera denies it.
    #[error("trust denied: {0}")]
    TrustDenied(String),

    /// This replica no longer leads (or cannot tell): it makes nothing in
    /// the cloud and stops; the leader does the work.
    #[error("not the leader: {0}")]
    NotLeader(String),

    /// `ephemera webhook-check` (the chart's `helm test`) found the webhook
    /// not serving as the apiserver needs it.
    #[error("webhook check failed: {0}")]
    WebhookCheck(String),

    /// `ephemera uninstall` (the chart's pre-delete hook) could not reap
    /// every identity in time.
    #[error("uninstall incomplete: {0}")]
    UninstallIncomplete(String),
}

impl Error {
    /// A short, stable label for metrics (`reason` label of error counters).
    #[must_use]
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "kube",
            Error::KubeConfig(_) => "kube_config",
            Error::Cloud { .. } => "cloud",
            Error::Config(_) => "config",
            Error::Tls(_) => "tls",
            Error::Stopped(_) => "stopped",
            Error::NotReady(_) => "not_ready",
            Error::Conflict(_) => "conflict",
            Error::NotGoverned(_) => "not_governed",
            Error::PermissionsBoundaryConflict(_) => "permissions_boundary_conflict",
            Error::LeaderElection(_) => "leader_election",
            Error::Unexpected(_) => "unexpected",
            Error::Serialization { .. } => "serialization",
            Error::Io { .. } => "io",
            Error::QuotaExceeded(_) => "quota",
            Error::RoleConflict(_) => "role_conflict",
            Error::LeaseRefused(_) => "lease_refused",
            Error::TokenRejected(_) => "token_rejected",
            Error::TrustDenied(_) => "trust_denied",
            Error::NotLeader(_) => "not_leader",
            Error::WebhookCheck(_) => "webhook_check",
            Error::UninstallIncomplete(_) => "uninstall_incomplete",
        }
    }

    /// The reason of the condition and Event that report it, for errors a
    /// user acts on (`Error` otherwise).
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Error::QuotaExceeded(_) => "QuotaExceeded",
            Error::RoleConflict(_) => "RoleConflict",
            Error::LeaseRefused(_) => "Refused",
            Error::TokenRejected(_) => "TokenRejected",
            Error::TrustDenied(_) => "TrustDenied",
            Error::NotGoverned(_) => "NotGoverned",
            Error::PermissionsBoundaryConflict(_) => "PermissionsBoundaryConflict",
            _ => "Error",
        }
    }

    /// Whether a cloud provider refused because of rate limits.
    #[must_use]
    pub fn is_throttling(&self) -> bool {
        matches!(self, Error::Cloud { message, .. }
            if THROTTLING_CODES.iter().any(|code| message.split(':').next() == Some(code)))
    }

    /// Wraps a Kubernetes error with what ephemera was doing at the time.
    pub fn kube(context: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let context = context.into();
        move |source| Error::Kube { context, source }
    }

    /// Wraps an I/O error with the path or socket it concerned.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_stable_and_messages_name_the_context() {
        let err = Error::io("reading /etc/ephemera/tls.crt")(std::io::Error::from(std::io::ErrorKind::NotFound));
        assert_eq!(err.metric_label(), "io");
        assert!(err.to_string().starts_with("reading /etc/ephemera/tls.crt: "));

        let err = Error::TokenRejected("no IAM OIDC provider".into());
        assert_eq!((err.metric_label(), err.reason()), ("token_rejected", "TokenRejected"));
        assert_eq!(err.to_string(), "token rejected: no IAM OIDC provider");
    }
}
