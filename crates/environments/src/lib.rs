//! Environments: the named root filesystems sessions start from (`Python3`, `Nodejs`, ...).
//! Owns their definitions and on-disk layout; starts nothing.
//!
//! An environment runs from its built image when there is one: a self-contained Debian root
//! filesystem made by `burrow env build` from the environment's definition
//! (`environments/<Name>.toml`, see [`definition`] and [`build`]), versioned and
//! garbage-collected under `<data>/environments/images` (see [`images`]).
//!
//! Otherwise, the zero-setup default: every built-in environment shares one generated lower root
//! filesystem (`<data>/environments/host/rootfs`, a minimal `/etc`, a home, mount points) and
//! sees the host's `/usr` and a few harmless files of its `/etc` through read-only binds. An
//! environment whose programs the host lacks is listed as unavailable, with what to install.

pub mod build;
pub mod definition;
pub mod egress;
mod host;
pub mod images;
pub mod snapshots;
mod sources;
pub mod usage;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

pub use definition::Definition;
pub use egress::{Cidr, Egress};
pub use images::{Image, Images};
pub use snapshots::{Snapshot, Snapshots};

/// The hostname of every sandbox; the generated `/etc/hosts` and `/etc/hostname` name it.
pub const HOSTNAME: &str = "sandbox";

/// `PATH` of every process in a sandbox.
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Number of uids/gids each sandbox maps, from 0 inside to `uid_base` outside.
pub const ID_RANGE: u32 = 65536;

/// A host path mounted read-only inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bind {
    pub host: PathBuf,
    pub inside: PathBuf,
}

/// The account processes run as inside a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    pub shell: PathBuf,
}

/// One environment a session can start from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Environment {
    /// The SDK's name for it (`Python3`, ...).
    pub name: String,
    /// The lower (read-only, shared) layer of the sandbox's root; owned by the mapped id range.
    pub rootfs: PathBuf,
    /// Host paths the sandbox sees read-only; every `inside` exists as a mount point in `rootfs`.
    pub binds: Vec<Bind>,
    pub user: User,
    /// Base environment of every process (PATH, LANG, ...).
    pub env: Vec<(String, String)>,
    /// Where commands start by default.
    pub workdir: PathBuf,
    /// `Err(what to do)` when this host cannot run the environment.
    pub availability: Result<(), String>,
    /// The built image `rootfs` belongs to, held in use while this lives; `None` for the
    /// host-based default.
    pub image: Option<Image>,
    /// For a custom environment with saved edits: the version `rootfs` belongs to (which then
    /// is a whole root of its own, no longer the image's).
    pub snapshot: Option<Snapshot>,
    /// What its sandboxes may reach, from its definition (whichever root it runs from).
    pub egress: Egress,
}

impl Environment {
    /// A lock that keeps the environment's root (image or snapshot version) from garbage
    /// collection for as long as the descriptor (or any copy of it) stays open: a sandbox's init
    /// holds it for the sandbox's life. `None` for the host-based default, never collected.
    pub fn pin(&self) -> Result<Option<OwnedFd>, Error> {
        match (&self.snapshot, &self.image) {
            (Some(snapshot), _) => snapshot.pin().map(Some),
            (None, image) => image.as_ref().map(Image::pin).transpose(),
        }
    }

    /// This environment with a snapshot's root instead of its own.
    pub fn with_snapshot(&self, snapshot: Snapshot) -> Environment {
        Environment {
            rootfs: snapshot.rootfs(),
            image: None,
            snapshot: Some(snapshot),
            ..self.clone()
        }
    }

    /// `image <version>`, `snapshot <version>` or `host`, for listings.
    pub fn source(&self) -> String {
        match (&self.snapshot, &self.image) {
            (Some(snapshot), _) => format!("snapshot {}", snapshot.version),
            (None, Some(image)) => format!("image {}", image.version),
            (None, None) => "host".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "uid base {0} is unusable: sandboxes map 65536 ids from it and their namespaces are owned \
         by the next 65536, so it must be between 1 and {max}",
        max = u32::MAX - 2 * ID_RANGE
    )]
    UidBase(u32),
    #[error(
        "the data dir {data_dir} is inside {bind}, which every sandbox sees: sandboxes would reach \
         each other's envd sockets and the server's files; use a data dir outside {bind}"
    )]
    DataDirVisible { data_dir: PathBuf, bind: PathBuf },
    #[error("{origin}: {message}")]
    Definition { origin: String, message: String },
    #[error(
        "unknown environment {name:?}: the built-in environments are {known} (or give a \
         definition file with --file)"
    )]
    UnknownEnvironment { name: String, known: String },
    #[error("{name} cannot be built: {reason}")]
    Unbuildable { name: String, reason: String },
    #[error("another build or cleanup of {name} is running; wait for it to finish")]
    Busy { name: String },
    #[error("cannot find a Debian mirror in the host's apt sources: {detail}")]
    NoMirror { detail: String },
    #[error(
        "refusing to delete {path}: {mount} is mounted inside it (unmount it first, or it would \
         delete the mounted files too)"
    )]
    MountedInside { path: PathBuf, mount: PathBuf },
    #[error("step {step} failed ({status}){}", quote_tail(tail))]
    StepFailed {
        step: String,
        status: String,
        tail: String,
    },
    #[error("cancelled during step {step:?}; the previous version stays current")]
    Cancelled { step: String },
}

fn quote_tail(tail: &str) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("; the end of its output:\n{tail}")
    }
}

/// Adds the failed action and its path to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn ctx(self, action: &'static str, path: &Path) -> Result<T, Error>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, action: &'static str, path: &Path) -> Result<T, Error> {
        self.map_err(|source| Error::Io {
            action,
            path: path.to_owned(),
            source,
        })
    }
}

/// A built-in environment of the SDK: its name, the programs it needs from the host, the
/// Debian package that provides them, and its image definition (`environments/<name>.toml`).
struct Builtin {
    name: &'static str,
    programs: &'static [&'static str],
    install: &'static str,
    definition: &'static str,
}

/// The built-in names of the SDK, defined once.
const BUILTINS: &[Builtin] = &[
    Builtin {
        name: "Nodejs",
        programs: &["node"],
        install: "Debian's nodejs",
        definition: include_str!("../../../environments/Nodejs.toml"),
    },
    Builtin {
        name: "Bash",
        programs: &["bash"],
        install: "Debian's bash",
        definition: include_str!("../../../environments/Bash.toml"),
    },
    Builtin {
        name: "Python3",
        programs: &["python3"],
        install: "Debian's python3",
        definition: include_str!("../../../environments/Python3.toml"),
    },
    Builtin {
        name: "Java",
        programs: &["java"],
        install: "Debian's default-jre-headless",
        definition: include_str!("../../../environments/Java.toml"),
    },
    Builtin {
        name: "Go",
        programs: &["go"],
        install: "Debian's golang-go",
        definition: include_str!("../../../environments/Go.toml"),
    },
    Builtin {
        name: "Rust",
        programs: &["rustc", "cargo"],
        install: "Debian's rustc and cargo",
        definition: include_str!("../../../environments/Rust.toml"),
    },
    Builtin {
        name: "PHP",
        programs: &["php"],
        install: "Debian's php-cli",
        definition: include_str!("../../../environments/PHP.toml"),
    },
    Builtin {
        name: "Perl",
        programs: &["perl"],
        install: "Debian's perl",
        definition: include_str!("../../../environments/Perl.toml"),
    },
    Builtin {
        name: "DotNET",
        programs: &["dotnet"],
        install: "Microsoft's dotnet-sdk-8.0 package",
        definition: include_str!("../../../environments/DotNET.toml"),
    },
];

/// Where the built-ins' programs are looked up on the host.
const PROGRAM_DIRS: &[&str] = &["/usr/bin", "/usr/local/bin", "/usr/sbin"];

/// Every environment this node can offer. A built-in follows its image: when `burrow env build`
/// makes a new version current, the next lookup serves it (sandboxes already running keep theirs).
#[derive(Debug)]
pub struct Catalog {
    /// Each built-in, with the `current` version of its image it was loaded for.
    environments: RwLock<Vec<(Option<String>, Arc<Environment>)>>,
    /// The host-based default of each built-in, for one without a usable image.
    host: Vec<Arc<Environment>>,
    images: Images,
    uid_base: u32,
    data_dir: PathBuf,
}

impl Catalog {
    /// Loads the built-in environments: each from the current version of its built image if it
    /// has one (taking that version into use for the catalog's life), else from the host-based
    /// default, (re)generating the shared root filesystem under `<data_dir>/environments/host`
    /// when it is missing or was made by another generator version. Then deletes image versions
    /// nothing uses any more. `uid_base` is the host uid of a sandbox's root; root filesystems
    /// are owned by the mapped ids.
    pub fn load(data_dir: &Path, uid_base: u32) -> Result<Catalog, Error> {
        validate_uid_base(uid_base)?;
        let data_dir = std::path::absolute(data_dir).ctx("resolve", data_dir)?;
        let layout = host::Layout::of_host(Path::new("/"));
        check_hidden(&data_dir, &layout.binds)?;
        let rootfs = host::ensure_rootfs(&data_dir.join("environments/host"), uid_base, &layout)?;
        let images = Images::new(&data_dir);
        let host: Vec<Arc<Environment>> = BUILTINS
            .iter()
            .map(|builtin| {
                Arc::new(Environment {
                    name: builtin.name.to_owned(),
                    rootfs: rootfs.clone(),
                    binds: layout.binds.clone(),
                    user: default_user(),
                    env: default_env(),
                    workdir: default_user().home,
                    availability: availability(builtin, PROGRAM_DIRS),
                    image: None,
                    snapshot: None,
                    egress: builtin_egress(builtin),
                })
            })
            .collect();
        let environments = host
            .iter()
            .map(|default| {
                let current = images.current_version(&default.name).ok().flatten();
                let env = match current_image(&images, &default.name, uid_base) {
                    Some(image) => Arc::new(from_image(&default.name, image)),
                    None => default.clone(),
                };
                (current, env)
            })
            .collect();
        // After the versions above are held: a collection never takes what is in use.
        match images.collect_all() {
            Ok(collected) => {
                for (name, done) in collected {
                    if !done.removed.is_empty() || done.leftovers > 0 {
                        tracing::info!(
                            environment = %name,
                            removed = ?done.removed,
                            in_use = ?done.in_use,
                            leftovers = done.leftovers,
                            "collected unused image versions"
                        );
                    }
                }
            }
            Err(e) => tracing::warn!("cannot collect unused image versions: {e}"),
        }
        if let Err(e) = snapshots::collect_all(&data_dir) {
            tracing::warn!("cannot collect unused snapshots: {e}");
        }
        Ok(Catalog {
            environments: RwLock::new(environments),
            host,
            images,
            uid_base,
            data_dir,
        })
    }

    /// The saved edits of one team's custom environments.
    pub fn snapshots(&self, team_id: i64) -> Snapshots {
        Snapshots::new(&self.data_dir, team_id)
    }

    /// The environment called `name`, from the image version that is current right now.
    pub fn get(&self, name: &str) -> Option<Arc<Environment>> {
        let index = self.host.iter().position(|e| e.name == name)?;
        Some(self.fresh(index))
    }

    /// Every environment, in the SDK's order.
    pub fn list(&self) -> Vec<Arc<Environment>> {
        (0..self.host.len()).map(|i| self.fresh(i)).collect()
    }

    /// The environment at `index`, switched over first if its image's `current` moved (one
    /// `readlink`; the new version is taken into use before it is handed out).
    fn fresh(&self, index: usize) -> Arc<Environment> {
        let (seen, known) =
            self.environments.read().unwrap_or_else(|e| e.into_inner())[index].clone();
        let name = &known.name;
        let current = match self.images.current_version(name) {
            Ok(current) => current,
            Err(e) => {
                tracing::warn!(environment = %name, "cannot read the current image version: {e}");
                return known;
            }
        };
        if current == seen {
            return known;
        }
        let next = match current_image(&self.images, name, self.uid_base) {
            Some(image) => Arc::new(from_image(name, image)),
            None => self.host[index].clone(),
        };
        tracing::info!(environment = %name, source = %next.source(), "environment switched to a new version");
        let mut environments = self.environments.write().unwrap_or_else(|e| e.into_inner());
        // Another lookup may have switched it meanwhile; either result is the current version.
        environments[index] = (current, next.clone());
        next
    }
}

/// The definition of a built-in environment (compiled in from `environments/<name>.toml`).
pub fn builtin_definition(name: &str) -> Option<(&'static str, Result<Definition, Error>)> {
    let builtin = BUILTINS.iter().find(|b| b.name == name)?;
    let origin = format!("environments/{}.toml", builtin.name);
    Some((
        builtin.definition,
        Definition::parse(builtin.name, &origin, builtin.definition),
    ))
}

/// The names of the built-in environments, in the SDK's order.
pub fn builtin_names() -> impl Iterator<Item = &'static str> {
    BUILTINS.iter().map(|b| b.name)
}

/// The current image of `name` if it was built for this uid base; problems are logged and mean
/// the host-based default.
fn current_image(images: &Images, name: &str, uid_base: u32) -> Option<Image> {
    match images.current(name) {
        Ok(Some(image)) if image.uid_base == uid_base => Some(image),
        Ok(Some(image)) => {
            tracing::warn!(
                environment = name,
                version = %image.version,
                "the image was built for uid base {}, not {uid_base}; using the host-based \
                 default (rebuild it with `burrow env build {name}`)",
                image.uid_base
            );
            None
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(
                environment = name,
                "cannot use the built image: {e}; using the host-based default"
            );
            None
        }
    }
}

/// The network policy of a built-in's compiled-in definition (which the tests check parses);
/// one that does not parse gets no network rather than more than it says.
fn builtin_egress(builtin: &Builtin) -> Egress {
    match Definition::parse(builtin.name, builtin.name, builtin.definition) {
        Ok(definition) => definition.egress,
        Err(e) => {
            tracing::error!(
                environment = builtin.name,
                "{e}; its sandboxes get no network"
            );
            Egress {
                network: Some(egress::Network::None),
                ..Egress::default()
            }
        }
    }
}

/// An environment served from its built image: the image's own `/usr` and `/etc` (no binds), its
/// definition's user, variables and working directory; the network policy of the compiled-in
/// definition, like the host-based default's.
fn from_image(name: &str, image: Image) -> Environment {
    let recipe = &image.recipe;
    let mut env: Vec<(String, String)> = default_env()
        .into_iter()
        .map(|(key, value)| match key.as_str() {
            "SHELL" => (key, recipe.user.shell.display().to_string()),
            _ => (key, value),
        })
        .filter(|(key, _)| !recipe.env.contains_key(key))
        .collect();
    env.extend(recipe.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    Environment {
        name: name.to_owned(),
        rootfs: image.rootfs(),
        binds: Vec::new(),
        user: recipe.user.clone(),
        env,
        workdir: recipe.workdir.clone(),
        availability: Ok(()),
        image: Some(image),
        snapshot: None,
        egress: BUILTINS
            .iter()
            .find(|builtin| builtin.name == name)
            .map(builtin_egress)
            .unwrap_or_default(),
    }
}

/// Refuses a data dir that sandboxes would see through a bind: it holds every sandbox's envd
/// socket (and the server's database), all owned by the ids sandboxes run as.
fn check_hidden(data_dir: &Path, binds: &[Bind]) -> Result<(), Error> {
    let real = data_dir
        .canonicalize()
        .unwrap_or_else(|_| data_dir.to_owned());
    match binds.iter().find(|bind| real.starts_with(&bind.host)) {
        Some(bind) => Err(Error::DataDirVisible {
            data_dir: real,
            bind: bind.host.clone(),
        }),
        None => Ok(()),
    }
}

/// Sandboxes map their ids 0..65536 to host ids from `uid_base`, and their user namespaces are
/// owned by the 65536 ids after those: it must leave room for both and must not be 0 (sandbox
/// root would be host root).
pub fn validate_uid_base(uid_base: u32) -> Result<(), Error> {
    if uid_base == 0 || uid_base > u32::MAX - 2 * ID_RANGE {
        return Err(Error::UidBase(uid_base));
    }
    Ok(())
}

fn default_user() -> User {
    User {
        name: "user".into(),
        uid: 1000,
        gid: 1000,
        home: "/home/user".into(),
        shell: "/bin/bash".into(),
    }
}

fn default_env() -> Vec<(String, String)> {
    [("PATH", PATH), ("LANG", "C.UTF-8"), ("SHELL", "/bin/bash")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Every environment runs its commands through `bash -l -c`, so bash is always required.
fn availability(builtin: &Builtin, dirs: &[&str]) -> Result<(), String> {
    let missing: Vec<&str> = std::iter::once("bash")
        .chain(builtin.programs.iter().copied().filter(|p| *p != "bash"))
        .filter(|program| find_program(program, dirs).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = missing.iter().map(|p| format!("`{p}`")).collect();
    let outside = missing
        .iter()
        .filter_map(|p| which_outside_usr(p).map(|path| format!("`{p}` is at {}", path.display())))
        .collect::<Vec<_>>();
    let mut reason = format!(
        "needs {} in {}; install {}",
        names.join(" and "),
        dirs.join(" or "),
        if missing == ["bash"] {
            "Debian's bash"
        } else {
            builtin.install
        }
    );
    if !outside.is_empty() {
        reason.push_str(&format!(
            " ({}, which sandboxes cannot see: they only see the host's /usr)",
            outside.join(", ")
        ));
    }
    match Definition::parse(builtin.name, builtin.name, builtin.definition).map(|d| d.recipe) {
        Ok(Ok(_)) => reason.push_str(&format!(
            "; or build its image: burrow env build {}",
            builtin.name
        )),
        Ok(Err(why)) => reason.push_str(&format!("; it has no image either: {why}")),
        Err(_) => {}
    }
    Err(reason)
}

/// The program's path in one of `dirs`, if it is an executable whose real location is under
/// `/usr` (sandboxes see the host's `/usr` and `/etc/alternatives`, nothing else of the host).
fn find_program(program: &str, dirs: &[&str]) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    dirs.iter()
        .map(|dir| Path::new(dir).join(program))
        .find(|path| {
            path.canonicalize().is_ok_and(|real| {
                real.starts_with("/usr")
                    && real
                        .metadata()
                        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
        })
}

/// Where `$PATH` finds a program that the sandbox cannot see, to make the reason concrete
/// (a rustup toolchain in /root/.cargo, a python shim in /root/.pyenv, ...).
fn which_outside_usr(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .filter(|p| {
            p.canonicalize()
                .map_or(true, |real| !real.starts_with("/usr"))
        })
}

#[cfg(test)]
pub(crate) mod test_support {
    use std::fs;
    use std::path::PathBuf;

    /// A scratch directory removed on drop.
    pub struct Scratch(pub PathBuf);

    impl Scratch {
        pub fn new(tag: &str) -> Scratch {
            let path = std::env::temp_dir().join(format!(
                "burrow-environments-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            Scratch(path)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_has_a_valid_definition() {
        for name in builtin_names() {
            let (text, definition) = builtin_definition(name).unwrap();
            let definition = definition.unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!text.is_empty());
            match (name, &definition.recipe) {
                ("DotNET", Err(why)) => assert!(why.contains("Debian has no .NET"), "{why}"),
                (_, Ok(recipe)) => assert_eq!(recipe.user, default_user(), "{name}"),
                (_, Err(why)) => panic!("{name} is unavailable: {why}"),
            }
        }
        let toolchains = [
            ("Python3", "python3-pip"),
            ("Nodejs", "npm"),
            ("Go", "golang-go"),
            ("Rust", "cargo"),
            ("PHP", "php-cli"),
            ("Perl", "perl"),
            ("Java", "default-jdk-headless"),
        ];
        for (name, package) in toolchains {
            let recipe = builtin_definition(name).unwrap().1.unwrap().recipe.unwrap();
            assert!(recipe.packages.iter().any(|p| p == package), "{name}");
        }
        assert!(builtin_definition("Cobol").is_none());
    }

    #[test]
    fn an_image_environment_uses_the_definition() {
        let scratch = test_support::Scratch::new("catalog-image");
        let images = Images::new(&scratch.0);
        let recipe = Definition::parse(
            "Go",
            "Go.toml",
            "suite = \"bookworm\"\nworkdir = \"/srv\"\n[env]\nGOPATH = \"/go\"\nLANG = \"C\"\n\
             [user]\nname = \"gopher\"\nshell = \"/bin/sh\"\n",
        )
        .unwrap()
        .recipe
        .unwrap();
        let dir = images.env_dir("Go").join("0123456789ab");
        std::fs::create_dir_all(dir.join("rootfs")).unwrap();
        images::create_version_lock(&dir).unwrap();
        let metadata = images::Metadata::new("Go", "0123456789ab", 100_000, &recipe);
        std::fs::write(
            dir.join("image.json"),
            serde_json::to_string(&metadata).unwrap(),
        )
        .unwrap();
        let lock = images.try_lock("Go").unwrap().unwrap();
        images.set_current("Go", "0123456789ab", &lock).unwrap();
        drop(lock);

        assert!(
            current_image(&images, "Go", 200_000).is_none(),
            "other uid base"
        );
        let environment = from_image("Go", current_image(&images, "Go", 100_000).unwrap());
        assert_eq!(environment.rootfs, dir.join("rootfs"));
        assert!(environment.binds.is_empty());
        assert_eq!(environment.user.name, "gopher");
        assert_eq!(environment.workdir, Path::new("/srv"));
        assert_eq!(environment.source(), "image 0123456789ab");
        assert!(environment.pin().unwrap().is_some());
        let get = |key: &str| {
            let values: Vec<&str> = environment
                .env
                .iter()
                .filter(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
                .collect();
            values.join(",")
        };
        assert_eq!(get("PATH"), PATH);
        assert_eq!(get("LANG"), "C", "the definition's value, once");
        assert_eq!(get("SHELL"), "/bin/sh");
        assert_eq!(get("GOPATH"), "/go");
    }

    #[test]
    fn builtin_names_are_the_sdks() {
        let names: Vec<&str> = BUILTINS.iter().map(|b| b.name).collect();
        assert_eq!(
            names,
            [
                "Nodejs", "Bash", "Python3", "Java", "Go", "Rust", "PHP", "Perl", "DotNET"
            ]
        );
    }

    #[test]
    fn missing_program_says_what_to_install() {
        let go = BUILTINS.iter().find(|b| b.name == "Go").unwrap();
        let reason = availability(go, &["/nonexistent"]).unwrap_err();
        assert!(
            reason.starts_with("needs `bash` and `go` in /nonexistent; install Debian's golang-go"),
            "{reason}"
        );
    }

    #[test]
    fn data_dir_must_stay_out_of_sight() {
        let binds = [Bind {
            host: "/usr".into(),
            inside: "/usr".into(),
        }];
        assert!(check_hidden(Path::new("/var/lib/burrow"), &binds).is_ok());
        assert!(check_hidden(Path::new("/usrdata/burrow"), &binds).is_ok());
        let error = check_hidden(Path::new("/usr/local/var/burrow"), &binds).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("inside /usr, which every sandbox sees"),
            "{error}"
        );
    }

    #[test]
    fn programs_are_found_only_under_usr() {
        assert!(find_program("sh", &["/usr/bin", "/bin"]).is_some());
        assert!(find_program("no-such-program-here", &["/usr/bin"]).is_none());
    }
}
