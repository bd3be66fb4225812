//! The fence around sandboxes with a network: one nftables table per sandbox subnet
//! (`inet burrow_10_200_0_0_16`), replaced whole at every server start. A subnet belongs to one
//! data dir at a time (see `net::choose_subnet`), so the table of a subnet is its server's, and
//! replacing it also drops what a previous owner of the subnet (a deleted data dir) left.
//!
//! What it does, for packets from this node's sandbox subnet (`iifname "bw*"`):
//! - source check before conntrack: a packet must come from an address routed through the link
//!   it arrives on (`fib saddr . iif`), ending in binary `10` (each sandbox's own; see
//!   `net.rs`), not local to the host. That is exact anti-spoofing with no per-sandbox
//!   element: the sandbox's /30 is routed through its link alone.
//! - DNS to the gateway is redirected to burrow's resolver; DNS anywhere else is dropped.
//! - nothing of the host is reachable (input: everything but the resolver is dropped, which
//!   covers every host address, 127.0.0.0/8 through the gateway and the API port);
//! - forwarding to other sandboxes, RFC 1918, CGNAT, link-local, loopback, multicast and
//!   reserved IPv4 (`@blocked4`) is dropped; IPv6 from sandboxes is dropped whole (they get no
//!   IPv6 address yet);
//! - the rest leaves masqueraded behind the host's address; inbound, only replies pass.
//!
//! Rules are scoped to this node's subnet where other servers on the host (other data dirs,
//! other subnets and resolvers) have tables of their own; the rules for `bw*` links in
//! general hold for every burrow server's sandboxes alike.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::error::Error;
use crate::net::Subnet;

/// The nft binary, from Debian's `nftables` package.
pub const NFT: &str = "nft";

/// IPv4 destinations no sandbox reaches, whatever the policy.
const BLOCKED4: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// The table's name for `subnet`.
pub fn table(subnet: Subnet) -> String {
    format!("burrow_{subnet}").replace(['.', '/'], "_")
}

/// The ruleset for the sandboxes in `subnet`, whose resolver listens on `resolver_port` on the
/// host. Only new connections to the resolver's port from elsewhere are dropped: the same
/// number is also an ephemeral port the host's own outgoing connections may get, whose replies
/// must pass (a server's table outlives it, so every port ever picked would be a trap).
fn ruleset(subnet: Subnet, resolver_port: u16) -> String {
    let table = table(subnet);
    let blocked = BLOCKED4
        .iter()
        .map(|net| net.to_string())
        .chain([subnet.to_string()])
        .collect::<Vec<_>>()
        .join(", ");
    let links = format!("\"{}*\"", crate::net::LINK_PREFIX);
    format!(
        r#"table inet {table}
delete table inet {table}
table inet {table} {{
    set blocked4 {{
        type ipv4_addr
        flags interval
        auto-merge
        elements = {{ {blocked} }}
    }}

    chain spoofing {{
        type filter hook prerouting priority raw; policy accept;
        iifname {links} meta nfproto ipv6 drop
        iifname {links} fib saddr . iif oif missing drop
        iifname {links} fib saddr type {{ local, broadcast, multicast }} drop
        iifname {links} ip saddr {subnet} ip saddr & 0.0.0.3 != 0.0.0.2 drop
    }}

    chain dns {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname {links} ip saddr {subnet} fib daddr type local meta l4proto {{ tcp, udp }} th dport 53 redirect to :{resolver_port}
    }}

    chain input {{
        type filter hook input priority filter; policy accept;
        iifname {links} ip saddr {subnet} meta l4proto {{ tcp, udp }} th dport {resolver_port} accept
        iifname {links} ip saddr {subnet} drop
        iifname != "lo" ct state new meta l4proto {{ tcp, udp }} th dport {resolver_port} drop
    }}

    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname {links} ip saddr {subnet} oifname {links} drop
        iifname {links} ip saddr {subnet} ip daddr @blocked4 drop
        iifname {links} ip saddr {subnet} meta l4proto {{ tcp, udp }} th dport {{ 53, 853 }} drop
        oifname {links} ip daddr {subnet} ct state established,related accept
        oifname {links} ip daddr {subnet} drop
    }}

    chain egress {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {subnet} oifname != {links} masquerade
    }}
}}
"#
    )
}

/// Whether `nft` runs at all (so that a missing package is said before anything starts).
pub fn check() -> Result<(), Error> {
    match Command::new(NFT).arg("--version").output() {
        Ok(output) if output.status.success() => Ok(()),
        Ok(output) => Err(Error::NetworkSetup {
            reason: format!("{NFT} --version failed ({})", output.status),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::NftMissing),
        Err(e) => Err(Error::NetworkSetup {
            reason: format!("cannot run {NFT}: {e}"),
        }),
    }
}

/// Installs (or replaces) the table of `subnet` and turns on IPv4 forwarding.
pub fn install(subnet: Subnet, resolver_port: u16) -> Result<(), Error> {
    nft(&ruleset(subnet, resolver_port))?;
    let forward = Path::new("/proc/sys/net/ipv4/ip_forward");
    let was = std::fs::read_to_string(forward).unwrap_or_default();
    if was.trim() != "1" {
        std::fs::write(forward, "1").map_err(|e| Error::NetworkSetup {
            reason: format!(
                "cannot turn on IPv4 forwarding ({}: {e}); sandboxes would have no internet",
                forward.display()
            ),
        })?;
        tracing::warn!(
            "turned on IPv4 forwarding (net.ipv4.ip_forward=1) for the sandboxes' egress; the \
             host now routes between all its interfaces: firewall them if it should not"
        );
    } else {
        tracing::info!("IPv4 forwarding is on (net.ipv4.ip_forward=1)");
    }
    Ok(())
}

/// Feeds a script to `nft -f -`.
fn nft(script: &str) -> Result<(), Error> {
    let spawned = Command::new(NFT)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::NftMissing),
        Err(e) => {
            return Err(Error::NetworkSetup {
                reason: format!("cannot run {NFT}: {e}"),
            });
        }
    };
    let written = child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(script.as_bytes());
    let output = child.wait_with_output().map_err(|e| Error::NetworkSetup {
        reason: format!("cannot run {NFT}: {e}"),
    })?;
    if !output.status.success() || written.is_err() {
        return Err(Error::NetworkSetup {
            reason: format!(
                "{NFT} -f - failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_is_scoped_to_its_subnet() {
        let rules = ruleset("10.201.0.0/16".parse().unwrap(), 40053);
        let table = "burrow_10_201_0_0_16";
        assert!(rules.starts_with(&format!("table inet {table}\ndelete table inet {table}\n")));
        assert!(rules.contains("ip saddr 10.201.0.0/16 oifname != \"bw*\" masquerade"));
        assert!(rules.contains("redirect to :40053"));
        assert!(rules.contains("169.254.0.0/16"));
        assert!(rules.contains("10.201.0.0/16 }"));
    }
}
