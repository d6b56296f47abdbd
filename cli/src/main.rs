//! `perch`: the one CLI for Perch components. `new` makes a crate, `build` compiles, checks,
//! embeds the manifest and signs, `inspect` shows what an artifact carries, `run` is the
//! inner loop on the simulated board, `deploy`, `status` and `logs` talk to an agent.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{CommandFactory as _, Parser, Subcommand};

mod builder;
mod compose;
mod image;
mod keys;
mod remote;
mod run;
mod shell;
mod templates;

use shell::{Shell, Verbosity};

/// Exit code for a failed command (cargo uses 101 for panics, 1 for errors).
const EXIT_FAILURE: u8 = 1;

/// An error to show as `error: message` with detail lines, without a backtrace.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub details: Vec<String>,
}

impl Failure {
    /// A failure with no details.
    pub fn msg(message: impl Into<String>) -> anyhow::Error {
        Self {
            message: message.into(),
            details: Vec::new(),
        }
        .into()
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)?;
        for d in &self.details {
            write!(f, "\n  - {d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Failure {}

/// Build, run, sign and deploy Perch components.
#[derive(Debug, Parser)]
#[command(name = "perch", version, about, propagate_version = true)]
struct Cli {
    /// Say more (cargo's build output, debug logs of the in-process agent).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Say nothing but errors and requested data.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// Colour: auto (on a terminal), always or never.
    #[arg(long, global = true, default_value = "auto", value_parser = ["auto", "always", "never"])]
    color: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create a component crate: Cargo.toml and src/lib.rs, with a test.
    New {
        /// Component name (lowercase letters, digits, `-`).
        name: String,
        /// What to start from.
        #[arg(long, value_enum, default_value = "timer")]
        template: templates::Template,
        /// Directory to create it in.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Build a component crate for wasm32-wasip2, check its grants, embed its manifest and
    /// sign it.
    Build {
        /// The crate (directory or Cargo.toml).
        #[arg(default_value = ".")]
        path: PathBuf,
        /// Where to write the artifact (default: <target>/perch/<name>.wasm).
        #[arg(short, long)]
        out: Option<PathBuf>,
        /// Leave the artifact unsigned (agents refuse it unless they allow unsigned).
        #[arg(long)]
        no_sign: bool,
    },
    /// Show the code, manifest and signature an artifact carries.
    Inspect {
        /// The .wasm file.
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Build and run a component on the simulated board in this process, streaming its log.
    Run {
        /// The crate, or a .wasm file.
        #[arg(default_value = ".")]
        path: PathBuf,
        /// Rebuild and swap the component in when a source file changes.
        #[arg(short, long)]
        watch: bool,
        /// Address of the agent's API and HTTP triggers.
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: SocketAddr,
        /// Board to simulate.
        #[arg(long, default_value = "sim")]
        board: String,
        /// Keep the agent's store here (default: a temporary directory).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Build (unless given a .wasm), then send the signed artifact to an agent.
    Deploy {
        /// The crate, or a .wasm file.
        #[arg(default_value = ".")]
        path: PathBuf,
        /// The agent's API, e.g. http://192.168.1.20:7070.
        #[arg(long, env = "PERCH_DEVICE")]
        to: String,
        /// Print the agent's reply as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show an agent's status and components.
    Status {
        /// The agent's API.
        #[arg(long, env = "PERCH_DEVICE", default_value = "http://127.0.0.1:7070")]
        device: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a component's recent log lines.
    Logs {
        /// Component name.
        name: String,
        /// The agent's API.
        #[arg(long, env = "PERCH_DEVICE", default_value = "http://127.0.0.1:7070")]
        device: String,
        /// How many lines.
        #[arg(short = 'n', long, default_value_t = 50)]
        lines: usize,
        /// Keep printing new lines until Ctrl-C.
        #[arg(short, long)]
        follow: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Manage the signing key in the config dir.
    Key {
        #[command(subcommand)]
        command: KeyCmd,
    },
    /// Build a board's firmware image, or flash one.
    Image {
        #[command(subcommand)]
        command: ImageCmd,
    },
    /// Print a shell completion script.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum ImageCmd {
    /// Build the flashable disk (disk.img.zst) and the A/B slot image of a board, with
    /// perchd cross-built for it and components preloaded (run inside a Perch checkout).
    Build {
        /// Board name (board-configs/<name>.toml) or board file.
        #[arg(long)]
        board: String,
        /// Output directory (default: target/perch-image/<board>).
        #[arg(short, long)]
        out: Option<PathBuf>,
        /// A perchd built for the board (default: scripts/cross-build.sh builds it).
        #[arg(long)]
        perchd: Option<PathBuf>,
        /// The device config (default: the board, the API on port 7070, preloads on).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Components (.wasm) the first boot deploys, offline.
        #[arg(long)]
        preload: Vec<PathBuf>,
    },
    /// Write an image (.img or .img.zst) to a block device or file and verify it. Refuses
    /// a mounted disk (which includes the running system's).
    Flash {
        /// The image: disk.img.zst or disk.img.
        image: PathBuf,
        /// The device, e.g. /dev/sdb or /dev/mmcblk0.
        target: PathBuf,
        /// Do not ask before overwriting a block device.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
enum KeyCmd {
    /// Create a signing key.
    New {
        /// Replace an existing key.
        #[arg(long)]
        force: bool,
    },
    /// Print the public key (for an agent's `trusted-keys`).
    Show,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let verbosity = if cli.quiet {
        Verbosity::Quiet
    } else if cli.verbose > 0 {
        Verbosity::Verbose
    } else {
        Verbosity::Normal
    };
    let shell = Shell::new(verbosity, &cli.color);
    init_logging(verbosity);
    match dispatch(&shell, cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&shell, &e);
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Prints an error: a [`Failure`] as message and details, anything else with its causes.
pub fn report(shell: &Shell, e: &anyhow::Error) {
    if let Some(f) = e.downcast_ref::<Failure>() {
        shell.error(&f.message, &f.details);
    } else if let Some(m) = e.downcast_ref::<perch_core::ManifestError>() {
        shell.error(
            format!(
                "{}: {} problem{} in the component manifest",
                m.source_name,
                m.problems.len(),
                if m.problems.len() == 1 { "" } else { "s" }
            ),
            &m.problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
        );
    } else {
        let causes: Vec<String> = e.chain().skip(1).map(ToString::to_string).collect();
        shell.error(e, &causes);
    }
}

/// The in-process agent of `perch run` logs through `tracing`: warnings by default, debug
/// with `-v`, or whatever `PERCH_LOG` says.
fn init_logging(verbosity: Verbosity) {
    use tracing_subscriber::EnvFilter;
    let default = match verbosity {
        Verbosity::Verbose => "debug",
        _ => "warn",
    };
    let filter = EnvFilter::try_from_env("PERCH_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn dispatch(shell: &Shell, cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::New {
            name,
            template,
            dir,
        } => {
            let root = templates::create(&dir, &name, template)?;
            shell.status(
                "Created",
                format!("component `{name}` in {}", root.display()),
            );
            shell.note(format!(
                "next: `perch run {0}` to try it, `perch build {0}` for the signed artifact",
                root.display()
            ));
            Ok(())
        }
        Cmd::Build { path, out, no_sign } => {
            let key = if no_sign {
                None
            } else {
                Some(keys::load_or_create(shell)?)
            };
            builder::build(shell, &path, key.as_ref(), out.as_deref())?;
            Ok(())
        }
        Cmd::Inspect { file, json } => inspect(&file, json),
        Cmd::Run {
            path,
            watch,
            listen,
            board,
            state_dir,
        } => run::run(
            shell,
            run::RunOptions {
                path,
                watch,
                listen,
                board,
                state_dir,
            },
        ),
        Cmd::Deploy { path, to, json } => {
            let device = remote::Device::new(&to)?;
            let bytes = if path.extension().is_some_and(|e| e == "wasm") {
                std::fs::read(&path)
                    .map_err(|e| Failure::msg(format!("reading {}: {e}", path.display())))?
            } else {
                let key = keys::load_or_create(shell)?;
                builder::build(shell, &path, Some(&key), None)?
            };
            shell.status(
                "Deploying",
                format!("{} to {to}", shell::human_bytes(bytes.len() as u64)),
            );
            let reply = device.deploy(shell, bytes)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&reply)?);
            } else {
                shell.status(
                    "Deployed",
                    format!(
                        "`{}` at revision {}",
                        reply["component"]["name"].as_str().unwrap_or("?"),
                        reply["revision"]
                    ),
                );
                remote::print_component(&reply["component"]);
            }
            Ok(())
        }
        Cmd::Status { device, json } => {
            let status = remote::Device::new(&device)?.status()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                remote::print_status(&status);
            }
            Ok(())
        }
        Cmd::Logs {
            name,
            device,
            lines,
            follow,
            json,
        } => logs(&remote::Device::new(&device)?, &name, lines, follow, json),
        Cmd::Image { command } => match command {
            ImageCmd::Build {
                board,
                out,
                perchd,
                config,
                preload,
            } => image::build(
                shell,
                image::BuildOptions {
                    board,
                    out,
                    perchd,
                    config,
                    preload,
                },
            ),
            ImageCmd::Flash { image, target, yes } => image::flash(shell, &image, &target, yes),
        },
        Cmd::Key { command } => match command {
            KeyCmd::New { force } => {
                let key = keys::create(force)?;
                shell.status(
                    "Created",
                    format!("signing key {}", keys::key_path()?.display()),
                );
                println!("{}", key.public());
                Ok(())
            }
            KeyCmd::Show => match keys::load()? {
                Some(key) => {
                    println!("{}", key.public());
                    Ok(())
                }
                None => Err(Failure::msg(format!(
                    "no signing key at {}: create one with `perch key new`",
                    keys::key_path()?.display()
                ))),
            },
        },
        Cmd::Completions { shell: target } => {
            clap_complete::generate(target, &mut Cli::command(), "perch", &mut std::io::stdout());
            Ok(())
        }
    }
}

fn inspect(file: &std::path::Path, json: bool) -> Result<()> {
    let bytes = std::fs::read(file)
        .map_err(|e| Failure::msg(format!("reading {}: {e}", file.display())))?;
    let a = perch_artifact::inspect(&bytes)
        .map_err(|e| Failure::msg(format!("{}: {e}", file.display())))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&a)?);
        return Ok(());
    }
    use shell::bold;
    anstream::println!("{}", bold("code"));
    anstream::println!("  file:    {}", file.display());
    anstream::println!("  size:    {}", shell::human_bytes(a.size));
    anstream::println!("  digest:  {}", a.digest);
    anstream::println!("  imports: {}", list(&a.imports));
    anstream::println!("  exports: {}", list(&a.exports));
    anstream::println!("{}", bold("manifest"));
    match &a.manifest {
        Some(m) => {
            let text = toml::to_string(m).unwrap_or_else(|e| format!("(unprintable: {e})"));
            for line in text.lines() {
                anstream::println!("  {line}");
            }
        }
        None => anstream::println!("  none (not built with `perch build`)"),
    }
    anstream::println!("{}", bold("signature"));
    match &a.signature {
        Some(s) => {
            anstream::println!("  key:     {} (id {})", s.key, s.key.id());
            anstream::println!("  signed:  {}", s.signed_digest);
            let verdict = if !s.valid {
                "INVALID: the signature does not verify".to_string()
            } else if s.signed_digest != s.actual_digest {
                format!(
                    "MODIFIED after signing: the bytes hash to {}",
                    s.actual_digest
                )
            } else if !s.last {
                "sections were appended after the signature".to_string()
            } else {
                "valid, and covers every byte before it".to_string()
            };
            anstream::println!("  status:  {verdict}");
        }
        None => anstream::println!("  none (unsigned)"),
    }
    Ok(())
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

fn logs(device: &remote::Device, name: &str, n: usize, follow: bool, json: bool) -> Result<()> {
    let lines = device.logs(name, n)?;
    if json && !follow {
        println!("{}", serde_json::to_string_pretty(&lines)?);
        return Ok(());
    }
    let print = |l: &serde_json::Value| {
        if json {
            println!("{l}");
        } else {
            remote::print_log_line(l);
        }
    };
    let mut last = 0u64;
    for l in lines.as_array().into_iter().flatten() {
        print(l);
        last = last.max(l["at-ms"].as_u64().unwrap_or(0));
    }
    if !follow {
        return Ok(());
    }
    loop {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let lines = device.logs(name, 200)?;
        for l in lines.as_array().into_iter().flatten() {
            let at = l["at-ms"].as_u64().unwrap_or(0);
            if at > last {
                print(l);
                last = at;
            }
        }
    }
}
