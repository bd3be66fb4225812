//! `burrow env build`: a self-contained Debian root filesystem for an environment, from its
//! [`Definition`], as a new version of its image (see [`crate::images`]).
//!
//! The steps: `mmdebstrap` bootstraps Debian's minimal base plus the definition's packages into
//! a scratch directory (through the host's apt mirror, in a mount namespace of its own so that
//! nothing it mounts outlives it); the user is created and the definition's `run` commands run
//! inside the new tree (chrooted, in new mount, PID, network, IPC and UTS namespaces: no
//! network, no process left behind); burrow writes the `/etc` files a sandbox needs; every
//! file's owner moves into the sandbox's mapped id range; the scratch directory becomes the
//! version directory and `current` points to it. A failed or cancelled build removes its scratch
//! directory and leaves `current` as it was.
//!
//! Image builds are the one place this crate starts processes: they run from the CLI, never in
//! the server.

use std::collections::VecDeque;
use std::fs;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use nix::unistd::Pid;

use crate::definition::{Definition, Recipe};
use crate::images::{
    self, BUILD_PREFIX, DEFINITION_COPY, EnvLock, Images, METADATA, Metadata, ROOTFS,
};
use crate::{Error, IoContext, PATH};

/// Lines of a failed step's output quoted in its error.
const TAIL_LINES: usize = 40;

/// How long a step's output may stay open after its process exited (a daemon it left behind
/// holding the pipe) before the rest of its process group is killed.
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// Host programs a build runs, and the Debian package of each.
const TOOLS: &[(&str, &str)] = &[
    ("mmdebstrap", "mmdebstrap"),
    ("unshare", "util-linux"),
    ("chroot", "coreutils"),
    ("mount", "mount"),
];

/// Asks a running build to stop: its current step's processes are killed and its scratch
/// directory removed. Cheap to clone; every clone cancels the same build.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// What a build reports while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress<'a> {
    /// Step `number` of `total` starts.
    Step {
        number: usize,
        total: usize,
        title: &'a str,
    },
    /// A line of the running step's output. `notable` lines are worth keeping on screen (the
    /// tool's own status lines, warnings, errors, the output of `run` commands); the others
    /// (apt's and dpkg's chatter) are detail for a live status line.
    Output { line: &'a str, notable: bool },
    /// The step that started last finished.
    StepDone { elapsed: Duration },
}

/// How a build ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The current version is already built from this definition; nothing was built.
    UpToDate { version: String },
    /// A version built earlier from this same definition was still on disk and is current again.
    Restored { version: String },
    /// A new version was built and is current.
    Built { version: String, elapsed: Duration },
}

impl Outcome {
    pub fn version(&self) -> &str {
        match self {
            Outcome::UpToDate { version }
            | Outcome::Restored { version }
            | Outcome::Built { version, .. } => version,
        }
    }
}

/// Installs the host programs a build needs (mmdebstrap, mostly) with apt when they are missing,
/// saying what it does. Needs root and the host's apt mirror. Not cancellable: killing apt or
/// dpkg half-way would leave the host's package database broken.
pub fn ensure_tools(progress: &mut dyn FnMut(Progress<'_>)) -> Result<(), Error> {
    let missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(program, _)| crate::sources::find_program(program).is_none())
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let never = Cancel::default();
    let mut runner = Runner::new(&never, progress, None);
    let total = 2;
    let title = format!(
        "install {} from Debian's packages (mmdebstrap bootstraps a Debian root filesystem; \
         image builds need it): apt-get update",
        missing.join(", ")
    );
    let apt = |args: &[&str]| {
        let mut command = Command::new("apt-get");
        command.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        command
    };
    runner.step(1, total, &title, |runner| {
        runner.run(apt(&["update"]), Namespace::Host, |_| true)
    })?;
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    args.extend(&missing);
    let title = format!("apt-get {}", args.join(" "));
    runner.step(2, total, &title, |runner| {
        runner.run(apt(&args), Namespace::Host, |_| true)
    })?;
    if let Some((program, _)) = TOOLS
        .iter()
        .find(|(program, _)| crate::sources::find_program(program).is_none())
    {
        return Err(Error::Io {
            action: "find",
            path: program.into(),
            source: std::io::Error::new(ErrorKind::NotFound, "still missing after apt-get install"),
        });
    }
    Ok(())
}

/// Builds `definition` into a new current version of its image, unless the current version is
/// already built from it. `text` is the definition's file, kept beside the image. Needs root;
/// [`ensure_tools`] first.
pub fn build(
    images: &Images,
    definition: &Definition,
    text: &str,
    uid_base: u32,
    cancel: &Cancel,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Outcome, Error> {
    let name = &definition.name;
    let recipe = match &definition.recipe {
        Ok(recipe) => recipe,
        Err(reason) => {
            return Err(Error::Unbuildable {
                name: name.clone(),
                reason: reason.clone(),
            });
        }
    };
    let version = recipe.version(uid_base);
    let lock = images
        .try_lock(name)?
        .ok_or_else(|| Error::Busy { name: name.clone() })?;
    let env_dir = images.env_dir(name);
    // Leftovers of a killed build and versions nobody uses any more go first: room for this one.
    images.collect(name, &lock)?;

    if images.current_version(name)?.as_deref() == Some(version.as_str()) {
        return Ok(Outcome::UpToDate { version });
    }
    let version_dir = env_dir.join(&version);
    if version_dir.join(METADATA).is_file() {
        images.set_current(name, &version, &lock)?;
        images.collect(name, &lock)?;
        return Ok(Outcome::Restored { version });
    }

    let started = Instant::now();
    let scratch = env_dir.join(format!("{BUILD_PREFIX}{version}"));
    images::remove_path(&scratch)?;
    fs::create_dir(&scratch).ctx("create", &scratch)?;
    let job = Job {
        scratch: &scratch,
        lock: &lock,
        name,
        recipe,
        text,
        version: &version,
        uid_base,
    };
    let result = job.run(cancel, progress);
    match result {
        Ok(()) => {
            fs::rename(&scratch, &version_dir).ctx("move into place", &scratch)?;
            images.set_current(name, &version, &lock)?;
            images.collect(name, &lock)?;
            Ok(Outcome::Built {
                version,
                elapsed: started.elapsed(),
            })
        }
        Err(e) => {
            if let Err(cleanup) = images::remove_path(&scratch) {
                tracing::warn!("cannot remove the failed build's directory: {cleanup}");
            }
            Err(e)
        }
    }
}

/// One build of a new version into its scratch directory.
struct Job<'a> {
    scratch: &'a Path,
    lock: &'a EnvLock,
    name: &'a str,
    recipe: &'a Recipe,
    /// The definition's file, kept beside the image.
    text: &'a str,
    version: &'a str,
    uid_base: u32,
}

impl Job<'_> {
    fn run(&self, cancel: &Cancel, progress: &mut dyn FnMut(Progress<'_>)) -> Result<(), Error> {
        let Job {
            scratch,
            lock,
            name,
            recipe,
            text,
            version,
            uid_base,
        } = *self;
        let rootfs = scratch.join(ROOTFS);
        let sources = crate::sources::debian_sources(&recipe.suite)?;
        let total = recipe.run.len() + 5;
        let mut runner = Runner::new(cancel, progress, Some(lock.file.as_raw_fd()));

        let packages = if recipe.packages.is_empty() {
            "no extra packages".to_owned()
        } else {
            recipe.packages.join(", ")
        };
        let title = format!(
            "bootstrap Debian {} (minbase) with {packages} (mmdebstrap, from {})",
            recipe.suite,
            sources[0].split_whitespace().nth(1).unwrap_or("?")
        );
        runner.step(1, total, &title, |runner| {
            runner.run(
                mmdebstrap(recipe, &rootfs, &sources),
                Namespace::Mount,
                |line| ["I: ", "W: ", "E: "].iter().any(|p| line.starts_with(p)),
            )
        })?;

        let user = &recipe.user;
        let title = format!(
            "create user {} (uid {}, gid {})",
            user.name, user.uid, user.gid
        );
        runner.step(2, total, &title, |runner| {
            runner.run(
                chroot(&rootfs, recipe, &user_script(recipe)),
                Namespace::Host,
                |_| true,
            )
        })?;

        for (i, command) in recipe.run.iter().enumerate() {
            let title = format!("run: {command}");
            runner.step(3 + i, total, &title, |runner| {
                runner.run(chroot(&rootfs, recipe, command), Namespace::Host, |_| true)
            })?;
        }

        let next = 3 + recipe.run.len();
        runner.step(next, total, "write the sandbox's /etc files", |_| {
            configure(&rootfs)
        })?;
        runner.step(
            next + 1,
            total,
            &format!("move owners into the sandbox's id range (from uid {uid_base})"),
            |runner| {
                let count = images::shift_ownership(&rootfs, uid_base)?;
                runner.say(&format!("{count} files"), true);
                Ok(())
            },
        )?;
        runner.step(
            next + 2,
            total,
            &format!("publish version {version}"),
            |_| {
                let metadata = Metadata::new(name, version, uid_base, recipe);
                let json = serde_json::to_string_pretty(&metadata).expect("metadata serializes");
                let path = scratch.join(METADATA);
                fs::write(&path, json).ctx("write", &path)?;
                let path = scratch.join(DEFINITION_COPY);
                fs::write(&path, text).ctx("write", &path)?;
                images::create_version_lock(scratch)
            },
        )?;
        Ok(())
    }
}

/// The mmdebstrap command: Debian's minimal base (`minbase`: essential and required packages,
/// apt) plus the definition's packages, from the host's mirror.
fn mmdebstrap(recipe: &Recipe, rootfs: &Path, sources: &[String]) -> Command {
    let mut command = Command::new("mmdebstrap");
    command
        .arg("--mode=root")
        .arg("--variant=minbase")
        .arg("--format=directory")
        .arg("--verbose")
        // Documentation stays: excluding paths from dpkg breaks maintainer scripts that expect
        // them (OpenJDK's update-alternatives links its man pages).
        .arg("--aptopt=Acquire::Retries \"3\"");
    if !recipe.packages.is_empty() {
        command.arg(format!("--include={}", recipe.packages.join(",")));
    }
    command
        .arg(&recipe.suite)
        .arg(rootfs)
        .args(sources)
        .env_clear()
        .env("PATH", PATH)
        .env("LANG", "C.UTF-8");
    // The host's proxy settings reach apt as they would for the host's own apt.
    for key in [
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
    ] {
        if let Some(value) = std::env::var_os(key) {
            command.env(key, value);
        }
    }
    command
}

/// Mounts what commands expect (`/proc` of a new PID namespace, a small `/dev` of the host's
/// harmless devices) inside the new tree, then runs `$2` there with `/bin/sh -ec`. Runs in new
/// mount, PID, network, IPC and UTS namespaces (see [`chroot`]), so all of it, mounts and
/// processes, goes when the command ends.
const CHROOT_SCRIPT: &str = r#"
root=$1
mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
mount -t tmpfs -o nosuid,noexec,mode=755,size=1m dev "$root/dev"
for name in null zero full random urandom tty; do
    : > "$root/dev/$name"
    mount --bind "/dev/$name" "$root/dev/$name"
done
mkdir "$root/dev/pts" "$root/dev/shm"
mount -t tmpfs -o nosuid,nodev,mode=1777 shm "$root/dev/shm"
ln -s /proc/self/fd "$root/dev/fd"
ln -s /proc/self/fd/0 "$root/dev/stdin"
ln -s /proc/self/fd/1 "$root/dev/stdout"
ln -s /proc/self/fd/2 "$root/dev/stderr"
exec chroot "$root" /bin/sh -ec "$2"
"#;

/// `command` as root inside the new tree, without network.
fn chroot(rootfs: &Path, recipe: &Recipe, command: &str) -> Command {
    let mut unshare = Command::new("unshare");
    unshare
        .args([
            "--mount",
            "--propagation=private",
            "--pid",
            "--fork",
            "--kill-child",
        ])
        .args([
            "--net",
            "--ipc",
            "--uts",
            "--",
            "/bin/sh",
            "-ec",
            CHROOT_SCRIPT,
            "sh",
        ])
        .arg(rootfs)
        .arg(command)
        .env_clear()
        .envs(recipe.env.iter())
        .env("PATH", PATH)
        .env("HOME", "/root")
        .env("LANG", "C.UTF-8")
        .env("DEBIAN_FRONTEND", "noninteractive");
    unshare
}

/// Creates the definition's user (with its own group and a home from `/etc/skel`) and its
/// working directory, and checks its shell exists.
fn user_script(recipe: &Recipe) -> String {
    let user = &recipe.user;
    // Validated paths and names hold no quotes (see `definition`), so single quotes suffice.
    let q = |p: &Path| format!("'{}'", p.display());
    let home = q(&user.home);
    let shell = q(&user.shell);
    let workdir = q(&recipe.workdir);
    let parent = user.home.parent().map_or_else(|| "'/'".to_owned(), q);
    format!(
        "test -x {shell} || {{ echo \"the user's shell {shell} is not in the image: add its package\" >&2; exit 1; }}\n\
         groupadd --gid {gid} '{name}'\n\
         mkdir -p {parent}\n\
         useradd --uid {uid} --gid {gid} --create-home --home-dir {home} --shell {shell} '{name}'\n\
         if [ ! -e {workdir} ]; then mkdir -p {workdir} && chown {uid}:{gid} {workdir}; fi\n",
        name = user.name,
        uid = user.uid,
        gid = user.gid,
    )
}

/// burrow's own `/etc` files (host name, loopback-only resolution; mmdebstrap copied the build
/// host's), and an empty `/dev` (every sandbox mounts its own; device nodes mmdebstrap made have
/// no business in an image).
fn configure(rootfs: &Path) -> Result<(), Error> {
    let etc = rootfs.join("etc");
    if !fs::symlink_metadata(&etc).ctx("stat", &etc)?.is_dir() {
        return Err(Error::Io {
            action: "write into",
            path: etc,
            source: std::io::Error::other("not a directory"),
        });
    }
    for (name, content) in crate::host::network_files() {
        let path = etc.join(name);
        // Replaced, never written through: a symlink here could point out of the tree.
        images::remove_path(&path)?;
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)
            .and_then(|mut file| std::io::Write::write_all(&mut file, content.as_bytes()))
            .ctx("write", &path)?;
    }
    let dev = rootfs.join("dev");
    for entry in fs::read_dir(&dev).ctx("read", &dev)? {
        images::remove_path(&entry.ctx("read", &dev)?.path())?;
    }
    Ok(())
}

/// Where a step's process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Namespace {
    /// In the host's namespaces (apt-get; `unshare`, which makes its own).
    Host,
    /// In a new, private mount namespace: whatever the process mounts goes with it.
    Mount,
}

/// Runs steps: numbering, timing, child processes with their output streamed, cancellation.
struct Runner<'a> {
    cancel: &'a Cancel,
    progress: &'a mut dyn FnMut(Progress<'_>),
    /// Cleared of close-on-exec in every child, so that the environment's lock outlives a build
    /// killed abruptly for as long as anything it started runs.
    inherited_lock: Option<RawFd>,
    tail: VecDeque<String>,
}

impl<'a> Runner<'a> {
    fn new(
        cancel: &'a Cancel,
        progress: &'a mut dyn FnMut(Progress<'_>),
        inherited_lock: Option<RawFd>,
    ) -> Runner<'a> {
        Runner {
            cancel,
            progress,
            inherited_lock,
            tail: VecDeque::new(),
        }
    }

    fn say(&mut self, line: &str, notable: bool) {
        (self.progress)(Progress::Output { line, notable });
    }

    /// Runs one step, turning a failure into an error that names it and quotes its output.
    fn step(
        &mut self,
        number: usize,
        total: usize,
        title: &str,
        body: impl FnOnce(&mut Self) -> Result<(), Error>,
    ) -> Result<(), Error> {
        if self.cancel.is_cancelled() {
            return Err(Error::Cancelled {
                step: title.to_owned(),
            });
        }
        (self.progress)(Progress::Step {
            number,
            total,
            title,
        });
        self.tail.clear();
        let started = Instant::now();
        match body(self) {
            Ok(()) => {
                (self.progress)(Progress::StepDone {
                    elapsed: started.elapsed(),
                });
                Ok(())
            }
            Err(Error::StepFailed { status, .. }) => Err(Error::StepFailed {
                step: format!("{number}/{total} ({title})"),
                status,
                tail: self.tail.iter().cloned().collect::<Vec<_>>().join("\n"),
            }),
            Err(Error::Cancelled { .. }) => Err(Error::Cancelled {
                step: title.to_owned(),
            }),
            Err(e) => Err(Error::StepFailed {
                step: format!("{number}/{total} ({title})"),
                status: e.to_string(),
                tail: self.tail.iter().cloned().collect::<Vec<_>>().join("\n"),
            }),
        }
    }

    /// Runs `command` in a process group of its own with stdout and stderr streamed as
    /// [`Progress::Output`]; on cancellation, kills the group.
    fn run(
        &mut self,
        mut command: Command,
        namespace: Namespace,
        notable: impl Fn(&str) -> bool,
    ) -> Result<(), Error> {
        let program = command.get_program().to_string_lossy().into_owned();
        let spawn_error = |source: std::io::Error| Error::Io {
            action: "run",
            path: program.clone().into(),
            source,
        };
        let (reader, writer) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| spawn_error(e.into()))?;
        let writer_copy = writer.try_clone().map_err(spawn_error)?;
        let inherited = self.inherited_lock;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(writer))
            .stderr(Stdio::from(writer_copy))
            .process_group(0);
        // SAFETY: the closure runs between fork and exec and makes only async-signal-safe system
        // calls (prctl, fcntl, unshare, mount) on values copied in before the fork; it allocates
        // nothing and takes no locks.
        unsafe {
            command.pre_exec(move || {
                // Killed with the builder, should the builder be killed.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = inherited
                    && libc::fcntl(fd, libc::F_SETFD, 0) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                if namespace == Namespace::Mount {
                    if libc::unshare(libc::CLONE_NEWNS) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let flags = libc::MS_REC | libc::MS_PRIVATE;
                    let none = std::ptr::null();
                    if libc::mount(none, c"/".as_ptr(), none, flags, none.cast()) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            })
        };
        let child = command.spawn().map_err(spawn_error)?;
        // The pipe's write ends live in `command` until it goes; the output ends with them.
        drop(command);
        let pid = Pid::from_raw(child.id() as i32);
        let (lines, received) = mpsc::channel();
        let reader_thread = std::thread::spawn(move || read_lines(reader, lines));
        let status = self.supervise(pid, &received, &notable);
        drop(received);
        // The reader ends when every writer is gone (its last line sent or dropped); a writer
        // that escaped the process group may keep it, so it is not waited for.
        drop(reader_thread);
        let status = status?;
        if status.success() {
            Ok(())
        } else {
            Err(Error::StepFailed {
                step: String::new(),
                status: describe(status),
                tail: String::new(),
            })
        }
    }

    /// Streams the output of the process group `pid` leads until the leader exits and the
    /// output ends; kills the whole group on cancellation or when it lingers. Reaps the leader.
    fn supervise(
        &mut self,
        pid: Pid,
        received: &mpsc::Receiver<String>,
        notable: &impl Fn(&str) -> bool,
    ) -> Result<ExitStatus, Error> {
        let mut exited_at: Option<Instant> = None;
        let mut output_open = true;
        loop {
            if output_open {
                match received.recv_timeout(Duration::from_millis(100)) {
                    Ok(line) => {
                        let is_notable = notable(&line);
                        self.say(&line, is_notable);
                        if self.tail.len() == TAIL_LINES {
                            self.tail.pop_front();
                        }
                        self.tail.push_back(line);
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => output_open = false,
                }
            } else {
                std::thread::sleep(Duration::from_millis(20));
            }
            if self.cancel.is_cancelled() {
                // The leader is not reaped yet, so its group id still names this group.
                let _ = killpg(pid, Signal::SIGKILL);
                let _ = reap(pid);
                return Err(Error::Cancelled {
                    step: String::new(),
                });
            }
            if exited_at.is_none() && leader_exited(pid) {
                exited_at = Some(Instant::now());
            }
            if let Some(at) = exited_at {
                if !output_open {
                    return reap(pid);
                }
                if at.elapsed() > OUTPUT_GRACE {
                    // Whatever it left behind holds the output open: end it.
                    let _ = killpg(pid, Signal::SIGKILL);
                    if at.elapsed() > OUTPUT_GRACE * 2 {
                        return reap(pid);
                    }
                }
            }
        }
    }
}

/// Whether the process has exited, without reaping it (its pid, and so its process group's id,
/// stays reserved until it is reaped).
fn leader_exited(pid: Pid) -> bool {
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    matches!(
        waitid(Id::Pid(pid), flags),
        Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) | Err(_)
    )
}

fn reap(pid: Pid) -> Result<ExitStatus, Error> {
    use std::os::unix::process::ExitStatusExt;
    loop {
        match nix::sys::wait::waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(ExitStatus::from_raw(code << 8)),
            Ok(WaitStatus::Signaled(_, signal, _)) => {
                return Ok(ExitStatus::from_raw(signal as i32));
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                return Err(Error::Io {
                    action: "wait for",
                    path: format!("process {pid}").into(),
                    source: e.into(),
                });
            }
        }
    }
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}

/// Sends every line (split at `\n` or `\r`, empty ones skipped) read from `reader` until EOF.
fn read_lines(reader: OwnedFd, lines: mpsc::Sender<String>) {
    let mut file = fs::File::from(reader);
    let mut buffer = [0u8; 8192];
    let mut pending: Vec<u8> = Vec::new();
    let send = |bytes: &[u8]| {
        let line = String::from_utf8_lossy(bytes).trim_end().to_owned();
        line.is_empty() || lines.send(line).is_ok()
    };
    loop {
        let n = match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        for &byte in &buffer[..n] {
            if byte == b'\n' || byte == b'\r' {
                if !send(&pending) {
                    return;
                }
                pending.clear();
            } else {
                pending.push(byte);
            }
        }
    }
    send(&pending);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(text: &str) -> Recipe {
        Definition::parse("Test", "Test.toml", text)
            .unwrap()
            .recipe
            .unwrap()
    }

    #[test]
    fn the_user_script_creates_user_home_and_workdir() {
        let script = user_script(&recipe(
            "suite = \"bookworm\"\nworkdir = \"/srv/app\"\n[user]\nname = \"dev\"\nuid = 1500\n",
        ));
        assert!(script.contains("groupadd --gid 1500 'dev'"), "{script}");
        assert!(
            script.contains(
                "useradd --uid 1500 --gid 1500 --create-home --home-dir '/home/dev' \
                 --shell '/bin/bash' 'dev'"
            ),
            "{script}"
        );
        assert!(script.contains("mkdir -p '/srv/app' && chown 1500:1500 '/srv/app'"));
    }

    #[test]
    fn a_step_streams_output_and_reports_failure_with_its_tail() {
        let cancel = Cancel::default();
        let mut seen = Vec::new();
        let mut progress = |p: Progress<'_>| {
            if let Progress::Output { line, .. } = p {
                seen.push(line.to_owned());
            }
        };
        let mut runner = Runner::new(&cancel, &mut progress, None);
        let mut command = Command::new("/bin/sh");
        command.args([
            "-c",
            "echo one; echo two >&2; printf 'three\\rfour'; exit 3",
        ]);
        let error = runner
            .step(2, 5, "count", |r| r.run(command, Namespace::Host, |_| true))
            .unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("step 2/5 (count) failed (exit status 3)"),
            "{message}"
        );
        assert!(message.contains("one\ntwo\nthree\nfour"), "{message}");
        assert_eq!(seen, ["one", "two", "three", "four"]);
    }

    #[test]
    fn a_cancelled_step_kills_its_process_group() {
        let cancel = Cancel::default();
        let mut seen = Vec::new();
        let mut progress = |p: Progress<'_>| {
            if let Progress::Output { line, .. } = p {
                seen.push(line.to_owned());
            }
        };
        let mut runner = Runner::new(&cancel, &mut progress, None);
        let mut command = Command::new("/bin/sh");
        // A child of the shell too, which must go with it.
        command.args(["-c", "sleep 30 & echo $!; wait"]);
        let canceller = cancel.clone();
        let watcher = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            canceller.cancel();
        });
        let started = Instant::now();
        let error = runner
            .step(1, 1, "sleep", |r| r.run(command, Namespace::Host, |_| true))
            .unwrap_err();
        watcher.join().unwrap();
        assert!(matches!(error, Error::Cancelled { .. }), "{error}");
        assert!(started.elapsed() < Duration::from_secs(10));
        let sleeper = format!("/proc/{}/stat", seen[0]);
        // Gone, or a zombie waiting for whoever adopted it.
        let gone = || {
            fs::read_to_string(&sleeper).map_or(true, |stat| {
                stat.rsplit(") ").next().is_some_and(|s| s.starts_with('Z'))
            })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !gone() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(gone(), "the shell's child survived the cancellation");
    }

    #[test]
    fn a_daemon_holding_the_output_does_not_hang_the_step() {
        let cancel = Cancel::default();
        let mut progress = |_: Progress<'_>| {};
        let mut runner = Runner::new(&cancel, &mut progress, None);
        let mut command = Command::new("/bin/sh");
        command.args(["-c", "sleep 60 & exit 0"]);
        let started = Instant::now();
        runner
            .step(1, 1, "daemon", |r| {
                r.run(command, Namespace::Host, |_| true)
            })
            .unwrap();
        assert!(
            started.elapsed() < OUTPUT_GRACE * 3,
            "{:?}",
            started.elapsed()
        );
    }
}
