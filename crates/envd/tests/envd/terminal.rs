//! The `terminal` service (wire spec §5.3).

use std::time::Duration;

use serde_json::{Value, json};

use crate::{Rpc, Sandbox, result_of, subscription_of};

/// Reads terminal notifications until the output seen so far contains `needle`.
async fn output_until(rpc: &mut Rpc, data: &str, needle: &str) -> String {
    let mut output = String::new();
    while !output.contains(needle) {
        let notification = tokio::time::timeout(Duration::from_secs(5), rpc.notification())
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} in terminal output {output:?}"));
        assert_eq!(notification["method"], "terminal_subscription");
        assert_eq!(
            subscription_of(&notification),
            data,
            "unexpected {notification}"
        );
        output.push_str(
            result_of(&notification)
                .as_str()
                .expect("chunks are strings"),
        );
    }
    output
}

#[tokio::test]
async fn interactive_shell_echo_resize_destroy() {
    let sandbox = Sandbox::start().await;
    let mut rpc = sandbox.rpc().await;
    let data = rpc.subscribe("terminal", json!(["onData", "term"])).await;
    let exit = rpc.subscribe("terminal", json!(["onExit", "term"])).await;
    let started = rpc
        .ok("terminal_start", json!(["term", 80, 24, {}, null, ""]))
        .await;
    assert_eq!(started, "term");

    rpc.ok("terminal_data", json!(["term", "echo hi-$((40+2))\n"]))
        .await;
    output_until(&mut rpc, &data, "hi-42\r\n").await;

    assert_eq!(
        rpc.ok("terminal_resize", json!(["term", 100, 30])).await,
        Value::Null
    );
    rpc.ok("terminal_data", json!(["term", "stty size; pwd\n"]))
        .await;
    let workdir = format!("{}\r\n", sandbox.workdir.display());
    let output = output_until(&mut rpc, &data, &workdir).await;
    assert!(output.contains("30 100\r\n"), "{output}");

    assert_eq!(
        rpc.ok("terminal_destroy", json!(["term"])).await,
        Value::Null
    );
    loop {
        let notification = rpc.notification().await;
        if subscription_of(&notification) == exit {
            assert_eq!(result_of(&notification), &json!({}));
            break;
        }
    }
    assert_eq!(
        rpc.error("terminal_data", json!(["term", "x"])).await,
        (-32000, "error finding terminal 'term'".to_owned())
    );
    assert_eq!(
        rpc.ok("terminal_destroy", json!(["term"])).await,
        Value::Null
    );
}

#[tokio::test]
async fn command_terminal_exits_by_itself() {
    let sandbox = Sandbox::start().await;
    let mut rpc = sandbox.rpc().await;
    let data = rpc.subscribe("terminal", json!(["onData", "cmd"])).await;
    let exit = rpc.subscribe("terminal", json!(["onExit", "cmd"])).await;
    // Only the three arguments JS clients send, then a command with an environment.
    rpc.ok("terminal_start", json!(["plain", 80, 24])).await;
    rpc.ok("terminal_destroy", json!(["plain"])).await;
    rpc.ok(
        "terminal_start",
        json!(["cmd", 80, 24, {"GREETING": "héllo"}, "echo $GREETING $TERM", null]),
    )
    .await;
    let mut output = String::new();
    loop {
        let notification = rpc.notification().await;
        if subscription_of(&notification) == exit {
            break;
        }
        assert_eq!(subscription_of(&notification), data);
        output.push_str(result_of(&notification).as_str().unwrap());
    }
    assert!(output.contains("héllo xterm"), "{output:?}");
}
