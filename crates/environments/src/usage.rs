//! Disk usage of saved edits, for the per-team quota: what a team's saved versions hold that
//! nothing else does, and what an edit session wrote.
//!
//! A saved version shares every unchanged file with the version before it and with its
//! template's image (hard links), so its size on disk is not its cost. What only it keeps alive
//! is what has no other link: a file with one link, counted in allocated blocks. Files the team
//! wrote long ago count once the versions that shared them are collected; image files count
//! once their image version is collected and the team's root is the last that holds them, which
//! is then true.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::{Error, IoContext};

/// Bytes allocated to the regular files under `dir` that no other path links to.
pub fn unshared_bytes(dir: &Path) -> Result<u64, Error> {
    walk(dir, &|meta| meta.nlink() == 1)
}

/// Bytes allocated to every regular file under `dir`.
pub fn file_bytes(dir: &Path) -> Result<u64, Error> {
    walk(dir, &|_| true)
}

/// Walks without following symbolic links (the tree was written by untrusted code); a tree that
/// changes underneath (a file removed) counts what is there.
fn walk(dir: &Path, counts: &dyn Fn(&fs::Metadata) -> bool) -> Result<u64, Error> {
    let entries = match fs::read_dir(dir) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(0),
        result => result.ctx("read", dir)?,
    };
    let mut total = 0;
    for entry in entries {
        let entry = entry.ctx("read", dir)?;
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            total += walk(&entry.path(), counts)?;
        } else if meta.is_file() && counts(&meta) {
            total += meta.blocks() * 512;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unshared_files_count() {
        let dir = std::env::temp_dir().join(format!("burrow-usage-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("a/b")).unwrap();
        fs::write(dir.join("a/b/own"), vec![1u8; 64 << 10]).unwrap();
        fs::write(dir.join("shared"), vec![2u8; 32 << 10]).unwrap();
        fs::hard_link(dir.join("shared"), dir.join("a/link")).unwrap();
        std::os::unix::fs::symlink("/etc", dir.join("a/etc")).unwrap();

        let own = unshared_bytes(&dir).unwrap();
        let all = file_bytes(&dir).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert!((64 << 10..96 << 10).contains(&own), "unshared {own}");
        // The two links of `shared` are counted once each, the symlink's target not at all.
        assert!((128 << 10..192 << 10).contains(&all), "all {all}");
        assert_eq!(
            unshared_bytes(&dir).unwrap(),
            0,
            "a missing tree holds nothing"
        );
    }
}
