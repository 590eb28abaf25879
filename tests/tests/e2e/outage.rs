//! The database going away while the broker runs, through a TCP relay between the broker and
//! PostgreSQL that the test cuts and restores: returning users keep being sent to their
//! session from the directory in memory (their machines' leases, stopped by the outage, still
//! count; before the broker notices the outage, the last session known), a user whose logon
//! this broker placed just before is sent to the same machine again, new users hear UNAVAILABLE before a front door would stop waiting (3 s)
//! and health says NOT_SERVING, agents are turned away with a hint to come back within a
//! second; once the database is back, a machine whose agent has not reconnected yet still
//! counts for its users, agents join again and new logons are placed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use tonic_health::pb::health_check_response::ServingStatus;
use tsbroker_common::proto::v1 as pb;
use tsbroker_tests::database::TestDatabase;
use tsbroker_tests::fake_agent::{machine, session};

use crate::support::{counter, eventually, reason, redirect, scrape};

/// How long a front door waits for a redirect before it sends the user to its own RDP service.
const FRONT_DOOR_WAIT: Duration = Duration::from_secs(3);

/// Relays TCP connections to the database; `cut` closes them all and turns new ones away.
pub(crate) struct DatabaseLink {
    address: std::net::SocketAddr,
    cut: Arc<AtomicBool>,
    relays: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl DatabaseLink {
    async fn start(target: String) -> DatabaseLink {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let relays: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let accept = tokio::spawn({
            let (cut, relays) = (cut.clone(), relays.clone());
            async move {
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else {
                        continue;
                    };
                    if cut.load(Ordering::SeqCst) {
                        continue; // dropped: the connection closes at once
                    }
                    let target = target.clone();
                    let relay = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(&target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    relays.lock().unwrap().push(relay.abort_handle());
                }
            }
        })
        .abort_handle();
        DatabaseLink {
            address,
            cut,
            relays,
            accept,
        }
    }

    pub(crate) fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for relay in self.relays.lock().unwrap().drain(..) {
            relay.abort();
        }
    }

    pub(crate) fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    /// As a database server that stopped: its connections cut, new ones refused (for good).
    fn stop_listening(&self) {
        self.accept.abort();
        self.cut();
    }
}

impl Drop for DatabaseLink {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// The `host:port` of `postgres://user@host:port/db`, and a function giving the same URL
/// through another address.
fn split_url(url: &str) -> (String, impl Fn(std::net::SocketAddr) -> String + '_) {
    let (scheme, rest) = url.split_once("://").expect("scheme");
    let (credentials, rest) = rest.rsplit_once('@').expect("user@");
    let (host_port, path) = rest.split_once('/').expect("/database");
    (host_port.to_owned(), move |address| {
        format!("{scheme}://{credentials}@{address}/{path}")
    })
}

/// A PostgreSQL database, a relay to it, and a broker (with `adjust`) that reaches the database
/// through the relay only.
pub(crate) async fn broker_through_a_link(
    adjust: impl FnOnce(&mut tsbroker::BrokerConfig),
) -> (TestDatabase, DatabaseLink, tsbroker_tests::TestBroker) {
    let database = TestDatabase::postgres().await;
    let (target, through) = split_url(&database.url);
    let link = DatabaseLink::start(target).await;
    let url = through(link.address);
    drop(through);
    let broker = tsbroker_tests::spawn_broker(&url, adjust).await;
    (database, link, broker)
}

pub(crate) async fn health(broker: &tsbroker_tests::TestBroker) -> i32 {
    tonic_health::pb::health_client::HealthClient::new(broker.channel().await)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .map(|answer| answer.into_inner().status)
        .unwrap_or_default()
}

/// Keeps the machine's lease fresh (a load report every 300 ms) while its stream lasts.
fn keep_alive(mut agent: tsbroker_tests::FakeAgent) {
    tokio::spawn(async move {
        while agent.heartbeat().await.is_ok() {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
}

/// ts-a with alice's disconnected session and an empty ts-b join, their leases kept fresh;
/// returns once alice is sent to ts-a.
pub(crate) async fn join_ts_a_with_alice_and_ts_b(
    broker: &tsbroker_tests::TestBroker,
    client: &tsbroker_common::proto::v1::broker_client::BrokerClient<tonic::transport::Channel>,
) {
    keep_alive(
        tsbroker_tests::FakeAgent::join(
            &broker.url(),
            machine("ts-a", "farm", 100),
            vec![session(1, "alice", pb::SessionState::Disconnected)],
        )
        .await,
    );
    keep_alive(
        tsbroker_tests::FakeAgent::join(&broker.url(), machine("ts-b", "farm", 100), vec![]).await,
    );
    eventually(10, || async {
        redirect(&mut client.clone(), "farm", "alice")
            .await
            .is_ok_and(|alice| alice.machine_name == "ts-a")
    })
    .await;
}

#[tokio::test]
async fn when_the_database_goes_away_returning_users_still_find_their_session() {
    let metrics_port = tsbroker_tests::process::free_port();
    let (database, link, broker) = broker_through_a_link(|config| {
        config.heartbeat_timeout = Duration::from_secs(5);
        config.metrics_listen = Some(format!("127.0.0.1:{metrics_port}").parse().unwrap());
    })
    .await;
    let mut client = broker.broker_client().await;
    join_ts_a_with_alice_and_ts_b(&broker, &client).await;

    let from_memory = |metrics: &str| {
        ["memory", "memory_degraded"]
            .iter()
            .map(|kind| {
                counter(
                    metrics,
                    &[
                        "tsbroker_session_lookups_total",
                        &format!("kind=\"{kind}\""),
                    ],
                )
            })
            .sum::<f64>()
    };
    // bob's logon goes out just before the outage; it has not shown up when he retries.
    let bob = redirect(&mut client, "farm", "bob").await.unwrap();
    assert_eq!(reason(&bob), pb::RedirectReason::LoadBalanced);
    let bob_retries = |client: pb::broker_client::BrokerClient<tonic::transport::Channel>| {
        let expected = bob.machine_name.clone();
        async move {
            let started = Instant::now();
            let again = redirect(&mut client.clone(), "farm", "bob").await.unwrap();
            assert!(
                started.elapsed() < FRONT_DOOR_WAIT,
                "{:?}",
                started.elapsed()
            );
            assert_eq!(
                (again.machine_name.as_str(), reason(&again)),
                (expected.as_str(), pb::RedirectReason::PendingLogon),
                "bob's retry goes where his logon went, not to a second session"
            );
        }
    };
    let before = from_memory(&scrape(metrics_port).await);
    link.cut();
    let started = Instant::now();
    let newcomer = redirect(&mut client, "farm", "newcomer").await.unwrap_err();
    assert_eq!(newcomer.code(), tonic::Code::Unavailable, "{newcomer:?}");
    assert!(
        started.elapsed() < FRONT_DOOR_WAIT,
        "a new logon's UNAVAILABLE took {:?}",
        started.elapsed()
    );
    bob_retries(client.clone()).await;
    // Long enough for failed lease refreshes (which used to take the directory down) and for
    // the machines' leases to go stale (their agents' load reports cannot be written).
    tokio::time::sleep(Duration::from_secs(9)).await;
    for _ in 0..3 {
        let started = Instant::now();
        let alice = redirect(&mut client, "farm", "alice").await.unwrap();
        assert!(
            started.elapsed() < FRONT_DOOR_WAIT,
            "alice's answer took {:?}",
            started.elapsed()
        );
        assert_eq!(alice.machine_name, "ts-a");
        assert_eq!(reason(&alice), pb::RedirectReason::ExistingSession);
    }
    // From memory: the directory (the outage's leases still count once the broker has seen it
    // away) or, before that, the last session known.
    let answered = from_memory(&scrape(metrics_port).await) - before;
    assert!(answered >= 3.0, "{answered} answers from memory");
    eventually(15, || async {
        health(&broker).await == ServingStatus::NotServing as i32
    })
    .await;
    // Known away now: still bob's machine.
    bob_retries(client.clone()).await;

    // Queries and admin changes too, rather than after the connection pool's wait.
    let started = Instant::now();
    let listing = client
        .list_sessions(pb::ListSessionsRequest {
            farm: "farm".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(listing.code(), tonic::Code::Unavailable, "{listing:?}");
    let drain = broker
        .admin_client()
        .await
        .drain_machine(crate::support::by_name("farm", "ts-b"))
        .await
        .unwrap_err();
    assert_eq!(drain.code(), tonic::Code::Unavailable, "{drain:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    // Agents are turned away at once, told to come back soon (not after their backoff).
    let started = Instant::now();
    let refused = tsbroker_tests::FakeAgent::connect(&broker.url(), machine("ts-c", "farm", 100))
        .await
        .err()
        .expect("no stream while the database is away");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert_eq!(
        refused
            .metadata()
            .get(tsbroker_common::proto::RETRY_AFTER_MS_METADATA)
            .and_then(|value| value.to_str().ok()),
        Some("1000")
    );
    assert!(
        started.elapsed() < FRONT_DOOR_WAIT,
        "{:?}",
        started.elapsed()
    );

    // carol logged on at ts-c while the database was away; its agent gets back in as soon as
    // the broker lets it. Her client asks the moment the database answers again, before the
    // broker has seen it back: she is not a new user, the broker waits for the agents'
    // resyncs before placing anyone.
    link.restore();
    let url = broker.url();
    let resynced = tokio::spawn(async move {
        loop {
            let description = machine("ts-c", "farm", 100);
            if let Ok(mut agent) = tsbroker_tests::FakeAgent::connect(&url, description).await
                && agent
                    .resync(vec![session(3, "carol", pb::SessionState::Active)])
                    .await
                    .is_ok()
                && agent.ready().await.is_ok()
            {
                return agent;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let carol = redirect(&mut client, "farm", "carol").await.unwrap();
    assert_eq!(
        (carol.machine_name.as_str(), reason(&carol)),
        ("ts-c", pb::RedirectReason::ExistingSession)
    );
    keep_alive(resynced.await.unwrap());
    eventually(30, || async {
        health(&broker).await == ServingStatus::Serving as i32
    })
    .await;
    // Back: ts-a's agent has not reconnected yet (its stream ended when its writes failed),
    // but its lease was fresh when the outage began: alice still goes to her session, not to a
    // new logon elsewhere.
    let alice = redirect(&mut client, "farm", "alice").await.unwrap();
    assert_eq!(
        (alice.machine_name.as_str(), reason(&alice)),
        ("ts-a", pb::RedirectReason::ExistingSession)
    );
    // The agents come back and the newcomer is placed.
    let mut rejoined = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while rejoined.is_none() {
        assert!(Instant::now() < deadline, "ts-b could not join again");
        if let Ok(mut agent) =
            tsbroker_tests::FakeAgent::connect(&broker.url(), machine("ts-b", "farm", 100)).await
            && agent.resync(vec![]).await.is_ok()
            && agent.ready().await.is_ok()
        {
            rejoined = Some(agent);
        } else {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    keep_alive(rejoined.unwrap());
    eventually(30, || async {
        redirect(&mut client.clone(), "farm", "newcomer")
            .await
            .is_ok_and(|answer| reason(&answer) == pb::RedirectReason::LoadBalanced)
    })
    .await;
    broker.stop().await;
    drop(link);
    database.drop_database().await;
}

/// Another client holds a table the agents' writes need (a long migration, a stuck script):
/// the database still answers the health check, but no machine's lease can be written. The
/// leases that were fresh when the writes began to fail still count, so a returning user is
/// still sent to their session, not placed anew as if their machine were gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_a_locked_table_stops_the_agents_writes_returning_users_still_find_their_session() {
    use sqlx::Connection;
    let database = TestDatabase::postgres().await;
    let broker = tsbroker_tests::spawn_broker(&database.url, |config| {
        config.heartbeat_timeout = Duration::from_secs(2);
    })
    .await;
    let mut client = broker.broker_client().await;
    join_ts_a_with_alice_and_ts_b(&broker, &client).await;

    let mut locker = sqlx::PgConnection::connect(&database.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    // SHARE: the machines can be read (the database's answer comes at once) but not written
    // (no lease is refreshed).
    sqlx::query("LOCK TABLE machines IN SHARE MODE")
        .execute(&mut locker)
        .await
        .unwrap();
    // Three heartbeat timeouts: the load reports wait for the lock and fail. Two health
    // checks (every 5 s): their write probe waits for the lock too, and it is not an outage.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(
        health(&broker).await,
        ServingStatus::Serving as i32,
        "the database answers"
    );
    let alice = redirect(&mut client, "farm", "alice").await.unwrap();
    assert_eq!(
        (alice.machine_name.as_str(), reason(&alice)),
        ("ts-a", pb::RedirectReason::ExistingSession)
    );
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    broker.stop().await;
    database.drop_database().await;
}

/// The database dropped and made again (here: its schema) under the running broker answers,
/// but has none of the broker's tables: health says NOT_SERVING, with why, instead of SERVING
/// while every decision fails INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_without_the_brokers_tables_is_not_served() {
    use sqlx::Connection;
    let database = TestDatabase::postgres().await;
    let broker = tsbroker_tests::spawn_broker(&database.url, |_| {}).await;
    eventually(10, || async {
        health(&broker).await == ServingStatus::Serving as i32
    })
    .await;
    let mut operator = sqlx::PgConnection::connect(&database.url).await.unwrap();
    sqlx::query("DROP SCHEMA public CASCADE")
        .execute(&mut operator)
        .await
        .unwrap();
    sqlx::query("CREATE SCHEMA public")
        .execute(&mut operator)
        .await
        .unwrap();
    eventually(10, || async {
        health(&broker).await == ServingStatus::NotServing as i32
    })
    .await;
    broker.stop().await;
}

/// A broker stopped (SIGTERM) while the database is away: its agents are told it is going at
/// once, so they move to another replica, and it stops well within its grace (it waited all of
/// it: marking each machine unreachable waited for the database).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_stopped_while_the_database_is_away_lets_its_agents_go_at_once() {
    let (database, link, broker) = broker_through_a_link(|config| {
        config.heartbeat_timeout = Duration::from_secs(30);
    })
    .await;
    let mut agent =
        tsbroker_tests::FakeAgent::join(&broker.url(), machine("ts-a", "farm", 100), vec![]).await;
    link.stop_listening();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    let stopping = tokio::spawn(broker.stop());
    let command = agent.next_command(Duration::from_secs(5)).await;
    assert!(
        matches!(
            command.as_ref().and_then(|command| command.body.as_ref()),
            Some(pb::broker_message::Body::Shutdown(_))
        ),
        "{command:?} after {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "told after {:?}",
        started.elapsed()
    );
    stopping.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stopped after {:?} (grace 10 s)",
        started.elapsed()
    );
    drop(link);
    database.drop_database().await;
}

/// The database back for half a second in the middle of an outage (a restart that failed again):
/// returning users are answered within the front door's wait all along, at once once the broker
/// has seen the outage again, and after it alice is still sent to her session on ts-a, whose
/// agent had no time to get back in during the half second. (That the outage then counts from
/// its first beginning is shown by `Reachability`'s unit test: these fake agents' leases pass
/// on the old rule too.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moment_of_database_in_an_outage_does_not_end_it() {
    let (database, link, broker) = broker_through_a_link(|config| {
        config.heartbeat_timeout = Duration::from_secs(3);
    })
    .await;
    let client = broker.broker_client().await;
    join_ts_a_with_alice_and_ts_b(&broker, &client).await;

    let alice_within_wait = |client: pb::broker_client::BrokerClient<tonic::transport::Channel>| async move {
        let started = Instant::now();
        let alice = redirect(&mut client.clone(), "farm", "alice").await;
        assert!(
            started.elapsed() < FRONT_DOOR_WAIT,
            "alice's answer took {:?}: {alice:?}",
            started.elapsed()
        );
        let alice = alice.unwrap();
        assert_eq!(
            (alice.machine_name.as_str(), reason(&alice)),
            ("ts-a", pb::RedirectReason::ExistingSession)
        );
    };
    link.cut();
    eventually(15, || async {
        health(&broker).await == ServingStatus::NotServing as i32
    })
    .await;
    // Back for a moment: the broker sees it (health SERVING), the agents do not get in.
    link.restore();
    eventually(10, || async {
        health(&broker).await == ServingStatus::Serving as i32
    })
    .await;
    link.cut();
    // Until the broker notices the outage again, and past the heartbeat timeout.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until || health(&broker).await != ServingStatus::NotServing as i32 {
        alice_within_wait(client.clone()).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The outage is the first one going on: ts-a's lease, fresh when it began, counts, and
    // alice is answered from the directory at once (a lease taken for stale has the database
    // asked for a second first).
    for _ in 0..3 {
        let started = Instant::now();
        alice_within_wait(client.clone()).await;
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "alice's answer took {:?}",
            started.elapsed()
        );
    }
    link.restore();
    eventually(30, || async {
        health(&broker).await == ServingStatus::Serving as i32
    })
    .await;
    // ts-a's agent has not come back (its stream ended with the outage): its lease, fresh when
    // the outage first began, still counts for a timeout after it.
    alice_within_wait(client.clone()).await;
    broker.stop().await;
    drop(link);
    database.drop_database().await;
}
