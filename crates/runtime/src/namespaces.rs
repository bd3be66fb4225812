//! [`Namespaces`]: the [`Backend`] that runs each sandbox in its own Linux namespaces, on the
//! host's kernel, limited by cgroups.

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, chown};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use burrow_environments::snapshots::IdShift;
use burrow_environments::{HOSTNAME, ID_RANGE};
use nix::fcntl::{OFlag, open};
use nix::sys::stat::Mode;
use nix::unistd::geteuid;
use rand::Rng;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, Interest};
use tokio::sync::watch;

use crate::cgroup::{self, Cgroups};
use crate::error::{Error, IoContext};
use crate::firewall::{self, Policy};
use crate::idmap;
use crate::ids::{IdSlot, IdSlots};
use crate::init::{Dirs, Exec, InitConfig, LAYER_FD, SOCKET_NAME};
use crate::layer::Layers;
use crate::net::{self, Subnet};
use crate::spawn::{self, Child};
use crate::{
    Backend, BoxFuture, Frozen, Limits, RuntimeConfig, Sandbox, SandboxSpec, lower_alphanumeric,
    ping, valid_sandbox_id,
};

/// How long a destroy waits for the sandbox's processes to die.
/// How many slots' idmapping user namespaces a server keeps (see `Inner::idmaps`).
const IDMAP_CACHE: usize = 8;
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a destroy waits after a kill before it kills again.
const KILL_ROUND: Duration = Duration::from_millis(100);
/// How often `wait_exit` looks at the cgroup of a sandbox this process did not start, when the
/// cgroup cannot tell by itself (no cgroup v2).
const ADOPTED_POLL: Duration = Duration::from_millis(500);
/// How long `probe` waits for `/ping`.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How much of the init log a start error quotes.
const LOG_TAIL_BYTES: u64 = 2048;

/// A command to run in a fresh sandbox instead of envd (see [`Namespaces::spawn_command`]).
#[derive(Debug)]
pub struct Command {
    pub argv: Vec<String>,
    /// Run as the sandbox's root instead of its user.
    pub as_root: bool,
    /// Become the command's stdout and stderr (its stdin is `/dev/null`).
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// Sandboxes as Linux namespaces (user, mount, pid, network, ipc, uts, cgroup) with an overlay
/// root, cgroup limits, dropped capabilities and a seccomp filter. Cheap to clone.
#[derive(Clone)]
pub struct Namespaces {
    inner: Arc<Inner>,
}

struct Inner {
    config: RuntimeConfig,
    /// `<data>/run`: one directory per sandbox, holding envd's socket and the init log.
    run_root: PathBuf,
    /// `<data>/stage`: where each sandbox attaches its writable layer, in its own mount
    /// namespace.
    stage: PathBuf,
    /// `<data>/layers`: the sandboxes' writable layers.
    layers: Layers,
    cgroups: Cgroups,
    /// `<data>/ids`: the sandboxes' host id ranges.
    ids: IdSlots,
    /// Per slot, the user namespace that idmaps the stored roots to the slot's range, for the
    /// [`IDMAP_CACHE`] slots used last, most recent last: making one takes a clone, and freed
    /// slots are reused first, so a few cover most creates; each held one is a descriptor.
    idmaps: Mutex<VecDeque<(u32, Arc<OwnedFd>)>>,
    /// Each sandbox this process started.
    children: Mutex<HashMap<String, Own>>,
    /// Where sandboxes' addresses come from, if they have a network beyond `lo`.
    subnet: Option<Subnet>,
}

/// A sandbox this process started.
#[derive(Clone)]
struct Own {
    /// Its init's pid (not reaped before `exit` has the status, so never reused until then).
    pid: i32,
    /// Its id range's slot.
    slot: u32,
    /// The init's exit status, once it has died.
    exit: watch::Receiver<Option<ExitStatus>>,
}

impl Namespaces {
    /// Checks the host (root, cgroups, path lengths) and prepares the data and cgroup
    /// directories of this node.
    pub fn new(mut config: RuntimeConfig) -> Result<Namespaces, Error> {
        if !geteuid().is_root() {
            return Err(Error::NotRoot);
        }
        let node = &config.node_id;
        if node.is_empty() || node.len() > 32 || !lower_alphanumeric(node) {
            return Err(Error::NodeId(node.clone()));
        }
        burrow_environments::validate_uid_base(config.uid_base)?;
        crate::ids::check_uid_base(config.uid_base)?;
        let data_dir = std::path::absolute(&config.data_dir).ctx("resolve", &config.data_dir)?;
        let socket = data_dir.join("run").join("x".repeat(12)).join(SOCKET_NAME);
        // sockaddr_un holds 108 bytes, the terminating NUL included.
        if socket.as_os_str().len() > 107 {
            let len = socket.as_os_str().len();
            return Err(Error::DataDirTooLong {
                dir: data_dir,
                socket,
                len,
            });
        }
        let run_root = data_dir.join("run");
        let stage = data_dir.join("stage");
        for dir in [&data_dir, &run_root, &stage] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .ctx("create", dir)?;
        }
        let cgroups = Cgroups::detect(node)?;
        cgroups.prepare_node()?;
        let ids = IdSlots::new(&data_dir)?;
        let layers = Layers::new(&data_dir)?;
        // Every start needs an idmapped root under its overlay: if this host cannot, say so
        // now rather than at the first create. The probe holds a slot of its own, like a
        // sandbox, while it uses the slot's ids.
        let probe = ids.allocate("probe")?;
        idmap::check_support(&data_dir.join("idmap-probe"), config.uid_base, probe.base())?;
        drop(probe);
        let subnet = match &config.network {
            Some(network) => {
                let subnet = net::setup(&data_dir, network)?;
                // The table was just replaced: the sandboxes this server adopts get their
                // policies back before anything else runs.
                firewall::restore(&run_root, subnet)?;
                Some(subnet)
            }
            None => None,
        };
        config.data_dir = data_dir;
        Ok(Namespaces {
            inner: Arc::new(Inner {
                config,
                run_root,
                stage,
                layers,
                cgroups,
                ids,
                idmaps: Mutex::new(VecDeque::new()),
                children: Mutex::new(HashMap::new()),
                subnet,
            }),
        })
    }

    /// Starts `command` in a fresh sandbox instead of envd, with its output on the given
    /// descriptors; returns once it runs. [`Namespaces::wait_status`] then tells how it ended.
    pub async fn spawn_command(
        &self,
        spec: &SandboxSpec,
        command: Command,
    ) -> Result<Sandbox, Error> {
        self.inner.start(spec, Some(command)).await
    }

    /// The exit status of the init (envd, or the command of [`Namespaces::spawn_command`]) of
    /// a sandbox this process started, once it has exited; `None` for other sandboxes.
    pub async fn wait_status(&self, id: &str) -> Option<ExitStatus> {
        let mut exit = self.inner.children().get(id).cloned()?.exit;
        exit.wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|status| *status)
    }

    /// Removes this node's parent cgroups if no sandbox is left in them (for short-lived node
    /// ids, like `burrow sandbox-run`'s).
    pub fn remove_node_cgroups(&self) {
        self.inner.cgroups.remove_node();
    }
}

impl Backend for Namespaces {
    fn create<'a>(&'a self, spec: &'a SandboxSpec) -> BoxFuture<'a, Result<Sandbox, Error>> {
        Box::pin(self.inner.start(spec, None))
    }

    fn destroy<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(self.inner.destroy(id))
    }

    /// This node's cgroups, and the run directories and writable layers no live sandbox holds:
    /// a run directory (or layer) whose sandbox holds its id range but has no cgroup of this
    /// node is another process's (a `burrow sandbox-run` sharing the data dir, with a node id
    /// of its own), and stays. Both are listed before the id ranges: a sandbox's range is held
    /// before its run directory and layer exist, so a live one is never missed.
    fn list(&self) -> Result<Vec<String>, Error> {
        let mut ids = self.inner.cgroups.ids()?;
        let mut leftovers = cgroup::sandbox_dirs(&self.inner.run_root)?;
        leftovers.extend(self.inner.layers.ids()?);
        let held = self.inner.ids.held()?;
        ids.extend(leftovers.into_iter().filter(|id| !held.contains(id)));
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    fn probe<'a>(&'a self, id: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            valid_sandbox_id(id) && ping::ping(&self.socket_path(id), PROBE_TIMEOUT).await
        })
    }

    fn wait_exit<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(self.inner.wait_exit(id))
    }

    fn running(&self, id: &str) -> Option<bool> {
        let own = self.inner.children().get(id).cloned()?;
        if own.exit.borrow().is_some() {
            return Some(false);
        }
        // Asked of the kernel too: the watcher may not have seen a death that just happened.
        Some(!spawn::has_exited(own.pid))
    }

    fn socket_path(&self, id: &str) -> PathBuf {
        self.inner.socket_path(id)
    }

    fn freeze<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Frozen, Error>> {
        Box::pin(self.inner.freeze(id))
    }

    fn uid_base(&self, id: &str) -> Result<u32, Error> {
        if !valid_sandbox_id(id) {
            return Err(Error::SandboxId(id.to_owned()));
        }
        let pid = self
            .inner
            .cgroups
            .init_pid(id)?
            .ok_or_else(|| Error::Gone { id: id.to_owned() })?;
        mapped_base(pid)
    }
}

impl Inner {
    fn children(&self) -> std::sync::MutexGuard<'_, HashMap<String, Own>> {
        self.children.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn run_dir(&self, id: &str) -> PathBuf {
        self.run_root.join(id)
    }

    fn socket_path(&self, id: &str) -> PathBuf {
        self.run_dir(id).join(SOCKET_NAME)
    }

    /// Starts a sandbox running envd (`command: None`) or a command; with envd, returns once it
    /// answers `/ping`. Whatever fails, nothing of the sandbox is left behind.
    async fn start(
        self: &Arc<Self>,
        spec: &SandboxSpec,
        command: Option<Command>,
    ) -> Result<Sandbox, Error> {
        let environment = &spec.environment;
        if let Err(reason) = &environment.availability {
            return Err(Error::Unavailable {
                name: environment.name.clone(),
                reason: reason.clone(),
            });
        }
        spec.limits.validate()?;
        // `None`: this sandbox gets no network (only `lo`).
        let policy = self
            .subnet
            .and_then(|_| Policy::resolve(self.config.network.as_ref(), &spec.egress));
        let envd = command.is_none();
        let (exec, stdio) = match command {
            None => (None, None),
            Some(c) => (
                Some(Exec {
                    argv: c.argv,
                    as_root: c.as_root,
                }),
                Some((c.stdout, c.stderr)),
            ),
        };
        let config = InitConfig {
            hostname: HOSTNAME.to_owned(),
            binds: environment.binds.clone(),
            user: environment.user.clone(),
            env: environment.env.clone(),
            workdir: environment.workdir.clone(),
            ready_shell: spec.ready_shell,
            exec,
            resolv_conf: policy.is_some(),
        };
        // Taken before the clone: the sandbox holds it from its start to its end.
        let pin = environment.pin()?;
        let config = serde_json::to_vec(&config).expect("the init config serializes");
        let started = Instant::now();

        let inner = Arc::clone(self);
        let rootfs = environment.rootfs.clone();
        let limits = spec.limits;
        let (id, child, control, (slot, uid_base)) = tokio::task::spawn_blocking(move || {
            inner.start_blocking(
                &rootfs,
                pin.as_ref(),
                &limits,
                policy.as_ref(),
                &config,
                stdio,
            )
        })
        .await
        .expect("the sandbox start does not panic")?;

        // From here on, an error or a dropped future destroys the sandbox.
        let mut guard = DestroyOnDrop {
            inner: Arc::clone(self),
            id: Some(id.clone()),
        };
        let pid = child.pid;
        let exit = watch_exit(child)?;
        self.children().insert(
            id.clone(),
            Own {
                pid,
                slot,
                exit: exit.clone(),
            },
        );
        let sandbox = Sandbox {
            socket: self.socket_path(&id),
            id,
            uid_base,
        };
        if envd && let Err(e) = self.await_envd(&sandbox, exit, control).await {
            guard.id = None;
            if let Err(cleanup) = self.destroy(&sandbox.id).await {
                tracing::warn!(id = %sandbox.id, "cleaning up a failed start: {cleanup}");
            }
            return Err(e);
        }
        guard.id = None;
        tracing::info!(id = %sandbox.id, environment = %environment.name, elapsed = ?started.elapsed(), "sandbox started");
        Ok(sandbox)
    }

    /// The blocking part of a start: id range, run directory, idmapped root, writable layer,
    /// cgroups, clone, maps, config. Returns the sandbox's id, its init, the control socket and its id range
    /// (slot and first host id); the range's lock is PID 1's from here on.
    #[allow(clippy::type_complexity)]
    fn start_blocking(
        &self,
        rootfs: &Path,
        pin: Option<&OwnedFd>,
        limits: &Limits,
        policy: Option<&Policy>,
        config: &[u8],
        stdio: Option<(OwnedFd, OwnedFd)>,
    ) -> Result<(String, Child, UnixStream, (u32, u32)), Error> {
        let (id, run_dir, slot) = self.new_run_dir()?;
        let network = self.subnet.zip(policy);
        let pair = network
            .map(|(subnet, _)| subnet.pair(slot.index))
            .transpose();
        let result = pair
            .and_then(|pair| {
                if let (Some(pair), Some((subnet, policy))) = (pair, network) {
                    net::write_resolv_conf(&run_dir, pair)?;
                    // In place before the sandbox has a link to send on.
                    firewall::apply(&run_dir, subnet, pair.sandbox, policy)?;
                }
                Ok(pair)
            })
            .and_then(|pair| {
                let tree = self.idmapped_root(rootfs, &slot)?;
                let layer = self.layers.make(&id, limits.disk_bytes, slot.base())?;
                let start = (&tree, &layer, pin, pair);
                self.clone_into(&id, &run_dir, start, &slot, limits, config, stdio)
            });
        match result {
            Ok((child, control)) => Ok((id, child, control, (slot.index, slot.base()))),
            Err(e) => {
                // The layer's loop device went with its last descriptor, above.
                let _ = self.layers.remove(&id);
                let _ = self.cgroups.remove(&id);
                let _ = net::detach(&id);
                if let Some(subnet) = self.subnet
                    && let Err(e) = firewall::remove(&run_dir, subnet)
                {
                    tracing::warn!(%id, "cleaning up a failed start: {e}");
                }
                let _ = fs::remove_dir_all(&run_dir);
                Err(e)
            }
        }
    }

    /// A detached mount of `rootfs` that shows its stored owners as the slot's ids.
    fn idmapped_root(&self, rootfs: &Path, slot: &IdSlot) -> Result<OwnedFd, Error> {
        let cached = {
            let mut idmaps = self.idmaps();
            let at = idmaps.iter().position(|(index, _)| *index == slot.index);
            at.and_then(|at| idmaps.remove(at))
        };
        let userns = match cached {
            Some((_, userns)) => userns,
            None => Arc::new(idmap::user_namespace(self.config.uid_base, slot.base())?),
        };
        {
            let mut idmaps = self.idmaps();
            idmaps.push_back((slot.index, Arc::clone(&userns)));
            if idmaps.len() > IDMAP_CACHE {
                idmaps.pop_front();
            }
        }
        idmap::idmapped_tree(rootfs, userns.as_fd()).ctx("make an idmapped mount of", rootfs)
    }

    fn idmaps(&self) -> std::sync::MutexGuard<'_, VecDeque<(u32, Arc<OwnedFd>)>> {
        self.idmaps.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A fresh sandbox id, its id range, and its run directory, writable by the sandbox's root
    /// (which creates envd's socket there). The range is taken first, naming the sandbox: a
    /// run directory whose sandbox holds no range is a leftover (see `list`).
    fn new_run_dir(&self) -> Result<(String, PathBuf, IdSlot), Error> {
        let mut rng = rand::rng();
        loop {
            let id: String = (0..12)
                .map(|_| {
                    char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.random_range(0..36)])
                })
                .collect();
            let dir = self.run_dir(&id);
            if self.cgroups.exists(&id) || dir.exists() || self.layers.exists(&id) {
                continue;
            }
            let slot = self.ids.allocate(&id)?;
            match fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {
                    let base = slot.base();
                    chown(&dir, Some(base), Some(base)).ctx("chown", &dir)?;
                    return Ok((id, dir, slot));
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    self.ids.recycle(slot.index);
                    continue;
                }
                Err(e) => return Err(e).ctx("create", &dir),
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn clone_into(
        &self,
        id: &str,
        run_dir: &Path,
        rootfs: (&OwnedFd, &OwnedFd, Option<&OwnedFd>, Option<net::Pair>),
        slot: &IdSlot,
        limits: &Limits,
        config: &[u8],
        stdio: Option<(OwnedFd, OwnedFd)>,
    ) -> Result<(Child, UnixStream), Error> {
        let log_path = run_dir.join("init.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log_path)
            .ctx("create", &log_path)?;
        let devnull = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .ctx("open", Path::new("/dev/null"))?;
        let (mut control, child_control) =
            UnixStream::pair().ctx("create a control socket for", run_dir)?;
        let (stdout, stderr) = match &stdio {
            Some((out, err)) => (out.as_fd(), err.as_fd()),
            None => (log.as_fd(), log.as_fd()),
        };
        self.cgroups.create(id, limits)?;
        let cgroup = match self.cgroups.clone_target(id) {
            Some(dir) => Some(
                open(
                    &dir,
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .ctx("open", &dir)?,
            ),
            None => None,
        };
        let child = spawn::clone_init(
            &self.config.init_program,
            [devnull.as_fd(), stdout, stderr, child_control.as_fd()],
            cgroup.as_ref().map(|fd| fd.as_fd()),
            slot.owner(self.config.uid_base),
        )?;
        drop(child_control);
        if let Err(e) = self.release(id, &child, &mut control, rootfs, slot, run_dir, config) {
            return Err(match spawn::kill(child.pid) {
                // It died on its own (a broken init program, say), which says more than the
                // broken pipe it left.
                Some(status) if status.signal() != Some(libc::SIGKILL) => Error::DiedDuringStart {
                    id: id.to_owned(),
                    status,
                    log: self.log_tail(id),
                },
                _ => e,
            });
        }
        Ok((child, control))
    }

    /// Lets the cloned child go: id maps, cgroups, the go byte, then its directories and
    /// writable layer, its id range's lock (and the rootfs's image pin) and config.
    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        id: &str,
        child: &Child,
        control: &mut UnixStream,
        (rootfs, layer, pin, pair): (&OwnedFd, &OwnedFd, Option<&OwnedFd>, Option<net::Pair>),
        slot: &IdSlot,
        run_dir: &Path,
        config: &[u8],
    ) -> Result<(), Error> {
        let map = format!("0 {} {ID_RANGE}\n", slot.base());
        for file in ["uid_map", "gid_map"] {
            let path = PathBuf::from(format!("/proc/{}/{file}", child.pid));
            fs::write(&path, &map).ctx("write", &path)?;
        }
        self.cgroups.add(id, child.pid)?;
        if let Some(pair) = pair {
            net::attach(id, child.pid, pair)?;
        }
        control
            .write_all(&[1])
            .ctx("let go of the sandbox in", run_dir)?;
        // Opened through the child's root, so that they belong to its mount namespace.
        let child_root = PathBuf::from(format!("/proc/{}/root", child.pid));
        let open_dir = |path: &Path| {
            let inside = child_root.join(path.strip_prefix("/").unwrap_or(path));
            open(
                &inside,
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .ctx("open", &inside)
        };
        let rootfs = rootfs
            .try_clone()
            .ctx("duplicate the idmapped root for", run_dir)?;
        let layer = layer
            .try_clone()
            .ctx("duplicate the writable layer for", run_dir)?;
        let dirs = [rootfs, open_dir(&self.stage)?, open_dir(run_dir)?, layer];
        Dirs::send(control, &dirs, &slot.lock, pin)
            .ctx("send the directories to the sandbox in", run_dir)?;
        control
            .write_all(config)
            .and_then(|()| control.shutdown(std::net::Shutdown::Write))
            .ctx("send the configuration to the sandbox in", run_dir)
    }

    /// Waits for envd's first answer, the init's death, or the start timeout.
    async fn await_envd(
        &self,
        sandbox: &Sandbox,
        mut exit: watch::Receiver<Option<ExitStatus>>,
        control: UnixStream,
    ) -> Result<(), Error> {
        let timeout = self.config.start_timeout;
        let started = Instant::now();
        // The sandbox closes the control socket once built (envd's socket listens from then on)
        // or when its init dies; the loop below tells which. Until then, pinging is pointless.
        let built = async {
            control.set_nonblocking(true)?;
            let mut control = tokio::net::UnixStream::from_std(control)?;
            let mut byte = [0u8; 1];
            while control.read(&mut byte).await? != 0 {}
            std::io::Result::Ok(())
        };
        let _ = tokio::time::timeout(timeout, built).await;
        let mut delay = Duration::from_millis(1);
        loop {
            if let Some(status) = *exit.borrow() {
                return Err(Error::DiedDuringStart {
                    id: sandbox.id.clone(),
                    status,
                    log: self.log_tail(&sandbox.id),
                });
            }
            let left = timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Err(Error::StartTimeout {
                    id: sandbox.id.clone(),
                    socket: sandbox.socket.clone(),
                    timeout,
                    log: self.log_tail(&sandbox.id),
                });
            }
            if ping::ping(&sandbox.socket, left).await {
                return Ok(());
            }
            let pause = delay.min(left);
            tokio::select! {
                changed = exit.changed() => if changed.is_err() {
                    tokio::time::sleep(pause).await;
                },
                () = tokio::time::sleep(pause) => {}
            }
            delay = (delay * 2).min(Duration::from_millis(20));
        }
    }

    fn log_tail(&self, id: &str) -> String {
        let path = self.run_dir(id).join("init.log");
        let read = || -> std::io::Result<String> {
            let mut file = fs::File::open(&path)?;
            let len = file.metadata()?.len();
            file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))?;
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)?;
            Ok(String::from_utf8_lossy(&bytes).trim_end().to_owned())
        };
        read().unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()))
    }

    async fn destroy(&self, id: &str) -> Result<(), Error> {
        if !valid_sandbox_id(id) {
            return Err(Error::SandboxId(id.to_owned()));
        }
        let deadline = Instant::now() + KILL_TIMEOUT;
        while self.cgroups.populated(id)? {
            if Instant::now() > deadline {
                let cgroup = self.cgroups.tracking_dir(id);
                return Err(Error::KillTimeout {
                    id: id.to_owned(),
                    cgroup,
                    timeout: KILL_TIMEOUT,
                });
            }
            // Killing again is for hosts without cgroup.kill, where a process may have forked
            // between the listing and the signal.
            self.cgroups.kill(id)?;
            let round = Instant::now() + KILL_ROUND;
            self.cgroups
                .until_empty(id, Duration::from_millis(2), Some(round.min(deadline)))
                .await?;
        }
        // An init of ours is reaped by its watcher; wait for it so that no zombie outlives this.
        let own = self.children().remove(id);
        if let Some(Own { mut exit, slot, .. }) = own {
            let _ = tokio::time::timeout(KILL_TIMEOUT, exit.wait_for(Option::is_some)).await;
            // Its PID 1, which held the range's lock, is gone.
            self.ids.recycle(slot);
        }
        loop {
            match self.cgroups.remove(id) {
                // Right after the last process left, the kernel may still hold the cgroup.
                Err(Error::Io { source, .. })
                    if source.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                result => break result?,
            }
        }
        self.remove_layer(id, deadline).await?;
        // Gone with the sandbox's network namespace too, but only once the kernel gets to it.
        net::detach(id)?;
        let run_dir = self.run_dir(id);
        // Its record goes with the run directory, so the elements go first.
        if let Some(subnet) = self.subnet {
            firewall::remove(&run_dir, subnet)?;
        }
        match fs::remove_dir_all(&run_dir) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(e).ctx("remove", &run_dir),
            _ => {
                tracing::info!(%id, "sandbox destroyed");
                Ok(())
            }
        }
    }

    /// Deletes the sandbox's image and waits until its loop device has let go of it, which it
    /// does once the last mount of the layer is gone, with the sandbox's mount namespace. Done
    /// before the run directory goes, so that a layer left behind keeps the sandbox listed.
    async fn remove_layer(&self, id: &str, deadline: Instant) -> Result<(), Error> {
        self.layers.remove(id)?;
        loop {
            let attached = self.layers.attached(id);
            let Some(device) = attached.first() else {
                return Ok(());
            };
            if Instant::now() > deadline {
                return Err(Error::LayerBusy {
                    id: id.to_owned(),
                    device: device.clone(),
                });
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn freeze(&self, id: &str) -> Result<Frozen, Error> {
        if !valid_sandbox_id(id) {
            return Err(Error::SandboxId(id.to_owned()));
        }
        self.cgroups.freeze(id, KILL_TIMEOUT).await?;
        let gone = || Error::Freeze {
            id: id.to_owned(),
            reason: "its PID 1 is gone".into(),
        };
        let pid = self.cgroups.init_pid(id)?.ok_or_else(gone)?;
        let upper = PathBuf::from(format!("/proc/{pid}/fd/{LAYER_FD}/upper"));
        let owners = IdShift {
            sandbox: mapped_base(pid)?,
            storage: self.config.uid_base,
        };
        match fs::symlink_metadata(&upper) {
            Ok(meta) if meta.is_dir() => Ok(Frozen { upper, owners }),
            _ => Err(gone()),
        }
    }

    async fn wait_exit(&self, id: &str) {
        if !valid_sandbox_id(id) {
            return;
        }
        let own = self.children().get(id).cloned().map(|own| own.exit);
        if let Some(mut exit) = own {
            let _ = exit.wait_for(Option::is_some).await;
            return;
        }
        // Started by an earlier run of the server: only its cgroup can tell.
        if let Err(e) = self.cgroups.until_empty(id, ADOPTED_POLL, None).await {
            tracing::warn!(%id, "cannot watch the sandbox's cgroup, taking it for dead: {e}");
        }
    }
}

/// The host id that id 0 of process `pid`'s user namespace maps to (its first `uid_map` line,
/// `0 <host> <count>`, as the server writes it).
fn mapped_base(pid: i32) -> Result<u32, Error> {
    let path = PathBuf::from(format!("/proc/{pid}/uid_map"));
    let map = fs::read_to_string(&path).ctx("read", &path)?;
    let mut fields = map.split_whitespace();
    match (fields.next(), fields.next().map(str::parse)) {
        (Some("0"), Some(Ok(base))) => Ok(base),
        _ => Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!("expected a map of id 0, found {map:?}"),
        ))
        .ctx("parse", &path),
    }
}

/// Reaps the sandbox's init when it exits (its pidfd turns readable) and publishes its status.
fn watch_exit(child: Child) -> Result<watch::Receiver<Option<ExitStatus>>, Error> {
    let Child { pid, pidfd } = child;
    // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and the same for the
    // AsyncFd's whole life.
    let pidfd = match unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            spawn::kill(pid);
            return Err(e.into_parts().1).ctx("watch", Path::new(&format!("/proc/{pid}")));
        }
    };
    let (sender, receiver) = watch::channel(None);
    tokio::spawn(async move {
        loop {
            let Ok(mut ready) = pidfd.readable().await else {
                return;
            };
            match spawn::reap(pid, false) {
                Ok(None) => ready.clear_ready(),
                Ok(Some(status)) => {
                    sender.send_replace(Some(status));
                    return;
                }
                Err(e) => {
                    tracing::warn!(pid, "cannot reap a sandbox's init: {e}");
                    sender.send_replace(Some(ExitStatus::from_raw(255 << 8)));
                    return;
                }
            }
        }
    });
    Ok(receiver)
}

/// Destroys a sandbox whose start was abandoned (its future dropped) half-way.
struct DestroyOnDrop {
    inner: Arc<Inner>,
    id: Option<String>,
}

impl Drop for DestroyOnDrop {
    fn drop(&mut self) {
        let Some(id) = self.id.take() else { return };
        let inner = Arc::clone(&self.inner);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = inner.destroy(&id).await {
                    tracing::warn!(%id, "destroying an abandoned sandbox: {e}");
                }
            });
        }
    }
}
