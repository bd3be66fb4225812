//! What an environment's sandboxes may reach on the network, as its definition says
//! (`network`, `egress_allow`, `egress_deny`); the runtime combines it with the server-wide
//! defaults and enforces it (`burrow_runtime::firewall`). CIDRs only for now, IPv4 only:
//! sandboxes have no IPv6 address yet.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// An IPv4 network `base/prefix` with no host bits (a bare address is its /32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    base: Ipv4Addr,
    prefix: u8,
}

impl Cidr {
    fn mask(prefix: u8) -> u32 {
        u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
    }

    pub fn base(&self) -> Ipv4Addr {
        self.base
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether every address of `other` is in `self`.
    pub fn contains(&self, other: &Cidr) -> bool {
        self.prefix <= other.prefix
            && u32::from(self.base) & Self::mask(self.prefix)
                == u32::from(other.base) & Self::mask(self.prefix)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (address, prefix) = s.split_once('/').unwrap_or((s, "32"));
        let base: Ipv4Addr = address.parse().map_err(|_| {
            format!(
                "{s:?} is not an IPv4 address or CIDR like 203.0.113.0/24 (domain names and \
                 IPv6 are not supported yet)"
            )
        })?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to 32"))?;
        let masked = Ipv4Addr::from(u32::from(base) & Cidr::mask(prefix));
        if masked != base {
            return Err(format!(
                "{s:?} has host bits set; did you mean {masked}/{prefix}?"
            ));
        }
        Ok(Cidr { base, prefix })
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Cidr, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Whether an environment's sandboxes get a network at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// Only `lo`, whatever the server's `--network`.
    None,
    /// The internet, within the server's fence and the egress lists.
    Internet,
}

/// An environment's own network policy; everything unset follows the server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Egress {
    /// `None`: the server's `--network`.
    pub network: Option<Network>,
    /// When not empty, only these are reachable (within the server's `--egress-allow`).
    pub allow: Vec<Cidr>,
    /// Never reachable, on top of the server's `--egress-deny`.
    pub deny: Vec<Cidr>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_strictly_and_contain() {
        let net: Cidr = "203.0.113.0/24".parse().unwrap();
        let host: Cidr = "203.0.113.2".parse().unwrap();
        assert_eq!(host.to_string(), "203.0.113.2/32");
        assert!(net.contains(&host) && !host.contains(&net));
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains(&net));
        assert!(
            "203.0.113.1/24"
                .parse::<Cidr>()
                .unwrap_err()
                .contains("203.0.113.0/24")
        );
        assert!("203.0.113.0/33".parse::<Cidr>().is_err());
        assert!("2001:db8::/32".parse::<Cidr>().is_err());
        assert!("pypi.org".parse::<Cidr>().is_err());
    }
}
