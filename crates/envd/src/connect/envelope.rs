//! Connect streaming envelopes: `flags:u8 | length:u32 big-endian | payload`. Requests carry
//! message envelopes only; responses end with exactly one end-of-stream envelope.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::Serialize;

use super::error::{Code, Error};

const MESSAGE: u8 = 0x00;
const COMPRESSED: u8 = 0x01;
const END_STREAM: u8 = 0x02;
const PREFIX: usize = 5;

fn encode(flags: u8, payload: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(PREFIX + payload.len());
    frame.put_u8(flags);
    // Our own messages are far below 4 GiB; a longer one would be a bug in envd, not input.
    frame.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    frame.put_slice(payload);
    frame.freeze()
}

/// A message envelope holding `message` as JSON.
pub(crate) fn message<M: Serialize>(message: &M) -> Bytes {
    encoded_message(&serde_json::to_vec(message).unwrap_or_default())
}

/// A message envelope around an already encoded JSON message.
pub(crate) fn encoded_message(json: &[u8]) -> Bytes {
    encode(MESSAGE, json)
}

/// The end-of-stream envelope: `{}` on success, `{"error":{...}}` on failure.
pub(crate) fn end_of_stream(result: &Result<(), Error>) -> Bytes {
    let payload = match result {
        Ok(()) => b"{}".to_vec(),
        Err(error) => {
            serde_json::to_vec(&serde_json::json!({ "error": error.body() })).unwrap_or_default()
        }
    };
    encode(END_STREAM, &payload)
}

/// Cuts a request body into the payloads of its message envelopes as bytes arrive.
pub(crate) struct Decoder {
    buffer: BytesMut,
    /// The largest payload accepted.
    limit: usize,
}

impl Decoder {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            buffer: BytesMut::new(),
            limit,
        }
    }

    pub(crate) fn push(&mut self, chunk: &[u8]) {
        self.buffer.extend_from_slice(chunk);
    }

    /// The next complete payload, `None` until one has fully arrived. Fails on a payload above
    /// the limit (checked from the prefix, before it is buffered) or on flags a client must not
    /// send.
    pub(crate) fn next(&mut self) -> Result<Option<Bytes>, Error> {
        if self.buffer.len() < PREFIX {
            return Ok(None);
        }
        let flags = self.buffer[0];
        let length = u32::from_be_bytes([
            self.buffer[1],
            self.buffer[2],
            self.buffer[3],
            self.buffer[4],
        ]);
        let length = usize::try_from(length).unwrap_or(usize::MAX);
        match flags {
            MESSAGE => {}
            COMPRESSED => {
                return Err(Error::internal(
                    "protocol error: received a compressed message, but envd accepts identity \
                     encoding only; send messages uncompressed",
                ));
            }
            other => {
                return Err(Error::invalid_argument(format!(
                    "protocol error: invalid envelope flags {other:#04x}; a request carries \
                     message envelopes (flags 0x00) only"
                )));
            }
        }
        if length > self.limit {
            return Err(Error::new(
                Code::ResourceExhausted,
                format!(
                    "message size {length} is larger than the maximum of {} bytes",
                    self.limit
                ),
            ));
        }
        if self.buffer.len() < PREFIX + length {
            return Ok(None);
        }
        self.buffer.advance(PREFIX);
        Ok(Some(self.buffer.split_to(length).freeze()))
    }

    /// Checks that the body ended on an envelope boundary.
    pub(crate) fn finish(&self) -> Result<(), Error> {
        if self.buffer.is_empty() {
            Ok(())
        } else {
            Err(Error::invalid_argument(format!(
                "protocol error: incomplete envelope: the body ended {} bytes into an envelope",
                self.buffer.len()
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_of_stream_matches_the_protocol_bytes() {
        assert_eq!(&end_of_stream(&Ok(()))[..], b"\x02\x00\x00\x00\x02{}");
        let failed = end_of_stream(&Err(Error::not_found("gone")));
        assert_eq!(failed[0], END_STREAM);
        assert_eq!(
            &failed[PREFIX..],
            br#"{"error":{"code":"not_found","message":"gone"}}"#
        );
    }

    #[test]
    fn decodes_envelopes_split_anywhere() {
        let mut body = message(&serde_json::json!({"a": 1})).to_vec();
        body.extend_from_slice(&message(&serde_json::json!({"b": 2})));
        for cut in 0..body.len() {
            let mut decoder = Decoder::new(1024);
            let mut payloads = Vec::new();
            for part in [&body[..cut], &body[cut..]] {
                decoder.push(part);
                while let Some(payload) = decoder.next().unwrap() {
                    payloads.push(payload);
                }
            }
            decoder.finish().unwrap();
            assert_eq!(payloads, [&br#"{"a":1}"#[..], &br#"{"b":2}"#[..]]);
        }
    }

    #[test]
    fn refuses_oversized_compressed_and_truncated_envelopes() {
        let mut decoder = Decoder::new(4);
        decoder.push(&[0, 0, 0, 0, 5]);
        assert_eq!(decoder.next().unwrap_err().code, Code::ResourceExhausted);

        let mut decoder = Decoder::new(4);
        decoder.push(&[1, 0, 0, 0, 1, b'x']);
        assert_eq!(decoder.next().unwrap_err().code, Code::Internal);

        let mut decoder = Decoder::new(4);
        decoder.push(&[2, 0, 0, 0, 2]);
        assert_eq!(decoder.next().unwrap_err().code, Code::InvalidArgument);

        let mut decoder = Decoder::new(4);
        decoder.push(&[0, 0, 0, 0, 3, b'{']);
        assert_eq!(decoder.next().unwrap(), None);
        assert_eq!(decoder.finish().unwrap_err().code, Code::InvalidArgument);
    }
}
