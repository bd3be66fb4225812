//! The `filesystem.Filesystem` service (e2b v2 wire spec §6.2) and `/files` (§4.3), with envd's
//! semantics. Paths resolve like a process's (`~`, relative ⇒ the user's home); every change to
//! the filesystem and every read of a file's bytes goes through `user_fs`, as the call's user,
//! else as root along a symlink-free path. Entries describe files with `lstat`/`stat`, which
//! change nothing and read no file's contents.

mod entry;
pub(crate) mod files;
mod watch;

use std::io;
use std::path::{Path, PathBuf};

use futures_util::FutureExt;
use serde::{Deserialize, Serialize};

use super::error::{Code, Error};
use super::json::{self, parse};
use super::user::expand;
use super::{Call, Method};
use crate::Config;
use crate::child::os_error_text;
use crate::user_fs::{self, denied_hint};
use entry::EntryInfo;
pub(crate) use watch::Watchers;

/// The methods, for the error that names an unknown one.
pub(crate) const NAMES: &str = "Stat, MakeDir, Move, ListDir, Remove, WatchDir, CreateWatcher, GetWatcherEvents, RemoveWatcher";

/// Mode of directories envd makes, before the umask (Go's `os.MkdirAll(path, 0o755)`).
const DIR_MODE: u32 = 0o755;

pub(crate) fn method(name: &str) -> Option<Method> {
    fn unary<R: Serialize + Send + 'static>(
        work: fn(&Config, &[u8]) -> Result<R, Error>,
        call: Call,
        payload: bytes::Bytes,
    ) -> super::Reply {
        async move {
            let user = call.user;
            let reply = tokio::task::spawn_blocking(move || work(&user, &payload))
                .await
                .map_err(|_| Error::internal("envd's file operation crashed"))??;
            serde_json::to_vec(&reply).map_err(|error| Error::internal(error.to_string()))
        }
        .boxed()
    }
    Some(match name {
        "Stat" => Method::Unary(|_, call, payload| unary(stat, call, payload)),
        "MakeDir" => Method::Unary(|_, call, payload| unary(make_dir, call, payload)),
        "Move" => Method::Unary(|_, call, payload| unary(move_entry, call, payload)),
        "ListDir" => Method::Unary(|_, call, payload| unary(list_dir, call, payload)),
        "Remove" => Method::Unary(|_, call, payload| unary(remove, call, payload)),
        "WatchDir" => Method::ServerStream(|_, call, payload, sink| {
            watch::watch_dir(call, payload, sink).boxed()
        }),
        "CreateWatcher" => Method::Unary(|state, call, payload| {
            watch::create_watcher(state, call, payload).boxed()
        }),
        "GetWatcherEvents" => Method::Unary(|state, _, payload| {
            async move { watch::get_watcher_events(&state, &payload) }.boxed()
        }),
        "RemoveWatcher" => Method::Unary(|state, _, payload| {
            async move { watch::remove_watcher(&state, &payload) }.boxed()
        }),
        _ => return None,
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PathRequest {
    #[serde(deserialize_with = "json::nullable")]
    path: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct MoveRequest {
    #[serde(deserialize_with = "json::nullable")]
    source: String,
    #[serde(deserialize_with = "json::nullable")]
    destination: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ListDirRequest {
    #[serde(deserialize_with = "json::nullable")]
    path: String,
    #[serde(deserialize_with = "json::uint32")]
    depth: u32,
}

/// `StatResponse`, `MakeDirResponse`, `MoveResponse`.
#[derive(Serialize)]
struct EntryResponse {
    entry: EntryInfo,
}

#[derive(Serialize)]
struct ListDirResponse {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    entries: Vec<EntryInfo>,
}

#[derive(Serialize)]
struct Empty {}

/// A request's path, resolved for `user`.
fn resolve(user: &Config, path: &str) -> Result<PathBuf, Error> {
    if path.is_empty() {
        return Err(Error::invalid_argument("path is required"));
    }
    expand(path, &user.home)
}

/// The Connect error of a failed file operation: what the SDKs map to their exceptions
/// (`not_found` ⇒ `FileNotFoundException`).
fn failed(user: &Config, what: &str, path: &Path, error: &io::Error) -> Error {
    let code = match error.raw_os_error() {
        Some(libc::ENOENT) => Code::NotFound,
        Some(libc::EACCES | libc::EPERM) => Code::PermissionDenied,
        Some(libc::ENOTDIR | libc::EISDIR | libc::EINVAL | libc::ENAMETOOLONG) => {
            Code::InvalidArgument
        }
        Some(libc::EEXIST | libc::ENOTEMPTY) => Code::AlreadyExists,
        Some(libc::ENOSPC | libc::EDQUOT) => Code::ResourceExhausted,
        _ if error.kind() == io::ErrorKind::NotFound => Code::NotFound,
        _ if error.kind() == io::ErrorKind::InvalidInput => Code::InvalidArgument,
        _ => Code::Internal,
    };
    Error::new(
        code,
        format!(
            "{what} {}: {}{}",
            path.display(),
            os_error_text(error),
            denied_hint(user, error)
        ),
    )
}

fn stat(user: &Config, payload: &[u8]) -> Result<EntryResponse, Error> {
    let request: PathRequest = parse(payload)?;
    let path = resolve(user, &request.path)?;
    let entry = EntryInfo::of(&path).map_err(|error| failed(user, "stat", &path, &error))?;
    Ok(EntryResponse { entry })
}

/// `mkdir -p`, each directory it makes the user's. A directory already there is
/// `already_exists` (the SDK's `make_dir` then answers False); a file there `invalid_argument`.
fn make_dir(user: &Config, payload: &[u8]) -> Result<EntryResponse, Error> {
    let request: PathRequest = parse(payload)?;
    let path = resolve(user, &request.path)?;
    match std::fs::metadata(&path) {
        Ok(meta) if meta.is_dir() => {
            return Err(Error::new(
                Code::AlreadyExists,
                format!("directory {} already exists", path.display()),
            ));
        }
        Ok(_) => {
            return Err(Error::invalid_argument(format!(
                "{} exists and is not a directory",
                path.display()
            )));
        }
        Err(_) => {}
    }
    make_dirs(user, &path).map_err(|error| failed(user, "mkdir", &path, &error))?;
    let entry = EntryInfo::of(&path).map_err(|error| failed(user, "stat", &path, &error))?;
    Ok(EntryResponse { entry })
}

/// `mkdir -p path` through `user_fs`: the missing directories, outermost first.
pub(super) fn make_dirs(user: &Config, path: &Path) -> io::Result<()> {
    let missing: Vec<&Path> = path
        .ancestors()
        .take_while(|dir| std::fs::symlink_metadata(dir).is_err())
        .collect();
    for dir in missing.into_iter().rev() {
        user_fs::make_dir(user, dir, DIR_MODE)?;
    }
    Ok(())
}

/// `rename(2)`, making the destination's parents first; answers the destination's entry.
fn move_entry(user: &Config, payload: &[u8]) -> Result<EntryResponse, Error> {
    let request: MoveRequest = parse(payload)?;
    let source = resolve(user, &request.source)?;
    let destination = resolve(user, &request.destination)?;
    std::fs::symlink_metadata(&source).map_err(|error| failed(user, "move", &source, &error))?;
    if let Some(parent) = destination.parent() {
        make_dirs(user, parent).map_err(|error| failed(user, "mkdir", parent, &error))?;
    }
    user_fs::rename(user, &source, &destination)
        .map_err(|error| failed(user, "move", &source, &error))?;
    let entry =
        EntryInfo::of(&destination).map_err(|error| failed(user, "stat", &destination, &error))?;
    Ok(EntryResponse { entry })
}

/// The entries under a directory down to `depth` levels (0 means 1), in name order, a
/// directory's entries right after it; symlinked directories are listed, not entered.
fn list_dir(user: &Config, payload: &[u8]) -> Result<ListDirResponse, Error> {
    let request: ListDirRequest = parse(payload)?;
    let path = resolve(user, &request.path)?;
    let meta = std::fs::metadata(&path).map_err(|error| failed(user, "list", &path, &error))?;
    if !meta.is_dir() {
        return Err(Error::invalid_argument(format!(
            "path {} is not a directory",
            path.display()
        )));
    }
    let mut entries = Vec::new();
    walk(user, &path, request.depth.max(1), &mut entries)
        .map_err(|error| failed(user, "list", &path, &error))?;
    Ok(ListDirResponse { entries })
}

fn walk(user: &Config, dir: &Path, depth: u32, entries: &mut Vec<EntryInfo>) -> io::Result<()> {
    let mut names = user_fs::list_dir(user, dir)?;
    names.sort();
    for (name, is_dir) in names {
        let path = dir.join(name);
        match EntryInfo::of(&path) {
            Ok(entry) => entries.push(entry),
            // Removed since the directory was read.
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => return Err(error),
        }
        if is_dir && depth > 1 {
            walk(user, &path, depth - 1, entries)?;
        }
    }
    Ok(())
}

/// `rm -rf`: a missing path is done already.
fn remove(user: &Config, payload: &[u8]) -> Result<Empty, Error> {
    let request: PathRequest = parse(payload)?;
    let path = resolve(user, &request.path)?;
    match user_fs::remove(user, &path) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(Empty {}),
        Err(error) => Err(failed(user, "remove", &path, &error)),
        Ok(()) => Ok(Empty {}),
    }
}
