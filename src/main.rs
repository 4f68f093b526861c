use clap::Parser;

use capl::config::{Cli, Command, LogFormat};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    capl::telemetry::init(cli.run.log_format);
    // One TLS crypto provider for the whole process (kube's client and our servers).
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        tracing::debug!("a rustls crypto provider was already installed");
    }
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            let json = cli.run.log_format == LogFormat::Json;
            let result = capl::manager::run(cli.run).await;
            match result {
                // With JSON logs, the reason for exiting is one more JSON line, not free text.
                Err(error) if json => {
                    tracing::error!(error = %format!("{error:#}"), "the manager failed");
                    std::process::exit(1);
                }
                result => result,
            }
        }
        Command::Webhooks { out_dir } => {
            let path = capl::webhook::configs::write(&out_dir)?;
            println!("wrote {}", path.display());
            Ok(())
        }
        Command::Crds { out_dir } => {
            for path in capl::api::crd::write_all(&out_dir)? {
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        Command::Version => {
            println!("manager {}", env!("CARGO_PKG_VERSION"));
            if !cli.run.libvirt_uri.is_empty() {
                let host = capl::manager::probe_libvirt(&cli.run.libvirt_uri, cli.run.uri_policy())
                    .await?;
                println!("{host}");
            }
            Ok(())
        }
    }
}
