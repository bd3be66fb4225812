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
//! - then each sandbox's egress policy: its address's elements of `@egress_deny` (sandbox
//!   address . destination CIDR) are dropped; if its address is in `@egress_restricted`, only its
//!   elements of `@egress_allow` pass. A policy is element updates, never a rewrite of the
//!   table; what a sandbox was given is kept in its run directory (`egress`), so that its
//!   destroy removes exactly those elements and a server start (which replaces the table)
//!   restores those of the sandboxes it adopts;
//! - the rest leaves masqueraded behind the host's address; inbound, only replies pass.
//!
//! Rules are scoped to this node's subnet where other servers on the host (other data dirs,
//! other subnets and resolvers) have tables of their own; the rules for `bw*` links in
//! general hold for every burrow server's sandboxes alike.

use std::io::{ErrorKind, Write};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};

use burrow_environments::Egress;
use burrow_environments::egress::{Cidr, Network};
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext};
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

    set egress_restricted {{
        type ipv4_addr
    }}

    set egress_allow {{
        type ipv4_addr . ipv4_addr
        flags interval
    }}

    set egress_deny {{
        type ipv4_addr . ipv4_addr
        flags interval
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
        iifname {links} ip saddr {subnet} ip saddr . ip daddr @egress_deny drop
        iifname {links} ip saddr @egress_restricted ip saddr . ip daddr != @egress_allow drop
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

/// What one sandbox may reach beyond the fence, which always holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Only `allow` is reachable (an empty `allow` then means nothing is).
    pub restricted: bool,
    pub allow: Vec<Cidr>,
    /// Never reachable, whatever `allow` says.
    pub deny: Vec<Cidr>,
}

impl Policy {
    /// The policy of a sandbox of an environment with `env`'s policy on a server whose
    /// defaults are `server` (`None`: `--network none`); `None` for no network (only `lo`).
    ///
    /// The server's lists bound every environment: deny lists add up, and where both have an
    /// allow list only what both allow is reachable.
    pub fn resolve(server: Option<&crate::NetworkConfig>, env: &Egress) -> Option<Policy> {
        let server = server?;
        if env.network == Some(Network::None) {
            return None;
        }
        let allow = match (server.egress_allow.as_slice(), env.allow.as_slice()) {
            ([], env) => env.to_vec(),
            (server, []) => server.to_vec(),
            (server, env) => intersect(server, env),
        };
        let deny = [server.egress_deny.as_slice(), env.deny.as_slice()].concat();
        Some(Policy {
            restricted: !server.egress_allow.is_empty() || !env.allow.is_empty(),
            allow: minimal(allow),
            deny: minimal(deny),
        })
    }

    /// Whether it takes any element (most sandboxes' do not, and cost no `nft` run).
    fn is_open(&self) -> bool {
        !self.restricted && self.deny.is_empty()
    }
}

/// The networks in both `a` and `b` (of two CIDRs, either one holds the other or they are
/// disjoint).
fn intersect(a: &[Cidr], b: &[Cidr]) -> Vec<Cidr> {
    let mut both = Vec::new();
    for x in a {
        for y in b {
            if x.contains(y) {
                both.push(*y);
            } else if y.contains(x) {
                both.push(*x);
            }
        }
    }
    both
}

/// `cidrs` sorted, without those another one holds: the interval sets refuse overlaps.
fn minimal(mut cidrs: Vec<Cidr>) -> Vec<Cidr> {
    cidrs.sort_by_key(|c| (c.prefix(), c.base()));
    let mut kept: Vec<Cidr> = Vec::new();
    for cidr in cidrs {
        if !kept.iter().any(|k| k.contains(&cidr)) {
            kept.push(cidr);
        }
    }
    kept.sort();
    kept
}

/// Where a sandbox's applied policy is kept: its run directory.
const POLICY_FILE: &str = "egress";

/// What a sandbox's elements are, as kept in its run directory.
#[derive(Debug, Serialize, Deserialize)]
struct Applied {
    address: Ipv4Addr,
    policy: Policy,
}

/// The `verb` (`add`, `delete`) commands of `applied`'s elements in `subnet`'s table.
fn elements(verb: &str, subnet: Subnet, applied: &Applied) -> String {
    let table = table(subnet);
    let address = applied.address;
    let mut script = String::new();
    if applied.policy.restricted {
        script += &format!("{verb} element inet {table} egress_restricted {{ {address} }}\n");
    }
    for (set, cidrs) in [
        ("egress_allow", &applied.policy.allow),
        ("egress_deny", &applied.policy.deny),
    ] {
        if cidrs.is_empty() {
            continue;
        }
        let list = cidrs
            .iter()
            .map(|cidr| format!("{address} . {cidr}"))
            .collect::<Vec<_>>()
            .join(", ");
        script += &format!("{verb} element inet {table} {set} {{ {list} }}\n");
    }
    script
}

/// Gives the sandbox at `address` (whose run directory is `run_dir`) `policy`: recorded first,
/// so that whatever happens next its destroy finds what to remove.
pub fn apply(
    run_dir: &Path,
    subnet: Subnet,
    address: Ipv4Addr,
    policy: &Policy,
) -> Result<(), Error> {
    if policy.is_open() {
        return Ok(());
    }
    let applied = Applied {
        address,
        policy: policy.clone(),
    };
    let path = run_dir.join(POLICY_FILE);
    let text = serde_json::to_vec(&applied).expect("a policy serializes");
    std::fs::write(&path, text).ctx("write", &path)?;
    nft(&elements("add", subnet, &applied))
}

/// The policy recorded in `run_dir`, if any.
fn recorded(run_dir: &Path) -> Result<Option<Applied>, Error> {
    let path = run_dir.join(POLICY_FILE);
    match std::fs::read(&path) {
        Ok(text) => serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| Error::NetworkSetup {
                reason: format!(
                    "{} is not a policy burrow wrote ({e}); delete it once the sandbox is gone",
                    path.display()
                ),
            }),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).ctx("read", &path),
    }
}

/// Removes the elements of the sandbox whose run directory is `run_dir`, and their record.
/// Each is added before it is deleted, in one transaction: a delete of a missing element fails
/// the whole of it, and a table replaced since (a server start) may lack some.
pub fn remove(run_dir: &Path, subnet: Subnet) -> Result<(), Error> {
    let Some(applied) = recorded(run_dir)? else {
        return Ok(());
    };
    nft(&(elements("add", subnet, &applied) + &elements("delete", subnet, &applied)))?;
    let path = run_dir.join(POLICY_FILE);
    std::fs::remove_file(&path).ctx("remove", &path)
}

/// Puts back the elements of every sandbox under `run_root` that has a policy, after
/// [`install`] replaced the table: the sandboxes a restarted server adopts keep theirs.
pub fn restore(run_root: &Path, subnet: Subnet) -> Result<(), Error> {
    let entries = match std::fs::read_dir(run_root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).ctx("list", run_root),
    };
    let mut script = String::new();
    for entry in entries {
        let entry = entry.ctx("list", run_root)?;
        if !entry.file_type().ctx("stat", &entry.path())?.is_dir() {
            continue;
        }
        if let Some(applied) = recorded(&entry.path())? {
            script += &elements("add", subnet, &applied);
        }
    }
    if script.is_empty() {
        return Ok(());
    }
    nft(&script)
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

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|c| c.parse().unwrap()).collect()
    }

    fn server(allow: &[&str], deny: &[&str]) -> crate::NetworkConfig {
        crate::NetworkConfig {
            egress_allow: cidrs(allow),
            egress_deny: cidrs(deny),
            ..Default::default()
        }
    }

    fn env(network: Option<Network>, allow: &[&str], deny: &[&str]) -> Egress {
        Egress {
            network,
            allow: cidrs(allow),
            deny: cidrs(deny),
        }
    }

    #[test]
    fn no_network_wins_from_either_side() {
        let internet = env(Some(Network::Internet), &[], &[]);
        assert_eq!(Policy::resolve(None, &internet), None);
        let none = env(Some(Network::None), &[], &[]);
        assert_eq!(Policy::resolve(Some(&server(&[], &[])), &none), None);
        let open = Policy::resolve(Some(&server(&[], &[])), &env(None, &[], &[])).unwrap();
        assert_eq!(open, Policy::default());
        assert!(open.is_open());
    }

    #[test]
    fn server_lists_bound_the_environments() {
        // Deny lists add up; an environment's allow list narrows the server's, never widens it.
        let policy = Policy::resolve(
            Some(&server(
                &["203.0.113.0/24", "198.51.100.0/24"],
                &["203.0.113.9/32"],
            )),
            &env(
                Some(Network::Internet),
                &["203.0.113.2/32", "192.0.2.0/24", "198.51.100.0/23"],
                &["203.0.113.0/24", "203.0.113.10/32"],
            ),
        )
        .unwrap();
        assert!(policy.restricted);
        assert_eq!(policy.allow, cidrs(&["198.51.100.0/24", "203.0.113.2/32"]));
        assert_eq!(policy.deny, cidrs(&["203.0.113.0/24"]));
        // Disjoint allow lists leave nothing allowed, not everything.
        let nothing = Policy::resolve(
            Some(&server(&["203.0.113.0/24"], &[])),
            &env(None, &["192.0.2.0/24"], &[]),
        )
        .unwrap();
        assert!(nothing.restricted && nothing.allow.is_empty());
        // Either side alone decides.
        let env_only =
            Policy::resolve(Some(&server(&[], &[])), &env(None, &["192.0.2.0/24"], &[])).unwrap();
        assert!(env_only.restricted);
        assert_eq!(env_only.allow, cidrs(&["192.0.2.0/24"]));
        let server_only = Policy::resolve(
            Some(&server(&["192.0.2.0/24"], &["192.0.2.1/32"])),
            &env(None, &[], &[]),
        )
        .unwrap();
        assert_eq!(
            (server_only.allow, server_only.deny),
            (cidrs(&["192.0.2.0/24"]), cidrs(&["192.0.2.1/32"]))
        );
    }

    #[test]
    fn restore_skips_what_is_not_a_sandbox_with_a_policy() {
        let run_root =
            std::env::temp_dir().join(format!("burrow-restore-test-{}", std::process::id()));
        std::fs::create_dir_all(run_root.join("abcdefabcdef")).unwrap();
        std::fs::write(run_root.join("a-file"), "").unwrap();
        let restored = restore(&run_root, "10.201.0.0/16".parse().unwrap());
        std::fs::remove_dir_all(&run_root).unwrap();
        restored.unwrap();
        assert!(restore(&run_root, "10.201.0.0/16".parse().unwrap()).is_ok());
    }

    #[test]
    fn elements_are_keyed_by_the_sandbox_address() {
        let applied = Applied {
            address: Ipv4Addr::new(10, 201, 0, 6),
            policy: Policy {
                restricted: true,
                allow: cidrs(&["203.0.113.2/32"]),
                deny: cidrs(&["198.51.100.0/24", "192.0.2.0/24"]),
            },
        };
        let script = elements("delete", "10.201.0.0/16".parse().unwrap(), &applied);
        assert_eq!(
            script,
            "delete element inet burrow_10_201_0_0_16 egress_restricted { 10.201.0.6 }\n\
             delete element inet burrow_10_201_0_0_16 egress_allow { 10.201.0.6 . 203.0.113.2/32 }\n\
             delete element inet burrow_10_201_0_0_16 egress_deny { 10.201.0.6 . 198.51.100.0/24, 10.201.0.6 . 192.0.2.0/24 }\n"
        );
    }
}
