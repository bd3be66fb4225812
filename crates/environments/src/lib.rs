//! Environments: the named root filesystems sessions start from (`Python3`, `Nodejs`, ...).
//! Owns their definitions and on-disk layout; starts nothing.
//!
//! The zero-setup default: every built-in environment shares one generated lower root filesystem
//! (`<data>/environments/host/rootfs`, a minimal `/etc`, a home, mount points) and sees the host's
//! `/usr` and a few harmless files of its `/etc` through read-only binds. An environment whose
//! programs the host lacks is listed as unavailable, with what to install.

mod host;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

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
    /// `Err(what to do)` when this host cannot run the environment.
    pub availability: Result<(), String>,
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
        "uid base {0} is unusable: sandboxes map 65536 ids from it, so it must be between 1 and {max}",
        max = u32::MAX - ID_RANGE
    )]
    UidBase(u32),
    #[error(
        "the data dir {data_dir} is inside {bind}, which every sandbox sees: sandboxes would reach \
         each other's envd sockets and the server's files; use a data dir outside {bind}"
    )]
    DataDirVisible { data_dir: PathBuf, bind: PathBuf },
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

/// A built-in environment of the SDK: its name, the programs it needs from the host, and the
/// Debian package that provides them.
struct Builtin {
    name: &'static str,
    programs: &'static [&'static str],
    install: &'static str,
}

/// The built-in names of the SDK, defined once.
const BUILTINS: &[Builtin] = &[
    Builtin {
        name: "Nodejs",
        programs: &["node"],
        install: "Debian's nodejs",
    },
    Builtin {
        name: "Bash",
        programs: &["bash"],
        install: "Debian's bash",
    },
    Builtin {
        name: "Python3",
        programs: &["python3"],
        install: "Debian's python3",
    },
    Builtin {
        name: "Java",
        programs: &["java"],
        install: "Debian's default-jre-headless",
    },
    Builtin {
        name: "Go",
        programs: &["go"],
        install: "Debian's golang-go",
    },
    Builtin {
        name: "Rust",
        programs: &["rustc", "cargo"],
        install: "Debian's rustc and cargo",
    },
    Builtin {
        name: "PHP",
        programs: &["php"],
        install: "Debian's php-cli",
    },
    Builtin {
        name: "Perl",
        programs: &["perl"],
        install: "Debian's perl",
    },
    Builtin {
        name: "DotNET",
        programs: &["dotnet"],
        install: "Microsoft's dotnet-sdk-8.0 package",
    },
];

/// Where the built-ins' programs are looked up on the host.
const PROGRAM_DIRS: &[&str] = &["/usr/bin", "/usr/local/bin", "/usr/sbin"];

/// Every environment this node can offer.
#[derive(Debug, Clone)]
pub struct Catalog {
    environments: Vec<Arc<Environment>>,
}

impl Catalog {
    /// Loads the built-in environments, (re)generating their shared root filesystem under
    /// `<data_dir>/environments/host` when it is missing or was made by another generator version.
    /// `uid_base` is the host uid of a sandbox's root; the rootfs is owned by the mapped ids.
    pub fn load(data_dir: &Path, uid_base: u32) -> Result<Catalog, Error> {
        validate_uid_base(uid_base)?;
        let data_dir = std::path::absolute(data_dir).ctx("resolve", data_dir)?;
        let layout = host::Layout::of_host(Path::new("/"));
        check_hidden(&data_dir, &layout.binds)?;
        let rootfs = host::ensure_rootfs(&data_dir.join("environments/host"), uid_base, &layout)?;
        let environments = BUILTINS
            .iter()
            .map(|builtin| {
                Arc::new(Environment {
                    name: builtin.name.to_owned(),
                    rootfs: rootfs.clone(),
                    binds: layout.binds.clone(),
                    user: default_user(),
                    env: default_env(),
                    availability: availability(builtin, PROGRAM_DIRS),
                })
            })
            .collect();
        Ok(Catalog { environments })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Environment>> {
        self.environments.iter().find(|e| e.name == name)
    }

    pub fn list(&self) -> &[Arc<Environment>] {
        &self.environments
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

/// Sandboxes map their ids 0..65536 to host ids from `uid_base`: it must leave room for them and
/// must not be 0 (sandbox root would be host root).
pub fn validate_uid_base(uid_base: u32) -> Result<(), Error> {
    if uid_base == 0 || uid_base > u32::MAX - ID_RANGE {
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
mod tests {
    use super::*;

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
