//! `codeSnippet` `scanOpenedPorts` (wire spec §5.4).

use serde_json::json;

use crate::{Sandbox, result_of, subscription_of};

#[tokio::test]
async fn scan_lists_a_listening_socket() {
    let sandbox = Sandbox::start().await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut rpc = sandbox.rpc().await;

    let subscription = rpc
        .subscribe("codeSnippet", json!(["scanOpenedPorts"]))
        .await;
    let notification = rpc.notification().await;
    assert_eq!(notification["method"], "codeSnippet_subscription");
    assert_eq!(subscription_of(&notification), subscription);
    let sockets = result_of(&notification)
        .as_array()
        .expect("always an array");
    let ours = sockets
        .iter()
        .find(|socket| socket["Port"] == json!(port) && socket["State"] == "LISTEN")
        .unwrap_or_else(|| panic!("port {port} missing from {sockets:?}"));
    assert_eq!(ours["Ip"], "127.0.0.1");
    assert_eq!(ours["ForeignIp"], "0.0.0.0");
    assert_eq!(ours["ForeignPort"], 0);
    assert_eq!(ours["Pid"], std::process::id().to_string());
    let mut keys: Vec<&str> = ours
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "Exe",
            "ForeignIp",
            "ForeignPort",
            "Ip",
            "Name",
            "Pid",
            "Port",
            "State",
            "User"
        ]
    );

    // The scan repeats about every second.
    let next = rpc.notification().await;
    assert_eq!(subscription_of(&next), subscription);
    rpc.ok("codeSnippet_unsubscribe", json!([subscription]))
        .await;
}
