//! The agent raises its soft open-files limit to what its front door needs, within the hard
//! one: a shell's or a container's default soft limit (often 1024) held the front door to 480
//! connections. A test binary of its own: it changes the process's limit.

use rlimit::Resource;

#[test]
fn the_soft_open_files_limit_is_raised_to_what_the_front_door_needs() {
    let (_, hard) = rlimit::getrlimit(Resource::NOFILE).unwrap();
    // 1,000 connections: two descriptors each, and 64 kept for the rest.
    let needed = 2_064;
    assert!(
        hard >= needed,
        "this test needs a hard open-files limit of {needed} (it is {hard})"
    );
    rlimit::setrlimit(Resource::NOFILE, 256, hard).unwrap();
    let allowed = tsagent::front_door::descriptors::connections_allowed(1_000);
    assert_eq!(allowed, 1_000);
    let (soft, _) = rlimit::getrlimit(Resource::NOFILE).unwrap();
    assert!(soft >= needed, "soft limit {soft}");
}
