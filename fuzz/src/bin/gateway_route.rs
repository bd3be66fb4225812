//! The gateway's `Host` routing (`burrow_gateway::route`) on any text.
//!
//! The first byte picks the session domain the operator configured (`--domain`), the rest is
//! the `Host` value. Invariants: a host is under the domain exactly when its name (without a
//! `:port` and one trailing dot) ends with `.` and the domain, ignoring ASCII case, and only such
//! hosts leave the API; a session route's parts are what its label is made of (a non-zero
//! decimal port, two non-empty `[a-z0-9]` IDs) and it round-trips: the hostname rebuilt from
//! them routes to the same session, also with a port, a trailing dot or an upper-case domain.
//! Adding `:port` or a trailing dot to a host that has neither never changes its route.

use burrow_gateway::{Route, route};

/// Domains an operator might configure; the non-ASCII one exercises character boundaries.
const DOMAINS: &[&str] = &[
    "burrow.test",
    "e2b.dev",
    "localhost",
    "Sandbox.Example.COM",
    "bü.test",
];

fn is_id(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// The host's name: without a `:<digits>` suffix and then one trailing dot.
fn name_of(host: &str) -> &str {
    let name = match host.rfind(':') {
        Some(colon) if host[colon + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..colon],
        _ => host,
    };
    name.strip_suffix('.').unwrap_or(name)
}

/// The label before `.<domain>` when the name is under the domain, compared bytewise (a `.`
/// byte is always a character boundary, so this needs no UTF-8 reasoning).
fn label_under<'a>(name: &'a str, domain: &str) -> Option<&'a str> {
    let (name_bytes, domain_bytes) = (name.as_bytes(), domain.as_bytes());
    let dot = name_bytes.len().checked_sub(domain_bytes.len() + 1)?;
    (name_bytes[dot] == b'.' && name_bytes[dot + 1..].eq_ignore_ascii_case(domain_bytes))
        .then(|| &name[..dot])
}

fn check(host: &str, domain: &str) {
    let routed = route(host, domain);
    let label = label_under(name_of(host), domain);
    match (&routed, label) {
        (Route::Api, None) | (Route::Invalid, Some(_)) => {}
        (
            Route::Session {
                port,
                session_id,
                client_id,
            },
            Some(label),
        ) => {
            assert!(*port != 0, "port 0 routed: {host:?}");
            assert!(
                is_id(session_id) && is_id(client_id),
                "{routed:?} from {host:?}"
            );
            let digits = label
                .strip_suffix(&format!("-{session_id}-{client_id}"))
                .unwrap_or_else(|| panic!("{routed:?} is not what {label:?} is made of"));
            assert!(
                !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()),
                "port {digits:?} of {host:?}"
            );
            assert_eq!(digits.parse::<u16>().ok(), Some(*port), "{host:?}");
            let rebuilt = format!("{port}-{session_id}-{client_id}.{domain}");
            for variant in [
                rebuilt.clone(),
                format!("{rebuilt}:49982"),
                format!("{rebuilt}."),
                format!(
                    "{port}-{session_id}-{client_id}.{}",
                    domain.to_ascii_uppercase()
                ),
            ] {
                assert_eq!(route(&variant, domain), routed, "{variant:?} vs {host:?}");
            }
        }
        (routed, label) => panic!("{host:?} on {domain:?}: {routed:?}, but label {label:?}"),
    }
    if !host.contains(':') {
        assert_eq!(
            route(&format!("{host}:443"), domain),
            routed,
            "{host:?}:443"
        );
        if !host.ends_with('.') {
            assert_eq!(route(&format!("{host}."), domain), routed, "{host:?}.");
        }
    }
}

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Some((&pick, host)) = data.split_first() else {
            return;
        };
        let Ok(host) = std::str::from_utf8(host) else {
            return;
        };
        check(host, DOMAINS[usize::from(pick) % DOMAINS.len()]);
    });
}
