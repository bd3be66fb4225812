//! JSON-RPC 2.0 framing as go-ethereum's `rpc` package (which the original envd used) speaks it:
//! requests, responses, subscription notifications, error codes and messages, and the decoding of
//! positional arguments into Go-like types. The SDKs depend on these exact shapes (wire spec §4).

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};

/// Invalid JSON.
pub(crate) const PARSE_ERROR: i64 = -32700;
/// Valid JSON that is not a request.
pub(crate) const INVALID_REQUEST: i64 = -32600;
/// Unknown method, or unknown subscription name.
pub(crate) const METHOD_NOT_FOUND: i64 = -32601;
/// Wrong number or types of arguments.
pub(crate) const INVALID_PARAMS: i64 = -32602;
/// The handler panicked.
pub(crate) const INTERNAL_ERROR: i64 = -32603;
/// The handler returned an error (go-ethereum's default code for handler errors).
pub(crate) const HANDLER_ERROR: i64 = -32000;

/// The `error` object of a response; both keys are required by the SDK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{message} (code {code})")]
pub(crate) struct RpcError {
    pub code: i64,
    pub message: String,
}

impl RpcError {
    /// A handler's own failure; the message reaches the SDK user as the exception text.
    pub(crate) fn handler(message: impl Into<String>) -> Self {
        Self {
            code: HANDLER_ERROR,
            message: message.into(),
        }
    }

    pub(crate) fn invalid_params(message: impl Into<String>) -> Self {
        Self {
            code: INVALID_PARAMS,
            message: message.into(),
        }
    }

    pub(crate) fn invalid_request(message: impl Into<String>) -> Self {
        Self {
            code: INVALID_REQUEST,
            message: message.into(),
        }
    }

    pub(crate) fn method_not_found(method: &str) -> Self {
        Self {
            code: METHOD_NOT_FOUND,
            message: format!("the method {method} does not exist/is not available"),
        }
    }

    pub(crate) fn subscription_not_found(service: &str, name: &str) -> Self {
        Self {
            code: METHOD_NOT_FOUND,
            message: format!("no \"{name}\" subscription in {service} namespace"),
        }
    }

    pub(crate) fn crashed() -> Self {
        Self {
            code: INTERNAL_ERROR,
            message: "method handler crashed".to_owned(),
        }
    }
}

/// The outcome of a call: the `result` value (`null` for void methods) or an error.
pub(crate) type CallResult = Result<Value, RpcError>;

/// One incoming websocket message, classified the way go-ethereum does it.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// A call. `id` is `None` for a notification (no `id` key), which gets no response.
    Request {
        id: Option<Value>,
        method: String,
        params: Option<Value>,
    },
    /// Something that must be answered with an error right away (`id` is `null` when unknown).
    Invalid { id: Value, error: RpcError },
}

/// Classifies one websocket message.
pub(crate) fn parse(message: &[u8]) -> Incoming {
    let value: Value = match serde_json::from_slice(message) {
        Ok(value) => value,
        Err(error) => {
            return Incoming::Invalid {
                id: Value::Null,
                error: RpcError {
                    code: PARSE_ERROR,
                    message: format!("parse error: {error}"),
                },
            };
        }
    };
    match value {
        Value::Object(object) => parse_object(object),
        // Batches are legal JSON-RPC but no SDK sends them; answering them would need batched
        // subscription responses, so they are refused as a whole.
        Value::Array(items) if items.is_empty() => Incoming::Invalid {
            id: Value::Null,
            error: RpcError::invalid_request("empty batch"),
        },
        Value::Array(_) => Incoming::Invalid {
            id: Value::Null,
            error: RpcError::invalid_request("batch requests are not supported"),
        },
        _ => Incoming::Invalid {
            id: Value::Null,
            error: RpcError::invalid_request("invalid request"),
        },
    }
}

fn parse_object(mut object: Map<String, Value>) -> Incoming {
    // go-ethereum accepts any id that is not an object or an array, `null` included.
    let id = object.remove("id");
    if matches!(id, Some(Value::Object(_) | Value::Array(_))) {
        return Incoming::Invalid {
            id: Value::Null,
            error: RpcError::invalid_request("invalid request"),
        };
    }
    match object.remove("method") {
        Some(Value::String(method)) if !method.is_empty() => Incoming::Request {
            id,
            method,
            params: object.remove("params"),
        },
        _ => Incoming::Invalid {
            id: id.unwrap_or(Value::Null),
            error: RpcError::invalid_request("invalid request"),
        },
    }
}

#[derive(Serialize)]
struct Success<'a> {
    jsonrpc: &'static str,
    id: &'a Value,
    result: &'a Value,
}

#[derive(Serialize)]
struct Failure<'a> {
    jsonrpc: &'static str,
    id: &'a Value,
    error: &'a RpcError,
}

/// The response frame for a call. `result` is always present on success, `null` included.
pub(crate) fn response(id: &Value, outcome: &CallResult) -> String {
    let encoded = match outcome {
        Ok(result) => serde_json::to_string(&Success {
            jsonrpc: "2.0",
            id,
            result,
        }),
        Err(error) => serde_json::to_string(&Failure {
            jsonrpc: "2.0",
            id,
            error,
        }),
    };
    // Serializing a `Value` (string keys only) cannot fail.
    encoded.unwrap_or_default()
}

/// A subscription notification; `result` is already-encoded JSON so that one event sent to many
/// subscribers is encoded once.
pub(crate) fn notification(service: &str, subscription: &str, result: &str) -> String {
    format!(
        r#"{{"jsonrpc":"2.0","method":"{service}_subscription","params":{{"subscription":"{subscription}","result":{result}}}}}"#
    )
}

/// A fresh subscription ID in go-ethereum's format: `0x` and the lowercase hex of 16 random bytes
/// without leading zeros.
pub(crate) fn subscription_id() -> String {
    let value: u128 = rand::random();
    format!("{value:#x}")
}

/// Positional arguments of a call, decoded like go-ethereum's `parsePositionalArguments`.
#[derive(Debug)]
pub(crate) struct Args {
    values: Vec<Value>,
}

impl Args {
    /// `params` absent or `null` means no arguments; anything but an array is refused.
    pub(crate) fn new(params: Option<Value>) -> Result<Self, RpcError> {
        match params {
            None | Some(Value::Null) => Ok(Self { values: Vec::new() }),
            Some(Value::Array(values)) => Ok(Self { values }),
            Some(_) => Err(RpcError::invalid_params("non-array args")),
        }
    }

    /// Refuses calls with more than `max` arguments.
    pub(crate) fn at_most(&self, max: usize) -> Result<&Self, RpcError> {
        if self.values.len() > max {
            return Err(RpcError::invalid_params(format!(
                "too many arguments, want at most {max}"
            )));
        }
        Ok(self)
    }

    /// A required argument; JSON `null` decodes to the type's zero value, as in Go.
    pub(crate) fn required<T: GoType>(&self, index: usize) -> Result<T, RpcError> {
        let value = self.values.get(index).ok_or_else(|| {
            RpcError::invalid_params(format!("missing value for required argument {index}"))
        })?;
        decode(index, value)
    }

    /// An optional (Go pointer) argument: absent or `null` is `None`.
    pub(crate) fn optional<T: GoType>(&self, index: usize) -> Result<Option<T>, RpcError> {
        match self.values.get(index) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => decode(index, value).map(Some),
        }
    }
}

fn decode<T: GoType>(index: usize, value: &Value) -> Result<T, RpcError> {
    T::decode(value).map_err(|found| {
        RpcError::invalid_params(format!(
            "invalid argument {index}: json: cannot unmarshal {found} into Go value of type {}",
            T::GO_NAME
        ))
    })
}

/// A Rust type standing in for the Go parameter type of the original handler.
pub(crate) trait GoType: Sized {
    /// The Go type's name, for error messages.
    const GO_NAME: &'static str;
    /// Decodes `value`; on mismatch returns what was found, the way Go's `encoding/json` names it.
    fn decode(value: &Value) -> Result<Self, String>;
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

impl GoType for String {
    const GO_NAME: &'static str = "string";

    fn decode(value: &Value) -> Result<Self, String> {
        match value {
            Value::Null => Ok(String::new()),
            Value::String(text) => Ok(text.clone()),
            other => Err(json_kind(other).to_owned()),
        }
    }
}

impl GoType for u16 {
    const GO_NAME: &'static str = "uint16";

    fn decode(value: &Value) -> Result<Self, String> {
        match value {
            Value::Null => Ok(0),
            Value::Number(number) => number
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .ok_or_else(|| format!("number {number}")),
            other => Err(json_kind(other).to_owned()),
        }
    }
}

impl GoType for BTreeMap<String, String> {
    const GO_NAME: &'static str = "map[string]string";

    fn decode(value: &Value) -> Result<Self, String> {
        match value {
            Value::Null => Ok(BTreeMap::new()),
            Value::Object(object) => object
                .iter()
                .map(|(key, value)| Ok((key.clone(), String::decode(value)?)))
                .collect(),
            other => Err(json_kind(other).to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn args(params: Value) -> Args {
        Args::new(Some(params)).expect("array params")
    }

    #[test]
    fn classifies_messages() {
        assert!(matches!(
            parse(br#"{"jsonrpc":"2.0","method":"a_b","params":[1],"id":"x"}"#),
            Incoming::Request { id: Some(Value::String(_)), ref method, params: Some(_) } if method == "a_b"
        ));
        assert!(matches!(
            parse(br#"{"method":"a_b"}"#),
            Incoming::Request {
                id: None,
                params: None,
                ..
            }
        ));
        let Incoming::Invalid { id, error } = parse(b"{nope") else {
            panic!("parse error expected")
        };
        assert_eq!((id, error.code), (Value::Null, PARSE_ERROR));
        let Incoming::Invalid { id, error } = parse(br#"{"id":7}"#) else {
            panic!("invalid request expected")
        };
        assert_eq!((id, error.code), (json!(7), INVALID_REQUEST));
        let Incoming::Invalid { error, .. } = parse(b"[]") else {
            panic!("empty batch refused")
        };
        assert_eq!(error.message, "empty batch");
        let Incoming::Invalid { id, .. } = parse(br#"{"id":{},"method":"a_b"}"#) else {
            panic!("object id refused")
        };
        assert_eq!(id, Value::Null);
    }

    #[test]
    fn encodes_responses_and_notifications() {
        assert_eq!(
            response(&json!(3), &Ok(Value::Null)),
            r#"{"jsonrpc":"2.0","id":3,"result":null}"#
        );
        assert_eq!(
            response(&json!("u"), &Err(RpcError::handler("boom"))),
            r#"{"jsonrpc":"2.0","id":"u","error":{"code":-32000,"message":"boom"}}"#
        );
        assert_eq!(
            notification("process", "0x1f", "3"),
            r#"{"jsonrpc":"2.0","method":"process_subscription","params":{"subscription":"0x1f","result":3}}"#
        );
    }

    #[test]
    fn subscription_ids_look_like_go_ethereum_ones() {
        for _ in 0..100 {
            let id = subscription_id();
            let digits = id.strip_prefix("0x").expect("0x prefix");
            assert!(digits.len() <= 32 && !digits.is_empty());
            assert!(
                digits
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            );
            assert!(!digits.starts_with('0') || digits == "0");
        }
    }

    /// Any JSON value, nested a few levels; numbers are integers or exactly representable
    /// floats, so that comparing a value with its re-parsed text is exact.
    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1000i32..1000).prop_map(|n| Value::from(f64::from(n) / 4.0)),
            ".{0,12}".prop_map(Value::String),
            // Keys and strings the decoder looks at.
            prop_oneof![
                Just("id"),
                Just("method"),
                Just("params"),
                Just("process_start"),
                Just("filesystem_subscribe"),
                Just("_"),
                Just("")
            ]
            .prop_map(|s| Value::String(s.to_owned())),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop_oneof![Just("id".to_owned()), Just("method".to_owned()), ".{0,6}"],
                    inner,
                    0..6
                )
                .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    /// What `parse` must make of a well-formed JSON text, restated from go-ethereum's rules.
    fn expected(value: &Value) -> (bool, Value, Option<i64>) {
        // (is a request, the id a response would carry, the error code if any)
        let Value::Object(object) = value else {
            return (false, Value::Null, Some(INVALID_REQUEST));
        };
        let id = object.get("id");
        if matches!(id, Some(Value::Object(_) | Value::Array(_))) {
            return (false, Value::Null, Some(INVALID_REQUEST));
        }
        match object.get("method") {
            Some(Value::String(method)) if !method.is_empty() => {
                (true, id.cloned().unwrap_or(Value::Null), None)
            }
            _ => (
                false,
                id.cloned().unwrap_or(Value::Null),
                Some(INVALID_REQUEST),
            ),
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics_on_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            match parse(&bytes) {
                Incoming::Request { method, .. } => prop_assert!(!method.is_empty()),
                Incoming::Invalid { error, .. } => {
                    prop_assert!([PARSE_ERROR, INVALID_REQUEST].contains(&error.code));
                }
            }
        }

        #[test]
        fn parse_classifies_any_json_like_go_ethereum(value in json_value()) {
            let text = serde_json::to_vec(&value).expect("a Value encodes");
            let (is_request, want_id, want_code) = expected(&value);
            match parse(&text) {
                Incoming::Request { id, method, params } => {
                    prop_assert!(is_request, "{value} taken for a request");
                    prop_assert_eq!(id.unwrap_or(Value::Null), want_id);
                    prop_assert_eq!(Some(&Value::String(method)), value.get("method"));
                    prop_assert_eq!(params.as_ref(), value.get("params"));
                }
                Incoming::Invalid { id, error } => {
                    prop_assert!(!is_request, "{value} refused: {error}");
                    prop_assert_eq!(id, want_id);
                    prop_assert_eq!(Some(error.code), want_code);
                }
            }
        }

        #[test]
        fn a_response_carries_its_id_and_exactly_one_of_result_or_error(
            id in json_value().prop_filter("ids are scalars", |v| !v.is_object() && !v.is_array()),
            result in json_value(),
            failed in any::<bool>(),
            code in any::<i64>(),
            message in ".{0,40}",
        ) {
            let outcome = if failed { Err(RpcError { code, message: message.clone() }) } else { Ok(result.clone()) };
            let encoded: Value = serde_json::from_str(&response(&id, &outcome)).expect("valid JSON");
            prop_assert_eq!(&encoded["jsonrpc"], "2.0");
            prop_assert_eq!(&encoded["id"], &id);
            prop_assert_ne!(encoded.get("result").is_some(), encoded.get("error").is_some());
            if failed {
                prop_assert_eq!(&encoded["error"]["code"], &Value::from(code));
                prop_assert_eq!(&encoded["error"]["message"], &Value::String(message));
            } else {
                prop_assert_eq!(&encoded["result"], &result);
            }
        }

        #[test]
        fn argument_decoding_never_panics(params in json_value(), index in 0usize..8, max in 0usize..8) {
            if let Ok(args) = Args::new(Some(params)) {
                let _ = args.at_most(max);
                let _ = args.required::<String>(index);
                let _ = args.optional::<String>(index);
                let _ = args.required::<u16>(index);
                let _ = args.optional::<u16>(index);
                let _ = args.required::<BTreeMap<String, String>>(index);
                let _ = args.optional::<BTreeMap<String, String>>(index);
            }
        }
    }

    #[test]
    fn decodes_arguments_like_go_ethereum() {
        assert_eq!(
            Args::new(Some(json!({"a": 1}))).unwrap_err().message,
            "non-array args"
        );
        assert!(Args::new(None).unwrap().values.is_empty());
        let a = args(json!(["id", null, 80, 70000, 1.5, {"K": "v"}, {"K": 1}]));
        assert_eq!(a.required::<String>(0).unwrap(), "id");
        assert_eq!(a.required::<String>(1).unwrap(), "");
        assert_eq!(a.optional::<String>(1).unwrap(), None);
        assert_eq!(a.required::<u16>(2).unwrap(), 80);
        assert_eq!(
            a.required::<u16>(3).unwrap_err().message,
            "invalid argument 3: json: cannot unmarshal number 70000 into Go value of type uint16"
        );
        assert_eq!(
            a.required::<u16>(4).unwrap_err().message,
            "invalid argument 4: json: cannot unmarshal number 1.5 into Go value of type uint16"
        );
        assert_eq!(
            a.required::<String>(2).unwrap_err().message,
            "invalid argument 2: json: cannot unmarshal number into Go value of type string"
        );
        let env: BTreeMap<String, String> = a.required(5).unwrap();
        assert_eq!(env.get("K").map(String::as_str), Some("v"));
        assert_eq!(
            a.required::<BTreeMap<String, String>>(6).unwrap_err().code,
            INVALID_PARAMS
        );
        assert_eq!(
            a.required::<String>(9).unwrap_err().message,
            "missing value for required argument 9"
        );
        assert_eq!(a.optional::<String>(9).unwrap(), None);
        assert_eq!(
            a.at_most(2).unwrap_err().message,
            "too many arguments, want at most 2"
        );
    }
}
