//! `WatchDir` (a stream; the JS and async Python SDKs) and `CreateWatcher` /
//! `GetWatcherEvents` / `RemoveWatcher` (polled; the sync Python SDK), e2b v2 wire spec §6.2.
//! Each watch has an inotify instance of its own, with a watch on the directory and, when
//! recursive, on every directory below it, including those made later. The directories are
//! found through `user_fs`, so a watch covers only what the call's user may list.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use inotify::{EventMask, EventStream, Inotify, WatchDescriptor, WatchMask, Watches};
use serde::{Deserialize, Serialize};

use super::entry::EntryInfo;
use super::{failed, resolve};
use crate::connect::error::Error;
use crate::connect::json::{self, parse};
use crate::connect::{Call, Sink};
use crate::watch::Operation;
use crate::{Config, State, lock, random_id, user_fs};

/// What fsnotify (used by envd) watches for.
const MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::MODIFY)
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::ATTRIB)
    .union(WatchMask::ONLYDIR);

/// Room for many events per read; one event takes at most 16 bytes plus a 256-byte name.
const EVENT_BUFFER: usize = 64 << 10;

/// Events a polled watcher keeps for a client that does not poll; older ones are dropped.
const BUFFERED_EVENTS: usize = 10_000;

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct WatchRequest {
    #[serde(deserialize_with = "json::nullable")]
    path: String,
    #[serde(deserialize_with = "json::nullable")]
    recursive: bool,
    #[serde(deserialize_with = "json::nullable", alias = "include_entry")]
    include_entry: bool,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct WatcherRequest {
    #[serde(deserialize_with = "json::nullable", alias = "watcher_id")]
    watcher_id: String,
}

/// `FilesystemEvent`.
#[derive(Serialize, Debug)]
pub(super) struct FilesystemEvent {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    entry: Option<EntryInfo>,
}

/// One directory (tree) watched for one client.
struct DirWatch {
    root: PathBuf,
    user: Config,
    recursive: bool,
    include_entry: bool,
    stream: EventStream<Vec<u8>>,
    watches: Watches,
    dirs: HashMap<WatchDescriptor, PathBuf>,
}

impl DirWatch {
    fn open(user: &Config, request: &WatchRequest) -> Result<Self, Error> {
        let root = resolve(user, &request.path)?;
        let meta =
            std::fs::metadata(&root).map_err(|error| failed(user, "watch", &root, &error))?;
        if !meta.is_dir() {
            return Err(Error::invalid_argument(format!(
                "path {} is not a directory",
                root.display()
            )));
        }
        let stream = Inotify::init()
            .and_then(|inotify| inotify.into_event_stream(vec![0; EVENT_BUFFER]))
            .map_err(|error| failed(user, "watch", &root, &error))?;
        let mut watch = Self {
            watches: stream.watches(),
            stream,
            root: root.clone(),
            user: user.clone(),
            recursive: request.recursive,
            include_entry: request.include_entry,
            dirs: HashMap::new(),
        };
        watch
            .add(&root)
            .map_err(|error| failed(user, "watch", &root, &error))?;
        Ok(watch)
    }

    /// Watches `dir` and, when recursive, the directories below it; what the user may not
    /// list is refused for the root and left out below it.
    fn add(&mut self, dir: &Path) -> std::io::Result<()> {
        let entries = user_fs::list_dir(&self.user, dir)?;
        let descriptor = self.watches.add(dir, MASK)?;
        self.dirs.insert(descriptor, dir.to_owned());
        if self.recursive {
            for (name, is_dir) in entries {
                if is_dir {
                    // A directory removed or closed to the user meanwhile is not watched.
                    let _ = self.add(&dir.join(name));
                }
            }
        }
        Ok(())
    }

    /// The next events; an error once inotify fails.
    async fn next(&mut self) -> Result<Vec<FilesystemEvent>, Error> {
        let event = match self.stream.next().await {
            Some(Ok(event)) => event,
            Some(Err(error)) => return Err(failed(&self.user, "watch", &self.root, &error)),
            None => return Err(Error::internal("the directory watch ended")),
        };
        if event.mask.contains(EventMask::IGNORED) {
            self.dirs.remove(&event.wd);
            return Ok(Vec::new());
        }
        let (Some(name), Some(kind), Some(dir)) =
            (event.name, kind(event.mask), self.dirs.get(&event.wd))
        else {
            return Ok(Vec::new());
        };
        let path = dir.join(name);
        if self.recursive && kind == "EVENT_TYPE_CREATE" && event.mask.contains(EventMask::ISDIR) {
            // Best effort: a directory gone already has nothing to watch.
            let _ = self.add(&path);
        }
        let entry = (self.include_entry
            && matches!(
                kind,
                "EVENT_TYPE_CREATE" | "EVENT_TYPE_WRITE" | "EVENT_TYPE_CHMOD"
            ))
        .then(|| EntryInfo::of(&path).ok())
        .flatten();
        let name = path
            .strip_prefix(&self.root)
            .unwrap_or(&path)
            .to_string_lossy()
            .into_owned();
        Ok(vec![FilesystemEvent { name, kind, entry }])
    }
}

/// The event's type, by its `filesystem.proto` name.
fn kind(mask: EventMask) -> Option<&'static str> {
    Some(match Operation::of(mask)? {
        Operation::Create => "EVENT_TYPE_CREATE",
        Operation::Write => "EVENT_TYPE_WRITE",
        Operation::Remove => "EVENT_TYPE_REMOVE",
        Operation::Rename => "EVENT_TYPE_RENAME",
        Operation::Chmod => "EVENT_TYPE_CHMOD",
    })
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
enum WatchDirResponse<'a> {
    Start {},
    Filesystem(&'a FilesystemEvent),
    Keepalive {},
}

/// `WatchDir`: `start`, then each event, with keepalives while it is quiet, until the client
/// goes (or its deadline passes).
pub(super) async fn watch_dir(call: Call, payload: bytes::Bytes, sink: Sink) -> Result<(), Error> {
    let request: WatchRequest = parse(&payload)?;
    let user = call.user.clone();
    let mut watch = tokio::task::spawn_blocking(move || DirWatch::open(&user, &request))
        .await
        .map_err(|_| Error::internal("envd's file operation crashed"))??;
    if sink.send(&WatchDirResponse::Start {}).await.is_err() {
        return Ok(());
    }
    loop {
        let sent = tokio::select! {
            events = watch.next() => {
                let mut sent = Ok(());
                for event in events? {
                    sent = sent.and(sink.send(&WatchDirResponse::Filesystem(&event)).await);
                }
                sent
            }
            () = tokio::time::sleep(call.keepalive) => {
                sink.send(&WatchDirResponse::Keepalive {}).await
            }
            () = sink.closed() => return Ok(()),
        };
        if sent.is_err() {
            return Ok(());
        }
    }
}

/// The polled watchers, by id.
#[derive(Default)]
pub(crate) struct Watchers {
    by_id: Mutex<HashMap<String, Arc<Polled>>>,
}

struct Polled {
    events: Mutex<Vec<FilesystemEvent>>,
    /// Why the watch stopped, once it has.
    failure: Mutex<Option<Error>>,
    task: tokio::task::AbortHandle,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CreateWatcherResponse {
    watcher_id: String,
}

#[derive(Serialize)]
struct EventsResponse {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    events: Vec<FilesystemEvent>,
}

pub(super) async fn create_watcher(
    state: Arc<State>,
    call: Call,
    payload: bytes::Bytes,
) -> Result<Vec<u8>, Error> {
    let request: WatchRequest = parse(&payload)?;
    let user = call.user;
    let mut watch = tokio::task::spawn_blocking(move || DirWatch::open(&user, &request))
        .await
        .map_err(|_| Error::internal("envd's file operation crashed"))??;
    let id = random_id(16);
    let polled = Arc::new_cyclic(|weak: &std::sync::Weak<Polled>| {
        let weak = weak.clone();
        let task = tokio::spawn(async move {
            loop {
                let next = watch.next().await;
                let Some(polled) = weak.upgrade() else { return };
                match next {
                    Ok(events) => {
                        let mut buffered = lock(&polled.events);
                        buffered.extend(events);
                        let excess = buffered.len().saturating_sub(BUFFERED_EVENTS);
                        buffered.drain(..excess);
                    }
                    Err(error) => {
                        *lock(&polled.failure) = Some(error);
                        return;
                    }
                }
            }
        });
        Polled {
            events: Mutex::new(Vec::new()),
            failure: Mutex::new(None),
            task: task.abort_handle(),
        }
    });
    lock(&state.connect_watchers.by_id).insert(id.clone(), polled);
    serde_json::to_vec(&CreateWatcherResponse { watcher_id: id })
        .map_err(|error| Error::internal(error.to_string()))
}

fn unknown(id: &str) -> Error {
    Error::not_found(format!("watcher with id {id} not found"))
}

pub(super) fn get_watcher_events(state: &State, payload: &[u8]) -> Result<Vec<u8>, Error> {
    let request: WatcherRequest = parse(payload)?;
    let polled = lock(&state.connect_watchers.by_id)
        .get(&request.watcher_id)
        .cloned()
        .ok_or_else(|| unknown(&request.watcher_id))?;
    let events = std::mem::take(&mut *lock(&polled.events));
    if events.is_empty()
        && let Some(error) = lock(&polled.failure).take()
    {
        return Err(error);
    }
    serde_json::to_vec(&EventsResponse { events })
        .map_err(|error| Error::internal(error.to_string()))
}

pub(super) fn remove_watcher(state: &State, payload: &[u8]) -> Result<Vec<u8>, Error> {
    let request: WatcherRequest = parse(payload)?;
    let polled = lock(&state.connect_watchers.by_id)
        .remove(&request.watcher_id)
        .ok_or_else(|| unknown(&request.watcher_id))?;
    polled.task.abort();
    Ok(b"{}".to_vec())
}

impl Drop for Watchers {
    fn drop(&mut self) {
        for polled in lock(&self.by_id).values() {
            polled.task.abort();
        }
    }
}
