//! The boundary matcher on any patterns: clamping never panics, and what it
//! keeps of an `Allow` statement is always inside the boundary (the property
//! that stops an identity from getting more than its boundary allows).
#![no_main]

use ephemera::{
    api::AwsStatement,
    policy::{action_admits, clamp_statements, glob_includes, resource_admits},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (Vec<String>, Vec<String>, Vec<String>, Vec<String>)| {
    let (actions, resources, allowed_actions, allowed_resources) = input;
    for p in actions.iter().chain(&allowed_actions) {
        assert!(glob_includes(p, p), "{p:?} must include itself");
        assert!(glob_includes("*", p), "* must include {p:?}");
    }
    let statements = vec![AwsStatement { actions, resources, ..AwsStatement::default() }];
    let (effective, _) = clamp_statements(&statements, "fuzz", &allowed_actions, &allowed_resources);
    for statement in effective {
        for action in &statement.actions {
            assert!(allowed_actions.iter().any(|a| action_admits(a, action)), "{action:?} escaped {allowed_actions:?}");
        }
        for resource in &statement.resources {
            assert!(
                allowed_resources.iter().any(|a| resource_admits(a, resource)),
                "{resource:?} escaped {allowed_resources:?}"
            );
        }
    }
});
