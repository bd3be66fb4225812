//! burrow's name server for sandboxes: a forwarder, on the host, to the host's own resolvers
//! (`/etc/resolv.conf`) or `--dns-upstream`. Sandboxes' `/etc/resolv.conf` names their gateway;
//! the firewall redirects port 53 there to this server's port and drops DNS to anywhere else.
//!
//! A forwarder rather than a resolver library (hickory): it needs no cache or DNS parsing to
//! be correct, answers exactly what the host's resolver would, and costs a socket per query in
//! flight. Domain-based egress rules will need to read answers; that is when a parser pays.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use crate::error::{Error, IoContext};

/// How long one upstream has to answer a UDP query before the next is asked.
const UDP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a TCP query's whole exchange may take.
const TCP_TIMEOUT: Duration = Duration::from_secs(10);
/// Queries in flight at once, over all sandboxes; more wait (UDP ones are dropped, as a busy
/// server would, and the client retries).
const IN_FLIGHT: usize = 1024;

/// The upstreams of `/etc/resolv.conf`, port 53.
pub fn host_upstreams() -> Result<Vec<SocketAddr>, Error> {
    let path = Path::new("/etc/resolv.conf");
    let text = std::fs::read_to_string(path).ctx("read", path)?;
    let upstreams: Vec<SocketAddr> = text
        .lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|address| address.trim().parse().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect();
    if upstreams.is_empty() {
        return Err(Error::NetworkSetup {
            reason: format!(
                "{} names no name server for the sandboxes' resolver to forward to; pass \
                 --dns-upstream IP[:PORT]",
                path.display()
            ),
        });
    }
    Ok(upstreams)
}

/// Starts the forwarder on a free port of the host's IPv4 addresses (the firewall keeps
/// everyone but sandboxes out); returns the port. Runs as long as the tokio runtime.
pub fn start(upstreams: Vec<SocketAddr>) -> Result<u16, Error> {
    let failed = |reason: String| Error::NetworkSetup { reason };
    let runtime = tokio::runtime::Handle::try_current().map_err(|e| {
        failed(format!(
            "the sandboxes' resolver needs a tokio runtime: {e}"
        ))
    })?;
    let _entered = runtime.enter();
    // The same port for UDP and TCP: take a UDP one, then its TCP twin (retrying if taken).
    let (udp, tcp) = (0..16)
        .find_map(|_| {
            let udp = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
            let port = udp.local_addr().ok()?.port();
            let tcp = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).ok()?;
            Some((udp, tcp))
        })
        .ok_or_else(|| {
            failed("cannot bind a UDP and TCP port for the sandboxes' resolver".into())
        })?;
    let port = udp
        .local_addr()
        .map_err(|e| failed(format!("resolver socket: {e}")))?
        .port();
    let to_tokio = |e: std::io::Error| failed(format!("resolver socket: {e}"));
    udp.set_nonblocking(true).map_err(to_tokio)?;
    tcp.set_nonblocking(true).map_err(to_tokio)?;
    let udp = UdpSocket::from_std(udp).map_err(to_tokio)?;
    let tcp = TcpListener::from_std(tcp).map_err(to_tokio)?;
    let upstreams: Arc<[SocketAddr]> = upstreams.into();
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    tokio::spawn(serve_udp(
        Arc::new(udp),
        Arc::clone(&upstreams),
        Arc::clone(&permits),
    ));
    tokio::spawn(serve_tcp(tcp, upstreams, permits));
    Ok(port)
}

async fn serve_udp(socket: Arc<UdpSocket>, upstreams: Arc<[SocketAddr]>, permits: Arc<Semaphore>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (len, client) = match socket.recv_from(&mut buf).await {
            Ok(got) => got,
            // An ICMP error of an earlier reply, say; the socket still works.
            Err(e) => {
                tracing::debug!("sandbox resolver: {e}");
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            continue;
        };
        let query = buf[..len].to_vec();
        let (socket, upstreams) = (Arc::clone(&socket), Arc::clone(&upstreams));
        tokio::spawn(async move {
            if let Some(reply) = ask_udp(&query, &upstreams).await {
                let _ = socket.send_to(&reply, client).await;
            }
            drop(permit);
        });
    }
}

/// Asks the upstreams in turn; the first reply with the query's id wins.
async fn ask_udp(query: &[u8], upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    for upstream in upstreams {
        let local: SocketAddr = if upstream.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let Ok(socket) = UdpSocket::bind(local).await else {
            continue;
        };
        if socket.connect(upstream).await.is_err() || socket.send(query).await.is_err() {
            continue;
        }
        let mut reply = vec![0u8; 65535];
        let answer = tokio::time::timeout(UDP_TIMEOUT, async {
            loop {
                let len = socket.recv(&mut reply).await?;
                if len >= 12 && reply[..2] == query[..2] {
                    return std::io::Result::Ok(len);
                }
            }
        })
        .await;
        if let Ok(Ok(len)) = answer {
            reply.truncate(len);
            return Some(reply);
        }
    }
    None
}

async fn serve_tcp(listener: TcpListener, upstreams: Arc<[SocketAddr]>, permits: Arc<Semaphore>) {
    loop {
        let mut client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(e) if e.kind() == ErrorKind::ConnectionAborted => continue,
            Err(e) => {
                tracing::warn!("sandbox resolver (TCP): {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        let upstreams = Arc::clone(&upstreams);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(TCP_TIMEOUT, async {
                for upstream in upstreams.iter() {
                    if let Ok(Ok(mut server)) =
                        tokio::time::timeout(UDP_TIMEOUT, TcpStream::connect(upstream)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        return;
                    }
                }
            })
            .await;
            drop(permit);
        });
    }
}
