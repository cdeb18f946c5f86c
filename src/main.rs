//! `ephemera`: the CLI. Parses flags and hands over to the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ephemera::telemetry::{self, LogFormat};

/// Ephemera gives every Kubernetes workload its own short-lived, narrowly
/// scoped identity (a ServiceAccount, a projected token, an IAM role) and
/// destroys it the moment the workload ends.
#[derive(Debug, Parser)]
#[command(name = "ephemera", version, propagate_version = true)]
struct Cli {
    /// Log format: `text` for terminals, `json` for log collectors.
    #[arg(long, global = true, value_enum, default_value_t, env = "EPHEMERA_LOG_FORMAT")]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controllers: clamp identities to their boundaries, provision a
    /// cloud role per workload, and reap it when the workload ends.
    Controller(ControllerArgs),
    /// Run the admission webhook: strip default tokens and inject per-pod
    /// identities into pods; validate ephemera's own resources.
    Webhook,
    /// Run the controllers and the webhook in one process (local development).
    Run(ControllerArgs),
    /// Print the CustomResourceDefinitions as YAML, or write one file per CRD.
    Crdgen {
        /// Write `<crd-name>.yaml` files into this directory instead of printing.
        #[arg(long, value_name = "DIR")]
        output_dir: Option<std::path::PathBuf>,
    },
    /// Print the version of this build and the Kubernetes API it targets.
    Version,
}

#[derive(Debug, clap::Args)]
struct ControllerArgs {
    /// Address of the admin server (`/livez`, `/readyz`, `/metrics`).
    #[arg(long, env = "EPHEMERA_ADMIN_ADDR", default_value = "127.0.0.1:8080")]
    admin_addr: std::net::SocketAddr,
    /// Hold the `ephemera-controller` coordination Lease, so that of several
    /// replicas only one reconciles. Off for a single local process.
    #[arg(long, env = "EPHEMERA_LEADER_ELECT")]
    leader_elect: bool,
    /// Namespace of the leader-election Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "ephemera-system")]
    namespace: String,
    /// This replica's name in the leader election.
    #[arg(long, env = "POD_NAME", default_value_t = default_identity())]
    identity: String,
}

impl From<ControllerArgs> for ephemera::controller::Settings {
    fn from(args: ControllerArgs) -> Self {
        ephemera::controller::Settings {
            admin_addr: args.admin_addr,
            leader_election: args.leader_elect,
            namespace: args.namespace,
            identity: args.identity,
        }
    }
}

fn default_identity() -> String {
    format!("ephemera-{}", std::process::id())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(err) = telemetry::init(cli.log_format, "info,ephemera=info") {
        eprintln!("error: {err}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Controller(args) => ephemera::controller::run(args.into()).await,
        Command::Webhook => ephemera::webhook::run().await,
        Command::Run(args) => run_all(args.into()).await,
        Command::Crdgen { output_dir } => ephemera::crdgen::run(output_dir.as_deref()),
        Command::Version => {
            println!("ephemera {} (Kubernetes API {})", ephemera::VERSION, ephemera::KUBERNETES_API);
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Controllers and webhook side by side; the first one to stop ends both.
async fn run_all(settings: ephemera::controller::Settings) -> ephemera::Result<()> {
    tokio::select! {
        res = ephemera::controller::run(settings) => res,
        res = ephemera::webhook::run() => res,
    }
}
