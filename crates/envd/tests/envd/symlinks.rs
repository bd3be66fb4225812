//! envd acts on files as the sandbox user, and as root only on paths without symlinks (issue
//! #15): a symlink (or hard link) the user plants cannot make a client's write, upload, mkdir,
//! remove or read reach what the user itself may not, while what the user may do (its home, its
//! own links) keeps working, and so does what only root may (a file in a root-owned directory,
//! as e2b's `run_code` writes `/index.py`), made the user's.
//!
//! The sandbox user here is uid/gid 1000 and envd runs as this test process, which must be root
//! to act as another user. In CI (`CI` set; CI runs as root) not being root fails these tests;
//! elsewhere they skip, saying so on the terminal.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use http_body_util::Full;
use hyper::{Request, StatusCode, header};
use serde_json::json;

use crate::Sandbox;
use crate::http::multipart;

const USER: u32 = 1000;

/// Whether this test can run; in CI it must.
fn can_act_as_another_user(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let in_ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0");
    assert!(
        !in_ci,
        "envd test `{test}` needs root (to serve another user than itself); CI is set, so this is a failure, not a skip"
    );
    // Straight to the stderr handle: the harness captures `eprintln!` of a passing test.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED envd test `{test}`: it needs root, to serve another user than itself"
    );
    false
}

/// A sandbox for user 1000 whose home holds `x -> <outside>/victim`, `d -> <outside>`,
/// `s -> <outside>/secret`, `p -> <outside>/private/y` and `pd -> <outside>/private`, where
/// `outside` is a root-owned directory (as `/` in a sandbox) with a root-owned file `victim` the
/// user may read but not write, a root-only file `secret` and a root-only directory `private`
/// (as `/root`). Planted as the user would: the links are the user's. `h` is a hard link to
/// `victim`, which the user could make itself where `fs.protected_hardlinks` is off.
struct Planted {
    sandbox: Sandbox,
    outside: PathBuf,
    victim: PathBuf,
    secret: PathBuf,
    private: PathBuf,
}

const ORIGINAL: &str = "root:x:0:0:root:/root:/bin/bash\n";

async fn planted() -> Planted {
    let outside = std::env::temp_dir().join(format!(
        "burrow-envd-outside-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir(&outside).unwrap();
    std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o755)).unwrap();
    let victim = outside.join("victim");
    std::fs::write(&victim, ORIGINAL).unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
    let secret = outside.join("secret");
    std::fs::write(&secret, "root only").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let private = outside.join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let sandbox = Sandbox::start_as(USER, USER, |home| {
        for (link, target) in [
            ("x", victim.clone()),
            ("d", outside.clone()),
            ("s", secret.clone()),
            ("p", private.join("y")),
            ("pd", private.clone()),
        ] {
            symlink(&target, home.join(link)).unwrap();
            std::os::unix::fs::lchown(home.join(link), Some(USER), Some(USER)).unwrap();
        }
        std::fs::hard_link(&victim, home.join("h")).unwrap();
    })
    .await;
    Planted {
        sandbox,
        outside,
        victim,
        secret,
        private,
    }
}

impl Drop for Planted {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.outside);
    }
}

fn assert_untouched(planted: &Planted) {
    assert_eq!(std::fs::read_to_string(&planted.victim).unwrap(), ORIGINAL);
    assert_eq!(std::fs::metadata(&planted.victim).unwrap().uid(), 0);
    let mut names: Vec<_> = std::fs::read_dir(&planted.outside)
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["private", "secret", "victim"],
        "files appeared outside the home"
    );
    assert_eq!(
        std::fs::read_dir(&planted.private).unwrap().count(),
        0,
        "files appeared in the root-only directory"
    );
}

fn assert_refused(message: &str) {
    assert!(
        message.contains("permission denied")
            && message.contains("envd accesses files as the sandbox user 'user'"),
        "{message}"
    );
}

#[tokio::test]
async fn rpc_writes_through_planted_symlinks_are_refused() {
    if !can_act_as_another_user("rpc_writes_through_planted_symlinks_are_refused") {
        return;
    }
    let planted = planted().await;
    let sandbox = &planted.sandbox;
    let mut rpc = sandbox.rpc().await;
    let cases = [
        ("filesystem_write", json!([sandbox.path("x"), "pwned"])),
        (
            "filesystem_writeBase64",
            json!([sandbox.path("x"), "cHduZWQ="]),
        ),
        ("filesystem_write", json!([sandbox.path("d/new"), "x"])),
        ("filesystem_write", json!([sandbox.path("d/victim"), "x"])),
        ("filesystem_makeDir", json!([sandbox.path("d/sub")])),
        ("filesystem_remove", json!([sandbox.path("d/victim")])),
        // Into a directory only root may even enter.
        ("filesystem_write", json!([sandbox.path("p"), "pwned"])),
        ("filesystem_write", json!([sandbox.path("pd/new"), "x"])),
        ("filesystem_makeDir", json!([sandbox.path("pd/sub")])),
        ("filesystem_makeDir", json!([sandbox.path("pd/sub/deeper")])),
        // A hard link is no symlink, but no less the user's plant.
        ("filesystem_write", json!([sandbox.path("h"), "pwned"])),
    ];
    for (method, params) in cases {
        let (code, message) = rpc.error(method, params.clone()).await;
        assert_eq!(code, -32000, "{method} {params}");
        assert_refused(&message);
        assert_untouched(&planted);
    }
    // Reads follow the same rule: a root-only file or directory is read as root by its own path
    // (`reads_what_only_root_may_by_its_real_path`), never through the user's link.
    let (_, message) = rpc
        .error("filesystem_read", json!([sandbox.path("s")]))
        .await;
    assert_refused(&message);
    let (_, message) = rpc
        .error("filesystem_list", json!([sandbox.path("pd")]))
        .await;
    assert_refused(&message);
    // What the user may read, it reads through its link.
    assert_eq!(
        rpc.ok("filesystem_read", json!([sandbox.path("x")])).await,
        ORIGINAL
    );
}

#[tokio::test]
async fn uploads_and_downloads_through_planted_symlinks_are_refused() {
    if !can_act_as_another_user("uploads_and_downloads_through_planted_symlinks_are_refused") {
        return;
    }
    let planted = planted().await;
    let sandbox = &planted.sandbox;
    let to = |path: &str| {
        multipart(&[
            ("path", None, path.as_bytes()),
            ("file", Some("f"), b"pwned"),
        ])
    };

    // Through a symlinked directory: the upload would be staged and renamed in `outside`.
    let (response, body) = sandbox.http(to(&sandbox.path("d/victim"))).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN, "{body:?}");
    assert_refused(std::str::from_utf8(&body).unwrap());
    assert_untouched(&planted);

    // Onto a symlinked file: the upload replaces the user's link (its own entry), never the
    // file it pointed to.
    let (response, body) = sandbox.http(to(&sandbox.path("x"))).await;
    assert_eq!(response.status(), StatusCode::OK, "{body:?}");
    assert_untouched(&planted);
    let x = sandbox.home.join("x");
    assert!(!std::fs::symlink_metadata(&x).unwrap().is_symlink());
    assert_eq!(std::fs::read_to_string(&x).unwrap(), "pwned");

    let download = |path: &Path| {
        Request::get(format!("/file?path={}", path.display()))
            .header(header::HOST, "49982-sid-cid.localhost")
            .body(Full::default())
            .unwrap()
    };
    let (response, body) = sandbox.http(download(&sandbox.home.join("s"))).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND, "{body:?}");
    assert_refused(std::str::from_utf8(&body).unwrap());
    // By its own path, root's file is root's to read, as before issue #15.
    let (response, body) = sandbox.http(download(&planted.secret)).await;
    assert_eq!(response.status(), StatusCode::OK, "{body:?}");
    assert_eq!(&body[..], b"root only");

    // Into the root-only directory, through the user's link to it.
    let (response, body) = sandbox.http(to(&sandbox.path("pd/f"))).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN, "{body:?}");
    assert_refused(std::str::from_utf8(&body).unwrap());
    assert_untouched(&planted);
}

#[tokio::test]
async fn what_the_user_may_do_still_works_and_is_the_users() {
    if !can_act_as_another_user("what_the_user_may_do_still_works_and_is_the_users") {
        return;
    }
    let planted = planted().await;
    let sandbox = &planted.sandbox;
    let mut rpc = sandbox.rpc().await;
    rpc.ok("filesystem_makeDir", json!([sandbox.path("a/b")]))
        .await;
    rpc.ok("filesystem_write", json!([sandbox.path("a/b/f"), "mine"]))
        .await;
    // The user's own link to its own file is followed.
    symlink(sandbox.home.join("a/b/f"), sandbox.home.join("own")).unwrap();
    std::os::unix::fs::lchown(sandbox.home.join("own"), Some(USER), Some(USER)).unwrap();
    rpc.ok("filesystem_write", json!([sandbox.path("own"), "through"]))
        .await;
    assert_eq!(
        std::fs::read_to_string(sandbox.home.join("a/b/f")).unwrap(),
        "through"
    );
    let (response, body) = sandbox
        .http(multipart(&[("file", Some("up.txt"), b"uploaded")]))
        .await;
    assert_eq!(response.status(), StatusCode::OK, "{body:?}");
    for made in ["a", "a/b", "a/b/f", "up.txt"] {
        let meta = std::fs::metadata(sandbox.home.join(made)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (USER, USER), "{made}");
    }
    // Removing the user's own link removes the link, not its target.
    rpc.ok("filesystem_remove", json!([sandbox.path("x")]))
        .await;
    assert!(!sandbox.home.join("x").exists());
    assert_untouched(&planted);
    rpc.ok("filesystem_remove", json!([sandbox.path("a")]))
        .await;
    assert!(!sandbox.home.join("a").exists());
}

#[tokio::test]
async fn what_only_root_may_write_works_and_is_the_users() {
    if !can_act_as_another_user("what_only_root_may_write_works_and_is_the_users") {
        return;
    }
    let planted = planted().await;
    let sandbox = &planted.sandbox;
    let outside = planted.outside.display().to_string();
    let in_outside = |name: &str| format!("{outside}/{name}");
    let mut rpc = sandbox.rpc().await;
    // e2b's run_code: `/index.py`, `/main.sh` in a directory only root may write.
    rpc.ok(
        "filesystem_write",
        json!([in_outside("index.py"), "print(1)"]),
    )
    .await;
    rpc.ok(
        "filesystem_writeBase64",
        json!([in_outside("main.sh"), "ZWNobyAx"]),
    )
    .await;
    // An SDK session's `cwd` is made at open: `mkdir -p`, in and below a root-only directory.
    rpc.ok("filesystem_makeDir", json!([in_outside("code/app")]))
        .await;
    rpc.ok(
        "filesystem_makeDir",
        json!([format!("{}/a/b", planted.private.display())]),
    )
    .await;
    let (response, body) = sandbox
        .http(multipart(&[
            ("path", None, in_outside("index.js").as_bytes()),
            ("file", Some("index.js"), b"console.log(1)"),
        ]))
        .await;
    assert_eq!(response.status(), StatusCode::OK, "{body:?}");
    for (made, content) in [
        ("index.py", Some("print(1)")),
        ("main.sh", Some("echo 1")),
        ("index.js", Some("console.log(1)")),
        ("code", None),
        ("code/app", None),
        ("private/a", None),
        ("private/a/b", None),
    ] {
        let path = planted.outside.join(made);
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (USER, USER), "{made}");
        if let Some(content) = content {
            assert_eq!(std::fs::read_to_string(&path).unwrap(), content, "{made}");
        }
    }
    assert_eq!(
        std::fs::metadata(&planted.outside).unwrap().uid(),
        0,
        "the root-owned directory stays root's"
    );
    // Written again: the user's own file now, written as the user.
    rpc.ok(
        "filesystem_write",
        json!([in_outside("index.py"), "print(2)"]),
    )
    .await;
    assert_eq!(
        std::fs::read_to_string(planted.outside.join("index.py")).unwrap(),
        "print(2)"
    );
    // A root-owned file written by its own path keeps its owner (and is written).
    rpc.ok("filesystem_write", json!([in_outside("secret"), "changed"]))
        .await;
    let meta = std::fs::metadata(&planted.secret).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o600));
    assert_eq!(std::fs::read_to_string(&planted.secret).unwrap(), "changed");
    // And removed: the user may not unlink in a root-owned directory.
    for removed in ["index.py", "main.sh", "index.js", "code", "private/a"] {
        rpc.ok("filesystem_remove", json!([in_outside(removed)]))
            .await;
        assert!(
            std::fs::symlink_metadata(planted.outside.join(removed)).is_err(),
            "{removed} is still there"
        );
    }
}

#[tokio::test]
async fn reads_what_only_root_may_by_its_real_path() {
    if !can_act_as_another_user("reads_what_only_root_may_by_its_real_path") {
        return;
    }
    let planted = planted().await;
    let sandbox = &planted.sandbox;
    std::fs::write(planted.private.join("y"), "root's y").unwrap();
    let mut rpc = sandbox.rpc().await;
    assert_eq!(
        rpc.ok("filesystem_read", json!([planted.secret])).await,
        "root only"
    );
    assert_eq!(
        rpc.ok("filesystem_list", json!([planted.private])).await,
        json!([{"isDir": false, "name": "y"}])
    );
    // Not through the user's links to them.
    for link in ["p", "pd/y", "s"] {
        let (_, message) = rpc
            .error("filesystem_read", json!([sandbox.path(link)]))
            .await;
        assert_refused(&message);
    }
    // Nor by a hard link the user made.
    std::fs::hard_link(&planted.secret, sandbox.home.join("hs")).unwrap();
    let (_, message) = rpc
        .error("filesystem_read", json!([sandbox.path("hs")]))
        .await;
    assert_refused(&message);
}
