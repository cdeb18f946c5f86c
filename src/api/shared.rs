//! Types shared by several custom resources: durations, IAM policy
//! statements, Kubernetes RBAC rules, and the patterns that validate them.
//! The patterns are used twice: in the CRD schema (the apiserver enforces
//! them) and by the Rust code that parses the same strings.

use std::{borrow::Cow, collections::BTreeMap, fmt, str::FromStr};

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Pattern of every duration field: whole hours, minutes and seconds, as in
/// `90s`, `15m`, `1h30m` (the format of `metav1.Duration` restricted to the
/// units that make sense for credentials).
pub const DURATION_PATTERN: &str = r"^([0-9]+h)?([0-9]+m)?([0-9]+s)?$";
/// Pattern of an IAM action: `*`, or `service:Action` where the action may
/// use the IAM globs `*` and `?` (`s3:GetObject`, `s3:Get*`).
pub const ACTION_PATTERN: &str = r"^(\*|[a-z0-9-]+:[A-Za-z0-9*?]+)$";
/// Pattern of an IAM resource: `*`, or an ARN whose parts may use `*`/`?`
/// globs (`arn:aws:s3:::team-a-*`, `arn:aws:dynamodb:*:123456789012:table/t`).
pub const RESOURCE_PATTERN: &str =
    r"^(\*|arn:(aws|aws-cn|aws-us-gov|\*):[a-z0-9*?-]+:[a-z0-9*?-]*:([0-9]{12}|[*?]|aws)?:.+)$";
/// Pattern of a managed IAM policy ARN (customer or AWS managed).
pub const POLICY_ARN_PATTERN: &str = r"^arn:(aws|aws-cn|aws-us-gov):iam::([0-9]{12}|aws):policy/[!-~]+$";

// === Duration ===

/// A duration written as whole hours, minutes and seconds: `15m`, `1h`,
/// `1h30m`, `900s`. Serialised as that string; compared by length.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(std::time::Duration);

impl Duration {
    /// A duration of `secs` seconds.
    #[must_use]
    pub const fn from_secs(secs: u64) -> Self {
        Duration(std::time::Duration::from_secs(secs))
    }

    /// Whole seconds.
    #[must_use]
    pub const fn as_secs(self) -> u64 {
        self.0.as_secs()
    }
}

impl From<Duration> for std::time::Duration {
    fn from(d: Duration) -> Self {
        d.0
    }
}

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {0:?}: use whole hours, minutes and seconds, e.g. 15m, 1h, 1h30m, 900s")]
pub struct InvalidDuration(String);

impl FromStr for Duration {
    type Err = InvalidDuration;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidDuration(s.to_owned());
        if s.is_empty() {
            return Err(invalid());
        }
        let mut total: u64 = 0;
        let mut number: Option<u64> = None;
        // Units must appear in h, m, s order, each at most once (as the pattern says).
        let mut last_rank = 0;
        for c in s.chars() {
            if let Some(digit) = c.to_digit(10) {
                let n = number.unwrap_or(0).checked_mul(10).and_then(|n| n.checked_add(u64::from(digit)));
                number = Some(n.ok_or_else(invalid)?);
                continue;
            }
            let (rank, scale) = match c {
                'h' => (1, 3600),
                'm' => (2, 60),
                's' => (3, 1),
                _ => return Err(invalid()),
            };
            if rank <= last_rank {
                return Err(invalid());
            }
            last_rank = rank;
            let n = number.take().ok_or_else(invalid)?;
            total = n.checked_mul(scale).and_then(|v| total.checked_add(v)).ok_or_else(invalid)?;
        }
        if number.is_some() {
            return Err(invalid()); // trailing digits without a unit
        }
        Ok(Duration::from_secs(total))
    }
}

impl fmt::Display for Duration {
    /// The shortest form: `1h30m`, `15m`, `45s`, `0s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.as_secs();
        if secs == 0 {
            return f.write_str("0s");
        }
        let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
        if h > 0 {
            write!(f, "{h}h")?;
        }
        if m > 0 {
            write!(f, "{m}m")?;
        }
        if s > 0 {
            write!(f, "{s}s")?;
        }
        Ok(())
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = Cow::<str>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "minLength": 2,
        })
    }
}

// === IAM ===

/// Whether a statement grants or refuses what it names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Effect {
    /// Grants the actions on the resources.
    #[default]
    Allow,
    /// Refuses the actions on the resources, whatever else allows them.
    Deny,
}

/// One IAM policy statement, with the same meaning as in an AWS policy
/// document.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AwsStatement {
    /// Optional statement id, copied into the IAM policy (`Sid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128), pattern(r"^[A-Za-z0-9]+$"))]
    pub sid: Option<String>,

    /// `Allow` (default) or `Deny`. A `Deny` is always accepted: it can only
    /// narrow what the workload gets.
    #[serde(default)]
    pub effect: Effect,

    /// IAM actions, `service:Action`, with `*` and `?` globs
    /// (`s3:GetObject`, `s3:Get*`). An `Allow` must stay within the
    /// boundary's `aws.allowedActions`.
    #[schemars(length(min = 1, max = 100), inner(pattern(ACTION_PATTERN)))]
    pub actions: Vec<String>,

    /// Resource ARNs, with `*` and `?` globs (`arn:aws:s3:::team-a-logs/*`).
    /// An `Allow` must stay within the boundary's `aws.allowedResources`.
    #[schemars(length(min = 1, max = 100), inner(pattern(RESOURCE_PATTERN)))]
    pub resources: Vec<String>,

    /// IAM condition block: operator -> condition key -> values, e.g.
    /// `{StringEquals: {"aws:RequestedRegion": ["eu-west-1"]}}`. Copied into
    /// the policy as written.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub conditions: BTreeMap<String, BTreeMap<String, Vec<String>>>,
}

// === Kubernetes RBAC ===

/// A namespaced RBAC rule, as in a Role. `nonResourceURLs` do not exist here:
/// the rule is bound in the workload's own namespace only.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesRule {
    /// API groups of the resources; `""` is the core group.
    #[serde(default)]
    #[schemars(length(max = 20))]
    pub api_groups: Vec<String>,
    /// Resources (`configmaps`, `pods/log`).
    #[schemars(length(min = 1, max = 50), inner(length(min = 1)))]
    pub resources: Vec<String>,
    /// Restricts the rule to these object names; empty means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resource_names: Vec<String>,
    /// Verbs (`get`, `list`, `watch`, `create`, `update`, `patch`, `delete`).
    #[schemars(length(min = 1, max = 20), inner(pattern(r"^([a-z]+|\*)$")))]
    pub verbs: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_print_in_the_documented_format() {
        for (text, secs, canonical) in [
            ("15m", 900, "15m"),
            ("1h", 3600, "1h"),
            ("1h30m", 5400, "1h30m"),
            ("900s", 900, "15m"),
            ("2h0m5s", 7205, "2h5s"),
        ] {
            let d: Duration = text.parse().unwrap();
            assert_eq!(d.as_secs(), secs, "{text}");
            assert_eq!(d.to_string(), canonical, "{text}");
        }
        for bad in ["", "15", "m", "15 m", "1.5h", "15min", "1s1m", "1h1h", "-5m", "99999999999999999999h"] {
            assert!(bad.parse::<Duration>().is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn schema_patterns_accept_and_refuse_what_the_docs_say() {
        let check = |pattern: &str, good: &[&str], bad: &[&str]| {
            let re = regex::Regex::new(pattern).unwrap();
            for s in good {
                assert!(re.is_match(s), "{pattern} must accept {s:?}");
            }
            for s in bad {
                assert!(!re.is_match(s), "{pattern} must refuse {s:?}");
            }
        };
        check(DURATION_PATTERN, &["15m", "1h30m", "90s", "1h", "1h0m0s"], &["1m1h", "15", "1d", "1.5h", "15 m"]);
        check(
            ACTION_PATTERN,
            &["*", "s3:GetObject", "s3:Get*", "dynamodb:Query", "ec2:Describe?nstances", "iam:*"],
            &["s3", "s3:", ":GetObject", "S3:GetObject", "s3:Get Object", "s3:GetObject,s3:PutObject"],
        );
        check(
            RESOURCE_PATTERN,
            &[
                "*",
                "arn:aws:s3:::team-a-*",
                "arn:aws:s3:::team-a-logs/x",
                "arn:aws:dynamodb:eu-west-1:123456789012:table/t",
                "arn:aws:sqs:*:*:q",
            ],
            &[
                "s3:::bucket",
                "arn:aws:s3",
                "arn:azure:s3:::b",
                "arn:aws:dynamodb:eu-west-1:1234:table/t",
                "arn:aws:s3:::",
            ],
        );
        check(
            POLICY_ARN_PATTERN,
            &["arn:aws:iam::aws:policy/ReadOnlyAccess", "arn:aws:iam::123456789012:policy/team/boundary"],
            &["arn:aws:iam::123:policy/x", "arn:aws:s3:::b", "arn:aws:iam::aws:role/x"],
        );
        // Every duration the pattern accepts, the parser accepts too.
        for s in ["15m", "1h30m", "90s", "1h", "1h0m0s"] {
            assert!(s.parse::<Duration>().is_ok(), "{s}");
        }
    }
}
