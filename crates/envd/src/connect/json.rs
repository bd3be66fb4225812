//! The parts of the proto3 JSON mapping serde does not do by itself (e2b v2 wire spec §5.3):
//! `null` for a default, 32-bit integers as numbers or strings, `bytes` as base64.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde::de::{self, DeserializeOwned, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

use super::error::Error;

/// Parses a request message; any mistake is the caller's (`invalid_argument`).
pub(crate) fn parse<M: DeserializeOwned>(payload: &[u8]) -> Result<M, Error> {
    // An empty unary body is the empty message, as connect-web sends for `{}`-only requests.
    let payload = if payload.iter().all(u8::is_ascii_whitespace) {
        &b"{}"[..]
    } else {
        payload
    };
    serde_json::from_slice(payload)
        .map_err(|error| Error::invalid_argument(format!("invalid request message: {error}")))
}

/// A field whose `null` means its default value.
pub(crate) fn nullable<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// A proto3 JSON number: a JSON number or a string holding one.
#[derive(Deserialize)]
#[serde(untagged)]
enum Number {
    Integer(i64),
    Float(f64),
    Text(String),
}

fn integer<E: de::Error>(number: Number) -> Result<i64, E> {
    let exact = |float: f64| {
        // An integral value in range converts exactly; anything else is refused.
        (float.fract() == 0.0 && float.abs() < 9.0e15)
            .then_some(float as i64)
            .ok_or_else(|| E::custom(format!("{float} is not an integer")))
    };
    match number {
        Number::Integer(value) => Ok(value),
        Number::Float(value) => exact(value),
        Number::Text(text) => match text.trim().parse::<i64>() {
            Ok(value) => Ok(value),
            Err(_) => exact(
                text.trim()
                    .parse::<f64>()
                    .map_err(|_| E::custom(format!("{text:?} is not a number")))?,
            ),
        },
    }
}

/// A `uint32` field (`null` = 0).
pub(crate) fn uint32<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    match Option::<Number>::deserialize(deserializer)? {
        None => Ok(0),
        Some(number) => {
            let value = integer(number)?;
            u32::try_from(value)
                .map_err(|_| de::Error::custom(format!("{value} is out of range for uint32")))
        }
    }
}

/// An optional `uint32` field, for `oneof` members whose presence matters.
pub(crate) fn optional_uint32<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u32>, D::Error> {
    match Option::<Number>::deserialize(deserializer)? {
        None => Ok(None),
        Some(number) => {
            let value = integer(number)?;
            u32::try_from(value)
                .map(Some)
                .map_err(|_| de::Error::custom(format!("{value} is out of range for uint32")))
        }
    }
}

/// An enum given by name or by number; `null` is the zero value.
pub(crate) fn enumeration<'de, D: Deserializer<'de>>(
    deserializer: D,
    values: &[(&str, i64)],
) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Value {
        Number(i64),
        Name(String),
    }
    match Option::<Value>::deserialize(deserializer)? {
        None => Ok(0),
        Some(Value::Number(number)) => Ok(number),
        Some(Value::Name(name)) => values
            .iter()
            .find(|(known, _)| *known == name)
            .map(|(_, number)| *number)
            .ok_or_else(|| de::Error::custom(format!("unknown enum value {name:?}"))),
    }
}

/// `bytes`: base64 (standard or URL-safe, padded or not) in, standard padded base64 out.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Base64(pub(crate) Vec<u8>);

impl<'de> Deserialize<'de> for Base64 {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let lenient = GeneralPurposeConfig::new()
            .with_decode_padding_mode(DecodePaddingMode::Indifferent)
            .with_decode_allow_trailing_bits(true);
        let text = Option::<String>::deserialize(deserializer)?.unwrap_or_default();
        let engine = if text.contains(['-', '_']) {
            GeneralPurpose::new(&base64::alphabet::URL_SAFE, lenient)
        } else {
            GeneralPurpose::new(&base64::alphabet::STANDARD, lenient)
        };
        engine
            .decode(text.as_bytes())
            .map(Base64)
            .map_err(|error| de::Error::custom(format!("invalid base64: {error}")))
    }
}

impl Serialize for Base64 {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::URL_SAFE;

    use super::*;

    #[derive(Deserialize)]
    struct Sample {
        #[serde(default, deserialize_with = "uint32")]
        n: u32,
        #[serde(default)]
        b: Base64,
    }

    #[test]
    fn numbers_come_as_numbers_or_strings() {
        let parsed: Sample = parse(br#"{"n":"12"}"#).unwrap();
        assert_eq!(parsed.n, 12);
        let parsed: Sample = parse(br#"{"n":7.0,"b":null}"#).unwrap();
        assert_eq!((parsed.n, parsed.b.0.len()), (7, 0));
        assert!(parse::<Sample>(br#"{"n":-1}"#).is_err());
        assert!(parse::<Sample>(br#"{"n":1.5}"#).is_err());
        assert!(parse::<Sample>(br#"{"n":"x"}"#).is_err());
    }

    #[test]
    fn bytes_accept_both_alphabets_with_or_without_padding() {
        for text in ["aGk/Pg==", "aGk/Pg", "aGk_Pg=="] {
            let parsed: Sample = parse(format!(r#"{{"b":"{text}"}}"#).as_bytes()).unwrap();
            assert_eq!(parsed.b.0, b"hi?>");
        }
        assert_eq!(
            serde_json::to_string(&Base64(b"hi?>".to_vec())).unwrap(),
            r#""aGk/Pg==""#
        );
        assert_eq!(URL_SAFE.encode(b"hi?>"), "aGk_Pg==");
    }
}
