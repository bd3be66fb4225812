//! The Debian mirror an image is bootstrapped from: the one the host's apt already uses (the
//! host may reach Debian's archive only through it), read from `/etc/apt/sources.list` and
//! `/etc/apt/sources.list.d/*.{list,sources}`.

use std::fs;
use std::path::{Path, PathBuf};

use crate::Error;

/// One `deb` entry of the host's apt sources.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    uri: String,
    suites: Vec<String>,
    components: Vec<String>,
}

/// The apt source lines (one-line format) an image of `suite` is built from, given the host's
/// release codename and sources. The main archive is the entry that serves the host's own
/// release; its `-updates` suite and the security archive are added when the host has them and
/// the target is a release that has them (not `sid`, `unstable` or `experimental`).
fn lines_for(suite: &str, codename: &str, entries: &[Entry]) -> Option<Vec<String>> {
    let main = entries
        .iter()
        .find(|e| e.suites.iter().any(|s| s == codename))?;
    let components = main.components.join(" ");
    let mut lines = vec![format!("deb {} {suite} {components}", main.uri)];
    let rolling = matches!(suite, "sid" | "unstable" | "experimental");
    if rolling {
        return Some(lines);
    }
    let updates = format!("{codename}-updates");
    if entries
        .iter()
        .any(|e| e.uri == main.uri && e.suites.contains(&updates))
    {
        lines.push(format!("deb {} {suite}-updates {components}", main.uri));
    }
    let security = format!("{codename}-security");
    if let Some(entry) = entries.iter().find(|e| e.suites.contains(&security)) {
        lines.push(format!(
            "deb {} {suite}-security {}",
            entry.uri,
            entry.components.join(" ")
        ));
    }
    Some(lines)
}

/// The apt source lines for an image of `suite`, from this host's configuration.
pub(crate) fn debian_sources(suite: &str) -> Result<Vec<String>, Error> {
    let os_release = fs::read_to_string("/etc/os-release").unwrap_or_default();
    let codename = os_release
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|c| c.trim_matches('"').to_owned())
        .filter(|c| !c.is_empty());
    let mut files: Vec<PathBuf> = vec!["/etc/apt/sources.list".into()];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    let mut entries = Vec::new();
    for file in &files {
        let Ok(text) = fs::read_to_string(file) else {
            continue;
        };
        match file.extension().and_then(|e| e.to_str()) {
            Some("sources") => entries.extend(parse_deb822(&text)),
            Some("list") => entries.extend(parse_one_line(&text)),
            _ => {}
        }
    }
    let lines = codename
        .as_deref()
        .and_then(|codename| lines_for(suite, codename, &entries));
    lines.ok_or_else(|| Error::NoMirror {
        detail: match codename {
            None => "/etc/os-release names no VERSION_CODENAME: this host is not Debian".into(),
            Some(codename) => format!(
                "no `deb` entry serves the host's own release {codename:?} in {}",
                files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
    })
}

/// `deb [options] uri suite component...` lines.
fn parse_one_line(text: &str) -> Vec<Entry> {
    text.lines()
        .filter_map(|line| {
            let line = line.split('#').next()?.trim();
            let rest = line.strip_prefix("deb ")?.trim_start();
            // Options in brackets (`[signed-by=... arch=amd64]`) are the host's business.
            let rest = match rest.strip_prefix('[') {
                Some(options) => options.split_once(']')?.1,
                None => rest,
            };
            let mut words = rest.split_whitespace();
            let uri = words.next()?.to_owned();
            let suite = words.next()?.to_owned();
            let components: Vec<String> = words.map(str::to_owned).collect();
            Some(Entry {
                uri,
                suites: vec![suite],
                components,
            })
        })
        .collect()
}

/// deb822 paragraphs (`Types:`, `URIs:`, `Suites:`, `Components:`, `Enabled:`).
fn parse_deb822(text: &str) -> Vec<Entry> {
    let mut entries = Vec::new();
    for paragraph in text.split("\n\n") {
        let field = |name: &str| -> Option<Vec<String>> {
            let mut value: Option<String> = None;
            for line in paragraph.lines() {
                if line.starts_with('#') {
                    continue;
                }
                if let Some(continued) = line.strip_prefix([' ', '\t']) {
                    if let Some(v) = value.as_mut() {
                        v.push(' ');
                        v.push_str(continued.trim());
                    }
                    continue;
                }
                if value.is_some() {
                    break;
                }
                if let Some((key, rest)) = line.split_once(':')
                    && key.trim().eq_ignore_ascii_case(name)
                {
                    value = Some(rest.trim().to_owned());
                }
            }
            value.map(|v| v.split_whitespace().map(str::to_owned).collect())
        };
        let enabled = field("Enabled").is_none_or(|v| v.first().is_none_or(|e| e != "no"));
        let is_deb = field("Types").is_some_and(|t| t.iter().any(|t| t == "deb"));
        let (Some(uris), Some(suites)) = (field("URIs"), field("Suites")) else {
            continue;
        };
        if !enabled || !is_deb {
            continue;
        }
        let components = field("Components").unwrap_or_default();
        for uri in uris {
            entries.push(Entry {
                uri,
                suites: suites.clone(),
                components: components.clone(),
            });
        }
    }
    entries
}

/// Whether a program is on `PATH` (or in the usual system directories).
pub(crate) fn find_program(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            [
                "/usr/local/sbin",
                "/usr/local/bin",
                "/usr/sbin",
                "/usr/bin",
                "/sbin",
                "/bin",
            ]
            .into_iter()
            .map(PathBuf::from),
        )
        .map(|dir| dir.join(name))
        .find(|p| {
            Path::new(p)
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEB822: &str = "\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: https://deb.nodesource.com/node_20.x
Suites: nodistro
Components: main

Types: deb-src
URIs: http://src.example/debian
Suites: bookworm
Components: main
";

    #[test]
    fn deb822_sources_give_the_mirror_updates_and_security() {
        let entries = parse_deb822(DEB822);
        assert_eq!(entries.len(), 3, "{entries:?}");
        assert_eq!(
            lines_for("bookworm", "bookworm", &entries).unwrap(),
            [
                "deb http://deb.debian.org/debian bookworm main",
                "deb http://deb.debian.org/debian bookworm-updates main",
                "deb http://deb.debian.org/debian-security bookworm-security main",
            ]
        );
        assert_eq!(
            lines_for("sid", "bookworm", &entries).unwrap(),
            ["deb http://deb.debian.org/debian sid main"]
        );
        assert!(lines_for("bookworm", "trixie", &entries).is_none());
    }

    #[test]
    fn one_line_sources_and_a_local_mirror() {
        let text = "\
# a comment
deb [signed-by=/usr/share/keyrings/x.gpg arch=amd64] http://mirror.local/debian trixie main contrib
deb-src http://mirror.local/debian trixie main
deb http://mirror.local/debian-security trixie-security main # trailing
";
        let entries = parse_one_line(text);
        assert_eq!(entries.len(), 2, "{entries:?}");
        assert_eq!(
            lines_for("bookworm", "trixie", &entries).unwrap(),
            [
                "deb http://mirror.local/debian bookworm main contrib",
                "deb http://mirror.local/debian-security bookworm-security main",
            ]
        );
    }

    #[test]
    fn disabled_deb822_entries_are_skipped() {
        let text = "Enabled: no\nTypes: deb\nURIs: http://a/debian\nSuites: bookworm\n";
        assert!(parse_deb822(text).is_empty());
    }

    #[test]
    fn this_host_has_a_mirror_or_says_why() {
        match debian_sources("bookworm") {
            Ok(lines) => assert!(lines[0].starts_with("deb "), "{lines:?}"),
            Err(e) => assert!(e.to_string().contains("Debian mirror"), "{e}"),
        }
    }
}
