//! Logging (tracing) setup. Metrics and the admin server join this module with
//! the controller.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, for a terminal.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs the global tracing subscriber. The filter comes from `RUST_LOG`
/// when set (e.g. `RUST_LOG=ephemera=debug,kube=info`), else `default_filter`.
///
/// # Errors
/// Fails when `RUST_LOG` cannot be parsed or a subscriber is already installed.
pub fn init(format: LogFormat, default_filter: &str) -> crate::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) => EnvFilter::try_new(&spec)
            .map_err(|e| crate::Error::Config(format!("RUST_LOG={spec:?} is not a valid filter: {e}")))?,
        Err(_) => EnvFilter::new(default_filter),
    };
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Text => registry.with(fmt::layer().with_writer(std::io::stderr)).try_init(),
        LogFormat::Json => registry
            .with(fmt::layer().json().flatten_event(true).with_current_span(true).with_writer(std::io::stderr))
            .try_init(),
    };
    installed.map_err(|e| crate::Error::Config(format!("cannot install the log subscriber: {e}")))
}
