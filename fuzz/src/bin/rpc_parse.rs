//! envd's classification of one websocket message (`rpc::parse`), on any bytes.
//!
//! Invariants, restated from go-ethereum's rules independently of envd's code: a call comes only
//! from a JSON object whose `method` is a non-empty string and whose `id` is absent or a scalar,
//! and carries exactly that object's `id`, `method` and `params`; anything that is not JSON is a
//! parse error (-32700) with id `null`; any other JSON is an invalid request (-32600) that keeps
//! the object's scalar `id` when it has one (`null` otherwise); every refusal has a message.

use burrow_envd::fuzzing::{Parsed, parse};
use serde_json::Value;

const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;

fn is_scalar(value: &Value) -> bool {
    !value.is_object() && !value.is_array()
}

fn check(message: &[u8]) {
    let json: Option<Value> = serde_json::from_slice(message).ok();
    match parse(message) {
        Parsed::Call { id, method, params } => {
            let Some(Value::Object(object)) = &json else {
                panic!("a call from something that is not a JSON object: {message:?}");
            };
            assert!(!method.is_empty(), "a call without a method");
            assert_eq!(object.get("method"), Some(&Value::String(method)));
            assert_eq!(object.get("id"), id.as_ref(), "the call lost its id");
            assert!(id.as_ref().is_none_or(is_scalar), "a call with id {id:?}");
            assert_eq!(
                object.get("params"),
                params.as_ref(),
                "the call lost its params"
            );
        }
        Parsed::Refused {
            id,
            code,
            message: text,
        } => {
            assert!(!text.is_empty(), "a refusal without a message");
            let Some(value) = json else {
                assert_eq!((code, &id), (PARSE_ERROR, &Value::Null), "not JSON: {text}");
                return;
            };
            assert_eq!(code, INVALID_REQUEST, "{value} refused with {code}: {text}");
            let Value::Object(object) = &value else {
                assert_eq!(id, Value::Null, "{value} refused with an id");
                return;
            };
            let scalar_id = object.get("id").filter(|id| is_scalar(id));
            let callable = scalar_id.is_some() == object.contains_key("id")
                && object
                    .get("method")
                    .and_then(Value::as_str)
                    .is_some_and(|m| !m.is_empty());
            assert!(!callable, "a well-formed call refused: {value}");
            assert_eq!(&id, scalar_id.unwrap_or(&Value::Null), "{value}");
        }
    }
}

fn main() {
    afl::fuzz!(|data: &[u8]| check(data));
}
