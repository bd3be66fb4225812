//! `GET /ping` to envd over its unix socket: a sandbox counts as running once this answers 200.
//! A hand-written HTTP/1.1 exchange, since only the status line matters.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const REQUEST: &[u8] = b"GET /ping HTTP/1.1\r\nHost: envd\r\nConnection: close\r\n\r\n";

/// Whether envd behind `socket` answers `GET /ping` with 200 within `timeout`.
pub(crate) async fn ping(socket: &Path, timeout: Duration) -> bool {
    tokio::time::timeout(timeout, exchange(socket))
        .await
        .is_ok_and(|ok| ok.unwrap_or(false))
}

async fn exchange(socket: &Path) -> std::io::Result<bool> {
    let mut stream = UnixStream::connect(socket).await?;
    stream.write_all(REQUEST).await?;
    let mut head = [0u8; 12];
    let mut filled = 0;
    while filled < head.len() {
        match stream.read(&mut head[filled..]).await? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(status_is_ok(&head[..filled]))
}

fn status_is_ok(head: &[u8]) -> bool {
    matches!(head, b"HTTP/1.1 200" | b"HTTP/1.0 200")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line() {
        assert!(status_is_ok(b"HTTP/1.1 200"));
        assert!(!status_is_ok(b"HTTP/1.1 502"));
        assert!(!status_is_ok(b"HTTP/1.1 2"));
    }

    #[tokio::test]
    async fn pings_a_server_on_a_unix_socket() {
        let dir = std::env::temp_dir().join(format!("burrow-ping-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("envd.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = vec![0u8; REQUEST.len()];
            stream.read_exact(&mut request).await.unwrap();
            assert_eq!(request, REQUEST);
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\npong")
                .await
                .unwrap();
        });
        assert!(ping(&socket, Duration::from_secs(5)).await);
        server.await.unwrap();
        assert!(!ping(&dir.join("missing.sock"), Duration::from_secs(5)).await);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
