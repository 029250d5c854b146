//! The `spoold` binary: parses the command line, sets up logging, runs the
//! command, and maps errors to exit codes (2 for errors of spoold itself).

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use spoold::config::{Cli, Command, Settings};

fn main() {
    let cli = Cli::parse();
    let default_level = match (&cli.command, cli.verbose) {
        (_, 2..) => "trace",
        (_, 1) => "debug",
        (Command::Serve(_), 0) => "info",
        _ => "warn",
    };
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
    let code = match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("spoold: {e:#}");
            2
        }
    };
    std::process::exit(code);
}

fn run(command: Command) -> anyhow::Result<i32> {
    if let Command::Report(args) = command {
        spoold::report::run(args)?;
        return Ok(0);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match command {
            Command::Serve(args) => {
                let settings = Settings::from_args(&args)?;
                let shutdown = CancellationToken::new();
                tokio::spawn(on_signals(shutdown.clone()));
                spoold::app::run(settings, shutdown).await?;
                Ok(0)
            }
            Command::Submit(args) => spoold::client::submit(args).await,
            Command::Status(args) => spoold::client::status(args).await,
            Command::Report(_) => unreachable!("handled above"),
        }
    })
}

/// SIGINT or SIGTERM starts a graceful shutdown; a second one exits at once.
async fn on_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
    tracing::info!("signal received; shutting down (send it again to exit at once)");
    shutdown.cancel();
    tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
    std::process::exit(130);
}
