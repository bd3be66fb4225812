//! The namespace backend end to end, through the `Backend` trait, with the real burrow binary as
//! every sandbox's init: `$BURROW_BIN`, else the workspace's `target/debug/burrow` (build it
//! first). Needs root and that binary. In CI (`CI` set, as CI services do; CI runs as root after
//! `cargo build`) a missing one fails the test; elsewhere the test skips, saying so on the
//! terminal.
//! `isolation.sh` beside this file checks what a sandbox can and cannot do.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use burrow_environments::Catalog;
use burrow_runtime::{Backend, Error, Limits, Namespaces, RuntimeConfig, SandboxSpec};

struct Fixture {
    config: RuntimeConfig,
    backend: Namespaces,
    catalog: Catalog,
}

impl Fixture {
    fn new(name: &str) -> Option<Fixture> {
        let binary = std::env::var_os("BURROW_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/burrow")
            });
        let mut missing = Vec::new();
        if !nix::unistd::geteuid().is_root() {
            missing.push("root (sandboxes need namespaces and cgroups): run as root".to_string());
        }
        if !binary.is_file() {
            missing.push(format!(
                "the burrow binary at {} (sandbox init): run `cargo build` or set BURROW_BIN",
                binary.display()
            ));
        }
        if !missing.is_empty() {
            skip_or_fail(name, &missing.join("; "));
            return None;
        }
        let data_dir = PathBuf::from(format!("/tmp/burrow-rt-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data_dir);
        let mut config = RuntimeConfig::new(&data_dir, format!("t{}{name}", std::process::id()));
        config.init_program = binary;
        let backend = Namespaces::new(config.clone()).unwrap();
        let catalog = Catalog::load(&data_dir, config.uid_base).unwrap();
        Some(Fixture {
            config,
            backend,
            catalog,
        })
    }

    fn spec(&self) -> SandboxSpec {
        let environment = self.catalog.get("Bash").unwrap();
        SandboxSpec {
            egress: environment.egress.clone(),
            environment,
            limits: Limits::default(),
            ready_shell: false,
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.backend.remove_node_cgroups();
        let _ = std::fs::remove_dir_all(&self.config.data_dir);
    }
}

/// Whether this runs in CI, where every test must really run: CI services set `CI` (GitHub and
/// GitLab to `true`).
fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// A test that cannot run here: a failure in CI; elsewhere a skip that says so where it is seen.
fn skip_or_fail(fixture: &str, missing: &str) {
    // The test harness names each test's thread after the test.
    let current = std::thread::current();
    let test = current.name().unwrap_or(fixture);
    assert!(
        !in_ci(),
        "namespace test `{test}` cannot run: it needs {missing} (CI is set, so this is a failure, not a skip)"
    );
    // Straight to the stderr handle, not `eprintln!`: the test harness captures the macros'
    // output of a passing test, which would hide the skip.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED namespace test `{test}`: it needs {missing}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_probe_list_adopt_destroy() {
    let Some(f) = Fixture::new("life") else {
        return;
    };
    let sandbox = f.backend.create(&f.spec()).await.unwrap();
    assert_eq!(sandbox.socket, f.backend.socket_path(&sandbox.id));
    assert!(f.backend.probe(&sandbox.id).await);
    assert_eq!(f.backend.list().unwrap(), std::slice::from_ref(&sandbox.id));

    // A restarted server finds the sandbox, can reach it, and learns when it is gone.
    let restarted = Namespaces::new(f.config.clone()).unwrap();
    assert_eq!(restarted.list().unwrap(), std::slice::from_ref(&sandbox.id));
    assert!(restarted.probe(&sandbox.id).await);
    let id = sandbox.id.clone();
    let waiter = tokio::spawn(async move { restarted.wait_exit(&id).await });

    f.backend.destroy(&sandbox.id).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert!(f.backend.list().unwrap().is_empty());
    assert!(!sandbox.socket.exists());
    assert!(!f.backend.probe(&sandbox.id).await);
    // Destroying twice is fine.
    f.backend.destroy(&sandbox.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_exit_sees_the_sandbox_die_on_its_own() {
    let Some(f) = Fixture::new("death") else {
        return;
    };
    let sandbox = f.backend.create(&f.spec()).await.unwrap();
    // A restarted server watches it through its cgroup alone.
    let restarted = Namespaces::new(f.config.clone()).unwrap();
    let id = sandbox.id.clone();
    let adopted = tokio::spawn(async move {
        restarted.wait_exit(&id).await;
        std::time::Instant::now()
    });
    tokio::time::sleep(Duration::from_millis(50)).await;

    let killed = std::time::Instant::now();
    for pid in sandbox_pids(&f.config.node_id, &sandbox.id) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
    }
    tokio::time::timeout(Duration::from_secs(5), f.backend.wait_exit(&sandbox.id))
        .await
        .unwrap();
    let status = f.backend.wait_status(&sandbox.id).await.unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    let seen = tokio::time::timeout(Duration::from_secs(5), adopted)
        .await
        .unwrap()
        .unwrap();
    eprintln!(
        "the restarted server saw the death after {:?}",
        seen - killed
    );

    f.backend.destroy(&sandbox.id).await.unwrap();
    assert!(f.backend.list().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_says_why_and_leaves_nothing() {
    let Some(mut f) = Fixture::new("fail") else {
        return;
    };
    // An init program that exits at once, as a broken binary would.
    f.config.init_program = "/bin/false".into();
    let backend = Namespaces::new(f.config.clone()).unwrap();
    let error = backend.create(&f.spec()).await.unwrap_err();
    assert!(matches!(error, Error::DiedDuringStart { .. }), "{error}");
    assert!(
        error
            .to_string()
            .contains("exited while starting (exit status: 1)"),
        "{error}"
    );
    assert!(backend.list().unwrap().is_empty());

    let mut unavailable = f.spec();
    let mut environment = (*unavailable.environment).clone();
    environment.availability = Err("needs `go`".into());
    unavailable.environment = Arc::new(environment);
    let error = backend.create(&unavailable).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "environment Bash is unavailable on this host: needs `go`"
    );
}

/// The processes of a sandbox, from whichever cgroup layout this host has.
fn sandbox_pids(node: &str, id: &str) -> Vec<i32> {
    ["unified/burrow", "burrow", "pids/burrow"]
        .iter()
        .map(|base| format!("/sys/fs/cgroup/{base}/{node}/{id}/cgroup.procs"))
        .find_map(|path| std::fs::read_to_string(path).ok())
        .unwrap()
        .lines()
        .map(|line| line.parse().unwrap())
        .collect()
}

/// Once built, envd writes nothing to the init log (a file on the host no disk limit covers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envd_stdio_leaves_the_host_disk() {
    let Some(f) = Fixture::new("stdio") else {
        return;
    };
    let sandbox = f.backend.create(&f.spec()).await.unwrap();
    let init = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .find(|pid| {
            let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            cgroup.contains(&sandbox.id) && comm.trim() == "burrow-init"
        })
        .expect("the sandbox's PID 1");
    for fd in [1, 2] {
        let target = std::fs::read_link(format!("/proc/{init}/fd/{fd}")).unwrap();
        assert_eq!(target, PathBuf::from("/dev/null"), "fd {fd}");
    }
    f.backend.destroy(&sandbox.id).await.unwrap();
}

/// The network interfaces of a sandbox, from its PID 1's view.
fn interfaces(node: &str, id: &str) -> Vec<String> {
    let pid = sandbox_pids(node, id)[0];
    let mut names: Vec<String> = std::fs::read_to_string(format!("/proc/{pid}/net/dev"))
        .unwrap()
        .lines()
        .filter_map(|line| Some(line.split_once(':')?.0.trim().to_owned()))
        .collect();
    names.sort();
    names
}

/// An environment with `network = "none"` gets only `lo` on a server that gives sandboxes the
/// internet; the others get their `eth0`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_environment_without_network_gets_only_lo() {
    let Some(mut f) = Fixture::new("nonet") else {
        return;
    };
    f.config.network = Some(burrow_runtime::NetworkConfig {
        // Never asked: these sandboxes resolve nothing.
        dns_upstream: vec!["127.0.0.1:53".parse().unwrap()],
        ..Default::default()
    });
    let backend = Namespaces::new(f.config.clone()).unwrap();
    let subnet = std::fs::read_to_string(f.config.data_dir.join("network/subnet")).unwrap();
    let _table = DropTable(format!("burrow_{}", subnet.trim()).replace(['.', '/'], "_"));

    let mut offline = f.spec();
    offline.egress.network = Some(burrow_environments::egress::Network::None);
    let without = backend.create(&offline).await.unwrap();
    let with = backend.create(&f.spec()).await.unwrap();
    let node = &f.config.node_id;
    assert_eq!(interfaces(node, &without.id), ["lo"]);
    assert_eq!(interfaces(node, &with.id), ["eth0", "lo"]);
    backend.destroy(&without.id).await.unwrap();
    backend.destroy(&with.id).await.unwrap();
}

/// Deletes a test server's nftables table, whatever the test's outcome.
struct DropTable(String);

impl Drop for DropTable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("nft")
            .args(["delete", "table", "inet", &self.0])
            .status();
    }
}
