//! `mutate()` on the golden plain pod (default token stripped, identity
//! injected) and on an already-mutated pod (the reinvocation path).
//! Run with `make bench`; the target is under 50 µs per call.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use ephemera::webhook::mutate::{Admission, Settings, mutate};
use k8s_openapi::api::core::v1::Pod;

fn fixture<T: serde::de::DeserializeOwned>(case: &str, file: &str) -> T {
    let path = format!("{}/tests/fixtures/mutate/{case}/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn bench(c: &mut Criterion) {
    let settings = Settings { aws_region: "eu-west-1".into() };
    let admission: Admission = fixture("plain-pod", "admission.yaml");
    let pod: Pod = fixture("plain-pod", "pod.yaml");
    let mutated: Pod = fixture("plain-pod", "expected-pod.yaml");
    let sidecars: Pod = fixture("init-and-native-sidecar", "pod.yaml");

    c.bench_function("mutate/plain-pod", |b| b.iter(|| mutate(black_box(&pod), &admission, &settings)));
    c.bench_function("mutate/init-and-native-sidecar", |b| {
        b.iter(|| mutate(black_box(&sidecars), &admission, &settings));
    });
    c.bench_function("mutate/reinvocation", |b| b.iter(|| mutate(black_box(&mutated), &admission, &settings)));
}

criterion_group!(benches, bench);
criterion_main!(benches);
