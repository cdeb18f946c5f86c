//! The webhook's serving certificate: from files (cert-manager, or any
//! mounted Secret), reloaded when they change; or self-managed: a CA and a
//! serving certificate ephemera makes itself, keeps in a Secret shared by the
//! replicas, renews before expiry and publishes as the `caBundle` of its
//! webhook configurations. Either way the server reloads without a restart.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum_server::tls_rustls::RustlsConfig;
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams, PostParams},
};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::{Error, Result};

/// Lifetime of the self-managed CA. Long, because rotating it means every
/// apiserver must learn the new `caBundle` first.
const CA_VALIDITY: Duration = Duration::from_hours(10 * 365 * 24);
/// Lifetime of the serving certificate; renewed when a third is left.
pub const CERT_VALIDITY: Duration = Duration::from_hours(365 * 24);
/// How often the certificate source is looked at again.
pub const RECHECK: Duration = Duration::from_secs(30);
const NOT_AFTER_ANNOTATION: &str = "ephemera.dev/not-after";
const CA_NAME: &str = "ephemera webhook CA";

/// PEM-encoded CA and serving certificate with their keys.
#[derive(Clone, PartialEq, Eq)]
pub struct CertBundle {
    /// CA certificate: what clients (the apiserver) trust, the `caBundle`.
    pub ca_cert: String,
    /// CA key, kept to sign renewed serving certificates.
    pub ca_key: String,
    /// Serving certificate.
    pub cert: String,
    /// Serving key.
    pub key: String,
    /// When the serving certificate expires (seconds since the epoch).
    pub not_after: i64,
}

impl std::fmt::Debug for CertBundle {
    // Keys never reach logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertBundle").field("not_after", &self.not_after).finish_non_exhaustive()
    }
}

fn tls_error(what: &str) -> impl FnOnce(rcgen::Error) -> Error + '_ {
    move |e| Error::Tls(format!("{what}: {e}"))
}

fn ca_params() -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(tls_error("CA parameters"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

fn offset(from: SystemTime, by: Duration) -> time::OffsetDateTime {
    time::OffsetDateTime::from(from + by)
}

/// A new CA and a serving certificate for `dns_names` and `ips`.
///
/// # Errors
/// When key generation or signing fails.
pub fn generate(dns_names: &[String], ips: &[IpAddr]) -> Result<CertBundle> {
    let ca_key = KeyPair::generate().map_err(tls_error("generating the CA key"))?;
    let mut params = ca_params()?;
    let now = SystemTime::now();
    params.not_before = offset(now, Duration::ZERO) - time::Duration::minutes(5);
    params.not_after = offset(now, CA_VALIDITY);
    let ca_cert = params.self_signed(&ca_key).map_err(tls_error("self-signing the CA"))?;
    let ca_key_pem = ca_key.serialize_pem();
    let mut bundle = CertBundle {
        ca_cert: ca_cert.pem(),
        ca_key: ca_key_pem,
        cert: String::new(),
        key: String::new(),
        not_after: 0,
    };
    renew(&mut bundle, dns_names, ips)?;
    Ok(bundle)
}

/// A new serving certificate signed by the bundle's CA (same `caBundle`).
///
/// # Errors
/// When the stored CA key cannot be read or signing fails.
pub fn renew(bundle: &mut CertBundle, dns_names: &[String], ips: &[IpAddr]) -> Result<()> {
    let ca_key = KeyPair::from_pem(&bundle.ca_key).map_err(tls_error("reading the CA key"))?;
    let issuer = Issuer::new(ca_params()?, ca_key);
    let key = KeyPair::generate().map_err(tls_error("generating the serving key"))?;
    let mut params = CertificateParams::new(dns_names.to_vec()).map_err(tls_error("serving certificate names"))?;
    params.subject_alt_names.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, dns_names.first().cloned().unwrap_or_else(|| "ephemera-webhook".into()));
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    let now = SystemTime::now();
    params.not_before = offset(now, Duration::ZERO) - time::Duration::minutes(5);
    params.not_after = offset(now, CERT_VALIDITY);
    let cert = params.signed_by(&key, &issuer).map_err(tls_error("signing the serving certificate"))?;
    bundle.cert = cert.pem();
    bundle.key = key.serialize_pem();
    bundle.not_after = params.not_after.unix_timestamp();
    Ok(())
}

/// Whether the serving certificate has less than a third of its life left.
#[must_use]
pub fn needs_renewal(bundle: &CertBundle, now: SystemTime) -> bool {
    let now = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let third = i64::try_from(CERT_VALIDITY.as_secs() / 3).unwrap_or(i64::MAX);
    bundle.not_after - now < third
}

/// A rustls server configuration (ring, TLS 1.2+, HTTP/2 and 1.1) for a PEM
/// certificate chain and key.
///
/// # Errors
/// When the PEM cannot be parsed or the key does not match.
pub fn server_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<rustls::ServerConfig>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::Tls(format!("serving certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Tls("serving certificate PEM holds no certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| Error::Tls(format!("serving key PEM: {e}")))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(format!("TLS versions: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| Error::Tls(format!("serving certificate and key do not match: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

// === Files ===

/// Serves the certificate in `cert`/`key` and reloads it whenever either file
/// changes (cert-manager and kubelet Secret updates replace them in place).
///
/// # Errors
/// When the files cannot be read at start.
pub async fn from_files(cert: PathBuf, key: PathBuf) -> Result<RustlsConfig> {
    let load = |cert: PathBuf, key: PathBuf| async move {
        let c = tokio::fs::read(&cert).await.map_err(Error::io(format!("reading {}", cert.display())))?;
        let k = tokio::fs::read(&key).await.map_err(Error::io(format!("reading {}", key.display())))?;
        server_config(&c, &k)
    };
    let config = RustlsConfig::from_config(load(cert.clone(), key.clone()).await?);
    let reloaded = config.clone();
    tokio::spawn(async move {
        let mut seen = (modified(&cert).await, modified(&key).await);
        loop {
            tokio::time::sleep(RECHECK).await;
            let now = (modified(&cert).await, modified(&key).await);
            if now == seen {
                continue;
            }
            match load(cert.clone(), key.clone()).await {
                Ok(c) => {
                    reloaded.reload_from_config(c);
                    tracing::info!(cert = %cert.display(), "reloaded the serving certificate");
                    seen = now;
                }
                // Half-written files: keep serving the old one, try again.
                Err(e) => tracing::warn!(error = %e, "serving certificate changed but cannot be loaded yet"),
            }
        }
    });
    Ok(config)
}

async fn modified(path: &Path) -> Option<SystemTime> {
    tokio::fs::metadata(path).await.and_then(|m| m.modified()).ok()
}

// === Secret ===

/// Reads the bundle from the Secret `namespace/name`, filling it (or
/// renewing it) when needed. The Secret must exist: the chart makes it as an
/// empty placeholder, so the webhook needs no right to create Secrets (RBAC
/// cannot limit `create` by name). Replicas race safely: a write conflict
/// means another replica filled or renewed it first, and its bundle is used.
///
/// `adopt_from` names the Secret an earlier release kept the bundle in
/// (`<fullname>-webhook-tls`, which the webhook made itself): an empty
/// placeholder takes its CA and certificate over, so the `caBundle` stays
/// valid while old and new replicas serve side by side, and the old Secret
/// is then deleted (only when ephemera's label says ephemera made it).
///
/// # Errors
/// When the Secret is missing, holds something else, or cannot be written.
pub async fn ensure_secret(
    client: &Client,
    namespace: &str,
    name: &str,
    adopt_from: Option<&str>,
    dns_names: &[String],
    ips: &[IpAddr],
) -> Result<CertBundle> {
    let api = Api::<Secret>::namespaced(client.clone(), namespace);
    let context = || format!("reading Secret {namespace}/{name}");
    for _ in 0..3 {
        let Some(secret) = api.get_opt(name).await.map_err(Error::kube(context()))? else {
            return Err(Error::Tls(format!(
                "Secret {namespace}/{name} does not exist: the Helm chart makes it empty and the webhook fills it; \
                 without the chart, make it with `kubectl -n {namespace} create secret generic {name}`"
            )));
        };
        let mut adopted = None;
        let bundle = match from_secret(&secret) {
            Some(bundle) if !needs_renewal(&bundle, SystemTime::now()) => return Ok(bundle),
            Some(mut bundle) => {
                renew(&mut bundle, dns_names, ips)?;
                bundle
            }
            None if is_placeholder(&secret) => {
                let earlier = match adopt_from {
                    Some(old) => earlier_bundle(&api, old).await?.map(|(b, s)| (b, s, old)),
                    None => None,
                };
                match earlier {
                    Some((mut bundle, old_secret, old)) => {
                        if needs_renewal(&bundle, SystemTime::now()) {
                            renew(&mut bundle, dns_names, ips)?;
                        }
                        adopted = Some((old, old_secret));
                        bundle
                    }
                    None => generate(dns_names, ips)?,
                }
            }
            None => {
                return Err(Error::Tls(format!(
                    "Secret {namespace}/{name} holds data but not all of ca.crt, ca.key, tls.crt, tls.key and the \
                     {NOT_AFTER_ANNOTATION} annotation; empty it (or delete it and run helm upgrade) to have ephemera \
                     make a new CA"
                )));
            }
        };
        match api.replace(name, &PostParams::default(), &with_bundle(secret, &bundle)).await {
            Ok(_) => {
                if let Some((old, old_secret)) = &adopted {
                    tracing::info!(secret = name, from = old, "took over the webhook CA of an earlier release");
                    delete_earlier(&api, old, old_secret).await;
                } else {
                    tracing::info!(secret = name, "wrote the webhook CA and serving certificate");
                }
                return Ok(bundle);
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(Error::kube(format!("writing Secret {namespace}/{name}"))(e)),
        }
    }
    Err(Error::Conflict(format!("Secret {namespace}/{name} keeps changing under us; giving up for now")))
}

/// An empty Secret: the chart's placeholder, not yet filled.
fn is_placeholder(secret: &Secret) -> bool {
    secret.data.as_ref().is_none_or(BTreeMap::is_empty) && secret.string_data.as_ref().is_none_or(BTreeMap::is_empty)
}

/// The bundle an earlier release kept in `old`, when ephemera made it.
async fn earlier_bundle(api: &Api<Secret>, old: &str) -> Result<Option<(CertBundle, Secret)>> {
    let Some(secret) = api.get_opt(old).await.map_err(Error::kube(format!("reading Secret {old}")))? else {
        return Ok(None);
    };
    let ours = secret.labels().get(crate::api::well_known::LABEL_MANAGED_BY).map(String::as_str)
        == Some(crate::api::well_known::MANAGED_BY);
    if !ours {
        tracing::warn!(secret = old, "not taking over a Secret ephemera did not make");
        return Ok(None);
    }
    Ok(from_secret(&secret).map(|bundle| (bundle, secret)))
}

/// Deletes the earlier release's Secret (the one read, by uid); a failure
/// only leaves it behind, which is logged.
async fn delete_earlier(api: &Api<Secret>, old: &str, read: &Secret) {
    let params = kube::api::DeleteParams {
        preconditions: Some(kube::api::Preconditions { uid: read.uid(), resource_version: None }),
        ..kube::api::DeleteParams::default()
    };
    match api.delete(old, &params).await {
        Ok(_) => tracing::info!(secret = old, "deleted the earlier release's webhook Secret"),
        Err(kube::Error::Api(s)) if s.is_not_found() || s.code == 409 => {}
        Err(e) => tracing::warn!(secret = old, error = %e, "cannot delete the earlier release's webhook Secret"),
    }
}

/// `secret` holding `bundle`: its labels (`managed-by: Helm`), annotations and
/// type are kept, because Helm owns the object.
fn with_bundle(mut secret: Secret, bundle: &CertBundle) -> Secret {
    let data = |s: &str| ByteString(s.as_bytes().to_vec());
    secret.metadata.managed_fields = None;
    secret
        .metadata
        .annotations
        .get_or_insert_default()
        .insert(NOT_AFTER_ANNOTATION.to_owned(), bundle.not_after.to_string());
    secret.string_data = None;
    secret.data = Some(BTreeMap::from([
        ("ca.crt".to_owned(), data(&bundle.ca_cert)),
        ("ca.key".to_owned(), data(&bundle.ca_key)),
        ("tls.crt".to_owned(), data(&bundle.cert)),
        ("tls.key".to_owned(), data(&bundle.key)),
    ]));
    secret
}

fn from_secret(secret: &Secret) -> Option<CertBundle> {
    let data = secret.data.as_ref()?;
    let text = |k: &str| data.get(k).and_then(|b| String::from_utf8(b.0.clone()).ok());
    Some(CertBundle {
        ca_cert: text("ca.crt")?,
        ca_key: text("ca.key")?,
        cert: text("tls.crt")?,
        key: text("tls.key")?,
        not_after: secret.annotations().get(NOT_AFTER_ANNOTATION)?.parse().ok()?,
    })
}

/// Puts `ca_bundle` into every webhook of the named configurations that
/// exist (made by the Helm chart or by [`super::register`]).
///
/// # Errors
/// When a configuration exists but cannot be patched.
pub async fn publish_ca_bundle(client: &Client, configuration: &str, ca_bundle: &str) -> Result<()> {
    use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
    publish_on(Api::<MutatingWebhookConfiguration>::all(client.clone()), configuration, ca_bundle, |c| {
        c.webhooks.iter().flatten().map(|w| w.client_config.ca_bundle.clone()).collect()
    })
    .await?;
    publish_on(Api::<ValidatingWebhookConfiguration>::all(client.clone()), configuration, ca_bundle, |c| {
        c.webhooks.iter().flatten().map(|w| w.client_config.ca_bundle.clone()).collect()
    })
    .await
}

/// Patches `caBundle` into one configuration, if it exists; `bundles` lists
/// each of its webhooks' current bundle.
async fn publish_on<K>(
    api: Api<K>,
    name: &str,
    ca_bundle: &str,
    bundles: impl Fn(&K) -> Vec<Option<ByteString>>,
) -> Result<()>
where
    K: kube::Resource<DynamicType = ()> + k8s_openapi::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let context = || format!("publishing caBundle on {} {name}", K::KIND);
    let Some(existing) = api.get_opt(name).await.map_err(Error::kube(context()))? else { return Ok(()) };
    let current = bundles(&existing);
    let patch = ca_patch(current.iter().map(Option::as_ref), ca_bundle);
    if !patch.0.is_empty() {
        api.patch(name, &PatchParams::default(), &Patch::Json::<()>(patch)).await.map_err(Error::kube(context()))?;
    }
    Ok(())
}

/// JSON patch setting `caBundle` on each webhook whose bundle differs.
fn ca_patch<'a>(current: impl Iterator<Item = Option<&'a ByteString>>, ca_bundle: &str) -> json_patch::Patch {
    let ops = current
        .enumerate()
        .filter(|(_, have)| have.map(|b| b.0.as_slice()) != Some(ca_bundle.as_bytes()))
        .filter_map(|(i, _)| {
            serde_json::from_value(serde_json::json!({
                "op": "add",
                "path": format!("/webhooks/{i}/clientConfig/caBundle"),
                "value": ByteString(ca_bundle.as_bytes().to_vec()),
            }))
            .ok()
        })
        .collect();
    json_patch::Patch(ops)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    #[test]
    fn generated_certificates_load_and_renew_under_the_same_ca() {
        let names = vec!["ephemera-webhook.ephemera-system.svc".to_owned()];
        let ips = vec![IpAddr::from([127, 0, 0, 1])];
        let mut bundle = generate(&names, &ips).unwrap();
        server_config(bundle.cert.as_bytes(), bundle.key.as_bytes()).unwrap();
        assert!(!needs_renewal(&bundle, SystemTime::now()));
        assert!(needs_renewal(&bundle, SystemTime::now() + CERT_VALIDITY * 2 / 3 + Duration::from_mins(1)));
        let (ca, cert) = (bundle.ca_cert.clone(), bundle.cert.clone());
        renew(&mut bundle, &names, &ips).unwrap();
        assert_eq!(bundle.ca_cert, ca);
        assert_ne!(bundle.cert, cert);
        // The chart's placeholder is recognised; filled, it keeps Helm's
        // metadata and round-trips; keys never reach Debug output.
        let helm = BTreeMap::from([("meta.helm.sh/release-name".to_owned(), "r".to_owned())]);
        let placeholder = Secret {
            metadata: ObjectMeta { annotations: Some(helm), ..ObjectMeta::default() },
            type_: Some("Opaque".into()),
            ..Secret::default()
        };
        assert!(is_placeholder(&placeholder) && from_secret(&placeholder).is_none());
        let secret = with_bundle(placeholder, &bundle);
        assert!(!is_placeholder(&secret));
        assert_eq!(secret.annotations()["meta.helm.sh/release-name"], "r");
        assert_eq!(secret.type_.as_deref(), Some("Opaque"));
        assert_eq!(from_secret(&secret).unwrap(), bundle);
        assert!(!format!("{bundle:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn mismatched_pem_is_a_clear_error() {
        let a = generate(&["a".into()], &[]).unwrap();
        let b = generate(&["b".into()], &[]).unwrap();
        let err = server_config(a.cert.as_bytes(), b.key.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("do not match"), "{err}");
        let err = server_config(b"", a.key.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("holds no certificate"), "{err}");
    }
}
