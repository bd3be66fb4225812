//! Property tests of `Host` routing: whatever a client puts in `Host`, `route` does not panic,
//! every well-formed session host round-trips, and nothing else is taken for a session.

use burrow_gateway::{Route, route};
use proptest::prelude::*;

/// What `route` must decide, written independently of it: strip one `:digits` suffix and one
/// trailing dot; under `.{domain}` (ASCII case-insensitive) the rest must be exactly
/// `{port}-{id}-{id}` with a port in 1..=65535 and ids of `[a-z0-9]+`.
fn reference<'a>(host: &'a str, domain: &str) -> Route<'a> {
    let name = match host.rfind(':') {
        Some(colon) if host[colon + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..colon],
        _ => host,
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    let suffix = format!(".{domain}");
    if name.len() < suffix.len() || !name.is_char_boundary(name.len() - suffix.len()) {
        return Route::Api;
    }
    let (label, tail) = name.split_at(name.len() - suffix.len());
    if !tail.eq_ignore_ascii_case(&suffix) {
        return Route::Api;
    }
    let parts: Vec<&str> = label.split('-').collect();
    let id = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    let port_ok = !parts[0].is_empty() && parts[0].bytes().all(|b| b.is_ascii_digit());
    let port = match parts[0].parse::<u16>() {
        Ok(port) if port != 0 && port_ok => port,
        _ => return Route::Invalid,
    };
    match parts[..] {
        [_, session_id, client_id] if id(session_id) && id(client_id) => Route::Session {
            port,
            session_id,
            client_id,
        },
        [_, sandbox_id] if id(sandbox_id) => Route::Sandbox { port, sandbox_id },
        _ => Route::Invalid,
    }
}

/// Host names shaped like session hosts, each part either right or a near miss (empty, zero,
/// too large, upper case, extra dashes or dots, non-ASCII), so that every rule of the parser is
/// exercised on most cases instead of by astronomically rare chance.
fn host_like(domain: &'static str) -> impl Strategy<Value = String> {
    let port = prop_oneof![
        "[1-9][0-9]{0,3}",
        "0{1,3}",
        "0[0-9]{1,4}",
        "6553[5-9]",
        "[0-9]{6,8}",
        Just(String::new()),
        "[+-][0-9]{1,3}",
    ];
    let id = prop_oneof![
        4 => "[a-z0-9]{1,12}",
        1 => "[a-zA-Z]{1,4}",
        1 => Just(String::new()),
        1 => "[a-z]{0,3}[ü€_.%/ ][a-z]{0,3}",
    ];
    let separator = prop_oneof![8 => Just("-"), 1 => Just("--"), 1 => Just(""), 1 => Just(".")];
    let tail = prop_oneof![
        4 => Just(format!(".{domain}")),
        1 => Just(format!(".{}", domain.to_uppercase())),
        1 => Just(domain.to_owned()),
        1 => Just(format!("x.{domain}")),
        1 => Just(format!(".{domain}.evil")),
        1 => Just(".other".to_owned()),
    ];
    let end = prop_oneof![
        Just(String::new()),
        Just(".".to_owned()),
        "[:][0-9]{0,5}",
        Just(":x".to_owned()),
        Just(".:80".to_owned()),
    ];
    (
        port,
        separator.clone(),
        id.clone(),
        separator,
        id,
        "(-[a-z0-9]{1,3})?",
        tail,
        end,
    )
        .prop_map(|(port, s1, session, s2, client, extra, tail, end)| {
            format!("{port}{s1}{session}{s2}{client}{extra}{tail}{end}")
        })
}

fn domains() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("localhost"),
        Just("sandbox.example.com"),
        Just("e2b.dev"),
        Just("x"),
    ]
}

proptest! {
    #[test]
    fn never_panics_on_any_text(host in any::<String>(), domain in any::<String>()) {
        let _ = route(&host, &domain);
    }

    #[test]
    fn agrees_with_the_reference_on_host_like_input(
        (domain, host) in domains().prop_flat_map(|d| (Just(d), host_like(d)))
    ) {
        prop_assert_eq!(route(&host, domain), reference(&host, domain));
    }

    #[test]
    fn well_formed_hosts_round_trip(
        port in 1u16..,
        session_id in "[a-z0-9]{1,32}",
        client_id in "[a-z0-9]{1,16}",
        domain in domains(),
        upper_domain in any::<bool>(),
        trailing_dot in any::<bool>(),
        listen_port in prop::option::of(any::<u16>()),
    ) {
        let shown_domain = if upper_domain { domain.to_uppercase() } else { domain.to_owned() };
        let mut host = format!("{port}-{session_id}-{client_id}.{shown_domain}");
        if trailing_dot {
            host.push('.');
        }
        if let Some(p) = listen_port {
            host.push_str(&format!(":{p}"));
        }
        prop_assert_eq!(
            route(&host, domain),
            Route::Session { port, session_id: &session_id, client_id: &client_id }
        );
    }

    #[test]
    fn anything_accepted_is_of_the_session_form(host in any::<String>(), domain in domains()) {
        if let Route::Session { port, session_id, client_id } = route(&host, domain) {
            prop_assert!(port != 0);
            for id in [session_id, client_id] {
                prop_assert!(!id.is_empty());
                prop_assert!(id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
            }
            let canonical = format!("{port}-{session_id}-{client_id}.{domain}");
            prop_assert!(
                host.to_ascii_lowercase().contains(&canonical),
                "{host:?} routed to {canonical}"
            );
        }
    }

    #[test]
    fn hosts_outside_the_domain_are_the_api(
        label in "[a-z0-9-]{0,30}",
        other in "[a-z]{1,10}\\.(com|net|org)",
    ) {
        // `localhost` as the domain: none of these end in `.localhost`.
        let bare = format!("{label}.{other}");
        let with_port = format!("{bare}:3000");
        prop_assert_eq!(route(&bare, "localhost"), Route::Api);
        prop_assert_eq!(route(&with_port, "localhost"), Route::Api);
    }
}
