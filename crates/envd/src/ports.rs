//! The `codeSnippet` service's one live part, `scanOpenedPorts`: every second, every IPv4 TCP
//! socket of the sandbox in every state, as the original's netstat entries (wire spec §5.4,
//! DECISIONS #10).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::time::MissedTickBehavior;

use crate::State;
use crate::connection::Subscriber;
use crate::hub::Topic;

/// The original scanner's period.
const SCAN_EVERY: Duration = Duration::from_secs(1);

pub(crate) fn subscription(name: &str) -> Option<Subscriber> {
    match name {
        "scanOpenedPorts" => Some(|_, args| {
            args.at_most(1)?;
            Ok(Topic::OpenPorts)
        }),
        _ => None,
    }
}

/// Sends a scan to `subscription` now and every second until it ends.
pub(crate) fn spawn_scanner(state: Arc<State>, subscription: String) {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(SCAN_EVERY);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let sockets = tokio::task::spawn_blocking(|| scan(Path::new("/proc")))
                .await
                .unwrap_or_default();
            // Always an array: the SDK iterates the payload.
            let encoded = serde_json::to_string(&sockets).unwrap_or_else(|_| "[]".to_owned());
            if !state.hub.send_to(&subscription, &encoded).await {
                return;
            }
        }
    });
}

/// One socket, with the field names of the Go struct the original sent (no JSON tags).
#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
struct Socket {
    user: String,
    name: String,
    pid: String,
    exe: String,
    state: &'static str,
    ip: String,
    port: u16,
    foreign_ip: String,
    foreign_port: u16,
}

/// A line of `/proc/net/tcp`.
#[derive(Debug, PartialEq, Eq)]
struct Row {
    local: (Ipv4Addr, u16),
    remote: (Ipv4Addr, u16),
    state: &'static str,
    uid: u32,
    inode: u64,
}

/// The process owning a socket.
#[derive(Clone, Default)]
struct Owner {
    pid: String,
    name: String,
    exe: String,
}

fn scan(proc: &Path) -> Vec<Socket> {
    let Ok(table) = fs::read_to_string(proc.join("net/tcp")) else {
        return Vec::new();
    };
    let rows: Vec<Row> = table.lines().skip(1).filter_map(parse_row).collect();
    let inodes: HashSet<u64> = rows
        .iter()
        .map(|row| row.inode)
        .filter(|&i| i != 0)
        .collect();
    let owners = socket_owners(proc, &inodes);
    let users = user_names();
    rows.into_iter()
        .map(|row| {
            let owner = owners.get(&row.inode).cloned().unwrap_or_default();
            Socket {
                user: users.get(&row.uid).cloned().unwrap_or_default(),
                name: owner.name,
                pid: owner.pid,
                exe: owner.exe,
                state: row.state,
                ip: row.local.0.to_string(),
                port: row.local.1,
                foreign_ip: row.remote.0.to_string(),
                foreign_port: row.remote.1,
            }
        })
        .collect()
}

fn parse_row(line: &str) -> Option<Row> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 10 {
        return None;
    }
    Some(Row {
        local: parse_endpoint(fields[1])?,
        remote: parse_endpoint(fields[2])?,
        state: state_name(fields[3]),
        uid: fields[7].parse().ok()?,
        inode: fields[9].parse().ok()?,
    })
}

/// `0100007F:1F90` → 127.0.0.1:8080. The kernel prints the address as a host-order integer of
/// network-order bytes.
fn parse_endpoint(field: &str) -> Option<(Ipv4Addr, u16)> {
    let (ip, port) = field.split_once(':')?;
    let ip = u32::from_str_radix(ip, 16).ok()?;
    let port = u16::from_str_radix(port, 16).ok()?;
    Some((Ipv4Addr::from(ip.to_ne_bytes()), port))
}

/// TCP state names as the original's netstat library spelled them.
fn state_name(code: &str) -> &'static str {
    match code {
        "01" => "ESTABLISHED",
        "02" => "SYN_SENT",
        "03" => "SYN_RECV",
        "04" => "FIN_WAIT1",
        "05" => "FIN_WAIT2",
        "06" => "TIME_WAIT",
        "07" => "CLOSE",
        "08" => "CLOSE_WAIT",
        "09" => "LAST_ACK",
        "0A" => "LISTEN",
        "0B" => "CLOSING",
        _ => "UNKNOWN",
    }
}

/// Finds which process holds each socket by reading every process's open descriptors.
fn socket_owners(proc: &Path, inodes: &HashSet<u64>) -> HashMap<u64, Owner> {
    let mut owners = HashMap::new();
    if inodes.is_empty() {
        return owners;
    }
    let Ok(processes) = fs::read_dir(proc) else {
        return owners;
    };
    for process in processes.flatten() {
        let pid = process.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = fs::read_dir(process.path().join("fd")) else {
            continue;
        };
        let mut owner = None;
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let Some(inode) = socket_inode(&target.to_string_lossy()) else {
                continue;
            };
            if !inodes.contains(&inode) || owners.contains_key(&inode) {
                continue;
            }
            let owner = owner.get_or_insert_with(|| describe(&process.path(), &pid));
            owners.insert(inode, owner.clone());
        }
    }
    owners
}

fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

fn describe(process: &Path, pid: &str) -> Owner {
    Owner {
        pid: pid.to_owned(),
        name: fs::read_to_string(process.join("comm"))
            .map(|name| name.trim_end().to_owned())
            .unwrap_or_default(),
        exe: fs::read_link(process.join("exe"))
            .map(|exe| exe.to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
}

/// uid → user name from the sandbox's `/etc/passwd`.
fn user_names() -> HashMap<u32, String> {
    fs::read_to_string("/etc/passwd")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let uid = fields.nth(1)?.parse().ok()?;
            Some((uid, name.to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_tcp_rows() {
        let line = "   0: 0100007F:1F90 0A01A8C0:D431 0A 00000000:00000000 00:00000000 00000000  1000        0 12345 1 0000000000000000 100 0 0 10 0";
        assert_eq!(
            parse_row(line),
            Some(Row {
                local: (Ipv4Addr::LOCALHOST, 8080),
                remote: (Ipv4Addr::new(192, 168, 1, 10), 54321),
                state: "LISTEN",
                uid: 1000,
                inode: 12345,
            })
        );
        assert_eq!(parse_row("  sl  local_address rem_address"), None);
        assert_eq!(socket_inode("socket:[77]"), Some(77));
        assert_eq!(socket_inode("pipe:[77]"), None);
    }

    #[test]
    fn serializes_with_the_go_field_names() {
        let socket = Socket {
            user: "user".into(),
            name: "node".into(),
            pid: "877".into(),
            exe: "/usr/bin/node".into(),
            state: "LISTEN",
            ip: "127.0.0.1".into(),
            port: 3000,
            foreign_ip: "0.0.0.0".into(),
            foreign_port: 0,
        };
        assert_eq!(
            serde_json::to_string(&socket).unwrap(),
            r#"{"User":"user","Name":"node","Pid":"877","Exe":"/usr/bin/node","State":"LISTEN","Ip":"127.0.0.1","Port":3000,"ForeignIp":"0.0.0.0","ForeignPort":0}"#
        );
    }
}
