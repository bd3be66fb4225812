//! Directory watches for `watchDir`: one inotify instance per sandbox, one (non-recursive) watch
//! per directory however many subscriptions share it, events in the shape of wire spec §5.1.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use futures_util::StreamExt;
use inotify::{EventMask, EventStream, Inotify, WatchDescriptor, WatchMask, Watches};
use serde::Serialize;

use crate::child::{now_ns, os_error_text};
use crate::hub::Topic;
use crate::{State, lock};

/// What fsnotify (used by the original) watched for, minus the watched directory's own removal
/// and moves: those events name the directory itself, which is never delivered.
const MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::MODIFY)
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::ATTRIB)
    .union(WatchMask::ONLYDIR);

/// Room for many events per read; one event takes at most 16 bytes plus a 256-byte name.
const EVENT_BUFFER: usize = 64 << 10;

#[derive(Default)]
pub(crate) struct Watcher {
    /// Started on the first `watchDir`: most sandboxes never watch anything.
    inner: Mutex<Option<Watching>>,
}

struct Watching {
    watches: Watches,
    dirs: HashMap<PathBuf, Watched>,
    /// One inode watched under several paths (symlinks) has one descriptor.
    paths: HashMap<WatchDescriptor, Vec<PathBuf>>,
}

struct Watched {
    descriptor: WatchDescriptor,
    subscriptions: usize,
}

impl Watcher {
    /// Adds a subscription's interest in `dir` (`shown` is the path as the client sent it).
    pub(crate) fn acquire(
        &self,
        state: &Arc<State>,
        dir: &Path,
        shown: &str,
    ) -> Result<(), String> {
        match std::fs::metadata(dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(format!(
                    "'{shown}': is not a directory. Only directories are supported"
                ));
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                return Err(format!(
                    "'{shown}': doesn't exist. Only existing paths are supported"
                ));
            }
            Err(error) => return Err(format!("'{shown}': {}", os_error_text(&error))),
        }
        let mut inner = lock(&self.inner);
        if inner.is_none() {
            let watches = start(Arc::downgrade(state))
                .map_err(|error| format!("inotify: {}", os_error_text(&error)))?;
            *inner = Some(Watching {
                watches,
                dirs: HashMap::new(),
                paths: HashMap::new(),
            });
        }
        let Some(watching) = inner.as_mut() else {
            return Err("inotify is not running".to_owned());
        };
        if let Some(watched) = watching.dirs.get_mut(dir) {
            watched.subscriptions += 1;
            return Ok(());
        }
        let descriptor = watching
            .watches
            .add(dir, MASK)
            .map_err(|error| format!("'{shown}': {}", os_error_text(&error)))?;
        watching
            .paths
            .entry(descriptor.clone())
            .or_default()
            .push(dir.to_path_buf());
        watching.dirs.insert(
            dir.to_path_buf(),
            Watched {
                descriptor,
                subscriptions: 1,
            },
        );
        Ok(())
    }

    /// Drops a subscription's interest in `dir`; the watch goes with the last one.
    pub(crate) fn release(&self, dir: &Path) {
        let mut inner = lock(&self.inner);
        let Some(watching) = inner.as_mut() else {
            return;
        };
        let Some(watched) = watching.dirs.get_mut(dir) else {
            return;
        };
        watched.subscriptions -= 1;
        if watched.subscriptions > 0 {
            return;
        }
        let descriptor = watched.descriptor.clone();
        watching.dirs.remove(dir);
        if let Some(paths) = watching.paths.get_mut(&descriptor) {
            paths.retain(|path| path != dir);
            if paths.is_empty() {
                watching.paths.remove(&descriptor);
                // Fails only if the directory is already gone, which removed the watch.
                let _ = watching.watches.remove(descriptor);
            }
        }
    }

    fn paths(&self, descriptor: &WatchDescriptor) -> Vec<PathBuf> {
        lock(&self.inner)
            .as_ref()
            .and_then(|watching| watching.paths.get(descriptor).cloned())
            .unwrap_or_default()
    }

    /// The kernel dropped a watch (its directory was deleted); a later `watchDir` of a new
    /// directory at that path must add a fresh one.
    fn forget(&self, descriptor: &WatchDescriptor) {
        let mut inner = lock(&self.inner);
        let Some(watching) = inner.as_mut() else {
            return;
        };
        for path in watching.paths.remove(descriptor).unwrap_or_default() {
            watching.dirs.remove(&path);
        }
    }

    /// The event stream failed; the next `watchDir` starts over.
    fn stop(&self) {
        *lock(&self.inner) = None;
    }
}

fn start(state: Weak<State>) -> io::Result<Watches> {
    let stream = Inotify::init()?.into_event_stream(vec![0; EVENT_BUFFER])?;
    let watches = stream.watches();
    tokio::spawn(deliver(state, stream));
    Ok(watches)
}

#[derive(Serialize)]
struct FilesystemEvent<'a> {
    path: &'a str,
    name: &'a str,
    operation: &'static str,
    timestamp: u64,
    #[serde(rename = "isDir")]
    is_dir: bool,
}

async fn deliver(state: Weak<State>, mut stream: EventStream<Vec<u8>>) {
    while let Some(event) = stream.next().await {
        let Some(state) = state.upgrade() else {
            return;
        };
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                tracing::warn!(%error, "reading inotify events failed; directory watches stop");
                state.watcher.stop();
                return;
            }
        };
        if event.mask.contains(EventMask::IGNORED) {
            state.watcher.forget(&event.wd);
            continue;
        }
        if let (Some(name), Some(operation)) = (event.name, operation(event.mask)) {
            publish(&state, &event.wd, &name, operation, event.mask).await;
        }
    }
}

async fn publish(
    state: &State,
    descriptor: &WatchDescriptor,
    name: &OsString,
    operation: &'static str,
    mask: EventMask,
) {
    let timestamp = now_ns();
    // A removed or renamed path cannot be looked at any more, so the original said `false`.
    let is_dir = !matches!(operation, "Remove" | "Rename") && mask.contains(EventMask::ISDIR);
    let name = name.to_string_lossy();
    for dir in state.watcher.paths(descriptor) {
        let path = dir.join(name.as_ref());
        let event = FilesystemEvent {
            path: &path.to_string_lossy(),
            name: &name,
            operation,
            timestamp,
            is_dir,
        };
        if let Ok(encoded) = serde_json::to_string(&event) {
            state.hub.publish(&Topic::Watch(dir), &encoded).await;
        }
    }
}

/// What happened to a watched entry, as fsnotify (whose precedence both SDK generations follow)
/// reads inotify's bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operation {
    Create,
    Write,
    Remove,
    Rename,
    Chmod,
}

impl Operation {
    /// The first operation that applies, in the SDK's order of precedence.
    pub(crate) fn of(mask: EventMask) -> Option<Operation> {
        [
            (EventMask::CREATE | EventMask::MOVED_TO, Operation::Create),
            (EventMask::MODIFY, Operation::Write),
            (EventMask::DELETE, Operation::Remove),
            (EventMask::MOVED_FROM, Operation::Rename),
            (EventMask::ATTRIB, Operation::Chmod),
        ]
        .into_iter()
        .find(|(bits, _)| mask.intersects(*bits))
        .map(|(_, operation)| operation)
    }

    /// Its name in the session-era protocol.
    fn name(self) -> &'static str {
        match self {
            Operation::Create => "Create",
            Operation::Write => "Write",
            Operation::Remove => "Remove",
            Operation::Rename => "Rename",
            Operation::Chmod => "Chmod",
        }
    }
}

/// The event's operation by its session-era name.
fn operation(mask: EventMask) -> Option<&'static str> {
    Operation::of(mask).map(Operation::name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_operations_in_priority_order() {
        assert_eq!(operation(EventMask::MOVED_TO), Some("Create"));
        assert_eq!(
            operation(EventMask::MODIFY | EventMask::ATTRIB),
            Some("Write")
        );
        assert_eq!(
            operation(EventMask::DELETE | EventMask::ISDIR),
            Some("Remove")
        );
        assert_eq!(operation(EventMask::MOVED_FROM), Some("Rename"));
        assert_eq!(operation(EventMask::ATTRIB), Some("Chmod"));
        assert_eq!(operation(EventMask::OPEN), None);
    }
}
