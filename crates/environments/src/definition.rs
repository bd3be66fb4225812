//! Environment definitions: the small TOML files (`environments/<Name>.toml` in the repository,
//! compiled into the binary) that say how an environment's image is built.
//!
//! ```toml
//! suite = "bookworm"                    # Debian release the image is bootstrapped from
//! packages = ["python3", "python3-pip"] # installed on top of Debian's minimal base (minbase)
//! run = ["python3 -m compileall -q /usr/lib/python3"]  # run as root inside the new image
//! workdir = "/home/user"                # where commands start (default: the user's home)
//!
//! [env]                                 # variables of every process in the sandbox
//! PIP_BREAK_SYSTEM_PACKAGES = "1"
//!
//! [user]                                # who processes run as (these are the defaults)
//! name = "user"
//! uid = 1000
//! gid = 1000
//! home = "/home/user"
//! shell = "/bin/bash"
//!
//! network = "internet"                  # or "none": only `lo` (default: the server's --network)
//! egress_allow = ["203.0.113.0/24"]     # when given, only these are reachable
//! egress_deny = ["203.0.113.9/32"]      # never reachable; deny wins over allow
//! ```
//!
//! The network keys are a policy for the environment's sandboxes, not part of its image (see
//! [`crate::egress`]).
//!
//! or, for an environment that cannot be built, only `unavailable = "why"`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::egress::{Cidr, Egress, Network};
use crate::{Error, ID_RANGE, User};

/// Bump when the way an image is built from a definition changes, so that every image is
/// rebuilt (its version changes) at the next `burrow env build`.
pub const IMAGE_GENERATOR_VERSION: u32 = 1;

/// Variables envd sets itself for every process; a definition may not override them.
const RESERVED_VARIABLES: &[&str] = &["HOME", "USER", "LOGNAME"];

/// A validated definition of one environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Definition {
    pub name: String,
    /// `Err(why)` when the environment cannot be built at all (no Debian package for it).
    pub recipe: Result<Recipe, String>,
    /// What its sandboxes may reach; kept out of the recipe, so that changing it rebuilds no
    /// image.
    pub egress: Egress,
}

/// How to build an environment's image, normalized: everything defaulted, packages sorted.
/// Its serialization is what the image's version is a hash of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub suite: String,
    pub packages: Vec<String>,
    pub run: Vec<String>,
    pub workdir: PathBuf,
    pub env: BTreeMap<String, String>,
    pub user: User,
}

impl Recipe {
    /// A short hash of everything that decides the image's content: the recipe, the generator
    /// version and the uid base the tree is owned by. Equal versions mean equal images.
    pub fn version(&self, uid_base: u32) -> String {
        let canonical = serde_json::to_string(self).expect("a recipe serializes");
        let mut hash = Sha256::new();
        hash.update(format!(
            "burrow image generator {IMAGE_GENERATOR_VERSION}\n"
        ));
        hash.update(format!("uid base {uid_base}\n"));
        hash.update(canonical);
        hash.finalize()[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Whether `name` looks like a version [`Recipe::version`] makes (12 lowercase hex digits).
pub(crate) fn is_version(name: &str) -> bool {
    name.len() == 12 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The file as written; every field optional so that validation can say what is missing.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefinition {
    unavailable: Option<String>,
    suite: Option<String>,
    packages: Option<Vec<String>>,
    run: Option<Vec<String>>,
    workdir: Option<PathBuf>,
    env: Option<BTreeMap<String, String>>,
    user: Option<RawUser>,
    network: Option<Network>,
    egress_allow: Option<Vec<Cidr>>,
    egress_deny: Option<Vec<Cidr>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    name: Option<String>,
    uid: Option<u32>,
    gid: Option<u32>,
    home: Option<PathBuf>,
    shell: Option<PathBuf>,
}

impl Definition {
    /// Parses and validates the definition of environment `name`; `origin` names the file in
    /// error messages.
    pub fn parse(name: &str, origin: &str, text: &str) -> Result<Definition, Error> {
        let invalid = |message: String| Error::Definition {
            origin: origin.to_owned(),
            message,
        };
        if !valid_environment_name(name) {
            return Err(invalid(format!(
                "{name:?} is not an environment name: use 1 to 32 letters, digits, `-` or `_`, \
                 starting with a letter"
            )));
        }
        let mut raw: RawDefinition = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let egress = Egress {
            network: raw.network,
            allow: raw.egress_allow.take().unwrap_or_default(),
            deny: raw.egress_deny.take().unwrap_or_default(),
        };
        if let Some(reason) = raw.unavailable {
            let others = [
                ("suite", raw.suite.is_some()),
                ("packages", raw.packages.is_some()),
                ("run", raw.run.is_some()),
                ("workdir", raw.workdir.is_some()),
                ("env", raw.env.is_some()),
                ("user", raw.user.is_some()),
            ];
            if let Some((field, _)) = others.iter().find(|(_, set)| *set) {
                return Err(invalid(format!(
                    "`unavailable` says the environment cannot be built, so `{field}` makes no \
                     sense beside it"
                )));
            }
            if reason.trim().is_empty() {
                return Err(invalid("`unavailable` must say why".into()));
            }
            return Ok(Definition {
                name: name.to_owned(),
                recipe: Err(reason.trim().to_owned()),
                egress,
            });
        }
        let recipe = validate(raw).map_err(invalid)?;
        Ok(Definition {
            name: name.to_owned(),
            recipe: Ok(recipe),
            egress,
        })
    }
}

/// Environment names become directory names and appear in URLs and hostnames' neighbours.
pub(crate) fn valid_environment_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn validate(raw: RawDefinition) -> Result<Recipe, String> {
    let suite = raw
        .suite
        .ok_or("`suite` is missing: name the Debian release to start from, e.g. \"bookworm\"")?;
    if suite.is_empty()
        || !suite
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(format!(
            "suite {suite:?} is not a Debian release name (lowercase letters, digits, `-`)"
        ));
    }

    let mut packages = BTreeSet::new();
    for package in raw.packages.unwrap_or_default() {
        if !valid_package_name(&package) {
            return Err(format!(
                "package {package:?} is not a Debian package name (lowercase letters, digits, \
                 `+`, `-`, `.`; at least two characters, starting with a letter or digit)"
            ));
        }
        if !packages.insert(package.clone()) {
            return Err(format!("package {package:?} is listed twice"));
        }
    }

    let run = raw.run.unwrap_or_default();
    for (i, command) in run.iter().enumerate() {
        if command.trim().is_empty() {
            return Err(format!("run command {} is empty", i + 1));
        }
        if command.contains('\0') {
            return Err(format!("run command {} contains a NUL byte", i + 1));
        }
    }

    let user = validate_user(raw.user)?;

    let workdir = raw.workdir.unwrap_or_else(|| user.home.clone());
    check_absolute("workdir", &workdir)?;

    let env = raw.env.unwrap_or_default();
    for (key, value) in &env {
        let valid = key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            return Err(format!(
                "environment variable {key:?}: names are letters, digits and `_`, not starting \
                 with a digit"
            ));
        }
        if RESERVED_VARIABLES.contains(&key.as_str()) {
            return Err(format!(
                "environment variable {key} is set by burrow from `[user]`; set the user instead"
            ));
        }
        if value.contains('\0') {
            return Err(format!("environment variable {key} contains a NUL byte"));
        }
    }

    Ok(Recipe {
        suite,
        packages: packages.into_iter().collect(),
        run,
        workdir,
        env,
        user,
    })
}

fn validate_user(raw: Option<RawUser>) -> Result<User, String> {
    let raw = raw.unwrap_or(RawUser {
        name: None,
        uid: None,
        gid: None,
        home: None,
        shell: None,
    });
    let name = raw.name.unwrap_or_else(|| "user".into());
    let valid_name = (1..=32).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if !valid_name || name == "root" {
        return Err(format!(
            "user name {name:?}: use 1 to 32 lowercase letters, digits, `_` or `-`, starting with \
             a letter or `_`, and not root"
        ));
    }
    // 0 is root; 65534 is nobody; ids past the sandbox's mapped range do not exist in it.
    let id_ok = |id: u32| (1..ID_RANGE - 2).contains(&id);
    let uid = raw.uid.unwrap_or(1000);
    let gid = raw.gid.unwrap_or(uid);
    for (what, id) in [("uid", uid), ("gid", gid)] {
        if !id_ok(id) {
            return Err(format!(
                "user {what} {id}: use 1 to {} (0 is root, and a sandbox maps only {ID_RANGE} ids)",
                ID_RANGE - 3
            ));
        }
    }
    let home = raw.home.unwrap_or_else(|| Path::new("/home").join(&name));
    check_absolute("user.home", &home)?;
    let shell = raw.shell.unwrap_or_else(|| "/bin/bash".into());
    check_absolute("user.shell", &shell)?;
    Ok(User {
        name,
        uid,
        gid,
        home,
        shell,
    })
}

/// Debian policy §5.6.1: lowercase letters, digits, `+`, `-`, `.`; two or more characters,
/// starting with an alphanumeric.
fn valid_package_name(name: &str) -> bool {
    name.len() >= 2
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'+' || b == b'-' || b == b'.'
        })
}

/// A path inside the image: absolute, no `.` or `..`, not `/` itself, printable (it ends up in
/// shell commands and `/etc/passwd`).
fn check_absolute(what: &str, path: &Path) -> Result<(), String> {
    let mut components = path.components();
    let rooted = components.next() == Some(Component::RootDir);
    let rest: Vec<Component> = components.collect();
    let plain = !rest.is_empty() && rest.iter().all(|c| matches!(c, Component::Normal(_)));
    let printable = path.to_str().is_some_and(|s| {
        s.chars()
            .all(|c| !c.is_control() && c != ':' && c != '\'' && c != '\\')
    });
    if rooted && plain && printable {
        Ok(())
    } else {
        Err(format!(
            "{what} {path:?} must be an absolute path below / without `.`, `..`, quotes, colons \
             or control characters",
            path = path.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Definition, Error> {
        Definition::parse("Test", "Test.toml", text)
    }

    fn recipe(text: &str) -> Recipe {
        parse(text).unwrap().recipe.unwrap()
    }

    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn defaults_fill_the_user_and_workdir() {
        let recipe = recipe("suite = \"bookworm\"\npackages = [\"python3\"]\n");
        assert_eq!(recipe.suite, "bookworm");
        assert_eq!(recipe.packages, ["python3"]);
        assert!(recipe.run.is_empty() && recipe.env.is_empty());
        assert_eq!(
            recipe.user,
            User {
                name: "user".into(),
                uid: 1000,
                gid: 1000,
                home: "/home/user".into(),
                shell: "/bin/bash".into(),
            }
        );
        assert_eq!(recipe.workdir, Path::new("/home/user"));
    }

    #[test]
    fn every_field_is_read() {
        let recipe = recipe(
            r#"
            suite = "trixie"
            packages = ["php-cli", "g++", "libc6.1"]
            run = ["echo hi > /etc/motd"]
            workdir = "/srv/app"
            [env]
            FOO_1 = "bar baz"
            [user]
            name = "dev"
            uid = 2000
            home = "/srv/dev"
            shell = "/bin/sh"
            "#,
        );
        assert_eq!(recipe.packages, ["g++", "libc6.1", "php-cli"], "sorted");
        assert_eq!(recipe.run, ["echo hi > /etc/motd"]);
        assert_eq!(recipe.workdir, Path::new("/srv/app"));
        assert_eq!(recipe.env["FOO_1"], "bar baz");
        assert_eq!((recipe.user.uid, recipe.user.gid), (2000, 2000));
        assert_eq!(recipe.user.home, Path::new("/srv/dev"));
        assert_eq!(recipe.user.shell, Path::new("/bin/sh"));
    }

    #[test]
    fn the_network_policy_is_read_and_stays_out_of_the_image() {
        let plain = parse("suite = \"bookworm\"").unwrap();
        assert_eq!(plain.egress, Egress::default());
        let text = r#"
            suite = "bookworm"
            network = "internet"
            egress_allow = ["203.0.113.0/24", "198.51.100.7"]
            egress_deny = ["203.0.113.9/32"]
            "#;
        let fenced = parse(text).unwrap();
        assert_eq!(fenced.egress.network, Some(Network::Internet));
        let cidrs = |list: &[Cidr]| list.iter().map(Cidr::to_string).collect::<Vec<_>>();
        assert_eq!(
            cidrs(&fenced.egress.allow),
            ["203.0.113.0/24", "198.51.100.7/32"]
        );
        assert_eq!(cidrs(&fenced.egress.deny), ["203.0.113.9/32"]);
        assert_eq!(
            fenced.recipe.unwrap().version(100_000),
            plain.recipe.unwrap().version(100_000)
        );
        let none = parse("suite = \"bookworm\"\nnetwork = \"none\"").unwrap();
        assert_eq!(none.egress.network, Some(Network::None));
        assert!(error("suite = \"bookworm\"\nnetwork = \"lan\"").contains("none"));
        assert!(
            error("suite = \"bookworm\"\negress_deny = [\"10.0.0.1/8\"]").contains("10.0.0.0/8")
        );
        assert!(
            error("suite = \"bookworm\"\negress_allow = [\"pypi.org\"]")
                .contains("not supported yet")
        );
    }

    #[test]
    fn unavailable_says_why_and_stands_alone() {
        let definition = parse("unavailable = \"no Debian package\"").unwrap();
        assert_eq!(definition.recipe, Err("no Debian package".into()));
        assert!(error("unavailable = \"x\"\nsuite = \"bookworm\"").contains("`suite` makes no"));
        assert!(error("unavailable = \"  \"").contains("must say why"));
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            ("packages = []", "`suite` is missing"),
            ("suite = \"Bookworm\"", "not a Debian release name"),
            (
                "suite = \"bookworm\"\npackage = []",
                "unknown field `package`",
            ),
            (
                "suite = \"bookworm\"\npackages = [\"Python3\"]",
                "not a Debian package",
            ),
            (
                "suite = \"bookworm\"\npackages = [\"a\"]",
                "not a Debian package",
            ),
            (
                "suite = \"bookworm\"\npackages = [\"x1\", \"x1\"]",
                "listed twice",
            ),
            (
                "suite = \"bookworm\"\npackages = \"python3\"",
                "invalid type",
            ),
            (
                "suite = \"bookworm\"\nrun = [\" \"]",
                "run command 1 is empty",
            ),
            (
                "suite = \"bookworm\"\nworkdir = \"srv\"",
                "workdir \"srv\" must be",
            ),
            (
                "suite = \"bookworm\"\nworkdir = \"/srv/../etc\"",
                "must be an absolute",
            ),
            (
                "suite = \"bookworm\"\nworkdir = \"/\"",
                "must be an absolute",
            ),
            (
                "suite = \"bookworm\"\n[env]\n1X = \"y\"",
                "names are letters",
            ),
            (
                "suite = \"bookworm\"\n[env]\nHOME = \"/x\"",
                "set by burrow",
            ),
            ("suite = \"bookworm\"\n[user]\nname = \"root\"", "not root"),
            ("suite = \"bookworm\"\n[user]\nname = \"Bob\"", "user name"),
            ("suite = \"bookworm\"\n[user]\nuid = 0", "user uid 0"),
            (
                "suite = \"bookworm\"\n[user]\nuid = 70000",
                "user uid 70000",
            ),
            (
                "suite = \"bookworm\"\n[user]\ngid = 65534",
                "user gid 65534",
            ),
            (
                "suite = \"bookworm\"\n[user]\nshell = \"bash\"",
                "user.shell",
            ),
            (
                "suite = \"bookworm\"\n[user]\nhome = \"/home/a:b\"",
                "user.home",
            ),
            (
                "suite = \"bookworm\"\n[user]\ngroup = \"x\"",
                "unknown field `group`",
            ),
            ("suite = ", "TOML parse error"),
        ];
        for (text, needle) in cases {
            let message = error(text);
            assert!(message.contains(needle), "{text:?}: {message}");
            assert!(message.starts_with("Test.toml: "), "{message}");
        }
        let name = Definition::parse("../x", "x.toml", "suite = \"bookworm\"").unwrap_err();
        assert!(
            name.to_string().contains("not an environment name"),
            "{name}"
        );
    }

    #[test]
    fn the_version_follows_the_content_not_the_formatting() {
        let a = recipe("suite = \"bookworm\"\npackages = [\"b1\", \"a1\"]\n");
        let b =
            recipe("# comment\nsuite = 'bookworm'\npackages = ['a1','b1']\n[user]\nuid = 1000\n");
        assert_eq!(a.version(100_000), b.version(100_000));
        assert!(is_version(&a.version(100_000)), "{}", a.version(100_000));
        let c = recipe("suite = \"bookworm\"\npackages = [\"a1\"]\n");
        assert_ne!(a.version(100_000), c.version(100_000));
        let d = recipe("suite = \"bookworm\"\npackages = [\"a1\", \"b1\"]\nrun = [\"true\"]\n");
        assert_ne!(a.version(100_000), d.version(100_000));
        assert_ne!(
            a.version(100_000),
            a.version(200_000),
            "the owner ids are content too"
        );
    }

    #[test]
    fn versions_are_recognized() {
        assert!(is_version("0123456789ab"));
        assert!(!is_version("0123456789AB"));
        assert!(!is_version("current"));
        assert!(!is_version(".build-0123456789ab"));
    }
}
