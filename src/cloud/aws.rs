//! AWS SDK configuration shared by the IAM and STS clients.
//!
//! Credentials, region and endpoint come from the standard AWS chain
//! (`AWS_ENDPOINT_URL`, `AWS_REGION`, web identity, IMDS, ...), so the same code
//! talks to MiniStack in tests and to real AWS in production.

use aws_config::{BehaviorVersion, SdkConfig};
use aws_smithy_http_client::{
    Builder,
    tls::{Provider, rustls_provider::CryptoMode},
};

/// Loads the AWS configuration from the environment with an HTTPS client that
/// uses rustls with the ring provider (the one kube uses), so only one crypto
/// library is compiled into the binary.
pub async fn sdk_config() -> SdkConfig {
    let http_client = Builder::new().tls_provider(Provider::Rustls(CryptoMode::Ring)).build_https();
    aws_config::defaults(BehaviorVersion::latest()).http_client(http_client).load().await
}

/// An IAM client from [`sdk_config`].
pub async fn iam_client() -> aws_sdk_iam::Client {
    aws_sdk_iam::Client::new(&sdk_config().await)
}

/// An STS client from [`sdk_config`].
pub async fn sts_client() -> aws_sdk_sts::Client {
    aws_sdk_sts::Client::new(&sdk_config().await)
}
