//! The pod mutation, as a pure function: pod + what admission decided ->
//! JSON patch. The HTTP layer decodes the AdmissionReview, resolves the
//! identity (and creates the ServiceAccount and lease), then calls this.
//!
//! Why each step:
//! - The built-in ServiceAccount admission plugin runs before mutating
//!   webhooks, so the pod already carries the `kube-api-access-*` projected
//!   volume (the standing default token) and its mounts: we remove them from
//!   every container kind and turn automounting off. The plugin does not run
//!   again on reinvocation, so they stay gone.
//! - A pod with an identity gets its own ServiceAccount, a projected token
//!   for the identity's audience (kubelet rotates it at 80 % of its life), the
//!   env every AWS SDK reads for web-identity credentials, and a scheduling
//!   gate the controller lifts once the role is verified usable.
//! - `reinvocationPolicy: IfNeeded`: a second call on the mutated pod yields
//!   an empty patch (nothing is added twice, nothing the user set is replaced).

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{
    ConfigMapProjection, Container, DownwardAPIProjection, DownwardAPIVolumeFile, EnvVar, KeyToPath,
    ObjectFieldSelector, Pod, PodSchedulingGate, PodSpec, ProjectedVolumeSource, ServiceAccountTokenProjection, Volume,
    VolumeMount, VolumeProjection,
};
use serde::{Deserialize, Serialize};

use crate::api::well_known::{
    ANNOTATION_ENV_KEPT, LABEL_LEASE, MIN_TOKEN_TTL_SECONDS, SCHEDULING_GATE, TOKEN_MOUNT_PATH,
};
use crate::{Error, Result};

/// Name of the projected volume holding the STS-audience token.
pub const TOKEN_VOLUME: &str = "ephemera-token";
/// Name of the projected volume replacing `kube-api-access-*` for identities
/// that have Kubernetes rules.
pub const KUBE_API_VOLUME: &str = "ephemera-kube-api-access";
/// Where Kubernetes client libraries look for the in-cluster token.
const KUBE_API_MOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Prefix of the volume the ServiceAccount admission plugin injects.
const DEFAULT_TOKEN_VOLUME_PREFIX: &str = "kube-api-access-";

/// Process-wide settings of the webhook.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    /// `AWS_REGION` / `AWS_DEFAULT_REGION` injected into pods.
    pub aws_region: String,
}

/// What admission decided for this pod, resolved before mutating.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Admission {
    /// The pod opted out (`ephemera.dev/default-token: keep`) and its boundary
    /// allows it: leave the default token alone.
    #[serde(default)]
    pub keep_default_token: bool,
    /// The identity the pod gets, if it matches a `WorkloadIdentity`.
    #[serde(default)]
    pub identity: Option<ResolvedIdentity>,
    /// Name given to a `generateName` pod, so its lease can name its holder
    /// before the pod exists (the apiserver keeps a name that is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assign_name: Option<String>,
}

/// A `WorkloadIdentity` instantiated for one pod (or Job run).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedIdentity {
    /// The `IdentityLease` made for this pod.
    pub lease: String,
    /// The per-pod ServiceAccount.
    pub service_account: String,
    /// ARN of the role the lease will provision.
    pub role_arn: String,
    /// `AWS_ROLE_SESSION_NAME`.
    pub session_name: String,
    /// Token audience.
    pub audience: String,
    /// Token lifetime in seconds (raised to the kubelet's minimum of 600).
    pub ttl_seconds: i64,
    /// The identity has Kubernetes rules: also project a Kubernetes API token.
    #[serde(default)]
    pub kubernetes_token: bool,
}

/// The JSON patch that turns `pod` into what ephemera admits: built from
/// the parts of the pod a mutation touches (appends with `/-`, removals by
/// index), not by serialising and diffing the whole pod twice.
///
/// # Errors
/// Only if a part of the pod cannot be serialised, which a decoded pod's
/// parts always can.
pub fn mutate(pod: &Pod, admission: &Admission, settings: &Settings) -> Result<Patch> {
    patch_between(pod, &mutated(pod, admission, settings))
}

/// A JSON patch (RFC 6902), as the JSON text the apiserver receives:
/// written straight from the pod's parts, without a JSON tree in between.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Patch {
    json: Vec<u8>,
    operations: usize,
}

impl Patch {
    /// No operation: the pod is admitted as it is.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.operations == 0
    }

    /// The patch as JSON text (an array of operations).
    #[must_use]
    pub fn json(&self) -> &[u8] {
        &self.json
    }

    /// [`Patch::json`], owned.
    #[must_use]
    pub fn into_json(self) -> Vec<u8> {
        self.json
    }

    /// The operations, decoded (tests and tools apply them with `json_patch`).
    ///
    /// # Errors
    /// Never for a patch [`mutate`] made: it writes well-formed operations.
    pub fn operations(&self) -> serde_json::Result<json_patch::Patch> {
        serde_json::from_slice(&self.json)
    }
}

/// `pod` as ephemera admits it.
fn mutated(pod: &Pod, admission: &Admission, settings: &Settings) -> Pod {
    let mut pod = pod.clone();
    if let Some(name) = &admission.assign_name
        && pod.metadata.name.as_deref().unwrap_or_default().is_empty()
    {
        pod.metadata.name = Some(name.clone());
    }
    let spec = pod.spec.get_or_insert_with(PodSpec::default);
    if !admission.keep_default_token {
        strip_default_token(spec);
    }
    if let Some(identity) = &admission.identity {
        spec.service_account_name = Some(identity.service_account.clone());
        if spec.service_account.is_some() {
            // Deprecated alias; the apiserver rejects a pod where they differ.
            spec.service_account = Some(identity.service_account.clone());
        }
        add_volume(spec, token_volume(identity));
        if identity.kubernetes_token {
            add_volume(spec, kube_api_volume(identity));
        }
        let env = aws_env(identity, settings);
        let mut kept = BTreeSet::new();
        for_each_container(spec, |kind, c| {
            add_mount(c, TOKEN_VOLUME, token_dir());
            if identity.kubernetes_token {
                add_mount(c, KUBE_API_VOLUME, KUBE_API_MOUNT_PATH);
            }
            for var in &env {
                if !add_env(c, var) {
                    kept.insert(format!("{kind}/{}:{}", c.name, var.name));
                }
            }
        });
        let gates = spec.scheduling_gates.get_or_insert_with(Vec::new);
        if !gates.iter().any(|g| g.name == SCHEDULING_GATE) {
            gates.push(PodSchedulingGate { name: SCHEDULING_GATE.to_owned() });
        }
        pod.metadata.labels.get_or_insert_with(Default::default).insert(LABEL_LEASE.to_owned(), identity.lease.clone());
        if !kept.is_empty() {
            let annotations = pod.metadata.annotations.get_or_insert_with(Default::default);
            annotations.insert(ANNOTATION_ENV_KEPT.to_owned(), kept.into_iter().collect::<Vec<_>>().join(","));
        }
    }
    pod
}

/// The operations that turn `before` into `after`, over the fields
/// [`mutated`] changes. Arrays there only lose elements (the default
/// token) and gain some at the end (ours), so each is patched by removals
/// (highest index first) and appends; maps by key.
fn patch_between(before: &Pod, after: &Pod) -> Result<Patch> {
    let mut ops = Ops::default();
    let (b, a) = (&before.metadata, &after.metadata);
    ops.value(&["metadata", "name"], b.name.as_ref(), a.name.as_ref())?;
    ops.map(&["metadata", "labels"], b.labels.as_ref(), a.labels.as_ref())?;
    ops.map(&["metadata", "annotations"], b.annotations.as_ref(), a.annotations.as_ref())?;
    match (before.spec.as_ref(), after.spec.as_ref()) {
        (Some(b), Some(a)) => spec_ops(&mut ops, b, a)?,
        (b, a) => ops.value(&["spec"], b, a)?,
    }
    Ok(ops.finish())
}

fn spec_ops(ops: &mut Ops, b: &PodSpec, a: &PodSpec) -> Result<()> {
    ops.value(
        &["spec", "automountServiceAccountToken"],
        b.automount_service_account_token.as_ref(),
        a.automount_service_account_token.as_ref(),
    )?;
    ops.value(&["spec", "serviceAccountName"], b.service_account_name.as_ref(), a.service_account_name.as_ref())?;
    ops.value(&["spec", "serviceAccount"], b.service_account.as_ref(), a.service_account.as_ref())?;
    ops.array(&["spec", "volumes"], b.volumes.as_ref(), a.volumes.as_ref())?;
    ops.array(&["spec", "schedulingGates"], b.scheduling_gates.as_ref(), a.scheduling_gates.as_ref())?;
    let kinds = [
        ("initContainers", b.init_containers.as_deref(), a.init_containers.as_deref()),
        ("containers", Some(b.containers.as_slice()), Some(a.containers.as_slice())),
    ];
    for (kind, before, after) in kinds {
        let (before, after) = (before.unwrap_or_default(), after.unwrap_or_default());
        if before.len() != after.len() {
            // Never: containers are changed, not added. Whole, to be safe.
            ops.add(&["spec", kind], &after)?;
            continue;
        }
        for (i, (b, a)) in before.iter().zip(after).enumerate() {
            let index = i.to_string();
            ops.array(&["spec", kind, &index, "volumeMounts"], b.volume_mounts.as_ref(), a.volume_mounts.as_ref())?;
            ops.array(&["spec", kind, &index, "env"], b.env.as_ref(), a.env.as_ref())?;
        }
    }
    let (before, after) =
        (b.ephemeral_containers.as_deref().unwrap_or_default(), a.ephemeral_containers.as_deref().unwrap_or_default());
    for (i, (b, a)) in before.iter().zip(after).enumerate() {
        let index = i.to_string();
        let path = ["spec", "ephemeralContainers", &index, "volumeMounts"];
        ops.array(&path, b.volume_mounts.as_ref(), a.volume_mounts.as_ref())?;
    }
    Ok(())
}

/// JSON patch operations, in the order they apply, written as JSON text
/// as they come.
#[derive(Default)]
struct Ops {
    json: Vec<u8>,
    operations: usize,
    /// The JSON pointer being written (reused).
    pointer: String,
}

impl Ops {
    fn add<T: Serialize + ?Sized>(&mut self, path: &[&str], value: &T) -> Result<()> {
        self.begin("add", path);
        self.json.extend_from_slice(br#","value":"#);
        serde_json::to_writer(&mut self.json, value)
            .map_err(|e| Error::Serialization { what: "pod field", message: e.to_string() })?;
        self.json.push(b'}');
        Ok(())
    }

    fn remove(&mut self, path: &[&str]) {
        self.begin("remove", path);
        self.json.push(b'}');
    }

    /// `[` or `,`, then `{"op":<op>,"path":<path>`, the path a JSON pointer
    /// (RFC 6901: `~` written `~0`, `/` written `~1`, so the label
    /// `ephemera.dev/lease` is the token `ephemera.dev~1lease`).
    fn begin(&mut self, op: &str, path: &[&str]) {
        self.json.push(if self.operations == 0 { b'[' } else { b',' });
        self.operations += 1;
        self.json.extend_from_slice(br#"{"op":""#);
        self.json.extend_from_slice(op.as_bytes());
        self.json.extend_from_slice(br#"","path":"#);
        self.pointer.clear();
        for token in path {
            self.pointer.push('/');
            for c in token.chars() {
                match c {
                    '~' => self.pointer.push_str("~0"),
                    '/' => self.pointer.push_str("~1"),
                    c => self.pointer.push(c),
                }
            }
        }
        // A string always serialises (JSON escapes whatever it holds).
        let _ = serde_json::to_writer(&mut self.json, self.pointer.as_str());
    }

    fn finish(mut self) -> Patch {
        if self.operations == 0 {
            self.json.extend_from_slice(b"[]");
        } else {
            self.json.push(b']');
        }
        Patch { json: self.json, operations: self.operations }
    }

    /// `add` (which replaces a member that is there) or `remove`.
    fn value<T: Serialize + PartialEq>(&mut self, path: &[&str], before: Option<&T>, after: Option<&T>) -> Result<()> {
        match (before, after) {
            (b, Some(a)) if b != Some(a) => self.add(path, a),
            (Some(_), None) => {
                self.remove(path);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn map(
        &mut self,
        path: &[&str],
        before: Option<&std::collections::BTreeMap<String, String>>,
        after: Option<&std::collections::BTreeMap<String, String>>,
    ) -> Result<()> {
        let (Some(b), Some(a)) = (before, after) else { return self.value(path, before, after) };
        for key in b.keys().filter(|k| !a.contains_key(*k)) {
            self.remove(&[path, &[key.as_str()]].concat());
        }
        for (key, value) in a.iter().filter(|(k, v)| b.get(*k) != Some(*v)) {
            self.add(&[path, &[key.as_str()]].concat(), value)?;
        }
        Ok(())
    }

    /// An array that kept some of its elements in order and gained others
    /// at its end: removals from the highest index down, then appends.
    fn array<T: Serialize + PartialEq>(
        &mut self,
        path: &[&str],
        before: Option<&Vec<T>>,
        after: Option<&Vec<T>>,
    ) -> Result<()> {
        let (Some(b), Some(a)) = (before, after) else { return self.value(path, before, after) };
        if b == a {
            return Ok(());
        }
        let mut kept = 0;
        let mut removed = Vec::new();
        for (i, item) in b.iter().enumerate() {
            if a.get(kept) == Some(item) {
                kept += 1;
            } else {
                removed.push(i);
            }
        }
        for i in removed.into_iter().rev() {
            self.remove(&[path, &[i.to_string().as_str()]].concat());
        }
        for item in &a[kept..] {
            self.add(&[path, &["-"]].concat(), item)?;
        }
        Ok(())
    }
}

/// A field of `pod` that would take the place of the token ephemera
/// projects for `identity`, named as the apiserver names fields: a volume
/// of ours by name that is not ours, or a mount at (or inside) our token
/// directory, or at the Kubernetes API token's for an identity with
/// Kubernetes rules, that is not of our volume. `mutate` leaves the user's
/// volumes and mounts alone, so such a pod would run without the token
/// while its lease went Ready: the webhook refuses it instead.
#[must_use]
pub fn token_conflict(pod: &Pod, identity: &ResolvedIdentity) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let mut ours = vec![(token_volume(identity), token_dir())];
    if identity.kubernetes_token {
        ours.push((kube_api_volume(identity), KUBE_API_MOUNT_PATH));
    }
    for (i, volume) in spec.volumes.iter().flatten().enumerate() {
        if let Some((want, _)) = ours.iter().find(|(want, _)| want.name == volume.name)
            && volume != want
        {
            return Some(format!(
                "spec.volumes[{i}].name: {:?} is the name of the volume ephemera projects the workload's token into; \
                 rename the pod's volume",
                volume.name
            ));
        }
    }
    // The default token's mounts go (`strip_default_token`): not a conflict.
    let stripped = |name: &str| {
        name.starts_with(DEFAULT_TOKEN_VOLUME_PREFIX)
            && spec.volumes.iter().flatten().any(|v| v.name == name && v.projected.is_some())
    };
    let inside = |path: &str, dir: &str| {
        let (path, dir) = (path.trim_end_matches('/'), dir.trim_end_matches('/'));
        path == dir || path.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/'))
    };
    let kinds =
        [("initContainers", spec.init_containers.as_deref().unwrap_or_default()), ("containers", &spec.containers)];
    for (kind, containers) in kinds {
        for (j, c) in containers.iter().enumerate() {
            for (k, m) in c.volume_mounts.iter().flatten().enumerate() {
                for (volume, dir) in &ours {
                    let here = inside(&m.mount_path, dir);
                    if (here && m.name != volume.name && !stripped(&m.name)) || (!here && m.name == volume.name) {
                        return Some(format!(
                            "spec.{kind}[{j}].volumeMounts[{k}]: {:?} at {:?} takes the place of ephemera's token at {dir}; \
                             mount it elsewhere",
                            m.name, m.mount_path
                        ));
                    }
                }
            }
        }
    }
    None
}

/// No default token: automount off, the plugin's volume and mounts gone.
fn strip_default_token(spec: &mut PodSpec) {
    spec.automount_service_account_token = Some(false);
    let injected: BTreeSet<String> = spec
        .volumes
        .iter()
        .flatten()
        .filter(|v| v.name.starts_with(DEFAULT_TOKEN_VOLUME_PREFIX) && v.projected.is_some())
        .map(|v| v.name.clone())
        .collect();
    if injected.is_empty() {
        return;
    }
    if let Some(volumes) = spec.volumes.as_mut() {
        volumes.retain(|v| !injected.contains(&v.name));
    }
    for_each_container(spec, |_, c| {
        if let Some(mounts) = c.volume_mounts.as_mut() {
            mounts.retain(|m| !injected.contains(&m.name));
        }
    });
    // Ephemeral containers share the pod's volumes too.
    for c in spec.ephemeral_containers.iter_mut().flatten() {
        if let Some(mounts) = c.volume_mounts.as_mut() {
            mounts.retain(|m| !injected.contains(&m.name));
        }
    }
}

/// Calls `f` with every container and init container (native sidecars are
/// init containers with `restartPolicy: Always`).
fn for_each_container(spec: &mut PodSpec, mut f: impl FnMut(&str, &mut Container)) {
    for c in spec.init_containers.iter_mut().flatten() {
        f("initContainer", c);
    }
    for c in &mut spec.containers {
        f("container", c);
    }
}

/// The directory of the token file: the file is `<dir>/token`.
fn token_dir() -> &'static str {
    TOKEN_MOUNT_PATH.rsplit_once('/').map_or(TOKEN_MOUNT_PATH, |(dir, _)| dir)
}

fn token_volume(identity: &ResolvedIdentity) -> Volume {
    Volume {
        name: TOKEN_VOLUME.to_owned(),
        projected: Some(ProjectedVolumeSource {
            default_mode: Some(0o444),
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(identity.audience.clone()),
                    expiration_seconds: Some(identity.ttl_seconds.max(MIN_TOKEN_TTL_SECONDS)),
                    path: "token".to_owned(),
                }),
                ..VolumeProjection::default()
            }]),
        }),
        ..Volume::default()
    }
}

/// What `kube-api-access-*` holds (API-audience token, cluster CA,
/// namespace), for identities that are granted Kubernetes rules. Its token
/// lives as long as the STS token: not the default `3607` seconds, which the
/// apiserver turns into a one-year token for old clients
/// (`--service-account-extend-token-expiration`, on by default; measured on
/// the test bed's real node).
fn kube_api_volume(identity: &ResolvedIdentity) -> Volume {
    Volume {
        name: KUBE_API_VOLUME.to_owned(),
        projected: Some(ProjectedVolumeSource {
            default_mode: Some(0o444),
            sources: Some(vec![
                VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: None,
                        expiration_seconds: Some(identity.ttl_seconds.max(MIN_TOKEN_TTL_SECONDS)),
                        path: "token".to_owned(),
                    }),
                    ..VolumeProjection::default()
                },
                VolumeProjection {
                    config_map: Some(ConfigMapProjection {
                        name: "kube-root-ca.crt".to_owned(),
                        items: Some(vec![KeyToPath { key: "ca.crt".into(), path: "ca.crt".into(), mode: None }]),
                        optional: None,
                    }),
                    ..VolumeProjection::default()
                },
                VolumeProjection {
                    downward_api: Some(DownwardAPIProjection {
                        items: Some(vec![DownwardAPIVolumeFile {
                            path: "namespace".into(),
                            field_ref: Some(ObjectFieldSelector {
                                api_version: Some("v1".into()),
                                field_path: "metadata.namespace".into(),
                            }),
                            ..DownwardAPIVolumeFile::default()
                        }]),
                    }),
                    ..VolumeProjection::default()
                },
            ]),
        }),
        ..Volume::default()
    }
}

fn add_volume(spec: &mut PodSpec, volume: Volume) {
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    if !volumes.iter().any(|v| v.name == volume.name) {
        volumes.push(volume);
    }
}

fn add_mount(container: &mut Container, volume: &str, path: &str) {
    let mounts = container.volume_mounts.get_or_insert_with(Vec::new);
    if !mounts.iter().any(|m| m.name == volume || m.mount_path == path) {
        mounts.push(VolumeMount {
            name: volume.to_owned(),
            mount_path: path.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
}

/// Adds `var` unless the container already sets a variable of that name;
/// returns whether the container's own value was kept instead.
fn add_env(container: &mut Container, var: &EnvVar) -> bool {
    let env = container.env.get_or_insert_with(Vec::new);
    match env.iter().find(|e| e.name == var.name) {
        None => {
            env.push(var.clone());
            true
        }
        // Ours from an earlier call (reinvocation) is not a user's value.
        Some(existing) => existing == var,
    }
}

fn aws_env(identity: &ResolvedIdentity, settings: &Settings) -> Vec<EnvVar> {
    let var =
        |name: &str, value: &str| EnvVar { name: name.to_owned(), value: Some(value.to_owned()), value_from: None };
    vec![
        var("AWS_ROLE_ARN", &identity.role_arn),
        var("AWS_WEB_IDENTITY_TOKEN_FILE", TOKEN_MOUNT_PATH),
        var("AWS_ROLE_SESSION_NAME", &identity.session_name),
        var("AWS_REGION", &settings.aws_region),
        var("AWS_DEFAULT_REGION", &settings.aws_region),
        var("AWS_STS_REGIONAL_ENDPOINTS", "regional"),
    ]
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::*;

    /// One golden case: `tests/fixtures/mutate/<case>/{pod.yaml,admission.yaml}` in,
    /// `expected-patch.json` (what the apiserver receives) and `expected-pod.yaml`
    /// (the patched pod, for reviewers) out. `UPDATE_GOLDEN=1 cargo test golden`
    /// rewrites both outputs: review the diff before committing.
    fn run_case(dir: &Path) -> std::result::Result<(), String> {
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).map_err(|e| format!("{f}: {e}"));
        let pod: Pod = serde_yaml::from_str(&read("pod.yaml")?).map_err(|e| format!("pod.yaml: {e}"))?;
        let admission: Admission =
            serde_yaml::from_str(&read("admission.yaml")?).map_err(|e| format!("admission.yaml: {e}"))?;
        let settings = Settings { aws_region: "eu-west-1".into() };
        let patch = mutate(&pod, &admission, &settings).map_err(|e| e.to_string())?;
        let patch = patch.operations().map_err(|e| format!("the patch is not JSON patch: {e}"))?;
        let rendered = serde_json::to_string_pretty(&patch).unwrap() + "\n";
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(dir.join("expected-patch.json"), &rendered).unwrap();
        }
        let expected = read("expected-patch.json")?;
        if rendered != expected {
            return Err(format!("patch differs from expected-patch.json:\n{rendered}"));
        }
        // The patch applies to the pod, and mutating the result again changes
        // nothing (reinvocation is idempotent).
        let mut doc = serde_json::to_value(&pod).unwrap();
        json_patch::patch(&mut doc, &patch).map_err(|e| format!("patch does not apply: {e}"))?;
        let rendered_pod = serde_yaml::to_string(&doc).unwrap();
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(dir.join("expected-pod.yaml"), &rendered_pod).unwrap();
        }
        if rendered_pod != read("expected-pod.yaml")? {
            return Err(format!("patched pod differs from expected-pod.yaml:\n{rendered_pod}"));
        }
        let mutated: Pod = serde_json::from_value(doc).map_err(|e| format!("patched pod: {e}"))?;
        let again = mutate(&mutated, &admission, &settings).map_err(|e| e.to_string())?;
        if !again.is_empty() {
            return Err(format!("second call is not a no-op: {}", String::from_utf8_lossy(again.json())));
        }
        Ok(())
    }

    #[test]
    fn patch_paths_are_escaped_json_pointers_in_json_strings() {
        let mut ops = Ops::default();
        ops.add(&["metadata", "labels", "a~b/c\"d"], "x\"y").unwrap();
        ops.remove(&["spec", "volumes", "0"]);
        let patch = ops.finish();
        assert!(!patch.is_empty());
        let parsed: Value = serde_json::from_slice(patch.json()).unwrap();
        assert_eq!(
            parsed,
            json!([
                {"op": "add", "path": "/metadata/labels/a~0b~1c\"d", "value": "x\"y"},
                {"op": "remove", "path": "/spec/volumes/0"},
            ])
        );
        let mut doc = json!({"metadata": {"labels": {}}, "spec": {"volumes": [1]}});
        json_patch::patch(&mut doc, &patch.operations().unwrap()).unwrap();
        assert_eq!(doc, json!({"metadata": {"labels": {"a~b/c\"d": "x\"y"}}, "spec": {"volumes": []}}));
        let empty = Ops::default().finish();
        assert!(empty.is_empty());
        assert_eq!(empty.json(), b"[]");
    }

    #[test]
    fn golden_fixtures() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mutate");
        let mut cases: Vec<PathBuf> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).collect();
        cases.sort();
        assert!(cases.len() >= 10, "golden cases went missing: {}", cases.len());
        let failures: Vec<String> = cases
            .iter()
            .filter_map(|c| run_case(c).err().map(|e| format!("{}: {e}", c.file_name().unwrap().to_string_lossy())))
            .collect();
        assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    }

    #[test]
    fn a_pod_of_its_own_at_the_token_path_is_named_and_refused() {
        let identity = ResolvedIdentity {
            lease: "l".into(),
            service_account: "l".into(),
            role_arn: "arn:aws:iam::1:role/ephemera/r".into(),
            session_name: "s".into(),
            audience: "sts.amazonaws.com".into(),
            ttl_seconds: 900,
            kubernetes_token: true,
        };
        let pod = |volumes: Value, mounts: Value| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {
                "volumes": volumes, "containers": [{"name": "app", "image": "x"}, {"name": "b", "image": "x", "volumeMounts": mounts}],
            }}))
            .unwrap()
        };
        let conflict = |volumes: Value, mounts: Value| token_conflict(&pod(volumes, mounts), &identity);
        assert_eq!(
            conflict(json!([{"name": "data", "emptyDir": {}}]), json!([{"name": "data", "mountPath": "/data"}])),
            None
        );
        // The plugin's default token at the API path goes anyway.
        let default = json!([{"name": "kube-api-access-x", "projected": {"sources": []}}]);
        assert_eq!(conflict(default, json!([{"name": "kube-api-access-x", "mountPath": KUBE_API_MOUNT_PATH}])), None);
        // Ours already (reinvocation): fine.
        let ours = json!([serde_json::to_value(token_volume(&identity)).unwrap()]);
        assert_eq!(conflict(ours, json!([{"name": TOKEN_VOLUME, "mountPath": token_dir()}])), None);

        let named = conflict(json!([{"name": TOKEN_VOLUME, "emptyDir": {}}]), json!([])).unwrap();
        assert!(named.starts_with("spec.volumes[0].name"), "{named}");
        let over =
            conflict(json!([{"name": "data", "emptyDir": {}}]), json!([{"name": "data", "mountPath": token_dir()}]))
                .unwrap();
        assert!(over.starts_with("spec.containers[1].volumeMounts[0]"), "{over}");
        let inside = format!("{}/token", token_dir());
        assert!(
            conflict(json!([{"name": "data", "emptyDir": {}}]), json!([{"name": "data", "mountPath": inside}]))
                .is_some()
        );
        let api = conflict(
            json!([{"name": "data", "emptyDir": {}}]),
            json!([{"name": "data", "mountPath": KUBE_API_MOUNT_PATH}]),
        );
        assert!(api.is_some_and(|m| m.contains(KUBE_API_MOUNT_PATH)));
        // A parent directory holds ours nested inside it: allowed.
        assert_eq!(
            conflict(
                json!([{"name": "data", "emptyDir": {}}]),
                json!([{"name": "data", "mountPath": "/var/run/secrets"}])
            ),
            None
        );
    }

    // === Properties over generated pods ===

    /// Volumes a pod may bring: the plugin's default token, a user volume, a
    /// user volume that happens to carry one of our names, and a volume named
    /// like the plugin's that is not a projection (not ours to remove).
    fn volume(i: usize) -> Value {
        match i {
            0 => {
                json!({"name": "kube-api-access-x1", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}})
            }
            1 => json!({"name": "data", "emptyDir": {}}),
            2 => json!({"name": TOKEN_VOLUME, "emptyDir": {}}),
            _ => json!({"name": "kube-api-access-user", "emptyDir": {}}),
        }
    }

    fn mount(i: usize) -> Value {
        match i {
            0 => json!({"name": "kube-api-access-x1", "mountPath": KUBE_API_MOUNT_PATH, "readOnly": true}),
            1 => json!({"name": "data", "mountPath": "/data"}),
            // A user volume at our token directory: theirs is kept.
            2 => json!({"name": "data", "mountPath": token_dir()}),
            _ => json!({"name": "kube-api-access-user", "mountPath": "/user"}),
        }
    }

    fn env(i: usize) -> Value {
        match i {
            0 => json!({"name": "AWS_ROLE_ARN", "value": "arn:aws:iam::1:role/theirs"}),
            // Equal to what we inject: not a user's choice to report.
            1 => json!({"name": "AWS_REGION", "value": "eu-west-1"}),
            2 => json!({"name": "AWS_REGION", "value": "us-east-1"}),
            _ => json!({"name": "FOO", "value": "bar"}),
        }
    }

    fn container() -> impl Strategy<Value = Value> {
        (
            prop::sample::select(vec!["app", "app", "sidecar"]),
            prop::sample::subsequence(vec![0, 1, 2, 3], 0..=4),
            prop::sample::subsequence(vec![0, 1, 2, 3], 0..=3),
        )
            .prop_map(|(name, mounts, envs)| {
                // Container env names are unique in a valid pod.
                let mut seen = BTreeSet::new();
                let env: Vec<Value> =
                    envs.into_iter().map(env).filter(|e| seen.insert(e["name"].to_string())).collect();
                // So are mount paths.
                let mut paths = BTreeSet::new();
                let mounts: Vec<Value> =
                    mounts.into_iter().map(mount).filter(|m| paths.insert(m["mountPath"].to_string())).collect();
                json!({"name": name, "image": "busybox", "volumeMounts": mounts, "env": env})
            })
    }

    prop_compose! {
        fn pod()(
            named in any::<bool>(),
            sa in prop::option::of(prop::sample::select(vec!["default", "custom"])),
            deprecated_sa in any::<bool>(),
            automount in prop::option::of(any::<bool>()),
            volumes in prop::sample::subsequence(vec![0, 1, 2, 3], 0..=4),
            containers in prop::collection::vec(container(), 1..3),
            init in prop::collection::vec(container(), 0..2),
            ephemeral in prop::collection::vec(container(), 0..2),
            gates in prop::sample::subsequence(vec![SCHEDULING_GATE, "other.example/gate"], 0..=2),
            labelled in any::<bool>(),
        ) -> Pod {
            let volumes: Vec<Value> = volumes.into_iter().map(volume).collect();
            // A valid pod: every mount names one of its volumes.
            let valid = |mut containers: Vec<Value>| {
                for c in &mut containers {
                    if let Some(mounts) = c["volumeMounts"].as_array_mut() {
                        mounts.retain(|m| volumes.iter().any(|v| v["name"] == m["name"]));
                    }
                }
                containers
            };
            let (containers, init, ephemeral) = (valid(containers), valid(init), valid(ephemeral));
            let mut spec = json!({
                "containers": containers, "initContainers": init, "ephemeralContainers": ephemeral,
                "volumes": volumes,
                "schedulingGates": gates.into_iter().map(|g| json!({"name": g})).collect::<Vec<_>>(),
            });
            if let Some(sa) = sa {
                spec["serviceAccountName"] = json!(sa);
                if deprecated_sa {
                    spec["serviceAccount"] = json!(sa);
                }
            }
            if let Some(a) = automount {
                spec["automountServiceAccountToken"] = json!(a);
            }
            let name = if named { json!("p") } else { Value::Null };
            // Labels of the user's, some with `/` (escaped in patch paths).
            let labels = if labelled { json!({"app": "p", "example.com/team": "a"}) } else { Value::Null };
            serde_json::from_value(json!({"metadata": {"name": name, "generateName": "p-", "labels": labels}, "spec": spec}))
                .unwrap()
        }
    }

    prop_compose! {
        fn admission()(
            keep_default_token in any::<bool>(),
            identity in any::<bool>(),
            kubernetes_token in any::<bool>(),
            assign in any::<bool>(),
        ) -> Admission {
            Admission {
                keep_default_token,
                identity: identity.then(|| ResolvedIdentity {
                    lease: "p-lease".into(),
                    service_account: "p-sa".into(),
                    role_arn: "arn:aws:iam::123456789012:role/ephemera/p".into(),
                    session_name: "p".into(),
                    audience: "sts.amazonaws.com".into(),
                    ttl_seconds: 900,
                    kubernetes_token,
                }),
                assign_name: assign.then(|| "p-abcde".into()),
            }
        }
    }

    fn containers_of(pod: &Pod) -> Vec<&Container> {
        let spec = pod.spec.as_ref().unwrap();
        spec.init_containers.iter().flatten().chain(&spec.containers).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// The patch applies, the result is what admission promises, and a
        /// second call (reinvocation) changes nothing.
        #[test]
        fn mutation_is_idempotent_and_keeps_its_promises(pod in pod(), admission in admission()) {
            // A pod whose own volume or mount would stand in for the token is
            // refused by the webhook (`token_conflict`), never mutated.
            if let Some(identity) = &admission.identity {
                prop_assume!(token_conflict(&pod, identity).is_none());
            }
            let settings = Settings { aws_region: "eu-west-1".into() };
            let patch = mutate(&pod, &admission, &settings).unwrap();
            let mut doc = serde_json::to_value(&pod).unwrap();
            json_patch::patch(&mut doc, &patch.operations().unwrap()).unwrap();
            // The patch, built from the touched fields, makes exactly the
            // pod the mutation made (whole pods compared as JSON).
            prop_assert_eq!(&doc, &serde_json::to_value(super::mutated(&pod, &admission, &settings)).unwrap());
            let mutated: Pod = serde_json::from_value(doc).unwrap();
            let again = mutate(&mutated, &admission, &settings).unwrap();
            prop_assert!(again.is_empty(), "second call patches again: {}", String::from_utf8_lossy(again.json()));

            let spec = mutated.spec.as_ref().unwrap();
            let volumes: Vec<&Volume> = spec.volumes.iter().flatten().collect();
            if !admission.keep_default_token {
                prop_assert_eq!(spec.automount_service_account_token, Some(false));
                prop_assert!(!volumes.iter().any(|v| v.name.starts_with(DEFAULT_TOKEN_VOLUME_PREFIX) && v.projected.is_some()));
            }
            // No mount is left without its volume (the apiserver would refuse the pod).
            let all_mounts = containers_of(&mutated).into_iter().flat_map(|c| c.volume_mounts.iter().flatten());
            for m in all_mounts {
                prop_assert!(volumes.iter().any(|v| v.name == m.name), "mount {} has no volume", m.name);
            }
            for c in spec.ephemeral_containers.iter().flatten() {
                for m in c.volume_mounts.iter().flatten() {
                    prop_assert!(volumes.iter().any(|v| v.name == m.name), "ephemeral mount {} has no volume", m.name);
                }
            }
            // What the user set is never replaced.
            for (before, after) in containers_of(&pod).into_iter().zip(containers_of(&mutated)) {
                for var in before.env.iter().flatten() {
                    prop_assert!(after.env.iter().flatten().any(|e| e == var), "{} replaced in {}", var.name, before.name);
                }
                for m in before.volume_mounts.iter().flatten().filter(|m| !m.name.starts_with("kube-api-access-x")) {
                    prop_assert!(after.volume_mounts.iter().flatten().any(|a| a == m), "mount {} replaced", m.name);
                }
            }
            match &admission.identity {
                None => prop_assert_eq!(&spec.scheduling_gates, &pod.spec.as_ref().unwrap().scheduling_gates),
                Some(identity) => {
                    prop_assert_eq!(spec.service_account_name.as_deref(), Some(identity.service_account.as_str()));
                    let ours = spec.scheduling_gates.iter().flatten().filter(|g| g.name == SCHEDULING_GATE).count();
                    prop_assert_eq!(ours, 1, "exactly one ephemera gate");
                    prop_assert_eq!(mutated.metadata.labels.as_ref().and_then(|l| l.get(LABEL_LEASE)), Some(&identity.lease));
                    for c in containers_of(&mutated) {
                        let env = |n: &str| c.env.iter().flatten().find(|e| e.name == n).and_then(|e| e.value.clone());
                        prop_assert!(env("AWS_ROLE_ARN").is_some() && env("AWS_WEB_IDENTITY_TOKEN_FILE").is_some());
                        let at = |dir: &str| c.volume_mounts.iter().flatten().filter(|m| m.mount_path == dir).map(|m| m.name.clone()).collect::<Vec<_>>();
                        prop_assert_eq!(at(token_dir()), vec![TOKEN_VOLUME.to_owned()], "{}: the token directory is ours", &c.name);
                        if identity.kubernetes_token && !admission.keep_default_token {
                            prop_assert_eq!(at(KUBE_API_MOUNT_PATH), vec![KUBE_API_VOLUME.to_owned()], "{}: the API token directory is ours", &c.name);
                        }
                    }
                    // ...and the volume there really is the projected token
                    // of the identity's audience and lifetime.
                    let token = volumes.iter().find(|v| v.name == TOKEN_VOLUME).expect("the token volume");
                    let projection = token.projected.as_ref().and_then(|p| p.sources.as_ref()).and_then(|s| s.first())
                        .and_then(|s| s.service_account_token.as_ref());
                    prop_assert_eq!(projection.and_then(|t| t.audience.as_deref()), Some(identity.audience.as_str()));
                    prop_assert_eq!(projection.and_then(|t| t.expiration_seconds), Some(identity.ttl_seconds.max(MIN_TOKEN_TTL_SECONDS)));
                }
            }
        }
    }
}
