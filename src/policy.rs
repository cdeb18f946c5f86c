//! IAM and RBAC semantics for clamping a `WorkloadIdentity` to its
//! `IdentityBoundary`s. Shared by the identity controller and the validating
//! webhook, so both say the same thing about the same input.
//!
//! Patterns are IAM globs: `*` matches any run of characters, `?` exactly one.
//! "Admits" is language inclusion, not string equality: a boundary pattern
//! admits an identity pattern when every string the identity pattern matches
//! is matched by the boundary pattern (`s3:Get*` admits `s3:GetObject` and
//! `s3:GetObject*`, but not `s3:*`). Actions compare case-insensitively, as
//! IAM does; ARNs compare case-sensitively, segment by segment, so a `*` in a
//! boundary's account segment never reaches into the resource part.

use std::fmt;

use crate::api::{AwsStatement, Effect, KubernetesRule};

/// Does every string matched by `inner` also match `outer`? Both are globs
/// over `*` and `?`.
#[must_use]
pub fn glob_includes(outer: &str, inner: &str) -> bool {
    includes_by(outer, inner, |o, i| o == i)
}

/// [`glob_includes`] with characters compared by `eq`. Patterns are nearly
/// always ASCII: those are walked as bytes, the rest as `char`s.
fn includes_by(outer: &str, inner: &str, eq: impl Fn(char, char) -> bool) -> bool {
    if outer == "*" || outer == inner {
        // A lone star matches every string; a pattern includes itself.
        return true;
    }
    if outer.is_ascii() && inner.is_ascii() {
        includes(outer.as_bytes(), inner.as_bytes(), b'*', b'?', |o, i| eq(char::from(o), char::from(i)))
    } else {
        let outer: Vec<char> = outer.chars().collect();
        let inner: Vec<char> = inner.chars().collect();
        includes(&outer, &inner, '*', '?', eq)
    }
}

/// The inclusion automaton over `outer`, run on `inner`.
fn includes<T: Copy + PartialEq>(outer: &[T], inner: &[T], star: T, any: T, eq: impl Fn(T, T) -> bool) -> bool {
    // reach[j]: outer[..j] can cover inner[..i] for the current i. Two rows,
    // reused for every character of `inner` (this runs on every admission).
    let mut reach = vec![false; outer.len() + 1];
    let mut next = vec![false; outer.len() + 1];
    reach[0] = true;
    close_over_stars(outer, star, &mut reach);
    for &c in inner {
        next.fill(false);
        for j in 0..outer.len() {
            if !reach[j] {
                continue;
            }
            match outer[j] {
                // A star in `outer` absorbs anything `inner` produces here.
                o if o == star => next[j] = true,
                // `inner`'s star produces strings of any length: only a star covers it.
                _ if c == star => {}
                o if o == any => next[j + 1] = true,
                // `inner`'s `?` is any character: only `?` or `*` covers it.
                _ if c == any => {}
                o if eq(o, c) => next[j + 1] = true,
                _ => {}
            }
        }
        close_over_stars(outer, star, &mut next);
        std::mem::swap(&mut reach, &mut next);
    }
    reach[outer.len()]
}

/// A star may also match nothing: whatever reaches it reaches past it.
fn close_over_stars<T: Copy + PartialEq>(outer: &[T], star: T, reach: &mut [bool]) {
    for j in 0..outer.len() {
        if reach[j] && outer[j] == star {
            reach[j + 1] = true;
        }
    }
}

/// Does the boundary action pattern admit the identity action pattern?
/// Case-insensitively, as IAM compares actions.
#[must_use]
pub fn action_admits(boundary: &str, identity: &str) -> bool {
    includes_by(boundary, identity, |o, i| o.eq_ignore_ascii_case(&i))
}

/// Does the boundary resource pattern admit the identity resource pattern?
/// `*` alone admits anything, and a pattern admits itself; otherwise both
/// must be ARNs and each of the six segments
/// (`arn:partition:service:region:account:resource`) must admit its
/// counterpart.
#[must_use]
pub fn resource_admits(boundary: &str, identity: &str) -> bool {
    if boundary == "*" || boundary == identity {
        return true;
    }
    match (arn_segments(boundary), arn_segments(identity)) {
        (Some(b), Some(i)) => b.iter().zip(&i).all(|(b, i)| glob_includes(b, i)),
        _ => false,
    }
}

fn arn_segments(arn: &str) -> Option<[&str; 6]> {
    let mut parts = arn.splitn(6, ':');
    let segments = [parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?];
    (segments[0] == "arn").then_some(segments)
}

/// One thing an identity asks for that a boundary does not allow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Path of the offending field, as `kubectl explain` names it
    /// (`spec.aws.statements[1].actions`).
    pub field: String,
    /// The offending value.
    pub value: String,
    /// The boundary that refuses it.
    pub boundary: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {:?} is not allowed by IdentityBoundary {}", self.field, self.value, self.boundary)
    }
}

/// The AWS statements an identity really gets under one boundary: `Deny`
/// statements unchanged; in `Allow` statements, the actions and resources the
/// boundary admits, narrowed to the boundary's own patterns where the
/// identity asked for more (`s3:*` under a boundary of `s3:Get*` becomes
/// `s3:Get*`). Whatever was narrowed or dropped is reported as a violation.
#[must_use]
pub fn clamp_statements(
    statements: &[AwsStatement],
    boundary_name: &str,
    allowed_actions: &[String],
    allowed_resources: &[String],
) -> (Vec<AwsStatement>, Vec<Violation>) {
    let mut effective = Vec::new();
    let mut violations = Vec::new();
    for (index, statement) in statements.iter().enumerate() {
        if statement.effect == Effect::Deny {
            effective.push(statement.clone());
            continue;
        }
        let field = |name: &str| format!("spec.aws.statements[{index}].{name}");
        let actions = clamp_patterns(&statement.actions, allowed_actions, action_admits);
        let resources = clamp_patterns(&statement.resources, allowed_resources, resource_admits);
        for value in actions.refused {
            violations.push(Violation { field: field("actions"), value, boundary: boundary_name.to_owned() });
        }
        for value in resources.refused {
            violations.push(Violation { field: field("resources"), value, boundary: boundary_name.to_owned() });
        }
        if !actions.kept.is_empty() && !resources.kept.is_empty() {
            effective.push(AwsStatement { actions: actions.kept, resources: resources.kept, ..statement.clone() });
        }
    }
    (effective, violations)
}

struct Clamped {
    kept: Vec<String>,
    refused: Vec<String>,
}

/// Keeps each requested pattern some allowed pattern admits; for one that is
/// not admitted, keeps instead the allowed patterns it admits (the
/// intersection), and reports it.
fn clamp_patterns(requested: &[String], allowed: &[String], admits: fn(&str, &str) -> bool) -> Clamped {
    let mut kept: Vec<String> = Vec::new();
    let mut refused = Vec::new();
    for want in requested {
        if allowed.iter().any(|a| admits(a, want)) {
            push_unique(&mut kept, want);
        } else {
            refused.push(want.clone());
            for a in allowed.iter().filter(|a| admits(want, a)) {
                push_unique(&mut kept, a);
            }
        }
    }
    Clamped { kept, refused }
}

fn push_unique(list: &mut Vec<String>, value: &str) {
    if !list.iter().any(|v| v == value) {
        list.push(value.to_owned());
    }
}

/// Is every request of `rule` within one of the `allowed` rules? `*` in an
/// allowed list means any; an allowed rule restricted to resource names
/// admits only rules restricted to a subset of them.
#[must_use]
pub fn rule_admitted(rule: &KubernetesRule, allowed: &[KubernetesRule]) -> bool {
    allowed.iter().any(|a| {
        let covers = |outer: &[String], inner: &[String]| {
            outer.iter().any(|o| o == "*") || inner.iter().all(|i| i != "*" && outer.contains(i))
        };
        covers(&a.api_groups, &rule.api_groups)
            && covers(&a.resources, &rule.resources)
            && covers(&a.verbs, &rule.verbs)
            && (a.resource_names.is_empty()
                || (!rule.resource_names.is_empty()
                    && rule.resource_names.iter().all(|n| a.resource_names.contains(n))))
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn iam_semantics_from_the_issue() {
        assert!(action_admits("s3:Get*", "s3:GetObject"));
        assert!(action_admits("s3:Get*", "S3:getobject"), "actions are case-insensitive");
        assert!(action_admits("s3:Get*", "s3:GetObject*"));
        assert!(!action_admits("s3:Get*", "s3:*"));
        assert!(!action_admits("s3:Get*", "*"));
        assert!(!action_admits("s3:*", "iam:*"));
        assert!(!action_admits("iam:Get*", "iam:*"));
        assert!(action_admits("*", "iam:*"));
        assert!(action_admits("s3:Get?bject", "s3:GetObject"));
        assert!(!action_admits("s3:Get?bject", "s3:Get*bject"));

        assert!(resource_admits("arn:aws:s3:::team-a-*", "arn:aws:s3:::team-a-logs/x"));
        assert!(resource_admits("arn:aws:s3:::team-a-*", "arn:aws:s3:::team-a-logs/*"));
        assert!(!resource_admits("arn:aws:s3:::team-a-*", "arn:aws:s3:::team-b-logs/x"));
        assert!(!resource_admits("arn:aws:s3:::team-a-*", "*"));
        assert!(!resource_admits("arn:aws:s3:::team-a-*", "arn:aws:s3:::*"));
        assert!(!resource_admits("arn:aws:s3:::team-a-*", "arn:aws:S3:::team-a-x"), "ARNs are case-sensitive");
        assert!(resource_admits("arn:aws:sqs:*:*:team-a-*", "arn:aws:sqs:eu-west-1:123456789012:team-a-q"));
        // A star in the account segment does not reach into the resource.
        assert!(!resource_admits("arn:aws:sqs:*:*:team-a-*", "arn:aws:sqs:eu-west-1:123456789012:other:team-a-q"));
        assert!(resource_admits("*", "arn:aws:iam::123456789012:role/admin"));
    }

    #[test]
    fn deny_statements_are_always_kept_and_allows_are_narrowed() {
        let statements = vec![
            AwsStatement {
                actions: strings(&["s3:GetObject", "iam:PassRole"]),
                resources: strings(&["arn:aws:s3:::team-a-raw/*"]),
                ..AwsStatement::default()
            },
            AwsStatement {
                actions: strings(&["s3:*"]),
                resources: strings(&["arn:aws:s3:::*"]),
                ..AwsStatement::default()
            },
            AwsStatement {
                effect: Effect::Deny,
                actions: strings(&["*"]),
                resources: strings(&["*"]),
                ..AwsStatement::default()
            },
        ];
        let (effective, violations) =
            clamp_statements(&statements, "team-a", &strings(&["s3:Get*"]), &strings(&["arn:aws:s3:::team-a-*"]));
        assert_eq!(effective[0].actions, strings(&["s3:GetObject"]));
        assert_eq!(effective[1].actions, strings(&["s3:Get*"]), "s3:* narrowed to the boundary's s3:Get*");
        assert_eq!(effective[1].resources, strings(&["arn:aws:s3:::team-a-*"]));
        assert_eq!(effective[2].effect, Effect::Deny);
        let shown: Vec<String> = violations.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                r#"spec.aws.statements[0].actions: "iam:PassRole" is not allowed by IdentityBoundary team-a"#,
                r#"spec.aws.statements[1].actions: "s3:*" is not allowed by IdentityBoundary team-a"#,
                r#"spec.aws.statements[1].resources: "arn:aws:s3:::*" is not allowed by IdentityBoundary team-a"#,
            ]
        );
    }

    #[test]
    fn kubernetes_rules_must_fit_one_allowed_rule() {
        let allowed = vec![KubernetesRule {
            api_groups: strings(&[""]),
            resources: strings(&["configmaps"]),
            verbs: strings(&["get", "list", "watch"]),
            resource_names: vec![],
        }];
        let rule = |resources: &[&str], verbs: &[&str]| KubernetesRule {
            api_groups: strings(&[""]),
            resources: strings(resources),
            verbs: strings(verbs),
            resource_names: vec![],
        };
        assert!(rule_admitted(&rule(&["configmaps"], &["get"]), &allowed));
        assert!(!rule_admitted(&rule(&["secrets"], &["get"]), &allowed));
        assert!(!rule_admitted(&rule(&["configmaps"], &["delete"]), &allowed));
        assert!(
            !rule_admitted(&rule(&["configmaps"], &["*"]), &allowed),
            "a wildcard verb is more than get/list/watch"
        );
    }

    /// A string matched by `pattern`, choosing what each wildcard produces.
    fn instantiate(pattern: &str, fill: &[String]) -> String {
        let mut fills = fill.iter().cycle();
        pattern
            .chars()
            .map(|c| match c {
                '*' => fills.next().cloned().unwrap_or_default(),
                '?' => fills.next().and_then(|f| f.chars().next()).unwrap_or('x').to_string(),
                c => c.to_string(),
            })
            .collect()
    }

    /// Plain glob matching of a concrete string, written independently of
    /// `glob_includes` (backtracking): the definition inclusion must agree with.
    fn matches(pattern: &str, s: &str) -> bool {
        fn go(p: &[char], s: &[char]) -> bool {
            match p.split_first() {
                None => s.is_empty(),
                Some(('*', rest)) => (0..=s.len()).any(|k| go(rest, &s[k..])),
                Some(('?', rest)) => !s.is_empty() && go(rest, &s[1..]),
                Some((c, rest)) => s.first() == Some(c) && go(rest, &s[1..]),
            }
        }
        go(&pattern.chars().collect::<Vec<_>>(), &s.chars().collect::<Vec<_>>())
    }

    proptest! {
        #[test]
        fn a_pattern_includes_itself(p in "[ab*?]{0,8}") {
            prop_assert!(glob_includes(&p, &p));
            // Not only through the shortcut for equal patterns.
            prop_assert!(includes(p.as_bytes(), p.as_bytes(), b'*', b'?', |o, i| o == i));
        }

        #[test]
        fn bytes_and_chars_agree(outer in "[aAé*?]{0,6}", inner in "[aAé*?]{0,6}") {
            let chars = |s: &str| s.chars().collect::<Vec<char>>();
            let by_char = includes(&chars(&outer), &chars(&inner), '*', '?', |o, i| o == i);
            prop_assert_eq!(glob_includes(&outer, &inner), by_char);
            let folded = includes(&chars(&outer), &chars(&inner), '*', '?', |o, i| o.eq_ignore_ascii_case(&i));
            prop_assert_eq!(action_admits(&outer, &inner), folded);
            // As actions were compared before: both sides lowercased first.
            prop_assert_eq!(
                action_admits(&outer, &inner),
                glob_includes(&outer.to_ascii_lowercase(), &inner.to_ascii_lowercase())
            );
        }

        #[test]
        fn a_star_includes_everything(p in "[ab*?]{0,8}") {
            prop_assert!(glob_includes("*", &p));
        }

        #[test]
        fn inclusion_is_sound(outer in "[ab*?]{0,6}", inner in "[ab*?]{0,6}", fill in prop::collection::vec("[ab]{0,3}", 1..4)) {
            // If outer includes inner, every string inner matches is matched by outer.
            if glob_includes(&outer, &inner) {
                let s = instantiate(&inner, &fill);
                prop_assert!(matches(&inner, &s), "instantiate is a witness of inner");
                prop_assert!(matches(&outer, &s), "{outer} includes {inner} but misses {s}");
            }
        }

        #[test]
        fn including_a_concrete_string_is_matching_it(outer in "[ab*?]{0,6}", s in "[ab]{0,6}") {
            prop_assert_eq!(glob_includes(&outer, &s), matches(&outer, &s));
        }

        #[test]
        fn inclusion_is_transitive(a in "[ab*?]{0,5}", b in "[ab*?]{0,5}", c in "[ab*?]{0,5}") {
            if glob_includes(&a, &b) && glob_includes(&b, &c) {
                prop_assert!(glob_includes(&a, &c));
            }
        }

        #[test]
        fn effective_allows_always_fit_the_boundary(
            actions in prop::collection::vec("(s3|iam|sqs):(Get|Put|List)?[*]?", 1..4),
            allowed in prop::collection::vec("(s3|iam|sqs):(Get|Put|List)?[*]?", 0..4),
        ) {
            let statements = vec![AwsStatement { actions, resources: vec!["*".into()], ..AwsStatement::default() }];
            let (effective, _) = clamp_statements(&statements, "b", &allowed, &["*".to_owned()]);
            for statement in effective {
                for action in &statement.actions {
                    prop_assert!(allowed.iter().any(|a| action_admits(a, action)), "{action} outside {allowed:?}");
                }
            }
        }
    }
}
