//! A broker out of file descriptors: it pauses its accepting instead of spinning on the
//! failure, says so once, and serves again when connections close. Started with a low soft
//! limit under a higher hard one, it raises the soft one first.

use std::process::Command;
use std::time::Duration;

use tsbroker_tests::binaries::workspace_binary;
use tsbroker_tests::process::{broker_process, free_port, in_shell};

/// CPU time (user + system) the process has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("process is running");
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let after_name = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of the line (utime, stime) are the 12th and 13th after the name.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn clock_ticks_per_second() -> u64 {
    let output = Command::new("getconf").arg("CLK_TCK").output().unwrap();
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_broker_pauses_says_so_and_serves_again() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // 64 descriptors: enough for the broker's own files and pools, not for 100 clients.
    let (mut broker, log) = broker_process(dir.path(), port, |binary, args| {
        in_shell("ulimit -n 64", binary, args)
    })
    .await;

    // More connections than descriptors: the kernel completes them all (the listen backlog),
    // the broker can accept only some.
    let address = format!("127.0.0.1:{port}");
    let mut clients = Vec::new();
    for _ in 0..100 {
        clients.push(tokio::net::TcpStream::connect(&address).await.unwrap());
    }
    assert!(
        log.wait_for(
            "cannot accept connections",
            1,
            Duration::from_secs(10),
            Some(&mut broker)
        )
        .await,
        "{}",
        log.tail(20)
    );

    // While out of descriptors it waits between attempts: a busy loop would use a whole core.
    let ticks_per_second = clock_ticks_per_second();
    let before = cpu_ticks(broker.pid());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = cpu_ticks(broker.pid()) - before;
    assert!(
        used < ticks_per_second * 3 / 5,
        "{used} ticks of CPU in 3 s ({ticks_per_second} a second) while out of descriptors"
    );
    assert_eq!(
        log.count("cannot accept connections"),
        1,
        "one warning for the whole shortage: {}",
        log.tail(20)
    );

    // The clients go away: the broker accepts (and serves) again within its longest pause.
    drop(clients);
    let output = tokio::task::spawn_blocking(move || {
        Command::new(workspace_binary("tsbroker"))
            .args(["--health-check", "--listen", &address])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "health check after the shortage: {} {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        log.tail(20)
    );
    assert!(
        log.wait_for(
            "accepting connections again",
            1,
            Duration::from_secs(5),
            Some(&mut broker)
        )
        .await,
        "{}",
        log.tail(20)
    );
}

/// `Max open files` of a process: (soft, hard), `None` for unlimited.
fn open_files(pid: u32) -> (Option<u64>, Option<u64>) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .unwrap();
    let mut values = line["Max open files".len()..]
        .split_whitespace()
        .map(|value| value.parse().ok());
    (values.next().flatten(), values.next().flatten())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_raises_its_soft_open_files_limit_to_the_hard_one() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // A shell's default: 1024 soft (here 256), a higher hard limit.
    let (broker, _log) = broker_process(dir.path(), port, |binary, args| {
        in_shell("ulimit -S -n 256", binary, args)
    })
    .await;
    let (soft, hard) = open_files(broker.pid());
    assert!(
        hard.is_none_or(|hard| hard > 256),
        "the hard limit is {hard:?}"
    );
    assert_eq!(soft, hard);
}
