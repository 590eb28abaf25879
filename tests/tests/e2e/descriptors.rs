//! A broker out of file descriptors: it pauses its accepting instead of spinning on the
//! failure, says so once, and serves again when connections close.

use std::process::Command;
use std::time::Duration;

use tsbroker_tests::binaries::workspace_binary;
use tsbroker_tests::process::{broker_process, free_port};

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
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg("ulimit -n 64 && exec \"$0\" \"$@\"")
            .arg(binary)
            .args(args);
        command
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
