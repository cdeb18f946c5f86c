//! `ephemera webhook-check`: what the chart's `helm test` pod runs. From
//! inside the cluster it checks what the apiserver relies on: a ready replica
//! behind the webhook Service, and an HTTPS port whose certificate the
//! published CA signed for the Service's DNS name, answering admission
//! requests (a malformed one gets the documented 400).

use std::{path::PathBuf, sync::Arc, time::Duration};

use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{Error, Result};

/// What to check.
#[derive(Clone, Debug)]
pub struct Check {
    /// Address to dial: the Service's cluster IP or DNS name.
    pub host: String,
    /// The webhook's HTTPS port on the Service.
    pub port: u16,
    /// Its admin port (`/readyz`).
    pub admin_port: u16,
    /// DNS name the serving certificate must carry (`<service>.<namespace>.svc`,
    /// the name the apiserver verifies).
    pub server_name: String,
    /// The CA the apiserver trusts (`caBundle`), PEM.
    pub ca_file: PathBuf,
    /// How long to keep trying while replicas start.
    pub timeout: Duration,
}

/// Runs the check, printing each step; retries until `timeout`.
///
/// # Errors
/// The last failure once `timeout` has passed.
pub async fn run(check: Check) -> Result<()> {
    let start = tokio::time::Instant::now();
    loop {
        match once(&check).await {
            Ok(()) => return Ok(()),
            Err(e) if start.elapsed() < check.timeout => {
                println!("not yet: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn once(check: &Check) -> Result<()> {
    let admin = format!("{}:{}", check.host, check.admin_port);
    let mut stream = connect(&admin).await?;
    let (status, body) = exchange(&mut stream, &admin, "GET", "/readyz", "").await?;
    if status != 200 {
        return Err(Error::WebhookCheck(format!("http://{admin}/readyz answered {status}: {body}")));
    }
    println!("ok  http://{admin}/readyz: {}", body.trim());

    let ca = tokio::fs::read(&check.ca_file)
        .await
        .map_err(Error::io(format!("reading the CA bundle {}", check.ca_file.display())))?;
    let connector = tokio_rustls::TlsConnector::from(client_config(&ca)?);
    let name = ServerName::try_from(check.server_name.clone())
        .map_err(|e| Error::WebhookCheck(format!("{:?} is not a DNS name: {e}", check.server_name)))?;
    let https = format!("{}:{}", check.host, check.port);
    let mut tls = connector.connect(name, connect(&https).await?).await.map_err(|e| {
        Error::WebhookCheck(format!(
            "TLS handshake with {https} as {} against {}: {e}",
            check.server_name,
            check.ca_file.display()
        ))
    })?;
    println!("ok  https://{https}: certificate valid for {} under the published CA", check.server_name);

    let (status, body) =
        exchange(&mut tls, &check.server_name, "POST", "/mutate/pods", r#"{"not":"a review"}"#).await?;
    if status != 400 {
        return Err(Error::WebhookCheck(format!("a malformed review got {status}, not 400: {body}")));
    }
    println!("ok  POST /mutate/pods with a malformed review: 400 ({})", body.trim());
    Ok(())
}

fn client_config(ca_pem: &[u8]) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|e| Error::WebhookCheck(format!("CA bundle PEM: {e}")))?;
        roots.add(cert).map_err(|e| Error::WebhookCheck(format!("CA bundle certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(Error::WebhookCheck("the CA bundle holds no certificate".into()));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::WebhookCheck(format!("TLS versions: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

async fn connect(addr: &str) -> Result<tokio::net::TcpStream> {
    tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| Error::WebhookCheck(format!("connecting to {addr} timed out")))?
        .map_err(Error::io(format!("connecting to {addr}")))
}

/// One HTTP/1.1 request with `Connection: close`; the status and body.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    host: &str,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String)> {
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let io = async {
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        // A server may close a TLS stream without close_notify after the body.
        match stream.read_to_end(&mut response).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
            Err(e) => return Err(e),
        }
        Ok(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(5), io)
        .await
        .map_err(|_| Error::WebhookCheck(format!("{method} {path} on {host} timed out")))?
        .map_err(Error::io(format!("{method} {path} on {host}")))?;
    parse_response(&String::from_utf8_lossy(&response))
        .ok_or_else(|| Error::WebhookCheck(format!("{method} {path} on {host}: not an HTTP response")))
}

fn parse_response(response: &str) -> Option<(u16, String)> {
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_give_status_and_body() {
        assert_eq!(parse_response("HTTP/1.1 400 Bad Request\r\nx: y\r\n\r\nbad"), Some((400, "bad".into())));
        assert_eq!(parse_response("garbage"), None);
    }

    #[test]
    fn a_ca_bundle_without_certificates_is_refused() {
        let err = client_config(b"not pem").expect_err("no certificate");
        assert!(err.to_string().contains("holds no certificate"), "{err}");
    }
}
