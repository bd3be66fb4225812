//! Who a Connect call acts as: `Authorization: Basic base64("<name>:")` names a Unix user of the
//! sandbox; without it, the sandbox user (e2b v2 wire spec §6.1, envd's `permissions`).

use std::path::{Component, Path, PathBuf};

use axum::http::{HeaderMap, header};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use super::error::{Code, Error};
use crate::Config;

/// The configuration children of this call start from: `config` with the identity (uid, gid,
/// name, home) of the user the request names.
pub(crate) fn resolve(headers: &HeaderMap, config: &Config) -> Result<Config, Error> {
    by_name(basic_user(headers), config)
}

/// `config` as the user `name` names (`/files`' `username`); no name means the sandbox user.
pub(crate) fn by_name(name: Option<String>, config: &Config) -> Result<Config, Error> {
    let Some(name) = name.filter(|name| !name.is_empty()) else {
        return Ok(config.clone());
    };
    if name == config.user {
        return Ok(config.clone());
    }
    let unknown = || Error::new(Code::Unauthenticated, format!("invalid username: '{name}'"));
    let user = nix::unistd::User::from_name(&name)
        .ok()
        .flatten()
        .ok_or_else(unknown)?;
    Ok(Config {
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        user: name,
        home: user.dir,
        ..config.clone()
    })
}

/// The user name of a well-formed Basic authorization; anything else names nobody, as in Go's
/// `Request.BasicAuth`.
fn basic_user(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, credentials) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = STANDARD.decode(credentials.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (name, _password) = decoded.split_once(':')?;
    Some(name.to_owned())
}

/// A process's working directory: none means the sandbox's working directory, `~` the user's
/// home, relative paths start at home. It must exist.
pub(crate) fn working_dir(config: &Config, cwd: Option<&str>) -> Result<PathBuf, Error> {
    let dir = match cwd {
        None | Some("") => config.workdir.clone(),
        Some(path) => expand(path, &config.home)?,
    };
    if dir.exists() {
        Ok(dir)
    } else {
        Err(Error::invalid_argument(format!(
            "cwd '{}' does not exist",
            dir.display()
        )))
    }
}

pub(crate) fn expand(path: &str, home: &Path) -> Result<PathBuf, Error> {
    let relative = match path.strip_prefix('~') {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => rest.trim_start_matches('/'),
        Some(_) => {
            return Err(Error::invalid_argument(format!(
                "failed to expand path '{path}': cannot expand user-specific home dir"
            )));
        }
        None if Path::new(path).is_absolute() => return Ok(PathBuf::from(path)),
        None => path,
    };
    // Lexically, like Go's `filepath.Join`: `..` climbs the path as written.
    let mut resolved = home.to_path_buf();
    for component in Path::new(relative).components() {
        match component {
            Component::ParentDir => {
                resolved.pop();
            }
            Component::Normal(part) => resolved.push(part),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn paths_expand_like_envd() {
        let home = Path::new("/home/user");
        assert_eq!(expand("~", home).unwrap(), home);
        assert_eq!(expand("~/a/../b", home).unwrap(), home.join("b"));
        assert_eq!(expand("a/./c", home).unwrap(), home.join("a/c"));
        assert_eq!(expand("../x", home).unwrap(), Path::new("/home/x"));
        assert_eq!(expand("/etc", home).unwrap(), Path::new("/etc"));
        assert_eq!(
            expand("~root", home).unwrap_err().code,
            Code::InvalidArgument
        );
    }

    #[test]
    fn basic_authorization_names_the_user() {
        let mut headers = HeaderMap::new();
        assert_eq!(basic_user(&headers), None);
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic cm9vdDo="),
        );
        assert_eq!(basic_user(&headers).as_deref(), Some("root"));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer cm9vdDo="),
        );
        assert_eq!(basic_user(&headers), None);
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("basic !!"));
        assert_eq!(basic_user(&headers), None);
    }
}
