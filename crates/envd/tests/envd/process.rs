//! The `process` service (wire spec §5.2).

use std::time::Duration;

use serde_json::{Value, json};

use crate::{Sandbox, collect, eventually, live_group_members, result_of, run, subscribe_process};

#[tokio::test]
async fn output_lines_and_exit_code() {
    let sandbox = Sandbox::start().await;
    let mut rpc = sandbox.rpc().await;
    let run = run(
        &mut rpc,
        "basic",
        "echo out1; echo err1 >&2; printf 'a\\r\\nb\\n\\nno newline'; exit 3",
        json!({}),
        "",
    )
    .await;
    assert_eq!(run.stdout, ["out1", "a", "b", "", "no newline"]);
    assert_eq!(run.stderr, ["err1"]);
    assert_eq!(run.exit, Some(json!(3)));
    assert_eq!(run.late, 0, "nothing after the exit notification");
}

#[tokio::test]
async fn environment_and_working_directory() {
    let sandbox = Sandbox::start().await;
    let mut rpc = sandbox.rpc().await;
    std::fs::create_dir(sandbox.home.join("sub")).unwrap();

    let run_env = run(
        &mut rpc,
        "env",
        "echo $FOO; echo $HOME; echo $USER $LOGNAME; echo $SHELL; pwd",
        json!({"FOO": "bar"}),
        "",
    )
    .await;
    let home = sandbox.home.display().to_string();
    let workdir = sandbox.workdir.display().to_string();
    assert_eq!(
        run_env.stdout,
        [
            "bar",
            home.as_str(),
            "user user",
            "/bin/bash",
            workdir.as_str()
        ]
    );

    let run_cwd = run(&mut rpc, "cwd", "pwd", json!({}), &sandbox.path("sub")).await;
    assert_eq!(run_cwd.stdout, [sandbox.path("sub")]);
    let run_relative = run(&mut rpc, "relative", "pwd", json!(null), "sub").await;
    assert_eq!(run_relative.stdout, [sandbox.path("sub")]);

    let (code, message) = rpc
        .error(
            "process_start",
            json!(["bad", "true", {}, "/nonexistent/dir"]),
        )
        .await;
    assert_eq!(code, -32000);
    assert_eq!(
        message,
        "error starting process 'bad': chdir /nonexistent/dir: no such file or directory"
    );
}

#[tokio::test]
async fn stdin_reaches_the_process() {
    let sandbox = Sandbox::start().await;
    let mut rpc = sandbox.rpc().await;
    let (stdout, stderr, exit) = subscribe_process(&mut rpc, "cat").await;
    rpc.ok("process_start", json!(["cat", "head -n 2", {}, ""]))
        .await;
    assert_eq!(
        rpc.ok("process_stdin", json!(["cat", "hello\nwor"])).await,
        Value::Null
    );
    rpc.ok("process_stdin", json!(["cat", "ld\n"])).await;
    let run = collect(&mut rpc, &stdout, &stderr, &exit).await;
    assert_eq!(run.stdout, ["hello", "world"]);
    assert_eq!(run.exit, Some(json!(0)));
}

#[tokio::test]
async fn kill_takes_the_whole_process_group() {
    let sandbox = Sandbox::start().await;
    let mut rpc = sandbox.rpc().await;
    let (stdout, stderr, exit) = subscribe_process(&mut rpc, "group").await;
    rpc.ok(
        "process_start",
        json!(["group", "echo $$; sleep 100 & sleep 100; wait", {}, ""]),
    )
    .await;
    let first = rpc.notification().await;
    let pgid: i32 = result_of(&first)["line"].as_str().unwrap().parse().unwrap();
    eventually("both sleeps to start", || {
        live_group_members(pgid).len() >= 3
    })
    .await;

    assert_eq!(rpc.ok("process_kill", json!(["group"])).await, Value::Null);
    let run = collect(&mut rpc, &stdout, &stderr, &exit).await;
    assert_eq!(run.exit, Some(json!(-1)), "killed by a signal");
    eventually("the group to be gone", || {
        live_group_members(pgid).is_empty()
    })
    .await;
}

#[tokio::test]
async fn all_output_comes_before_the_exit_with_increasing_timestamps() {
    let sandbox = Sandbox::start().await;
    let mut rpc = sandbox.rpc().await;
    let run = run(
        &mut rpc,
        "many",
        "for i in $(seq 1 3000); do echo $i; echo e$i >&2; done",
        json!({}),
        "",
    )
    .await;
    assert_eq!(run.stdout.len(), 3000);
    assert_eq!(run.stderr.len(), 3000);
    assert_eq!(run.stdout.last().map(String::as_str), Some("3000"));
    assert_eq!(run.exit, Some(json!(0)));
    let mut sorted = run.timestamps.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), run.timestamps.len(), "timestamps are unique");
    assert_eq!(run.late, 0);
}

#[tokio::test]
async fn long_lines_are_split_at_one_mebibyte() {
    let sandbox = Sandbox::start().await;
    let mut rpc = sandbox.rpc().await;
    let run = run(
        &mut rpc,
        "long",
        "head -c 2500000 /dev/zero | tr '\\0' x; echo; echo short",
        json!({}),
        "",
    )
    .await;
    let lengths: Vec<usize> = run.stdout.iter().map(String::len).collect();
    assert_eq!(lengths, [1 << 20, 1 << 20, 2_500_000 - (2 << 20), 5]);
}

#[tokio::test]
async fn start_is_idempotent_and_generates_missing_ids() {
    let sandbox = Sandbox::start().await;
    let mut rpc = sandbox.rpc().await;
    let (_, _, exit) = subscribe_process(&mut rpc, "same").await;
    assert_eq!(
        rpc.ok("process_start", json!(["same", "sleep 100", {}, ""]))
            .await,
        "same"
    );
    assert_eq!(
        rpc.ok("process_start", json!(["same", "echo second", {}, ""]))
            .await,
        "same"
    );
    rpc.ok("process_kill", json!(["same"])).await;
    let notification = rpc.notification().await;
    assert_eq!(crate::subscription_of(&notification), exit);

    let generated = rpc.ok("process_start", json!(["", "true", {}, ""])).await;
    let generated = generated.as_str().unwrap();
    assert_eq!(generated.len(), 20);

    // Once the first process exited, its ID can be used again (the first connection's
    // subscriptions would see it too, so a fresh connection watches).
    let mut other = sandbox.rpc().await;
    let again = run(&mut other, "same", "echo again", json!({}), "").await;
    assert_eq!(again.stdout, ["again"]);
}

#[tokio::test]
async fn processes_survive_disconnects_and_output_goes_to_every_subscriber() {
    let sandbox = Sandbox::start().await;
    let mut first = sandbox.rpc().await;
    first
        .ok(
            "process_start",
            json!(["shared", "read x; echo got $x", {}, ""]),
        )
        .await;
    drop(first);

    let mut second = sandbox.rpc().await;
    let mut third = sandbox.rpc().await;
    let (out2, err2, exit2) = subscribe_process(&mut second, "shared").await;
    let (out3, err3, exit3) = subscribe_process(&mut third, "shared").await;
    second.ok("process_stdin", json!(["shared", "hi\n"])).await;
    for (rpc, out, err, exit) in [
        (&mut second, out2, err2, exit2),
        (&mut third, out3, err3, exit3),
    ] {
        let run = collect(rpc, &out, &err, &exit).await;
        assert_eq!(run.stdout, ["got hi"]);
        assert_eq!(run.exit, Some(json!(0)));
    }
    assert!(third.quiet_for(Duration::from_millis(50)).await);
}

#[tokio::test]
async fn a_background_job_does_not_hold_the_exit_back() {
    let sandbox = Sandbox::start().await;
    let mut rpc = sandbox.rpc().await;
    let started = std::time::Instant::now();
    // The job inherits the output pipes and keeps them open far longer than the shell lives.
    let run = run(
        &mut rpc,
        "bg",
        "echo $$; sleep 30 & echo started",
        json!({}),
        "",
    )
    .await;
    assert_eq!(run.stdout[1], "started");
    assert_eq!(run.exit, Some(json!(0)));
    assert!(started.elapsed() < Duration::from_secs(10));
    let pgid = nix::unistd::Pid::from_raw(run.stdout[0].parse().unwrap());
    nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL).unwrap();
}

#[tokio::test]
async fn a_client_that_does_not_read_throttles_the_process() {
    let sandbox = Sandbox::start().await;
    let mut idle = sandbox.rpc().await;
    subscribe_process(&mut idle, "flood").await;
    // 4 KB lines, 800 MB in all, and a progress mark every thousand lines.
    let flood = r#"awk 'BEGIN { s = sprintf("%4000s", ""); for (i = 1; i <= 200000; i++) { print s; if (i % 1000 == 0) { print i > "progress"; close("progress") } } }'"#;
    idle.ok("process_start", json!(["flood", flood, {}, ""]))
        .await;
    let progress = sandbox.workdir.join("progress");
    let lines_written = || {
        std::fs::read_to_string(&progress)
            .ok()
            .and_then(|text| text.trim().parse::<u32>().ok())
            .unwrap_or(0)
    };
    eventually("output to start", || lines_written() > 0).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The connection's budget (16 MiB) and the socket and pipe buffers hold a few thousand
    // lines; everything else must still be unwritten.
    let written = lines_written();
    assert!(
        written < 20_000,
        "{written} lines were buffered for a client that reads nothing"
    );

    let mut other = sandbox.rpc().await;
    other.ok("process_kill", json!(["flood"])).await;
}

/// The first command of a sandbox runs in a login shell started ahead of time (first_shell.rs):
/// it must behave exactly as the next commands, started the ordinary way.
#[tokio::test]
async fn the_first_command_runs_like_every_other() {
    let sandbox = Sandbox::start_with_home(|home| {
        std::fs::write(
            home.join(".profile"),
            "export FROM_PROFILE=yes\necho profile-says-hi\ndate +%s%N >> ~/.profile-ran\n",
        )
        .unwrap();
    })
    .await;
    let mut rpc = sandbox.rpc().await;
    // The first shell starts once envd has answered its first ping: let it get ready.
    eventually("the first shell to read its profile", || {
        std::fs::read_to_string(sandbox.home.join(".profile-ran")).is_ok_and(|t| t.ends_with('\n'))
    })
    .await;
    let before_first = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let probe = r#"echo "$0|$-|$#|$PWD|$FROM_PROFILE|${BURROW_COMMAND-unset}"; shopt -q login_shell && echo login; ls /proc/$$/fd/3 2>/dev/null || echo no-fd-3; read -r line; echo "stdin:$line"; exit 7"#;
    let mut outputs = Vec::new();
    for id in ["first", "second"] {
        let (stdout, stderr, exit) = subscribe_process(&mut rpc, id).await;
        rpc.ok("process_start", json!([id, probe, {}, ""])).await;
        rpc.ok("process_stdin", json!([id, "typed\n"])).await;
        let run = collect(&mut rpc, &stdout, &stderr, &exit).await;
        assert_eq!(run.exit, Some(json!(7)), "{id}: {run:?}");
        outputs.push((run.stdout, run.stderr));
    }
    assert_eq!(outputs[0], outputs[1], "the first command ran differently");
    // The first command's profile ran before it was asked for (the shell was started ahead);
    // the second's after.
    let ran: Vec<u128> = std::fs::read_to_string(sandbox.home.join(".profile-ran"))
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(ran.len(), 2, "{ran:?}");
    assert!(
        ran[0] < before_first && ran[1] > before_first,
        "{ran:?} vs {before_first}"
    );
    let workdir = sandbox.workdir.display().to_string();
    assert_eq!(
        outputs[0].0,
        [
            "profile-says-hi".to_owned(),
            format!("/bin/bash|hBc|0|{workdir}|yes|unset"),
            "login".into(),
            "no-fd-3".into(),
            "stdin:typed".into(),
        ]
    );
}

/// A change before the first command (here: the profile, written over RPC) means the shell
/// started ahead read an outdated profile: the first command starts afresh and sees the change.
#[tokio::test]
async fn the_first_command_sees_changes_made_before_it() {
    let sandbox = Sandbox::start().await;
    let mut rpc = sandbox.rpc().await;
    let profile = sandbox.home.join(".profile").display().to_string();
    rpc.ok(
        "filesystem_write",
        json!([profile, "export FROM_PROFILE=written-first\n"]),
    )
    .await;
    let run = run(&mut rpc, "first", "echo $FROM_PROFILE", json!({}), "").await;
    assert_eq!(run.stdout, ["written-first"]);
}
