//! The `filesystem` service and `watchDir` (wire spec §5.1).

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::{Sandbox, result_of, subscription_of};

#[tokio::test]
async fn write_read_list_make_remove() {
    let sandbox = Sandbox::start().await;
    let mut rpc = sandbox.rpc().await;
    let text = sandbox.path("a.txt");

    assert_eq!(
        rpc.ok("filesystem_write", json!([text, "h\u{e9}llo\nworld"]))
            .await,
        Value::Null
    );
    assert_eq!(
        rpc.ok("filesystem_read", json!([text])).await,
        "h\u{e9}llo\nworld"
    );
    // Relative paths resolve against the home directory.
    assert_eq!(
        rpc.ok("filesystem_read", json!(["a.txt"])).await,
        "h\u{e9}llo\nworld"
    );
    rpc.ok("filesystem_write", json!([text, "short"])).await;
    assert_eq!(
        rpc.ok("filesystem_read", json!([text])).await,
        "short",
        "truncated"
    );

    let binary = sandbox.path("b.bin");
    rpc.ok("filesystem_writeBase64", json!([binary, "AP8Q"]))
        .await;
    assert_eq!(std::fs::read(&binary).unwrap(), [0x00, 0xff, 0x10]);
    assert_eq!(
        rpc.ok("filesystem_readBase64", json!([binary])).await,
        "AP8Q"
    );
    assert_eq!(
        rpc.ok("filesystem_read", json!([binary])).await,
        "\u{0}\u{fffd}\u{10}"
    );

    let nested = sandbox.path("artifacts/deep/er");
    rpc.ok("filesystem_makeDir", json!([nested])).await;
    rpc.ok("filesystem_makeDir", json!([nested])).await;
    assert!(sandbox.home.join("artifacts/deep/er").is_dir());
    std::os::unix::fs::symlink(sandbox.home.join("artifacts"), sandbox.home.join("link")).unwrap();

    assert_eq!(
        rpc.ok(
            "filesystem_list",
            json!([sandbox.home.display().to_string()])
        )
        .await,
        json!([
            {"isDir": false, "name": "a.txt"},
            {"isDir": true, "name": "artifacts"},
            {"isDir": false, "name": "b.bin"},
            {"isDir": false, "name": "link"},
        ])
    );
    assert_eq!(rpc.ok("filesystem_list", json!([nested])).await, json!([]));

    rpc.ok("filesystem_remove", json!([sandbox.path("artifacts")]))
        .await;
    rpc.ok("filesystem_remove", json!([sandbox.path("artifacts")]))
        .await;
    rpc.ok("filesystem_remove", json!([sandbox.path("link")]))
        .await;
    assert!(!sandbox.home.join("artifacts").exists());
    assert!(!sandbox.home.join("link").exists());
}

#[tokio::test]
async fn errors_name_the_path_and_the_cause() {
    let sandbox = Sandbox::start().await;
    let mut rpc = sandbox.rpc().await;
    let missing = sandbox.path("missing");
    let cases = [
        (
            "filesystem_read",
            json!([missing]),
            format!("error reading file '{missing}': open {missing}: no such file or directory"),
        ),
        (
            "filesystem_list",
            json!([missing]),
            format!(
                "error listing files in '{missing}': open {missing}: no such file or directory"
            ),
        ),
        (
            "filesystem_write",
            json!([format!("{missing}/x"), "x"]),
            format!(
                "error writing to file '{missing}/x': open {missing}/x: no such file or directory"
            ),
        ),
        (
            "filesystem_writeBase64",
            json!([missing, "AP!Q"]),
            format!(
                "error decoding bytes from base64 for file '{missing}': illegal base64 data at input byte 2"
            ),
        ),
    ];
    for (method, params, message) in cases {
        assert_eq!(
            rpc.error(method, params).await,
            (-32000, message),
            "{method}"
        );
    }
    std::fs::write(sandbox.home.join("file"), "x").unwrap();
    let (_, message) = rpc
        .error("filesystem_makeDir", json!([sandbox.path("file/sub")]))
        .await;
    assert!(message.ends_with("not a directory"), "{message}");
}

#[tokio::test]
async fn watch_dir_reports_create_write_remove() {
    let sandbox = Sandbox::start().await;
    let mut rpc = sandbox.rpc().await;
    let dir = sandbox.home.join("watched");
    std::fs::create_dir(&dir).unwrap();
    let dir_path = dir.display().to_string();

    let (code, message) = rpc
        .error(
            "filesystem_subscribe",
            json!(["watchDir", sandbox.path("nope")]),
        )
        .await;
    assert_eq!(code, -32000);
    assert!(
        message.contains("doesn't exist. Only existing paths are supported"),
        "{message}"
    );

    let subscription = rpc
        .subscribe("filesystem", json!(["watchDir", dir_path]))
        .await;
    let file = format!("{dir_path}/f.txt");
    rpc.ok("filesystem_write", json!([file, "data"])).await;
    std::fs::create_dir(dir.join("sub")).unwrap();
    std::fs::remove_file(dir.join("f.txt")).unwrap();
    // Grandchildren are not watched.
    std::fs::write(dir.join("sub/deeper"), "x").unwrap();

    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|(op, name, _): &(String, String, bool)| op == "Remove" && name == "f.txt")
    {
        let notification = rpc.notification().await;
        assert_eq!(notification["method"], "filesystem_subscription");
        assert_eq!(subscription_of(&notification), subscription);
        let event = result_of(&notification);
        let keys: HashSet<&str> = event
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            HashSet::from(["path", "name", "operation", "timestamp", "isDir"])
        );
        let name = event["name"].as_str().unwrap().to_owned();
        assert_eq!(event["path"], format!("{dir_path}/{name}"));
        assert!(event["timestamp"].as_u64().unwrap() > 1_600_000_000_000_000_000);
        seen.push((
            event["operation"].as_str().unwrap().to_owned(),
            name,
            event["isDir"].as_bool().unwrap(),
        ));
    }
    let has = |op: &str, name: &str, is_dir: bool| {
        seen.contains(&(op.to_owned(), name.to_owned(), is_dir))
    };
    assert!(has("Create", "f.txt", false), "{seen:?}");
    assert!(has("Write", "f.txt", false), "{seen:?}");
    assert!(has("Create", "sub", true), "{seen:?}");
    assert!(seen.iter().all(|(_, name, _)| name != "deeper"), "{seen:?}");

    rpc.ok("filesystem_unsubscribe", json!([subscription]))
        .await;
    std::fs::write(dir.join("after"), "x").unwrap();
    assert!(rpc.quiet_for(Duration::from_millis(200)).await);
}
