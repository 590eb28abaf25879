//! The benchmark tool (`tsbroker-bench`, BENCHMARKS.md) at tiny sizes, in this process, on both
//! stores: every scenario runs end to end in seconds and its results must be correct (no
//! errors, no duplicate sessions, an even spread). Speed is not checked here.

use std::time::Duration;
use tsbroker_bench::scenarios::{decisions, frontdoor, ingest, scale, storm};
use tsbroker_bench::{Context, ProcessMode, Report, StoreKind};

fn context(store: StoreKind) -> Context {
    Context::new(store, ProcessMode::InProcess)
}

fn only(reports: Vec<Report>) -> Report {
    assert_eq!(reports.len(), 1, "{reports:?}");
    reports.into_iter().next().expect("one report")
}

async fn decisions(store: StoreKind) {
    let options = decisions::Options {
        machines: 8,
        sessions: 400,
        concurrency: vec![1, 4],
        duration: Duration::from_millis(400),
        warmup: Duration::from_millis(100),
        join_concurrency: 4,
        ..decisions::Options::default()
    };
    let reports = decisions::run(&context(store), &options)
        .await
        .expect("decisions runs");
    assert_eq!(reports.len(), 2);
    for report in &reports {
        assert_eq!(report.get_u64("errors"), 0, "{}", report.line());
        assert!(report.get_f64("decisions_per_s") > 0.0, "{}", report.line());
        assert!(report.get_f64("echo_per_s") > 0.0, "{}", report.line());
        assert!(report.get_f64("ratio_to_echo") > 0.0, "{}", report.line());
    }
}

async fn storm(store: StoreKind) {
    let options = storm::Options {
        machines: 6,
        users: 240,
        // Slow enough that logons in flight stay far below the per-machine cap even on a
        // loaded CI machine (a machine at its cap is skipped, which would skew the spread).
        over: Duration::from_secs(3),
        ..storm::Options::default()
    };
    let report = only(
        storm::run(&context(store), &options)
            .await
            .expect("storm runs"),
    );
    assert_eq!(report.get_u64("errors"), 0, "{}", report.line());
    assert_eq!(report.get_u64("duplicates"), 0, "{}", report.line());
    assert_eq!(report.get_u64("missing"), 0, "{}", report.line());
    assert_eq!(report.get_u64("sessions"), 240, "{}", report.line());
    assert!(report.get_f64("spread") <= 1.0, "{}", report.line());
}

async fn ingest(store: StoreKind) {
    let options = ingest::Options {
        machines: 10,
        window: 8,
        duration: Duration::from_millis(500),
        warmup: Duration::from_millis(200),
        baseline_connections: 2,
    };
    let report = only(
        ingest::run(&context(store), &options)
            .await
            .expect("ingest runs"),
    );
    assert!(report.get_u64("acked_events") > 0, "{}", report.line());
    assert_eq!(report.get_u64("rejected"), 0, "{}", report.line());
    assert_eq!(report.get_u64("stream_ends"), 0, "{}", report.line());
    assert!(report.get_f64("raw_rows_per_s") > 0.0, "{}", report.line());
}

async fn scale(store: StoreKind) {
    let options = scale::Options {
        machines: 20,
        sessions: 1_000,
        join_concurrency: 8,
        concurrency: 4,
        duration: Duration::from_millis(300),
        ready_limit: Duration::from_secs(60),
        ..scale::Options::default()
    };
    let report = only(
        scale::run(&context(store), &options)
            .await
            .expect("scale runs"),
    );
    assert_eq!(report.get_u64("errors"), 0, "{}", report.line());
    assert_eq!(
        report.get_u64("after_restart_errors"),
        0,
        "{}",
        report.line()
    );
    assert!(report.get_f64("resync_s") >= 0.0, "{}", report.line());
    assert!(report.get_f64("rss_loaded_mib") > 0.0, "{}", report.line());
}

async fn frontdoor(store: StoreKind) {
    let options = frontdoor::Options {
        concurrency: 2,
        duration: Duration::from_millis(400),
        warmup: Duration::from_millis(100),
        users: 4,
        bulk_mib: 4,
        skip_haproxy: false,
        bursts: frontdoor::Bursts {
            connections: 40,
            rounds: 1,
            settle: Duration::from_millis(100),
        },
    };
    let reports = frontdoor::run(&context(store), &options)
        .await
        .expect("frontdoor runs");
    let paths: Vec<&str> = reports
        .iter()
        .filter(|report| report.scenario == "frontdoor")
        .filter_map(|report| report.get("path").and_then(|path| path.as_str()))
        .collect();
    let bursts: Vec<&Report> = reports
        .iter()
        .filter(|report| report.scenario == "frontdoor_burst")
        .collect();
    assert_eq!(bursts.len(), 2, "{reports:?}");
    for report in bursts {
        assert_eq!(report.get_u64("errors"), 0, "{}", report.line());
        assert_eq!(report.get_u64("connections"), 40, "{}", report.line());
    }
    assert_eq!(
        paths,
        ["direct", "haproxy", "tsagent_local", "tsagent_remote"]
    );
    for report in reports
        .iter()
        .filter(|report| report.scenario == "frontdoor")
    {
        assert_eq!(report.get_u64("errors"), 0, "{}", report.line());
        assert!(report.get_f64("conns_per_s") > 0.0, "{}", report.line());
        assert!(report.get("bulk_error").is_none(), "{}", report.line());
        assert!(report.get_f64("bulk_mib_per_s") > 0.0, "{}", report.line());
    }
    // HAProxy always runs as its own process: its CPU per connection is measured.
    let haproxy = reports
        .iter()
        .find(|report| report.get("path").and_then(|path| path.as_str()) == Some("haproxy"))
        .expect("a haproxy line");
    assert!(
        haproxy.get_f64("proxy_cpu_us_per_conn") >= 0.0,
        "{}",
        haproxy.line()
    );
}

macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(tsbroker_bench::StoreKind::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(tsbroker_bench::StoreKind::Postgres).await;
                }
            )*
        }
    };
}

on_both_stores!(decisions, storm, ingest, scale, frontdoor);

/// `bench/scripts/placement_batch_sqlite.py` (BENCHMARKS.md, tenth run) at a tiny size: it
/// builds its file from the broker's SQLite migrations, so a migration that renames what it
/// alters breaks it here, not in the next benchmark run.
#[test]
fn placement_batch_script_runs_on_the_current_migrations() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../bench/scripts/placement_batch_sqlite.py");
    let output = std::process::Command::new("python3")
        .arg(&script)
        .args(["--pending", "50", "--batches", "20", "--rounds", "1"])
        .output()
        .expect("python3 runs (scripts/install-test-deps.sh installs it)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let layouts: Vec<&str> = stdout
        .lines()
        .filter(|line| line.starts_with("round=1 "))
        .collect();
    assert_eq!(layouts.len(), 4, "{stdout}");
    for line in layouts {
        assert!(
            line.contains(" batch_us=") && line.contains(" refresh_200_of_1000_ms="),
            "{line}"
        );
        // 50 pending logons to start with, then 220 batches of 7 new ones.
        assert!(line.ends_with(" pending_at_refresh=1590"), "{line}");
    }
}

/// `tsbroker-bench decisions --tls` (BENCHMARKS.md, twenty-first run) as the binary runs it: the
/// broker it starts says it serves TLS, every call goes over it (none fails), and the result
/// line says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_run_over_tls() {
    // The tool keeps its brokers' logs under $TMPDIR/tsbroker-bench-logs.
    let tmp = tempfile::tempdir().unwrap();
    let line = run_tool(
        tmp.path(),
        &[
            "decisions",
            "--store",
            "sqlite",
            "--tls",
            "--machines",
            "8",
            "--sessions",
            "400",
            "--concurrency",
            "4",
            "--duration",
            "400ms",
        ],
    )
    .await;
    assert!(
        line.contains(" errors=0 ") && line.ends_with(" tls=on"),
        "{line}"
    );
    assert!(!line.contains(" decisions_per_s=0 "), "{line}");
    let logs = std::fs::read_dir(tmp.path().join("tsbroker-bench-logs"))
        .expect("the brokers' log directory")
        .flatten()
        .map(|entry| std::fs::read_to_string(entry.path()).unwrap_or_default())
        .collect::<String>();
    assert!(
        logs.contains("tls=\"on\""),
        "the broker did not serve TLS:\n{logs}"
    );
}

/// `tsbroker-bench revocation` (BENCHMARKS.md, twenty-second run) as the binary runs it, at 20
/// connections: they stay open while a list revoking nothing is taken up, and are all cut once
/// the list revokes their certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_cuts_every_connection_and_only_then() {
    let tmp = tempfile::tempdir().unwrap();
    let line = run_tool(
        tmp.path(),
        &[
            "revocation",
            "--store",
            "sqlite",
            "--connections",
            "20",
            "--window",
            "11s",
        ],
    )
    .await;
    assert!(line.contains(" connections=20 "), "{line}");
    assert!(line.contains(" recheck_cut_cpu_us_per_conn="), "{line}");
}

/// Runs the `tsbroker-bench` binary with `args` and `TMPDIR` at `tmp`; it must succeed. The
/// result line of its scenario (the first argument).
async fn run_tool(tmp: &std::path::Path, args: &[&str]) -> String {
    let output =
        tokio::process::Command::new(tsbroker_tests::binaries::workspace_binary("tsbroker-bench"))
            .env("TMPDIR", tmp)
            .args(args)
            .output()
            .await
            .expect("tsbroker-bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let scenario = format!("{} ", args[0]);
    stdout
        .lines()
        .find(|line| line.starts_with(&scenario))
        .unwrap_or_else(|| panic!("no {scenario}line: {stdout}"))
        .to_owned()
}
