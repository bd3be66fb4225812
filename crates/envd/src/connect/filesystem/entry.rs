//! `EntryInfo` in proto3 JSON (e2b v2 wire spec §6.2): `size` as a string, the type's enum name,
//! `permissions` as Go's `FileMode.String()`, `modifiedTime` in RFC 3339; default values omitted.

use std::fs::{self, Metadata};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub(crate) struct EntryInfo {
    #[serde(skip_serializing_if = "String::is_empty")]
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    path: String,
    #[serde(skip_serializing_if = "is_zero")]
    size: String,
    #[serde(skip_serializing_if = "is_no_mode")]
    mode: u32,
    permissions: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    owner: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    group: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    modified_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    symlink_target: Option<String>,
}

fn is_no_mode(mode: &u32) -> bool {
    *mode == 0
}

fn is_zero(size: &String) -> bool {
    size == "0"
}

impl EntryInfo {
    /// The entry `path` names; a symlink is described by its target's type, mode and size
    /// (envd's `entry.go`), a dangling one as a file of its own.
    pub(crate) fn of(path: &Path) -> io::Result<Self> {
        let link = fs::symlink_metadata(path)?;
        let (meta, symlink_target) = if link.file_type().is_symlink() {
            let target = fs::read_link(path)?.to_string_lossy().into_owned();
            (
                fs::metadata(path).unwrap_or_else(|_| link.clone()),
                Some(target),
            )
        } else {
            (link.clone(), None)
        };
        let kind = if meta.is_dir() {
            "FILE_TYPE_DIRECTORY"
        } else if meta.file_type().is_symlink() {
            "FILE_TYPE_SYMLINK"
        } else {
            "FILE_TYPE_FILE"
        };
        Ok(Self {
            name: path
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default(),
            kind,
            path: path.to_string_lossy().into_owned(),
            size: meta.len().to_string(),
            mode: meta.mode() & 0o777,
            permissions: permissions(&link),
            owner: user_name(meta.uid()),
            group: group_name(meta.gid()),
            modified_time: meta
                .modified()
                .ok()
                .and_then(|time| time.duration_since(UNIX_EPOCH).ok())
                .map(rfc3339),
            symlink_target,
        })
    }

    #[cfg(test)]
    pub(crate) fn permissions(&self) -> &str {
        &self.permissions
    }
}

/// Go's `FileMode.String()`: one letter per type and special bit (`dalTLDpSugct?` order; `-`
/// for none), then `rwx` thrice.
fn permissions(meta: &Metadata) -> String {
    let kind = meta.file_type();
    let mode = meta.mode();
    let mut text = String::new();
    let letters = [
        (kind.is_dir(), 'd'),
        (kind.is_symlink(), 'L'),
        (kind.is_block_device() || kind.is_char_device(), 'D'),
        (kind.is_fifo(), 'p'),
        (kind.is_socket(), 'S'),
        (mode & 0o4000 != 0, 'u'),
        (mode & 0o2000 != 0, 'g'),
        (kind.is_char_device(), 'c'),
        (mode & 0o1000 != 0, 't'),
    ];
    text.extend(letters.iter().filter(|(set, _)| *set).map(|(_, c)| c));
    if text.is_empty() {
        text.push('-');
    }
    for (bit, c) in (0..9).rev().zip("rwxrwxrwx".chars()) {
        text.push(if mode & (1 << bit) != 0 { c } else { '-' });
    }
    text
}

/// The owner's name, or its uid when the sandbox names none (as Go's `user.LookupId` fallback).
fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(uid.into())
        .ok()
        .flatten()
        .map_or_else(|| uid.to_string(), |user| user.name)
}

fn group_name(gid: u32) -> String {
    nix::unistd::Group::from_gid(gid.into())
        .ok()
        .flatten()
        .map_or_else(|| gid.to_string(), |group| group.name)
}

/// `google.protobuf.Timestamp` in JSON: RFC 3339 UTC, nanoseconds only when there are any.
fn rfc3339(since_epoch: Duration) -> String {
    let seconds = since_epoch.as_secs();
    let (days, of_day) = (seconds / 86_400, seconds % 86_400);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01 (never negative here).
    let z = days as i64 + 719_468;
    let era = z / 146_097;
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    let mut text = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60
    );
    let nanos = since_epoch.subsec_nanos();
    if nanos != 0 {
        text.push_str(&format!(".{nanos:09}"));
    }
    text.push('Z');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(Duration::ZERO), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(Duration::new(1_787_306_400, 123_456_789)),
            "2026-08-21T10:00:00.123456789Z"
        );
        assert_eq!(
            rfc3339(Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }

    #[test]
    fn permissions_read_like_go() {
        let dir = std::env::temp_dir();
        assert!(EntryInfo::of(&dir).unwrap().permissions().starts_with('d'));
        let entry = EntryInfo::of(Path::new("/dev/null")).unwrap();
        assert_eq!(entry.permissions(), "Dcrw-rw-rw-");
    }
}
