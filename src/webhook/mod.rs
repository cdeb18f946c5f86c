//! Admission: the mutating pod webhook and the validating webhook for
//! ephemera's own resources.
//!
//! - [`mutate`]: the pod mutation, a pure function with golden fixtures;
//! - [`pods`]: what a pod gets (pure) and its ServiceAccount and lease;
//! - [`identities`]: `WorkloadIdentity` validation (boundaries, escalation);
//! - [`server`]: the HTTPS layer; [`tls`]: its certificate;
//! - [`configuration`]: the webhook configurations;
//! - [`check`]: the chart's `helm test`, run from inside the cluster.

pub mod check;
pub mod configuration;
pub mod identities;
pub mod mutate;
pub mod pods;
pub mod server;
pub mod tls;

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::{StreamExt, TryStreamExt};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, reflector, watcher},
};

use self::{configuration::Target, pods::AwsTarget, server::Stores};
use crate::{Error, Result, telemetry::Metrics};

/// Settings of the webhook process.
#[derive(Clone, Debug)]
pub struct Settings {
    /// HTTPS address of the webhook.
    pub listen_addr: SocketAddr,
    /// Where `/livez`, `/readyz` and `/metrics` are served.
    pub admin_addr: SocketAddr,
    /// The operator's namespace (never mutated; holds the TLS Secret).
    pub namespace: String,
    /// Where the serving certificate comes from.
    pub tls: TlsSource,
    /// Name of the Mutating/ValidatingWebhookConfiguration.
    pub configuration: String,
    /// Register the webhook configurations pointing at this URL (local
    /// development and e2e); otherwise they are the chart's.
    pub register_url: Option<String>,
    /// With `register_url`: send only namespaces with this label.
    pub namespace_label: Option<(String, String)>,
    /// Region injected into pods.
    pub aws_region: String,
    /// Account of the roles; `None`: asked from STS at start.
    pub aws_account: Option<String>,
    /// Partition of the role ARNs.
    pub aws_partition: String,
    /// This cluster's name (role names and tags).
    pub cluster_name: String,
    /// The IAM path every role lives under.
    pub role_path_root: String,
}

/// Where the serving certificate comes from.
#[derive(Clone, Debug)]
pub enum TlsSource {
    /// PEM files, reloaded when they change (cert-manager, mounted Secret).
    Files { cert: PathBuf, key: PathBuf },
    /// Self-managed, kept in this Secret of the operator namespace, for the
    /// Service `service` (its DNS names go into the certificate).
    /// `adopt_from` is where an earlier release kept it ([`tls::ensure_secret`]).
    Secret { name: String, service: String, adopt_from: Option<String> },
    /// Made in memory at start (with `register_url`, for local runs).
    Ephemeral,
}

/// Runs the webhook until SIGTERM/SIGINT.
///
/// # Errors
/// Fails when the Kubernetes client cannot be built, the certificate cannot be
/// loaded or made, the webhook cannot be registered, or a port cannot be bound.
pub async fn run(settings: Settings) -> Result<()> {
    let client = Client::try_default().await.map_err(Error::KubeConfig)?;
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let admin = tokio::spawn(crate::telemetry::serve_admin(settings.admin_addr, metrics.clone(), ready.clone()));

    let account = match &settings.aws_account {
        Some(account) => account.clone(),
        None => crate::cloud::aws::AwsProvider::from_env(None, None).await.account().await?,
    };
    let aws = AwsTarget {
        partition: settings.aws_partition.clone(),
        account,
        cluster: settings.cluster_name.clone(),
        role_path_root: settings.role_path_root.clone(),
    };
    let (stores, watchers) = start_stores(&client);
    let watchers = tokio::spawn(watchers);
    let (tls, ca_bundle) = serving_config(&client, &settings, &metrics).await?;

    let state = Arc::new(server::AppState {
        client: client.clone(),
        stores: stores.clone(),
        aws,
        settings: mutate::Settings { aws_region: settings.aws_region.clone() },
        metrics,
    });
    // Not ready (and not registered) until the caches are: an empty cache
    // would admit pods of governed namespaces untouched.
    wait_for_stores(&stores).await?;
    let handle = axum_server::Handle::new();
    let server = axum_server::bind_rustls(settings.listen_addr, tls)
        .handle(handle.clone())
        .serve(server::router(state).into_make_service());
    tracing::info!(addr = %settings.listen_addr, "admission webhook listening");
    let shutdown = handle.clone();
    tokio::spawn(async move {
        crate::shutdown_signal().await;
        tracing::info!("shutting down the webhook");
        shutdown.graceful_shutdown(Some(Duration::from_secs(10)));
    });
    let server = tokio::spawn(server);
    handle.listening().await;
    // Only now does the apiserver learn where we are: registering earlier
    // would fail pod creation (failurePolicy Fail) until we listen.
    if let Some(ca_bundle) = ca_bundle {
        publish(&client, &settings, &ca_bundle).await?;
    }
    ready.store(true, Ordering::SeqCst);

    tokio::select! {
        res = server => res
            .map_err(|e| Error::Stopped(format!("webhook server stopped: {e}")))?
            .map_err(Error::io(format!("serving the webhook on {}", settings.listen_addr))),
        res = admin => res.map_err(|e| Error::Stopped(format!("admin server stopped: {e}")))?,
        _ = watchers => Err(Error::Stopped("the webhook's watches ended".into())),
    }
}

/// The serving certificate, and the CA to publish once the server listens
/// (none for files: cert-manager's CA injector publishes it).
async fn serving_config(
    client: &Client,
    settings: &Settings,
    metrics: &Arc<Metrics>,
) -> Result<(axum_server::tls_rustls::RustlsConfig, Option<String>)> {
    let local_ips = [IpAddr::from([127, 0, 0, 1])];
    match &settings.tls {
        TlsSource::Files { cert, key } => Ok((tls::from_files(cert.clone(), key.clone()).await?, None)),
        TlsSource::Ephemeral => {
            let bundle = tls::generate(&["localhost".into()], &local_ips)?;
            metrics.certificate_expiry.set(bundle.not_after);
            let config = tls::server_config(bundle.cert.as_bytes(), bundle.key.as_bytes())?;
            Ok((axum_server::tls_rustls::RustlsConfig::from_config(config), Some(bundle.ca_cert)))
        }
        TlsSource::Secret { name, service, adopt_from } => {
            let ns = &settings.namespace;
            let names = vec![
                format!("{service}.{ns}.svc"),
                format!("{service}.{ns}.svc.cluster.local"),
                format!("{service}.{ns}"),
                service.clone(),
            ];
            let bundle = tls::ensure_secret(client, ns, name, adopt_from.as_deref(), &names, &local_ips).await?;
            metrics.certificate_expiry.set(bundle.not_after);
            let config = axum_server::tls_rustls::RustlsConfig::from_config(tls::server_config(
                bundle.cert.as_bytes(),
                bundle.key.as_bytes(),
            )?);
            let ca = bundle.ca_cert.clone();
            let fresh =
                keep_secret_fresh(client.clone(), settings.clone(), names, bundle, config.clone(), metrics.clone());
            tokio::spawn(fresh);
            Ok((config, Some(ca)))
        }
    }
}

/// Registers the configurations (`register_url`) or puts the CA into the
/// existing ones.
async fn publish(client: &Client, settings: &Settings, ca_bundle: &str) -> Result<()> {
    match &settings.register_url {
        Some(url) => {
            configuration::register(
                client,
                &settings.configuration,
                &Target::Url(url.clone()),
                ca_bundle,
                &settings.namespace,
                settings.namespace_label.as_ref(),
            )
            .await
        }
        None => tls::publish_ca_bundle(client, &settings.configuration, ca_bundle).await,
    }
}

/// Renews the self-managed certificate before it expires and picks up a
/// renewal made by another replica; the server reloads without a restart.
async fn keep_secret_fresh(
    client: Client,
    settings: Settings,
    names: Vec<String>,
    mut current: tls::CertBundle,
    config: axum_server::tls_rustls::RustlsConfig,
    metrics: Arc<Metrics>,
) {
    let TlsSource::Secret { name, adopt_from, .. } = &settings.tls else { return };
    let ips = [IpAddr::from([127, 0, 0, 1])];
    loop {
        tokio::time::sleep(tls::RECHECK * 20).await;
        let bundle =
            match tls::ensure_secret(&client, &settings.namespace, name, adopt_from.as_deref(), &names, &ips).await {
                Ok(bundle) => bundle,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot check the webhook serving certificate");
                    continue;
                }
            };
        metrics.certificate_expiry.set(bundle.not_after);
        if bundle == current {
            continue;
        }
        match tls::server_config(bundle.cert.as_bytes(), bundle.key.as_bytes()) {
            Ok(c) => {
                config.reload_from_config(c);
                tracing::info!("reloaded the renewed webhook serving certificate");
            }
            Err(e) => tracing::warn!(error = %e, "renewed certificate does not load"),
        }
        if bundle.ca_cert != current.ca_cert
            && let Err(e) = tls::publish_ca_bundle(&client, &settings.configuration, &bundle.ca_cert).await
        {
            tracing::warn!(error = %e, "cannot publish the new caBundle");
        }
        current = bundle;
    }
}

/// Reflectors for what admission reads; the returned future drives them.
fn start_stores(client: &Client) -> (Stores, impl Future<Output = ()> + use<>) {
    let cfg = watcher::Config::default;
    let (namespaces, ns_writer) = reflector::store();
    let (boundaries, b_writer) = reflector::store();
    let (identities, i_writer) = reflector::store();
    let (leases, l_writer) = reflector::store();
    let ns = reflector(ns_writer, watcher(Api::all(client.clone()), cfg())).default_backoff().touched_objects();
    let b = reflector(b_writer, watcher(Api::all(client.clone()), cfg())).default_backoff().touched_objects();
    let i = reflector(i_writer, watcher(Api::all(client.clone()), cfg())).default_backoff().touched_objects();
    let lease_counts = Arc::new(server::LeaseCounts::default());
    let l = {
        let (counts, store) = (lease_counts.clone(), leases.clone());
        let events = watcher(Api::all(client.clone()), cfg()).inspect_ok(move |event| counts.observe(event, &store));
        reflector(l_writer, events).default_backoff().touched_objects()
    };
    let drive = async move {
        tokio::join!(
            drain_watch("Namespace", ns),
            drain_watch("IdentityBoundary", b),
            drain_watch("WorkloadIdentity", i),
            drain_watch("IdentityLease", l),
        );
    };
    (Stores { namespaces, boundaries, identities, leases, lease_counts }, drive)
}

/// Polls a reflector's stream (which fills its store) until it ends.
async fn drain_watch<T>(kind: &'static str, stream: impl futures::Stream<Item = Result<T, watcher::Error>>) {
    stream
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::warn!(kind, error = %e, "watch failed; retrying");
            }
        })
        .await;
}

async fn wait_for_stores(stores: &Stores) -> Result<()> {
    let waited = async {
        stores.namespaces.wait_until_ready().await?;
        stores.boundaries.wait_until_ready().await?;
        stores.identities.wait_until_ready().await?;
        stores.leases.wait_until_ready().await
    };
    match tokio::time::timeout(Duration::from_mins(1), waited).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::NotReady(format!("webhook caches: {e}"))),
        Err(_) => Err(Error::NotReady(
            "webhook caches not filled after 60 s: can the operator list namespaces and ephemera.dev resources?".into(),
        )),
    }
}
