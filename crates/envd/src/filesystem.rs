//! The `filesystem` service (wire spec §5.1). Paths are the sandbox's own; relative ones resolve
//! against the user's home. Every call acts through `user_fs`: as the sandbox user, else as root
//! on a path without symlinks, so that no link user code plants redirects it; what it creates
//! belongs to the user (DECISIONS #9). Work runs on blocking threads so that a slow disk does not
//! stall the runtime.

use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Serialize;
use serde_json::Value;

use crate::child::{os_error_text, resolve};
use crate::connection::{Handler, Outcome, Subscriber};
use crate::hub::Topic;
use crate::rpc::{Args, CallResult, RpcError};
use crate::user_fs::{self, denied_hint};
use crate::{Config, State};

/// Largest file `read`/`readBase64` return: the whole content is held in memory (several times,
/// once encoded), so bigger files go through `GET /file`, which streams.
pub(crate) const MAX_READ: u64 = 100 << 20;
/// Mode of files created by `write`/`writeBase64` (the original's, before the umask).
const FILE_MODE: u32 = 0o755;
/// Mode of directories created by `makeDir`.
const DIR_MODE: u32 = 0o755;

pub(crate) fn method(name: &str) -> Option<Handler> {
    Some(match name {
        "list" => |state, args| path_call(state, args, list),
        "read" => |state, args| {
            path_call(state, args, |config, path| {
                let bytes = read_bytes(config, path)?;
                Ok(Value::String(String::from_utf8_lossy(&bytes).into_owned()))
            })
        },
        "readBase64" => |state, args| {
            path_call(state, args, |config, path| {
                Ok(Value::String(STANDARD.encode(read_bytes(config, path)?)))
            })
        },
        "write" => |state, args| {
            content_call(state, args, |config, path, content| {
                write(config, &path, content.as_bytes())
            })
        },
        "writeBase64" => |state, args| {
            content_call(state, args, |config, path, content| {
                let bytes = STANDARD.decode(&content).map_err(|error| {
                    RpcError::handler(format!(
                        "error decoding bytes from base64 for file '{path}': {}",
                        base64_error_text(&error)
                    ))
                })?;
                write(config, &path, &bytes)
            })
        },
        "makeDir" => |state, args| path_call(state, args, make_dir),
        "remove" => |state, args| path_call(state, args, remove),
        _ => return None,
    })
}

pub(crate) fn subscription(name: &str) -> Option<Subscriber> {
    match name {
        "watchDir" => Some(watch_dir),
        _ => None,
    }
}

/// `["watchDir", path]`: events on the direct children of an existing directory.
fn watch_dir(state: &Arc<State>, args: &Args) -> Result<Topic, RpcError> {
    let path: String = args.at_most(2)?.required(1)?;
    // Without trailing slashes or `.` components, so that event paths read naturally.
    let dir: PathBuf = resolve(&state.config, &path).components().collect();
    state
        .watcher
        .acquire(state, &dir, &path)
        .map_err(|error| RpcError::handler(format!("error adding path to dwatcher: {error}")))?;
    Ok(Topic::Watch(dir))
}

/// A method taking `[path]`.
fn path_call(
    state: &Arc<State>,
    args: &Args,
    work: fn(&Config, &str) -> CallResult,
) -> Result<Outcome, RpcError> {
    let path: String = args.at_most(1)?.required(0)?;
    Ok(blocking(state, move |config| work(config, &path)))
}

/// A method taking `[path, content]`.
fn content_call(
    state: &Arc<State>,
    args: &Args,
    work: fn(&Config, String, String) -> CallResult,
) -> Result<Outcome, RpcError> {
    args.at_most(2)?;
    let path: String = args.required(0)?;
    let content: String = args.required(1)?;
    Ok(blocking(state, move |config| work(config, path, content)))
}

fn blocking<F>(state: &Arc<State>, work: F) -> Outcome
where
    F: FnOnce(&Config) -> CallResult + Send + 'static,
{
    let state = state.clone();
    Outcome::Later(Box::pin(async move {
        tokio::task::spawn_blocking(move || work(&state.config))
            .await
            .unwrap_or_else(|_| Err(RpcError::crashed()))
    }))
}

#[derive(Serialize)]
struct Entry {
    #[serde(rename = "isDir")]
    is_dir: bool,
    name: String,
}

/// `filesystem_list [path]`: direct children sorted by name; symlinks are not directories.
fn list(config: &Config, path: &str) -> CallResult {
    let dir = resolve(config, path);
    let fail = |error: io::Error| {
        RpcError::handler(format!(
            "error listing files in '{path}': open {}: {}{}",
            dir.display(),
            os_error_text(&error),
            denied_hint(config, &error)
        ))
    };
    let mut entries = user_fs::list_dir(config, &dir).map_err(fail)?;
    entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let entries: Vec<Entry> = entries
        .into_iter()
        .map(|(name, is_dir)| Entry {
            is_dir,
            name: name.to_string_lossy().into_owned(),
        })
        .collect();
    serde_json::to_value(entries).map_err(|error| RpcError::handler(error.to_string()))
}

fn read_bytes(config: &Config, path: &str) -> Result<Vec<u8>, RpcError> {
    let file_path = resolve(config, path);
    let fail = |op: &str, detail: String| {
        RpcError::handler(format!(
            "error reading file '{path}': {op} {}: {detail}",
            file_path.display()
        ))
    };
    let file = user_fs::open_read(config, &file_path)
        .map_err(|e| fail("open", os_error_text(&e) + &denied_hint(config, &e)))?;
    let too_large = |size: u64| {
        fail(
            "read",
            format!(
                "the file has {size} bytes, more than the {MAX_READ} a read returns; download it over /file instead"
            ),
        )
    };
    let size = file.metadata().map_or(0, |meta| meta.len());
    if size > MAX_READ {
        return Err(too_large(size));
    }
    let mut bytes = Vec::new();
    // The file may grow while it is read; the limit holds regardless.
    file.take(MAX_READ + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fail("read", os_error_text(&e)))?;
    if bytes.len() as u64 > MAX_READ {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

fn write(config: &Config, path: &str, content: &[u8]) -> CallResult {
    let file_path = resolve(config, path);
    let fail = |op: &str, error: io::Error| {
        RpcError::handler(format!(
            "error writing to file '{path}': {op} {}: {}{}",
            file_path.display(),
            os_error_text(&error),
            denied_hint(config, &error)
        ))
    };
    let mut file =
        user_fs::create_file(config, &file_path, FILE_MODE).map_err(|e| fail("open", e))?;
    file.write_all(content).map_err(|e| fail("write", e))?;
    Ok(Value::Null)
}

/// `filesystem_makeDir [path]`: `mkdir -p`.
fn make_dir(config: &Config, path: &str) -> CallResult {
    let dir = resolve(config, path);
    create_dirs(config, &dir).map_err(|error| {
        RpcError::handler(format!(
            "error creating directory '{path}': mkdir {}: {}{}",
            dir.display(),
            os_error_text(&error),
            denied_hint(config, &error)
        ))
    })?;
    Ok(Value::Null)
}

/// `mkdir -p`: each directory made is the user's.
fn create_dirs(config: &Config, dir: &Path) -> io::Result<()> {
    match user_fs::make_dir(config, dir, DIR_MODE) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent() {
                create_dirs(config, parent)?;
            }
            user_fs::make_dir(config, dir, DIR_MODE)
        }
        made => made,
    }
}

/// `filesystem_remove [path]`: `rm -rf`; a missing path is not an error.
fn remove(config: &Config, path: &str) -> CallResult {
    // Go's RemoveAll("") does nothing; resolving it to the home directory would delete that.
    if path.is_empty() {
        return Ok(Value::Null);
    }
    let target = resolve(config, path);
    match user_fs::remove(config, &target) {
        Ok(()) => Ok(Value::Null),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(Value::Null),
        Err(error) => Err(RpcError::handler(format!(
            "error removing file or directory '{path}': unlinkat {}: {}{}",
            target.display(),
            os_error_text(&error),
            denied_hint(config, &error)
        ))),
    }
}

/// Go's wording of a base64 decoding error.
fn base64_error_text(error: &base64::DecodeError) -> String {
    use base64::DecodeError;
    let offset = match *error {
        DecodeError::InvalidByte(offset, _) | DecodeError::InvalidLastSymbol(offset, _) => offset,
        DecodeError::InvalidLength(length) => length,
        DecodeError::InvalidPadding => return "illegal base64 data: bad padding".to_owned(),
    };
    format!("illegal base64 data at input byte {offset}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_errors_read_like_go() {
        let error = STANDARD.decode("AP!Q").unwrap_err();
        assert_eq!(
            base64_error_text(&error),
            "illegal base64 data at input byte 2"
        );
    }
}
