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
/// 1 in 20,000 (docs/benchmarks.md has the burst that showed 5 too few).
/// A collision is refused, never shared.
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
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(seed.as_bytes());
    // Only the digits asked for, from a table (this runs on every admission).
    let mut hex = String::with_capacity(len.min(64));
    for b in digest.iter().take(len.div_ceil(2)) {
        hex.push(char::from(HEX[usize::from(b >> 4)]));
        hex.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    hex.truncate(len);
    hex
}

/// Name of the lease and ServiceAccount made for one workload:
/// `<identity>-<suffix>`, the identity part shortened so the whole is a valid
/// DNS label (the ServiceAccount name is also a label value on the pod).
#[must_use]
pub fn lease_name(identity: &str, suffix: &str) -> String {
    let room = MAX_LABEL - suffix.len() - 1;
    format!("{}-{suffix}", truncate_dns(identity, room))
}

/// Hex characters of the digest that ends every role name: 48 bits, so two
/// leases among a million share a digest with a chance of about 1 in 500
/// (and even then the role's tags keep each from touching the other's).
pub const ROLE_DIGEST_LEN: usize = 12;

/// The digest of one lease's identity: which cluster, namespace and lease.
/// Namespaces and lease names cannot hold `/`, so the seed is unambiguous.
#[must_use]
pub fn role_digest(cluster: &str, namespace: &str, lease: &str) -> String {
    hex_digest(&format!("{cluster}/{namespace}/{lease}"), ROLE_DIGEST_LEN)
}

/// IAM role name for a lease: `<prefix>-<namespace>-<lease>-<digest>`, the
/// readable middle shortened to fit IAM's 64 characters, the digest of
/// (cluster, namespace, lease) always last. The digest, not the readable
/// part, makes names distinct: `team` + `a-report` and `team-a` + `report`
/// read alike, and two clusters sharing an account name their leases alike.
#[must_use]
pub fn role_name(prefix: &str, cluster: &str, namespace: &str, lease: &str) -> String {
    let digest = role_digest(cluster, namespace, lease);
    let room = MAX_ROLE_NAME.saturating_sub(prefix.len() + digest.len() + 2);
    let middle = format!("{namespace}-{lease}");
    match truncate_dns(&middle, room) {
        "" => format!("{prefix}-{digest}"),
        middle => format!("{prefix}-{middle}-{digest}"),
    }
}

/// Whether `name` is the role of lease (cluster, namespace, lease): the name
/// this version gives it, whatever the boundary's prefix, or the one
/// ephemera 0.1 gave (`<prefix>-<namespace>-<lease>`, or shortened with a
/// 10-character digest), so leases admitted before an upgrade are still
/// reaped. Names are a first check only; before a role is adopted or
/// deleted, its tags must say the same (`cloud::aws::RoleOwner`).
#[must_use]
pub fn is_role_of(name: &str, cluster: &str, namespace: &str, lease: &str) -> bool {
    let legacy_digest = hex_digest(&format!("{cluster}/{namespace}/{lease}"), 10);
    name.strip_suffix(&role_digest(cluster, namespace, lease)).is_some_and(|rest| rest.ends_with('-'))
        || name.strip_suffix(&format!("-{namespace}-{lease}")).is_some_and(|prefix| !prefix.is_empty())
        || (name.len() == MAX_ROLE_NAME && name.ends_with(&format!("-{legacy_digest}")))
}

/// Default root of every role's IAM path (`--role-path-root`).
pub const ROLE_PATH_ROOT: &str = "/ephemera/";

/// Whether an IAM path is a valid role path (`/`, `/a/`, `/a/b/`): what IAM
/// accepts and the CRD's `rolePath` pattern says.
#[must_use]
pub fn is_role_path(path: &str) -> bool {
    path.len() <= 512
        && path.starts_with('/')
        && path.ends_with('/')
        && path.split('/').skip(1).collect::<Vec<_>>().split_last().is_some_and(|(last, segments)| {
            last.is_empty()
                && segments.iter().all(|s| !s.is_empty() && s.bytes().all(|b| (b'!'..=b'~').contains(&b) && b != b'/'))
        })
}

/// Whether role path `path` lies under `root` (every role ephemera makes
/// does, so one `ListRoles` under the root finds them all).
#[must_use]
pub fn is_under_root(path: &str, root: &str) -> bool {
    path.starts_with(root)
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
    fn a_hex_digest_is_sha256s_leading_hex_digits() {
        // SHA-256("abc"), FIPS 180-2's example; role names depend on these digits.
        let full = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(hex_digest("abc", 64), full);
        assert_eq!(hex_digest("abc", 100), full);
        assert_eq!(hex_digest("abc", 11), &full[..11]);
        assert_eq!(hex_digest("abc", 0), "");
    }

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
        let name = role_name("ephemera", "c", "team-a", "report-x7k2p");
        assert!(name.starts_with("ephemera-team-a-report-x7k2p-"), "{name}");
        assert_eq!(name.len(), "ephemera-team-a-report-x7k2p-".len() + ROLE_DIGEST_LEN);
        // Read alike, named apart.
        assert_ne!(name, role_name("ephemera", "c", "team", "a-report-x7k2p"));
        let ns = "n".repeat(60);
        let a = role_name("ephemera", "c", &ns, "report-x7k2p");
        let b = role_name("ephemera", "c", &ns, "report-x7k2q");
        assert!(a.len() <= MAX_ROLE_NAME && b.len() <= MAX_ROLE_NAME, "{a} {b}");
        assert_ne!(a, b);
        assert_ne!(a, role_name("ephemera", "other-cluster", &ns, "report-x7k2p"));
        let longest_prefix = "p".repeat(20);
        assert!(role_name(&longest_prefix, "c", &ns, &"l".repeat(63)).len() <= MAX_ROLE_NAME);
    }

    #[test]
    fn a_role_name_is_recognised_only_for_its_own_lease() {
        let name = role_name("team-prefix", "c", "team-a", "report-x7k2p");
        assert!(is_role_of(&name, "c", "team-a", "report-x7k2p"));
        assert!(!is_role_of(&name, "c", "team", "a-report-x7k2p"));
        assert!(!is_role_of(&name, "other", "team-a", "report-x7k2p"));
        assert!(!is_role_of(&name, "c", "team-a", "report-x7k2q"));
        // ephemera 0.1's names, for leases admitted before an upgrade.
        assert!(is_role_of("ephemera-team-a-report-x7k2p", "c", "team-a", "report-x7k2p"));
        assert!(!is_role_of("-team-a-report-x7k2p", "c", "team-a", "report-x7k2p"));
        let ns = "n".repeat(60);
        let legacy = format!(
            "ephemera-{}-{}",
            &format!("{ns}-report-x7k2p")[..64 - 9 - 11],
            hex_digest(&format!("c/{ns}/report-x7k2p"), 10)
        );
        assert_eq!(legacy.len(), MAX_ROLE_NAME);
        assert!(is_role_of(&legacy, "c", &ns, "report-x7k2p"));
        assert!(!is_role_of(&legacy, "c", &ns, "report-x7k2q"));
    }

    proptest::proptest! {
        /// Distinct (cluster, namespace, lease) triples never share a role
        /// name, at any lengths, and every name fits IAM.
        #[test]
        fn distinct_leases_get_distinct_role_names(
            a in ("[a-z0-9./-]{1,40}", "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"),
            b in ("[a-z0-9./-]{1,40}", "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"),
            prefix in "[A-Za-z0-9+=,.@_-]{1,20}",
        ) {
            let name_a = role_name(&prefix, &a.0, &a.1, &a.2);
            let name_b = role_name(&prefix, &b.0, &b.1, &b.2);
            proptest::prop_assert!(name_a.len() <= MAX_ROLE_NAME, "{}", name_a);
            proptest::prop_assert!(is_role_of(&name_a, &a.0, &a.1, &a.2));
            if a != b {
                proptest::prop_assert_ne!(&name_a, &name_b);
                let legacy_suffix = format!("-{}-{}", b.1, b.2);
                proptest::prop_assert!(!is_role_of(&name_a, &b.0, &b.1, &b.2) || name_a.ends_with(&legacy_suffix), "{} {:?}", name_a, b);
            }
        }

        /// Names that differ only in where the dashes fall stay apart.
        #[test]
        fn dash_shifted_triples_get_distinct_role_names(words in proptest::collection::vec("[a-z0-9]{1,12}", 3..6), split in 1usize..5) {
            let split = split.min(words.len() - 1);
            let (ns_a, lease_a) = (words[..split].join("-"), words[split..].join("-"));
            let other = if split > 1 { split - 1 } else { split + 1 };
            proptest::prop_assume!(other < words.len());
            let (ns_b, lease_b) = (words[..other].join("-"), words[other..].join("-"));
            proptest::prop_assert_ne!(role_name("ephemera", "c", &ns_a, &lease_a), role_name("ephemera", "c", &ns_b, &lease_b));
        }
    }

    #[test]
    fn role_paths_are_iam_paths_and_lie_under_a_root_by_segments() {
        for ok in ["/", "/ephemera/", "/org/team-a/", "/a+b=c,d.e@f_g-h/"] {
            assert!(is_role_path(ok), "{ok}");
        }
        for bad in ["", "ephemera/", "/ephemera", "//", "/a//b/", "/a b/"] {
            assert!(!is_role_path(bad), "{bad:?}");
        }
        assert!(is_under_root("/ephemera/", "/ephemera/"));
        assert!(is_under_root("/ephemera/batch/", "/ephemera/"));
        assert!(is_under_root("/anything/", "/"));
        assert!(!is_under_root("/ephemera-batch/", "/ephemera/"));
        assert!(!is_under_root("/", "/ephemera/"));
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
