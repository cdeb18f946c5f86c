//! Names ephemera gives to what it makes: per-workload ids, IAM role names
//! and ARNs, STS session names. Deterministic, so the webhook (which puts the
//! role ARN into the pod) and the controller (which makes the role) agree
//! without talking to each other, and a crash and retry lands on the same name.

use sha2::{Digest, Sha256};

/// IAM's limit on role names.
pub const MAX_ROLE_NAME: usize = 64;
/// STS's limit on `RoleSessionName`.
pub const MAX_SESSION_NAME: usize = 64;
/// Kubernetes' limit on a label value (and a DNS label).
const MAX_LABEL: usize = 63;
/// Alphabet Kubernetes uses for `generateName` suffixes (no vowels, no
/// look-alikes), so our ids look like the names users already see.
const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// Length of the random part of a lease name: 27^8 (2.8e11) names, so 5,000
/// leases of one identity in one namespace collide with a chance of about
/// 1 in 20,000 (with 5 characters, measured in a 5,000-pod burst, it was
/// better than even). A collision is refused, never shared.
pub const LEASE_SUFFIX_LEN: usize = 8;

/// A short id (`len` chars of [`ALPHABET`]) derived from `seed`.
#[must_use]
pub fn short_id(seed: &str, len: usize) -> String {
    let digest = Sha256::digest(seed.as_bytes());
    digest.iter().take(len).map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()])).collect()
}

/// Hex digest prefix of `seed` (`len` hex chars, at most 64).
#[must_use]
pub fn hex_digest(seed: &str, len: usize) -> String {
    let digest = Sha256::digest(seed.as_bytes());
    let hex: String = digest.iter().fold(String::with_capacity(64), |mut out, b| {
        use std::fmt::Write;
        let _ = write!(out, "{b:02x}"); // writing to a String cannot fail
        out
    });
    hex[..len.min(hex.len())].to_owned()
}

/// Name of the lease and ServiceAccount made for one workload:
/// `<identity>-<suffix>`, the identity part shortened so the whole is a valid
/// DNS label (the ServiceAccount name is also a label value on the pod).
#[must_use]
pub fn lease_name(identity: &str, suffix: &str) -> String {
    let room = MAX_LABEL - suffix.len() - 1;
    format!("{}-{suffix}", truncate_dns(identity, room))
}

/// IAM role name for a lease: `<prefix>-<namespace>-<lease>` when it fits in
/// 64 characters, else shortened with a digest of the full triple so two
/// leases never share a role.
#[must_use]
pub fn role_name(prefix: &str, cluster: &str, namespace: &str, lease: &str) -> String {
    let full = format!("{prefix}-{namespace}-{lease}");
    if full.len() <= MAX_ROLE_NAME {
        return full;
    }
    let digest = hex_digest(&format!("{cluster}/{namespace}/{lease}"), 10);
    let room = MAX_ROLE_NAME - prefix.len() - digest.len() - 2;
    let middle = format!("{namespace}-{lease}");
    format!("{prefix}-{}-{digest}", truncate_dns(&middle, room))
}

/// ARN of a role.
#[must_use]
pub fn role_arn(partition: &str, account: &str, path: &str, name: &str) -> String {
    format!("arn:{partition}:iam::{account}:role{path}{name}")
}

/// The path (`/ephemera/`) and name of a role from its ARN.
#[must_use]
pub fn split_role_arn(arn: &str) -> Option<(String, String)> {
    let resource = arn.splitn(6, ':').nth(5)?;
    let rest = resource.strip_prefix("role")?;
    let (path, name) = rest.rsplit_once('/')?;
    (!name.is_empty()).then(|| (format!("{path}/"), name.to_owned()))
}

/// `AWS_ROLE_SESSION_NAME` for a workload: `<namespace>.<workload>`, limited
/// to what STS accepts (2 to 64 of `[\w+=,.@-]`), so CloudTrail shows who it was.
#[must_use]
pub fn session_name(namespace: &str, workload: &str) -> String {
    let cleaned: String = format!("{namespace}.{workload}")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "+=,.@-_".contains(c) { c } else { '-' })
        .take(MAX_SESSION_NAME)
        .collect();
    if cleaned.len() < 2 { format!("{cleaned}-x") } else { cleaned }
}

/// `s` cut to `max` bytes without leaving a trailing `-` or `.` (DNS labels
/// must end alphanumeric). Names here are ASCII (Kubernetes names are).
fn truncate_dns(s: &str, max: usize) -> &str {
    let cut = &s[..s.len().min(max)];
    cut.trim_end_matches(['-', '.'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_deterministic_and_use_the_kubernetes_alphabet() {
        let a = short_id("request-uid-1", 5);
        assert_eq!(a, short_id("request-uid-1", 5));
        assert_ne!(a, short_id("request-uid-2", 5));
        assert_eq!(a.len(), 5);
        assert!(a.bytes().all(|b| ALPHABET.contains(&b)));
    }

    #[test]
    fn lease_names_are_dns_labels() {
        assert_eq!(lease_name("report", "x7k2p"), "report-x7k2p");
        let long = lease_name(&"a".repeat(80), "x7k2p");
        assert_eq!(long.len(), 63);
        assert!(long.ends_with("-x7k2p"));
        let dashed = lease_name(&format!("{}-b", "a".repeat(56)), "x7k2p");
        assert!(!dashed.contains("--"), "{dashed}");
    }

    #[test]
    fn role_names_fit_iam_and_stay_distinct() {
        assert_eq!(role_name("ephemera", "c", "team-a", "report-x7k2p"), "ephemera-team-a-report-x7k2p");
        let ns = "n".repeat(60);
        let a = role_name("ephemera", "c", &ns, "report-x7k2p");
        let b = role_name("ephemera", "c", &ns, "report-x7k2q");
        assert!(a.len() <= MAX_ROLE_NAME && b.len() <= MAX_ROLE_NAME, "{a} {b}");
        assert_ne!(a, b);
        assert_ne!(a, role_name("ephemera", "other-cluster", &ns, "report-x7k2p"));
    }

    #[test]
    fn role_arns_split_into_path_and_name() {
        let arn = role_arn("aws", "1", "/ephemera/team/", "r");
        assert_eq!(split_role_arn(&arn), Some(("/ephemera/team/".into(), "r".into())));
        assert_eq!(split_role_arn("arn:aws:iam::1:role/r"), Some(("/".into(), "r".into())));
        assert_eq!(split_role_arn("arn:aws:iam::1:user/r"), None);
        assert_eq!(split_role_arn("nonsense"), None);
    }

    #[test]
    fn session_names_are_what_sts_accepts() {
        assert_eq!(session_name("team-a", "report-x7k2p"), "team-a.report-x7k2p");
        let s = session_name(&"n".repeat(70), "p");
        assert_eq!(s.len(), MAX_SESSION_NAME);
        assert_eq!(session_name("a", "b/c d"), "a.b-c-d");
    }
}
