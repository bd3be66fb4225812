//! envd, the agent inside each sandbox: the envd JSON-RPC websocket, `/file`, and a tunnel to TCP
//! ports inside the sandbox, served over one unix socket. Runs inside the sandbox; never sees the host.

use std::path::PathBuf;

/// Who envd runs processes and terminals as, and the environment they start from.
#[derive(Debug, Clone)]
pub struct Config {
    /// uid/gid of the sandbox user (`user`, 1000 in built-in environments). Processes, terminals
    /// and files written over RPC or `/file` belong to this user.
    pub uid: u32,
    pub gid: u32,
    /// The user's name (`USER`, `LOGNAME`).
    pub user: String,
    /// The user's home (`HOME`, default working directory, default upload directory).
    pub home: PathBuf,
    /// The login shell used as `$SHELL -l -c CMD` for processes and `$SHELL -i -l` for terminals.
    pub shell: PathBuf,
    /// Base environment every process and terminal starts from (PATH, LANG, ...), before
    /// `HOME`/`USER`/`LOGNAME` and the request's own variables.
    pub env: Vec<(String, String)>,
}
