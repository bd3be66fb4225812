//! JSON-RPC framing (wire spec §4).

use serde_json::{Value, json};

use crate::Sandbox;

#[tokio::test]
async fn ids_keep_their_json_type_and_void_results_are_null() {
    let sandbox = Sandbox::start().await;
    let mut rpc = sandbox.rpc().await;
    let dir = sandbox.path("d");

    for id in [json!(7), json!("7"), json!("0b8f6d3e-uuid"), json!(1.5)] {
        let request =
            json!({"jsonrpc": "2.0", "method": "filesystem_makeDir", "params": [dir], "id": id});
        rpc.send_text(&request.to_string()).await;
        let response = rpc.response().await;
        assert_eq!(response["id"], id);
        assert_eq!(response["jsonrpc"], "2.0");
        assert_eq!(response.get("result"), Some(&Value::Null), "{response}");
    }
    // A float id comes back as the same number (std's parse is correctly rounded).
    let id = "9.666666666666667e+32";
    rpc.send_text(&format!(
        r#"{{"jsonrpc":"2.0","method":"filesystem_makeDir","params":["{dir}"],"id":{id}}}"#
    ))
    .await;
    let response = rpc.response().await;
    assert_eq!(response["id"].as_f64(), Some(id.parse::<f64>().unwrap()));
}

#[tokio::test]
async fn framing_errors_use_go_ethereum_codes_and_messages() {
    let sandbox = Sandbox::start().await;
    let mut rpc = sandbox.rpc().await;

    rpc.send_text("{not json").await;
    let response = rpc.response().await;
    assert_eq!(response["id"], Value::Null);
    assert_eq!(response["error"]["code"], -32700);

    rpc.send_text(r#"[{"jsonrpc":"2.0","method":"filesystem_list","params":["/"],"id":1}]"#)
        .await;
    assert_eq!(rpc.response().await["error"]["code"], -32600);

    rpc.send_text(r#"{"jsonrpc":"2.0","id":5}"#).await;
    let response = rpc.response().await;
    assert_eq!(
        (response["id"].clone(), response["error"]["code"].clone()),
        (json!(5), json!(-32600))
    );

    let cases = [
        (
            "process_nope",
            json!([]),
            -32601,
            "the method process_nope does not exist/is not available",
        ),
        (
            "nothing",
            json!([]),
            -32601,
            "the method nothing does not exist/is not available",
        ),
        (
            "codeSnippet_run",
            json!(["x", {}]),
            -32601,
            "the method codeSnippet_run does not exist/is not available",
        ),
        (
            "process_kill",
            json!([]),
            -32602,
            "missing value for required argument 0",
        ),
        (
            "filesystem_list",
            json!(["/", "/"]),
            -32602,
            "too many arguments, want at most 1",
        ),
        (
            "filesystem_list",
            json!({"path": "/"}),
            -32602,
            "non-array args",
        ),
        (
            "process_start",
            json!([1, "true", {}, ""]),
            -32602,
            "invalid argument 0: json: cannot unmarshal number into Go value of type string",
        ),
        (
            "terminal_resize",
            json!(["t", 70000, 24]),
            -32602,
            "invalid argument 1: json: cannot unmarshal number 70000 into Go value of type uint16",
        ),
        (
            "process_subscribe",
            json!(["nope", "x"]),
            -32601,
            "no \"nope\" subscription in process namespace",
        ),
        (
            "process_subscribe",
            json!(["onStdout"]),
            -32602,
            "missing value for required argument 1",
        ),
        (
            "codeSnippet_subscribe",
            json!(["state"]),
            -32601,
            "no \"state\" subscription in codeSnippet namespace",
        ),
        (
            "process_unsubscribe",
            json!(["0x1234"]),
            -32000,
            "subscription not found",
        ),
        (
            "process_stdin",
            json!(["nope", "x"]),
            -32000,
            "error finding process 'nope'",
        ),
        (
            "terminal_data",
            json!(["nope", "x"]),
            -32000,
            "error finding terminal 'nope'",
        ),
    ];
    for (method, params, code, message) in cases {
        assert_eq!(
            rpc.error(method, params).await,
            (code, message.to_owned()),
            "{method}"
        );
    }
}

#[tokio::test]
async fn params_may_be_absent_and_null_strings_are_empty() {
    let sandbox = Sandbox::start().await;
    let mut rpc = sandbox.rpc().await;
    rpc.send_text(r#"{"jsonrpc":"2.0","method":"process_kill","id":1}"#)
        .await;
    assert_eq!(
        rpc.response().await["error"]["message"],
        "missing value for required argument 0"
    );
    // `null` for a string argument is "", and killing an unknown process is not an error.
    assert_eq!(rpc.ok("process_kill", json!([null])).await, Value::Null);
}

#[tokio::test]
async fn notifications_get_no_response_and_unsubscribe_answers_true() {
    let sandbox = Sandbox::start().await;
    let mut rpc = sandbox.rpc().await;
    rpc.send_text(r#"{"jsonrpc":"2.0","method":"process_kill","params":["x"]}"#)
        .await;
    let subscription = rpc.subscribe("process", json!(["onExit", "later"])).await;
    assert!(subscription.starts_with("0x"));
    assert_eq!(
        rpc.ok("process_unsubscribe", json!([subscription])).await,
        Value::Bool(true)
    );
    assert_eq!(
        rpc.error("process_unsubscribe", json!([subscription]))
            .await,
        (-32000, "subscription not found".to_owned())
    );
}
