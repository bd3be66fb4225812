//! `burrow env build`: the terminal side of an image build (choosing definitions, live step
//! lines, Ctrl-C). The build itself is `burrow_environments::build`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use burrow_environments::build::{self, Cancel, Outcome, Progress};
use burrow_environments::{Definition, Images};
use burrow_runtime::RuntimeConfig;
use nix::sys::signal::{SigSet, Signal};

use crate::serve::prepare_data_dir;

/// What to build: one environment (from its built-in definition, or from `file`), or all.
pub struct Request {
    pub name: Option<String>,
    pub all: bool,
    pub file: Option<PathBuf>,
    pub data_dir: PathBuf,
}

pub fn run(request: Request) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!(
            "image builds need root: mmdebstrap bootstraps as root, and the image's files are \
             handed to the ids sandboxes map"
        );
    }
    let definitions = definitions(&request)?;
    let cancel = cancel_on_signals()?;
    let data_dir = prepare_data_dir(&request.data_dir)?;
    let images = Images::new(&data_dir);
    let mut printer = Printer::new();

    build::ensure_tools(&mut |p| printer.show(p))?;

    let mut failed = Vec::new();
    for (definition, text) in &definitions {
        let name = &definition.name;
        if let Err(reason) = &definition.recipe {
            eprintln!("{name}: not built: {reason}");
            if !request.all {
                failed.push(name.clone());
            }
            continue;
        }
        printer.header = Some(format!("{name}: building"));
        let outcome = build::build(
            &images,
            definition,
            text,
            RuntimeConfig::DEFAULT_UID_BASE,
            &cancel,
            &mut |p| printer.show(p),
        );
        printer.clear();
        printer.header = None;
        match outcome {
            Ok(Outcome::UpToDate { version }) => {
                println!("{name}: up to date (version {version}); nothing to build");
            }
            Ok(Outcome::Restored { version }) => println!(
                "{name}: version {version}, built earlier from this same definition, is current \
                 again; running servers use it for sessions created from now on"
            ),
            Ok(Outcome::Built { version, elapsed }) => println!(
                "{name}: built version {version} in {:.1} s; running servers use it for sessions \
                 created from now on",
                elapsed.as_secs_f64()
            ),
            Err(e) if cancel.is_cancelled() => {
                anyhow::bail!("{name}: {e}");
            }
            Err(e) => {
                eprintln!("{name}: build failed, the previous version stays current: {e}");
                failed.push(name.clone());
            }
        }
    }
    if !failed.is_empty() {
        anyhow::bail!("not built: {}", failed.join(", "));
    }
    Ok(())
}

/// The definitions to build, each with its file's text.
fn definitions(request: &Request) -> anyhow::Result<Vec<(Definition, String)>> {
    match (&request.name, request.all, &request.file) {
        (None, true, None) => burrow_environments::builtin_names().map(builtin).collect(),
        (Some(name), false, None) => Ok(vec![builtin(name)?]),
        (Some(name), false, Some(file)) => {
            if burrow_environments::builtin_definition(name).is_none() {
                anyhow::bail!(unknown(name));
            }
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let definition = Definition::parse(name, &file.display().to_string(), &text)?;
            // Sandboxes follow the compiled-in definition's network policy, not an image's: a
            // file that says otherwise would be silently ignored.
            let (builtin, _) = builtin(name)?;
            if definition.egress != builtin.egress {
                anyhow::bail!(
                    "{}: `network`, `egress_allow` and `egress_deny` differ from \
                     environments/{name}.toml; --file builds only the image, and sandboxes follow \
                     the network policy compiled into burrow: drop those keys from the file (or \
                     copy them from environments/{name}.toml)",
                    file.display()
                );
            }
            Ok(vec![(definition, text)])
        }
        (None, false, _) => anyhow::bail!("name an environment to build, or give --all"),
        (Some(_), true, _) => anyhow::bail!("give an environment's name or --all, not both"),
        (None, true, Some(_)) => anyhow::bail!("--file defines one environment: name it"),
    }
}

fn builtin(name: &str) -> anyhow::Result<(Definition, String)> {
    let (text, definition) =
        burrow_environments::builtin_definition(name).ok_or_else(|| unknown(name))?;
    Ok((definition?, text.to_owned()))
}

fn unknown(name: &str) -> burrow_environments::Error {
    burrow_environments::Error::UnknownEnvironment {
        name: name.to_owned(),
        known: burrow_environments::builtin_names()
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// SIGINT (Ctrl-C) and SIGTERM cancel the build instead of killing this process, so that the
/// build can stop its processes and remove its scratch directory. Call before any thread starts:
/// threads inherit the blocked mask, and only the watcher takes the signals.
fn cancel_on_signals() -> anyhow::Result<Cancel> {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals
        .thread_block()
        .context("cannot block SIGINT and SIGTERM")?;
    let cancel = Cancel::default();
    let watcher = cancel.clone();
    std::thread::spawn(move || {
        while let Ok(signal) = signals.wait() {
            eprintln!(
                "\n{signal}: cancelling the build (stopping its processes, removing its files)"
            );
            watcher.cancel();
        }
    });
    Ok(cancel)
}

/// Step lines as they come; on a terminal, apt's and dpkg's chatter as one transient status line.
struct Printer {
    terminal: bool,
    transient: bool,
    /// Printed before the first step, if there is one (an up-to-date image has none).
    header: Option<String>,
}

impl Printer {
    fn new() -> Printer {
        Printer {
            terminal: std::io::stderr().is_terminal(),
            transient: false,
            header: None,
        }
    }

    fn clear(&mut self) {
        if self.transient {
            eprint!("\r\x1b[2K");
            self.transient = false;
        }
    }

    fn show(&mut self, progress: Progress<'_>) {
        match progress {
            Progress::Step {
                number,
                total,
                title,
            } => {
                self.clear();
                if let Some(header) = self.header.take() {
                    eprintln!("{header}");
                }
                eprintln!("[{number}/{total}] {title}");
            }
            Progress::Output {
                line,
                notable: true,
            } => {
                self.clear();
                eprintln!("      {line}");
            }
            Progress::Output {
                line,
                notable: false,
            } => {
                if self.terminal {
                    let short: String = line.chars().take(100).collect();
                    eprint!("\r\x1b[2K      {short}");
                    let _ = std::io::stderr().flush();
                    self.transient = true;
                }
            }
            Progress::StepDone { elapsed } => {
                self.clear();
                eprintln!("      done in {}", seconds(elapsed));
            }
        }
    }
}

fn seconds(elapsed: Duration) -> String {
    format!("{:.1} s", elapsed.as_secs_f64())
}
