//! Any bytes the apiserver (or anyone reaching the port) sends: decoding
//! must answer with an error, never panic; a decoded Pod must mutate without
//! panicking, and mutating the result again must change nothing.
#![no_main]

use ephemera::webhook::{
    mutate::{Admission, ResolvedIdentity, Settings, mutate},
    server::decode,
};
use k8s_openapi::api::core::v1::Pod;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((_, request)) = decode(data) else { return };
    let Some(object) = request.object else { return };
    let Ok(pod) = serde_json::from_str::<Pod>(object.get()) else { return };
    let settings = Settings { aws_region: "eu-west-1".into() };
    for admission in [
        Admission::default(),
        Admission {
            keep_default_token: false,
            assign_name: Some("fuzz-abcde".into()),
            identity: Some(ResolvedIdentity {
                lease: "fuzz-abcde".into(),
                service_account: "fuzz-abcde".into(),
                role_arn: "arn:aws:iam::000000000000:role/ephemera/fuzz".into(),
                session_name: "ns.fuzz".into(),
                audience: "sts.amazonaws.com".into(),
                ttl_seconds: 900,
                kubernetes_token: true,
            }),
        },
    ] {
        let patch = mutate(&pod, &admission, &settings).expect("a decoded pod always serialises");
        let mut doc = serde_json::to_value(&pod).expect("serialise");
        json_patch_apply(&mut doc, &patch);
        let mutated: Pod = serde_json::from_value(doc).expect("the patched pod is a pod");
        let again = mutate(&mutated, &admission, &settings).expect("serialise");
        assert!(again.is_empty(), "mutation is not idempotent: {again:?}");
    }
});

fn json_patch_apply(doc: &mut serde_json::Value, patch: &ephemera::webhook::mutate::Patch) {
    let operations = patch.operations().expect("our own patch is JSON patch");
    json_patch::patch(doc, &operations).expect("our own patch applies to the pod it was made from");
}
