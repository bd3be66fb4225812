//! The messages of `process.proto` in proto3 JSON (e2b v2 wire spec §6.1): requests parsed
//! leniently, responses with default fields omitted and no field the proto lacks.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

use crate::connect::error::{Code, Error};
use crate::connect::json::{self, Base64};
use crate::reaper::Exit;

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub(crate) struct ProcessConfig {
    #[serde(
        deserialize_with = "json::nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub(crate) cmd: String,
    #[serde(
        deserialize_with = "json::nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub(crate) args: Vec<String>,
    #[serde(
        deserialize_with = "json::nullable",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub(crate) envs: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cwd: Option<String>,
}

impl ProcessConfig {
    /// The command line as envd's messages quote it.
    pub(crate) fn command_line(&self) -> String {
        std::iter::once(self.cmd.as_str())
            .chain(self.args.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Pty {
    #[serde(deserialize_with = "json::nullable")]
    pub(crate) size: Size,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Size {
    #[serde(deserialize_with = "json::uint32")]
    pub(crate) cols: u32,
    #[serde(deserialize_with = "json::uint32")]
    pub(crate) rows: u32,
}

impl Size {
    /// Columns and rows as a terminal takes them; larger values are clamped.
    pub(crate) fn dimensions(&self) -> (u16, u16) {
        let clamp = |value: u32| u16::try_from(value).unwrap_or(u16::MAX);
        (clamp(self.cols), clamp(self.rows))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct StartRequest {
    #[serde(deserialize_with = "json::nullable")]
    pub(crate) process: ProcessConfig,
    pub(crate) pty: Option<Pty>,
    pub(crate) tag: Option<String>,
    pub(crate) stdin: Option<bool>,
}

/// `ProcessSelector`: `oneof selector { uint32 pid; string tag; }`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct ProcessSelector {
    #[serde(deserialize_with = "json::optional_uint32")]
    pid: Option<u32>,
    tag: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Selector {
    Pid(u32),
    Tag(String),
}

impl Selector {
    /// The selector of a request's `process` field.
    pub(crate) fn of(selector: Option<ProcessSelector>) -> Result<Self, Error> {
        match selector.map(|selector| (selector.pid, selector.tag)) {
            Some((Some(pid), None)) => Ok(Self::Pid(pid)),
            Some((None, Some(tag))) => Ok(Self::Tag(tag)),
            Some((Some(_), Some(_))) => Err(Error::invalid_argument(
                "the process selector sets both pid and tag; set one",
            )),
            Some((None, None)) | None => Err(Error::new(
                Code::Unimplemented,
                "the request names no process: set process.pid or process.tag",
            )),
        }
    }

    pub(crate) fn not_found(&self) -> Error {
        match self {
            Self::Pid(pid) => Error::not_found(format!("process with pid {pid} not found")),
            Self::Tag(tag) => Error::not_found(format!("process with tag {tag} not found")),
        }
    }
}

/// `ProcessInput`: `oneof input { bytes stdin; bytes pty; }`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct ProcessInput {
    pub(crate) stdin: Option<Base64>,
    pub(crate) pty: Option<Base64>,
}

/// The process a request names (`ConnectRequest`, `CloseStdinRequest`).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct ProcessRequest {
    pub(crate) process: Option<ProcessSelector>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct SendInputRequest {
    pub(crate) process: Option<ProcessSelector>,
    pub(crate) input: Option<ProcessInput>,
}

/// `StreamInputRequest`: `oneof event { StartEvent start; DataEvent data; KeepAlive keepalive; }`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct StreamInputRequest {
    pub(crate) start: Option<ProcessRequest>,
    pub(crate) data: Option<StreamInputData>,
    pub(crate) keepalive: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct StreamInputData {
    pub(crate) input: Option<ProcessInput>,
}

pub(crate) const SIGNAL_SIGTERM: i64 = 15;
pub(crate) const SIGNAL_SIGKILL: i64 = 9;
const SIGNALS: [(&str, i64); 3] = [
    ("SIGNAL_UNSPECIFIED", 0),
    ("SIGNAL_SIGTERM", SIGNAL_SIGTERM),
    ("SIGNAL_SIGKILL", SIGNAL_SIGKILL),
];

/// A `Signal` value's name, or its number when the proto has none for it.
pub(crate) fn signal_name(value: i64) -> String {
    SIGNALS
        .iter()
        .find(|(_, number)| *number == value)
        .map_or_else(|| value.to_string(), |(name, _)| (*name).to_owned())
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct SendSignalRequest {
    pub(crate) process: Option<ProcessSelector>,
    #[serde(deserialize_with = "signal")]
    pub(crate) signal: i64,
}

fn signal<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    json::enumeration(deserializer, &SIGNALS)
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct UpdateRequest {
    pub(crate) process: Option<ProcessSelector>,
    pub(crate) pty: Option<Pty>,
}

/// A request without fields (`ListRequest`); unknown fields are ignored.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Empty {}

/// The empty response message.
pub(crate) fn empty() -> Vec<u8> {
    b"{}".to_vec()
}

/// `StartResponse` and `ConnectResponse`: `{"event": ProcessEvent}`.
#[derive(Serialize)]
pub(crate) struct EventResponse<'a> {
    pub(crate) event: &'a Event,
}

/// `ProcessEvent`: `oneof event { start, data, end, keepalive }`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Event {
    Start { pid: u32 },
    Data(Output),
    End(End),
    Keepalive {},
}

/// `DataEvent`: `oneof output { bytes stdout; bytes stderr; bytes pty; }`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Output {
    Stdout(Base64),
    Stderr(Base64),
    Pty(Base64),
}

/// `EndEvent`, filled in as Go's envd fills it from `exec.Cmd.Wait`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct End {
    #[serde(skip_serializing_if = "is_zero")]
    pub(crate) exit_code: i32,
    #[serde(skip_serializing_if = "is_false")]
    pub(crate) exited: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
}

fn is_zero(value: &i32) -> bool {
    *value == 0
}

fn is_false(value: &bool) -> bool {
    !value
}

impl End {
    /// `status` is Go's `ProcessState.String()`; `error` is `Wait`'s error, which Go sets for
    /// every unsuccessful exit (an `ExitError` whose text is the same status).
    pub(crate) fn of(exit: Exit) -> Self {
        match exit {
            Exit::Code(code) => {
                let status = format!("exit status {code}");
                Self {
                    exit_code: code,
                    exited: true,
                    error: (code != 0).then(|| status.clone()),
                    status,
                }
            }
            Exit::Signal {
                signal,
                core_dumped,
            } => {
                let mut status = format!("signal: {}", go_signal_name(signal));
                if core_dumped {
                    status.push_str(" (core dumped)");
                }
                Self {
                    exit_code: crate::reaper::KILLED_BY_SIGNAL,
                    exited: false,
                    error: Some(status.clone()),
                    status,
                }
            }
            Exit::Lost => Self {
                exit_code: crate::reaper::KILLED_BY_SIGNAL,
                exited: false,
                status: String::new(),
                error: Some("wait: no child processes".to_owned()),
            },
        }
    }
}

/// Go's names of Linux signals (`syscall.Signal.String()`), which SDK users see in `status`.
fn go_signal_name(signal: i32) -> String {
    const NAMES: [&str; 31] = [
        "hangup",
        "interrupt",
        "quit",
        "illegal instruction",
        "trace/breakpoint trap",
        "aborted",
        "bus error",
        "floating point exception",
        "killed",
        "user defined signal 1",
        "segmentation fault",
        "user defined signal 2",
        "broken pipe",
        "alarm clock",
        "terminated",
        "stack fault",
        "child exited",
        "continued",
        "stopped (signal)",
        "stopped",
        "stopped (tty input)",
        "stopped (tty output)",
        "urgent I/O condition",
        "CPU time limit exceeded",
        "file size limit exceeded",
        "virtual timer expired",
        "profiling timer expired",
        "window changed",
        "I/O possible",
        "power failure",
        "bad system call",
    ];
    usize::try_from(signal)
        .ok()
        .and_then(|number| NAMES.get(number.checked_sub(1)?))
        .map_or_else(|| format!("signal {signal}"), |name| (*name).to_owned())
}

/// `ProcessInfo`.
#[derive(Debug, Serialize)]
pub(crate) struct ProcessInfo {
    pub(crate) config: ProcessConfig,
    pub(crate) pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) tag: Option<String>,
}

/// `ListResponse`.
#[derive(Debug, Serialize)]
pub(crate) struct ListResponse {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) processes: Vec<ProcessInfo>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::connect::json::parse;

    fn event(event: Event) -> serde_json::Value {
        serde_json::to_value(EventResponse { event: &event }).unwrap()
    }

    #[test]
    fn events_serialize_as_proto3_json() {
        assert_eq!(
            event(Event::Start { pid: 41 }),
            json!({"event": {"start": {"pid": 41}}})
        );
        assert_eq!(
            event(Event::Data(Output::Stdout(Base64(b"hi\n".to_vec())))),
            json!({"event": {"data": {"stdout": "aGkK"}}})
        );
        assert_eq!(
            event(Event::Keepalive {}),
            json!({"event": {"keepalive": {}}})
        );
        assert_eq!(
            event(Event::End(End::of(Exit::Code(0)))),
            json!({"event": {"end": {"exited": true, "status": "exit status 0"}}})
        );
        assert_eq!(
            event(Event::End(End::of(Exit::Code(3)))),
            json!({"event": {"end": {"exitCode": 3, "exited": true, "status": "exit status 3", "error": "exit status 3"}}})
        );
        assert_eq!(
            event(Event::End(End::of(Exit::Signal {
                signal: 9,
                core_dumped: false
            }))),
            json!({"event": {"end": {"exitCode": -1, "status": "signal: killed", "error": "signal: killed"}}})
        );
        assert_eq!(go_signal_name(11), "segmentation fault");
        assert_eq!(go_signal_name(64), "signal 64");
    }

    #[test]
    fn requests_parse_leniently() {
        let start: StartRequest = parse(
            br#"{"process":{"cmd":"/bin/bash","args":["-c","x"],"envs":null,"cwd":"/tmp"},
                "pty":{"size":{"cols":"80","rows":24}},"stdin":false,"unknown":1}"#,
        )
        .unwrap();
        assert_eq!(start.process.command_line(), "/bin/bash -c x");
        assert_eq!(start.pty.unwrap().size.dimensions(), (80, 24));
        assert_eq!(start.stdin, Some(false));

        let signal: SendSignalRequest =
            parse(br#"{"process":{"pid":"12"},"signal":"SIGNAL_SIGKILL"}"#).unwrap();
        assert_eq!(Selector::of(signal.process).unwrap(), Selector::Pid(12));
        assert_eq!(signal.signal, SIGNAL_SIGKILL);
        let signal: SendSignalRequest = parse(br#"{"signal":15}"#).unwrap();
        assert_eq!(signal.signal, SIGNAL_SIGTERM);
        assert_eq!(
            Selector::of(signal.process).unwrap_err().code,
            Code::Unimplemented
        );
        assert!(parse::<SendSignalRequest>(br#"{"signal":"SIGHUP"}"#).is_err());
        assert!(parse::<StartRequest>(br#"{"process":{"cmd":1}}"#).is_err());
    }
}
