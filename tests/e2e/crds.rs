//! The API against the real apiserver: every validation rule rejects its bad
//! input with a message that names the field, the examples apply cleanly, and
//! `kubectl explain` / `kubectl get ephemera` show what the docs promise.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, DynamicObject, Patch, PatchParams},
    core::GroupVersionKind,
    discovery::{self, Scope},
};

use crate::support::{TestBed, ensure_crds, unique_name, wait_until};

#[tokio::test]
async fn every_invalid_resource_is_rejected_with_a_message_naming_the_field() {
    let bed = TestBed::connect().await;
    ensure_crds(&bed.client).await;
    let ns = bed.namespace("e2e-invalid").await;
    let dir = repo_path("e2e/invalid");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    cases.sort();
    assert!(cases.len() >= 15, "the invalid-input suite lost cases: {}", cases.len());

    let mut failures = Vec::new();
    for case in &cases {
        let text = std::fs::read_to_string(case).unwrap();
        let expect = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} has no `# expect:` line", case.display()))
            .to_owned();
        // Unique names: cases share the namespace, and boundaries the cluster.
        let suffix = unique_name("x");
        let docs: Vec<_> = yaml_documents(&text).into_iter().map(|d| renamed(d, &suffix)).collect();
        // All documents but the last must be accepted; the last must be refused.
        let (last, setup) = docs.split_last().expect("at least one document");
        for doc in setup {
            apply(&bed.client, doc, &ns.name)
                .await
                .unwrap_or_else(|e| panic!("{}: setup document refused: {e}", case.display()));
        }
        match apply(&bed.client, last, &ns.name).await {
            Ok(()) => failures.push(format!("{}: accepted, expected refusal with {expect:?}", case.display())),
            Err(kube::Error::Api(status)) if status.code == 422 && status.message.contains(&expect) => {}
            Err(e) => {
                failures.push(format!("{}: refused with {e}, expected a 422 containing {expect:?}", case.display()));
            }
        }
        cleanup_cluster_scoped(&bed.client, &docs).await;
    }
    assert!(failures.is_empty(), "{} case(s) failed:\n{}", failures.len(), failures.join("\n"));
}

#[tokio::test]
async fn the_examples_apply_cleanly_and_kubectl_shows_them() {
    let bed = TestBed::connect().await;
    ensure_crds(&bed.client).await;
    let ns = bed.namespace("e2e-examples").await;
    let suffix = unique_name("x");
    let mut all_docs = Vec::new();
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(repo_path("examples")).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for file in &files {
        for doc in yaml_documents(&std::fs::read_to_string(file).unwrap()) {
            // The examples' own namespace is replaced by the test's.
            if doc["kind"] == "Namespace" {
                continue;
            }
            // Boundaries are cluster-scoped: a unique name keeps reruns apart.
            let doc = if doc["kind"] == "IdentityBoundary" { renamed(doc, &suffix) } else { doc };
            apply(&bed.client, &doc, &ns.name)
                .await
                .unwrap_or_else(|e| panic!("{}: {} refused: {e}", file.display(), doc["kind"]));
            all_docs.push(doc);
        }
    }

    // Discovery cached before the CRDs existed would not know the category.
    kubectl(&["api-resources"]);
    let get = kubectl(&["get", "ephemera", "-n", &ns.name]);
    for name in ["nightly-report", "orders-api"] {
        assert!(get.contains(name), "`kubectl get ephemera` lists {name}:\n{get}");
    }
    assert!(get.contains("SCOPE") && get.contains("LEASES"), "printer columns:\n{get}");
    // The apiserver publishes a CRD's OpenAPI schema a moment after the CRD
    // is served (CI once asked in between: "couldn't find resource").
    let args = ["explain", "workloadidentity.spec.scope"];
    let explain = wait_until("`kubectl explain` to know WorkloadIdentity", Duration::from_secs(30), || async {
        try_kubectl(&args).inspect_err(|e| eprintln!("kubectl {args:?}: {e}")).ok()
    })
    .await;
    assert!(explain.contains("each pod gets its own identity"), "`kubectl explain` shows the field docs:\n{explain}");

    cleanup_cluster_scoped(&bed.client, &all_docs).await;
}

/// `doc` with `-<suffix>` appended to its name.
fn renamed(mut doc: serde_json::Value, suffix: &str) -> serde_json::Value {
    let name = doc["metadata"]["name"].as_str().unwrap_or_default().to_owned();
    doc["metadata"]["name"] = format!("{name}-{suffix}").into();
    doc
}

/// Server-side apply of one document; namespaced objects go to `namespace`.
async fn apply(client: &Client, doc: &serde_json::Value, namespace: &str) -> kube::Result<()> {
    let mut obj: DynamicObject = serde_json::from_value(doc.clone()).expect("a Kubernetes object");
    let (resource, scope) = discover(client, doc).await;
    let api: Api<DynamicObject> = if scope == Scope::Namespaced {
        obj.metadata.namespace = Some(namespace.to_owned());
        Api::namespaced_with(client.clone(), namespace, &resource)
    } else {
        Api::all_with(client.clone(), &resource)
    };
    api.patch(&obj.name_any(), &PatchParams::apply("ephemera-e2e").force(), &Patch::Apply(&obj)).await.map(drop)
}

/// Deletes the cluster-scoped objects among `docs` (namespaced ones go with
/// the test namespace).
async fn cleanup_cluster_scoped(client: &Client, docs: &[serde_json::Value]) {
    for doc in docs {
        let (resource, scope) = discover(client, doc).await;
        if scope == Scope::Cluster {
            let name = doc["metadata"]["name"].as_str().unwrap_or_default();
            let _ =
                Api::<DynamicObject>::all_with(client.clone(), &resource).delete(name, &DeleteParams::default()).await;
        }
    }
}

async fn discover(client: &Client, doc: &serde_json::Value) -> (kube::core::ApiResource, Scope) {
    let api_version = doc["apiVersion"].as_str().expect("apiVersion");
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, doc["kind"].as_str().expect("kind"));
    let (resource, caps) = discovery::pinned_kind(client, &gvk).await.expect("the kind is served");
    (resource, caps.scope)
}

fn yaml_documents(text: &str) -> Vec<serde_json::Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| serde_json::Value::deserialize(doc).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn kubectl(args: &[&str]) -> String {
    try_kubectl(args).unwrap_or_else(|e| panic!("kubectl {args:?} failed: {e}"))
}

/// kubectl's output, or its error output when it fails.
fn try_kubectl(args: &[&str]) -> Result<String, String> {
    let out =
        std::process::Command::new("kubectl").args(args).output().expect("kubectl on PATH (source .ephemera/dev.env)");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}
