//! A sandbox's network: a veth pair from its network namespace to the host, with a
//! point-to-point /30 of the sandbox subnet (`--sandbox-subnet`) tied to its id range's slot
//! (see `ids.rs`), so that an address is held exactly as long as the slot: unique among the
//! sandboxes of a data dir, whichever process started them, across restarts.
//!
//! Slot `i` owns the /30 at `subnet + 4 i`: `+1` is the host's end (`bw<sandbox-id>`, the
//! sandbox's gateway and resolver), `+2` the sandbox's `eth0`. Every sandbox address ends in
//! binary `10`, which the firewall uses to refuse spoofed sources without per-sandbox state.
//!
//! Links, addresses and routes are made over rtnetlink directly (a few fixed messages; no
//! `ip`, no netlink crate and its async runtime for what is three requests per start).

use std::fs;
use std::io::{self, ErrorKind, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext};

/// Prefix of the host ends' names; `bw` + 12 id characters fits IFNAMSIZ (15).
pub const LINK_PREFIX: &str = "bw";
/// The sandbox's end.
const SANDBOX_LINK: &str = "eth0";

/// An IPv4 network: `base/prefix`, `base` with no host bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    /// The subnets the default is picked from: the /16s of 10.0.0.0/8, from 10.200.0.0 on
    /// (away from the low ones that LANs and VPNs favour).
    const DEFAULT_FIRST: u8 = 200;

    fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0)
    }

    fn contains_net(&self, other: &Subnet) -> bool {
        let mask = self.mask() & other.mask();
        u32::from(self.base) & mask == u32::from(other.base) & mask
    }

    /// How many sandboxes (one /30 each) it holds.
    pub fn capacity(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix)).saturating_sub(2)
    }

    /// The addresses of slot `slot`.
    pub fn pair(&self, slot: u32) -> Result<Pair, Error> {
        if u64::from(slot) >= self.capacity() {
            return Err(Error::SubnetFull {
                subnet: self.to_string(),
                capacity: self.capacity(),
            });
        }
        let block = u32::from(self.base) + 4 * slot;
        Ok(Pair {
            gateway: Ipv4Addr::from(block + 1),
            sandbox: Ipv4Addr::from(block + 2),
        })
    }

    /// The first default subnet that none of `routes` (the host's, but its default) overlaps.
    pub fn pick_default(routes: &[Subnet]) -> Option<Subnet> {
        (Self::DEFAULT_FIRST..=u8::MAX)
            .chain(0..Self::DEFAULT_FIRST)
            .map(|second| Subnet {
                base: Ipv4Addr::new(10, second, 0, 0),
                prefix: 16,
            })
            .find(|candidate| !routes.iter().any(|route| candidate.contains_net(route)))
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

impl std::str::FromStr for Subnet {
    type Err = String;

    fn from_str(s: &str) -> Result<Subnet, String> {
        let (base, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not an IPv4 CIDR like 10.200.0.0/16"))?;
        let base: Ipv4Addr = base
            .parse()
            .map_err(|e| format!("{s:?}: bad address: {e}"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (8..=30).contains(p))
            .ok_or_else(|| format!("{s:?}: the prefix must be 8 to 30"))?;
        let subnet = Subnet { base, prefix };
        if u32::from(base) & !subnet.mask() != 0 {
            return Err(format!(
                "{s:?} has host bits set; did you mean {}/{prefix}?",
                Ipv4Addr::from(u32::from(base) & subnet.mask())
            ));
        }
        Ok(subnet)
    }
}

/// The two ends of one sandbox's link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pair {
    /// The host's end: the sandbox's default gateway and name server.
    pub gateway: Ipv4Addr,
    /// The sandbox's `eth0`.
    pub sandbox: Ipv4Addr,
}

/// The host's IPv4 routes but the default ones and burrow's own links (of any server), from
/// `/proc/net/route` (the main table).
pub fn host_routes() -> Result<Vec<Subnet>, Error> {
    let path = Path::new("/proc/net/route");
    let text = fs::read_to_string(path).ctx("read", path)?;
    Ok(parse_routes(&text))
}

fn parse_routes(text: &str) -> Vec<Subnet> {
    let hex = |field: &str| u32::from_str_radix(field, 16).ok().map(u32::from_be);
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (iface, dest, mask) = (fields.first()?, hex(fields.get(1)?)?, hex(fields.get(7)?)?);
            if iface.starts_with(LINK_PREFIX) || mask == 0 {
                return None;
            }
            Some(Subnet {
                base: Ipv4Addr::from(dest & mask),
                prefix: mask.count_ones() as u8,
            })
        })
        .collect()
}

/// The subnet of this data dir's sandboxes: `wanted`, or the one recorded in
/// `<data>/network/subnet` (so that sandboxes adopted after a restart keep their addresses), or
/// a new default claimed host-wide so that servers with other data dirs pick other ones.
pub fn choose_subnet(data_dir: &Path, wanted: Option<Subnet>) -> Result<Subnet, Error> {
    let dir = data_dir.join("network");
    fs::create_dir_all(&dir).ctx("create", &dir)?;
    let recorded_path = dir.join("subnet");
    let recorded = match fs::read_to_string(&recorded_path) {
        Ok(text) => text.trim().parse::<Subnet>().ok(),
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => return Err(e).ctx("read", &recorded_path),
    };
    let routes = host_routes()?;
    let subnet = match (wanted, recorded) {
        (Some(wanted), _) => wanted,
        (None, Some(recorded)) => recorded,
        (None, None) => claim_default(data_dir, &routes)?,
    };
    if let Some(route) = routes.iter().find(|route| subnet.contains_net(route)) {
        return Err(Error::SubnetRouted {
            subnet: subnet.to_string(),
            route: route.to_string(),
        });
    }
    if recorded != Some(subnet) {
        fs::write(&recorded_path, format!("{subnet}\n")).ctx("write", &recorded_path)?;
    }
    Ok(subnet)
}

/// Where servers claim default subnets: one file per subnet naming the data dir using it.
const CLAIMS: &str = "/run/burrow/subnets";

fn claim_default(data_dir: &Path, routes: &[Subnet]) -> Result<Subnet, Error> {
    let claims = Path::new(CLAIMS);
    fs::create_dir_all(claims).ctx("create", claims)?;
    let mut taken = routes.to_vec();
    loop {
        let subnet = Subnet::pick_default(&taken).ok_or(Error::NoFreeSubnet)?;
        let path = claims.join(subnet.base.to_string());
        let created = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path);
        match created {
            Ok(mut file) => {
                file.write_all(data_dir.as_os_str().as_encoded_bytes())
                    .ctx("write", &path)?;
                return Ok(subnet);
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                // A claim holds while its data dir still records the subnet; a deleted data dir
                // (a test's, say) leaves the subnet free again.
                let owner = PathBuf::from(fs::read_to_string(&path).ctx("read", &path)?);
                if owner == data_dir {
                    return Ok(subnet);
                }
                let still = fs::read_to_string(owner.join("network").join("subnet"))
                    .is_ok_and(|text| text.trim() == subnet.to_string());
                if !still {
                    fs::remove_file(&path).ctx("remove", &path)?;
                    continue;
                }
                taken.push(subnet);
            }
            Err(e) => return Err(e).ctx("create", &path),
        }
    }
}

/// Readies the host for the data dir's sandboxes with a network: their subnet, the resolver,
/// the firewall and IPv4 forwarding. Returns the subnet.
pub fn setup(data_dir: &Path, config: &crate::NetworkConfig) -> Result<Subnet, Error> {
    let subnet = choose_subnet(data_dir, config.subnet)?;
    let upstreams = match config.dns_upstream.as_slice() {
        [] => crate::resolver::host_upstreams()?,
        given => given.to_vec(),
    };
    // The firewall first: without nft, nothing else is worth starting.
    crate::firewall::check()?;
    let port = crate::resolver::start(upstreams.clone())?;
    crate::firewall::install(subnet, port)?;
    tracing::info!(
        %subnet,
        resolver_port = port,
        upstreams = ?upstreams,
        table = %format!("inet {}", crate::firewall::table(subnet)),
        "sandboxes get the internet: a veth each, NAT out, nothing of the host or private networks"
    );
    Ok(subnet)
}

/// Writes the `resolv.conf` a sandbox with addresses `pair` gets, in its run directory.
pub fn write_resolv_conf(run_dir: &Path, pair: Pair) -> Result<(), Error> {
    let path = run_dir.join("resolv.conf");
    let text = format!(
        "# burrow's resolver, at this sandbox's gateway.\nnameserver {}\noptions edns0\n",
        pair.gateway
    );
    fs::write(&path, text).ctx("write", &path)
}

/// The host end's name of sandbox `id`'s link.
pub fn link_name(id: &str) -> String {
    format!("{LINK_PREFIX}{id}")
}

/// Creates sandbox `id`'s veth pair, its `eth0` inside the network namespace of process `pid`,
/// and addresses both ends, with the sandbox's default route through the host's end.
pub fn attach(id: &str, pid: i32, pair: Pair) -> Result<(), Error> {
    let host = link_name(id);
    let failed = |step: &str, source: io::Error| Error::Network {
        step: format!("{step} for sandbox {id}"),
        source,
    };
    let netns_path = PathBuf::from(format!("/proc/{pid}/ns/net"));
    let netns = fs::File::open(&netns_path).ctx("open", &netns_path)?;
    let socket = Netlink::open().map_err(|e| failed("open a netlink socket", e))?;
    socket
        .create_veth(&host, SANDBOX_LINK, netns.as_fd())
        .map_err(|e| failed(&format!("create the veth pair {host}/{SANDBOX_LINK}"), e))?;
    let result = (|| {
        let index = if_index(&host).map_err(|e| failed(&format!("find {host}"), e))?;
        socket
            .add_address(index, pair.gateway, 30)
            .map_err(|e| failed(&format!("address {host} as {}/30", pair.gateway), e))?;
        inside(netns.as_fd(), || {
            let socket = Netlink::open()?;
            let index = if_index(SANDBOX_LINK)?;
            socket.set_up(index)?;
            socket.add_address(index, pair.sandbox, 30)?;
            socket.add_default_route(index, pair.gateway)
        })
        .map_err(|e| failed("address eth0 and route through it", e))
    })();
    if result.is_err() {
        let _ = socket.delete_link(&host);
    }
    result
}

/// Removes sandbox `id`'s veth pair, if it still exists. The kernel deletes it with the
/// network namespace too, but later (the namespace's cleanup runs in the background).
pub fn detach(id: &str) -> Result<(), Error> {
    let host = link_name(id);
    let failed = |source| Error::Network {
        step: format!("delete the link {host}"),
        source,
    };
    let socket = Netlink::open().map_err(failed)?;
    match socket.delete_link(&host) {
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
        result => result.map_err(failed),
    }
}

/// Runs `work` on a thread of its own inside the network namespace `netns` (a thread's
/// namespace is its own, so the caller's stays the host's whatever happens).
fn inside<T: Send>(
    netns: std::os::fd::BorrowedFd<'_>,
    work: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
                work()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the netlink thread panicked")))
    })
}

fn if_index(name: &str) -> io::Result<u32> {
    let name = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: a NUL-terminated string that outlives the call.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(io::Error::last_os_error()),
        index => Ok(index),
    }
}

/// A NETLINK_ROUTE socket of the calling thread's network namespace.
struct Netlink {
    fd: OwnedFd,
}

const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const NLA_F_NESTED: u16 = 1 << 15;

/// One request: a header, a fixed family header, then attributes (nested ones patched in
/// place once their content is written).
struct Message {
    bytes: Vec<u8>,
}

impl Message {
    fn new(kind: u16, flags: u16) -> Message {
        let mut bytes = Vec::with_capacity(256);
        bytes.extend_from_slice(&0u32.to_ne_bytes());
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(
            &(flags | (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes(),
        );
        bytes.extend_from_slice(&1u32.to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes());
        Message { bytes }
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    /// `struct ifinfomsg`: family, pad, type, index, flags, change.
    fn ifinfo(&mut self, index: i32, flags: u32) {
        self.bytes
            .extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
        self.bytes.extend_from_slice(&index.to_ne_bytes());
        self.bytes.extend_from_slice(&flags.to_ne_bytes());
        self.bytes.extend_from_slice(&flags.to_ne_bytes());
    }

    fn attr(&mut self, kind: u16, value: &[u8]) {
        self.bytes
            .extend_from_slice(&(4 + value.len() as u16).to_ne_bytes());
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self.bytes.extend_from_slice(value);
        self.pad();
    }

    fn name(&mut self, name: &str) {
        let mut value = name.as_bytes().to_vec();
        value.push(0);
        self.attr(IFLA_IFNAME, &value);
    }

    /// Opens a nested attribute; returns where its length goes for [`Message::end`].
    fn begin(&mut self, kind: u16) -> usize {
        let at = self.bytes.len();
        self.attr(kind | NLA_F_NESTED, &[]);
        at
    }

    fn end(&mut self, at: usize) {
        let len = (self.bytes.len() - at) as u16;
        self.bytes[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.bytes.len() as u32;
        self.bytes[..4].copy_from_slice(&len.to_ne_bytes());
        self.bytes
    }
}

impl Netlink {
    fn open() -> io::Result<Netlink> {
        // SAFETY: plain socket(2); the descriptor is owned right below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor socket(2) just returned, owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_nl is valid; the fields set below make it the kernel's.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `kernel` is a sockaddr_nl whose size is passed; it outlives the call.
        let connected = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&raw const kernel).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if connected < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Netlink { fd })
    }

    /// Sends one request and waits for its acknowledgement (an `NLMSG_ERROR` with code 0).
    fn request(&self, message: Message) -> io::Result<()> {
        let bytes = message.finish();
        // SAFETY: sends `bytes`, which outlives the call, to the kernel (the default address of
        // an unbound netlink socket).
        let sent =
            unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut reply = [0u8; 1024];
        loop {
            // SAFETY: receives into `reply`, whose length is passed.
            let got = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    reply.as_mut_ptr().cast(),
                    reply.len(),
                    0,
                )
            };
            if got < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let reply = &reply[..got as usize];
            if reply.len() < 20 {
                return Err(io::Error::other("short netlink reply"));
            }
            let kind = u16::from_ne_bytes([reply[4], reply[5]]);
            if kind != libc::NLMSG_ERROR as u16 {
                continue;
            }
            let code = i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
            return match code {
                0 => Ok(()),
                code => Err(io::Error::from_raw_os_error(-code)),
            };
        }
    }

    fn create_veth(
        &self,
        host: &str,
        peer: &str,
        netns: std::os::fd::BorrowedFd<'_>,
    ) -> io::Result<()> {
        let up = libc::IFF_UP as u32;
        let mut m = Message::new(
            libc::RTM_NEWLINK,
            (libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16,
        );
        m.ifinfo(0, up);
        m.name(host);
        let info = m.begin(IFLA_LINKINFO);
        m.attr(IFLA_INFO_KIND, b"veth");
        let data = m.begin(IFLA_INFO_DATA);
        let peer_at = m.begin(VETH_INFO_PEER);
        // Not up yet: the kernel configures the peer before pairing it, and a veth without
        // its peer refuses to open (ENOTCONN).
        m.ifinfo(0, 0);
        m.name(peer);
        m.attr(IFLA_NET_NS_FD, &netns.as_raw_fd().to_ne_bytes());
        m.end(peer_at);
        m.end(data);
        m.end(info);
        self.request(m)
    }

    fn add_address(&self, index: u32, address: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let mut m = Message::new(
            libc::RTM_NEWADDR,
            (libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16,
        );
        // struct ifaddrmsg: family, prefix length, flags, scope, index.
        m.bytes
            .extend_from_slice(&[libc::AF_INET as u8, prefix, 0, libc::RT_SCOPE_UNIVERSE]);
        m.bytes.extend_from_slice(&index.to_ne_bytes());
        m.attr(IFA_LOCAL, &address.octets());
        m.attr(IFA_ADDRESS, &address.octets());
        self.request(m)
    }

    fn add_default_route(&self, index: u32, gateway: Ipv4Addr) -> io::Result<()> {
        let mut m = Message::new(
            libc::RTM_NEWROUTE,
            (libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16,
        );
        // struct rtmsg: family, dst len, src len, tos, table, protocol, scope, type, flags.
        m.bytes.extend_from_slice(&[
            libc::AF_INET as u8,
            0,
            0,
            0,
            libc::RT_TABLE_MAIN,
            libc::RTPROT_BOOT,
            libc::RT_SCOPE_UNIVERSE,
            libc::RTN_UNICAST,
        ]);
        m.bytes.extend_from_slice(&0u32.to_ne_bytes());
        m.attr(RTA_GATEWAY, &gateway.octets());
        m.attr(RTA_OIF, &index.to_ne_bytes());
        self.request(m)
    }

    fn set_up(&self, index: u32) -> io::Result<()> {
        let mut m = Message::new(libc::RTM_NEWLINK, 0);
        m.ifinfo(index as i32, libc::IFF_UP as u32);
        self.request(m)
    }

    fn delete_link(&self, name: &str) -> io::Result<()> {
        let mut m = Message::new(libc::RTM_DELLINK, 0);
        m.ifinfo(0, 0);
        m.name(name);
        self.request(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_get_disjoint_point_to_point_blocks() {
        let subnet: Subnet = "10.200.0.0/16".parse().unwrap();
        assert_eq!(subnet.capacity(), 16_384);
        let first = subnet.pair(0).unwrap();
        assert_eq!(first.gateway, Ipv4Addr::new(10, 200, 0, 1));
        assert_eq!(first.sandbox, Ipv4Addr::new(10, 200, 0, 2));
        let last = subnet.pair(16_383).unwrap();
        assert_eq!(last.sandbox, Ipv4Addr::new(10, 200, 255, 254));
        assert!(subnet.pair(16_384).is_err());
    }

    #[test]
    fn subnets_parse_strictly() {
        assert!("10.1.0.0/16".parse::<Subnet>().is_ok());
        assert!(
            "10.1.0.1/16"
                .parse::<Subnet>()
                .unwrap_err()
                .contains("10.1.0.0/16")
        );
        assert!("10.1.0.0/31".parse::<Subnet>().is_err());
        assert!("10.1.0.0".parse::<Subnet>().is_err());
    }

    #[test]
    fn the_default_avoids_routed_networks_and_ignores_burrows_own_links() {
        let table = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n\
                     eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                     eth0\t0000C80A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
                     bwabcdefabcdef\t0000C90A\t00000000\t0001\t0\t0\t0\tFCFFFFFF\t0\t0\t0\n";
        let routes = parse_routes(table);
        assert_eq!(routes, vec!["10.200.0.0/16".parse().unwrap()]);
        let picked = Subnet::pick_default(&routes).unwrap();
        assert_eq!(picked, "10.201.0.0/16".parse().unwrap());
        let wide = vec!["10.0.0.0/8".parse().unwrap()];
        assert_eq!(Subnet::pick_default(&wide), None);
    }
}
