//! What a client says of its user, end to end over real gRPC on both stores: names cut from an
//! `mstshash` cookie (mstsc keeps 9 characters) and names in user principal form find their
//! user's session; a cut name several users share, and a client that names no user at all
//! (mstsc with a collection's load-balancing info), are told apart by the client's address, as
//! are new users who share a cut name that is no one's.

use crate::support::{machine, on_both_stores, reason};
use tsbroker_common::proto::v1 as pb;
use tsbroker_common::proto::v1::agent_message::Body;
use tsbroker_tests::fake_agent::{machine as description, session};
use tsbroker_tests::{FakeAgent, TestDatabase, spawn_broker};

on_both_stores!(
    cut_and_principal_names_find_their_user,
    a_shared_cut_name_finds_the_user_whose_session_came_from_the_client,
    a_client_that_names_no_user_finds_the_one_user_with_sessions_from_its_address,
    people_who_share_a_cut_name_that_is_no_users_are_not_one_users_retries,
);

/// A Redirect as a front door asks it for a cookie of exactly 9 characters.
fn truncated(user: &str) -> pb::RedirectRequest {
    pb::RedirectRequest {
        user_name: user.to_owned(),
        farm: "farm".into(),
        user_name_may_be_truncated: true,
        ..Default::default()
    }
}

async fn cut_and_principal_names_find_their_user(database: &TestDatabase) {
    let broker = spawn_broker(&database.url, |_| {}).await;
    let mut client = broker.broker_client().await;
    let _a = FakeAgent::join(&broker.url(), description("ts-a", "farm", 100), vec![]).await;
    let _b = FakeAgent::join(
        &broker.url(),
        description("ts-b", "farm", 100),
        vec![
            session(1, "alexander.long", pb::SessionState::Disconnected),
            session(2, "bernadette.a", pb::SessionState::Disconnected),
            session(3, "bernadette.b", pb::SessionState::Disconnected),
            session(4, "ann", pb::SessionState::Disconnected),
            session(6, "mary ann lee", pb::SessionState::Disconnected),
            pb::SessionInfo {
                domain: "CORP".into(),
                ..session(5, "pmiller", pb::SessionState::Disconnected)
            },
            session(7, "erin", pb::SessionState::Disconnected),
        ],
    )
    .await;
    // erin@corp.example's only session is of another domain.
    let _c = FakeAgent::join(
        &broker.url(),
        description("ts-c", "farm", 100),
        vec![pb::SessionInfo {
            domain: "OTHER".into(),
            ..session(8, "erin@corp.example", pb::SessionState::Disconnected)
        }],
    )
    .await;
    let alexander = client
        .redirect(truncated("alexander"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            alexander.machine_name.as_str(),
            alexander.user_name.as_str()
        ),
        ("ts-b", "alexander.long")
    );
    let ambiguous = client
        .redirect(truncated("bernadett"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reason(&ambiguous),
        pb::RedirectReason::LoadBalanced,
        "an ambiguous prefix is an unknown user"
    );
    // mstsc cuts the whole cookie: `CORP\pmiller` arrives as `CORP\pmil`, flagged.
    let with_domain = pb::RedirectRequest {
        domain: "CORP".into(),
        ..truncated("pmil")
    };
    let pmiller = client.redirect(with_domain).await.unwrap().into_inner();
    assert_eq!(
        (
            pmiller.machine_name.as_str(),
            pmiller.user_name.as_str(),
            reason(&pmiller)
        ),
        ("ts-b", "pmiller", pb::RedirectReason::ExistingSession)
    );
    // A cut that falls just after a space keeps it: `mary ann lee` arrives as `mary ann `.
    let mary = client
        .redirect(truncated("mary ann "))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            mary.machine_name.as_str(),
            mary.user_name.as_str(),
            reason(&mary)
        ),
        ("ts-b", "mary ann lee", pb::RedirectReason::ExistingSession)
    );
    for (name, flagged) in [
        ("mary ann ", false),
        (" mary ann", true),
        ("         ", true),
    ] {
        let request = pb::RedirectRequest {
            user_name_may_be_truncated: flagged,
            ..truncated(name)
        };
        let refused = client.redirect(request).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{name:?}");
        assert!(refused.message().contains("user_name"), "{refused:?}");
    }
    let short = client
        .redirect(truncated("pmil"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reason(&short),
        pb::RedirectReason::LoadBalanced,
        "4 characters without a domain were not cut"
    );
    let untruncated = pb::RedirectRequest {
        user_name_may_be_truncated: false,
        ..truncated("alexander")
    };
    let plain = client.redirect(untruncated).await.unwrap().into_inner();
    assert_eq!(
        reason(&plain),
        pb::RedirectReason::LoadBalanced,
        "without the flag, names are exact"
    );

    // Windows clients send the name as typed, often `user@domain`; PAM reported the Linux
    // logon as `user`. The answer names the user as the directory knows them (the front door
    // then finds the session under that name), also from mstsc's 9 characters of it.
    let upn = |user: &str| pb::RedirectRequest {
        user_name_may_be_truncated: false,
        ..truncated(user)
    };
    for request in [
        upn("ann@example.com"),
        upn("ANN@corp.example"),
        truncated("ann@examp"),
    ] {
        let name = request.user_name.clone();
        let ann = client.redirect(request).await.unwrap().into_inner();
        assert_eq!(
            (
                ann.machine_name.as_str(),
                ann.user_name.as_str(),
                reason(&ann)
            ),
            ("ts-b", "ann", pb::RedirectReason::ExistingSession),
            "{name}"
        );
    }
    // With a domain, a user principal name whose sessions are all another domain's is its
    // user part, when that one has a session of the domain (or of none).
    for (user, domain, expected) in [
        ("CORP\\erin@corp.example", "", ("ts-b", "erin")),
        ("erin@corp.example", "corp", ("ts-b", "erin")),
        (
            "OTHER\\erin@corp.example",
            "",
            ("ts-c", "erin@corp.example"),
        ),
        ("erin@corp.example", "", ("ts-c", "erin@corp.example")),
    ] {
        let request = pb::RedirectRequest {
            domain: domain.into(),
            ..upn(user)
        };
        let erin = client.redirect(request).await.unwrap().into_inner();
        assert_eq!(
            (
                (erin.machine_name.as_str(), erin.user_name.as_str()),
                reason(&erin)
            ),
            (expected, pb::RedirectReason::ExistingSession),
            "{domain}\\{user}"
        );
    }
    // No session under either name: a new logon.
    let carl = client
        .redirect(upn("carl@example.com"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reason(&carl), pb::RedirectReason::LoadBalanced);
    broker.stop().await;
}

/// mstsc sends `CORPORATE\\jsmith` and `CORPORATE\\akim` both as `CORPORATE` (a domain of 9
/// characters fills the cookie). Two people logging on at once with it are placed each as a
/// new user, by the policy, not as one user's logon in flight; a client's retry (another port
/// of the same address) still finds its own logon in flight.
async fn people_who_share_a_cut_name_that_is_no_users_are_not_one_users_retries(
    database: &TestDatabase,
) {
    let broker = spawn_broker(&database.url, |_| {}).await;
    let client = broker.broker_client().await;
    let mut a = FakeAgent::join(&broker.url(), description("ts-a", "farm", 100), vec![]).await;
    let mut b = FakeAgent::join(&broker.url(), description("ts-b", "farm", 100), vec![]).await;
    let ask = |client_address: &str| {
        let request = pb::RedirectRequest {
            client_address: client_address.to_owned(),
            ..truncated("CORPORATE")
        };
        let mut client = client.clone();
        async move { client.redirect(request).await.unwrap().into_inner() }
    };
    let first = ask("10.0.0.7:50001").await;
    assert_eq!(reason(&first), pb::RedirectReason::LoadBalanced);
    let retry = ask("10.0.0.7:50002").await;
    assert_eq!(
        (retry.machine_name.as_str(), reason(&retry)),
        (
            first.machine_name.as_str(),
            pb::RedirectReason::PendingLogon
        )
    );
    let other = ask("10.0.0.8:50001").await;
    assert_eq!(
        reason(&other),
        pb::RedirectReason::LoadBalanced,
        "{other:?}"
    );
    assert_ne!(
        other.machine_name, first.machine_name,
        "the fewest sessions and logons in flight"
    );

    // The front door hands the first client to its machine's RDP service and reports the
    // session under the cut name, from the client's address: that logon in flight ends there
    // (it would otherwise hold a place in the machine's cap for its whole time to live); the
    // other client's stays.
    let agent = if first.machine_name == "ts-a" {
        &mut a
    } else {
        &mut b
    };
    let logon = pb::SessionEvent {
        r#type: pb::SessionEventType::Logon as i32,
        session: Some(session_from(5, "CORPORATE", "10.0.0.7:50001")),
    };
    agent.request(Body::SessionEvent(logon)).await.unwrap();
    let mut client = client.clone();
    let first_machine = machine(&mut client, "farm", &first.machine_name).await;
    let other_machine = machine(&mut client, "farm", &other.machine_name).await;
    assert_eq!(first_machine.pending_logons, 0);
    assert_eq!(other_machine.pending_logons, 1);
    broker.stop().await;
}

fn session_from(session_id: u32, user: &str, client: &str) -> pb::SessionInfo {
    pb::SessionInfo {
        client_address: client.to_owned(),
        ..session(session_id, user, pb::SessionState::Disconnected)
    }
}

async fn a_shared_cut_name_finds_the_user_whose_session_came_from_the_client(
    database: &TestDatabase,
) {
    let broker = spawn_broker(&database.url, |_| {}).await;
    let mut client = broker.broker_client().await;
    let mut a = FakeAgent::join(
        &broker.url(),
        description("ts-a", "farm", 100),
        vec![
            // Two users behind one address (a NAT): that address tells them apart no more
            // than the name does.
            session_from(1, "christopher.brown", "10.0.0.7:50001"),
            session_from(2, "christopher.white", "10.0.0.7:50002"),
        ],
    )
    .await;
    let _b = FakeAgent::join(
        &broker.url(),
        description("ts-b", "farm", 100),
        vec![
            session_from(1, "christopher.jones", "10.0.0.5:50000"),
            // PAM's PAM_RHOST: an address without a port.
            session_from(2, "christopher.smith", "10.0.0.6"),
        ],
    )
    .await;
    let from = |client: &str| pb::RedirectRequest {
        client_address: client.to_owned(),
        ..truncated("christoph")
    };
    for (client_address, machine, user) in [
        ("10.0.0.5:61000", "ts-b", "christopher.jones"),
        ("10.0.0.6:3390", "ts-b", "christopher.smith"),
        // A dual-stack listener sees an IPv4 client as IPv4-mapped.
        ("[::ffff:10.0.0.6]:4000", "ts-b", "christopher.smith"),
    ] {
        let answer = client.redirect(from(client_address)).await.unwrap();
        let answer = answer.into_inner();
        assert_eq!(
            (
                answer.machine_name.as_str(),
                answer.user_name.as_str(),
                reason(&answer)
            ),
            (machine, user, pb::RedirectReason::ExistingSession),
            "from {client_address}"
        );
    }

    // Two users behind 10.0.0.7, none from 10.0.0.9, and no address at all: the cut name
    // is nobody's, a new logon (placed under the name as cut).
    for client_address in ["10.0.0.7:50003", "10.0.0.9:1000", ""] {
        let answer = client.redirect(from(client_address)).await.unwrap();
        let answer = answer.into_inner();
        assert_ne!(
            reason(&answer),
            pb::RedirectReason::ExistingSession,
            "from {client_address:?}: {answer:?}"
        );
        assert_eq!(answer.user_name, "christoph", "from {client_address:?}");
    }

    // The session's address follows its reconnections: brown now connects from home.
    let reconnected = pb::SessionEvent {
        r#type: pb::SessionEventType::Reconnect as i32,
        session: Some(pb::SessionInfo {
            state: pb::SessionState::Unspecified as i32,
            ..session_from(1, "christopher.brown", "192.0.2.44:40000")
        }),
    };
    a.request(Body::SessionEvent(reconnected)).await.unwrap();
    a.disconnect(1, "christopher.brown").await.unwrap();
    let brown = client
        .redirect(from("192.0.2.44:40001"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (brown.machine_name.as_str(), brown.user_name.as_str()),
        ("ts-a", "christopher.brown")
    );
    // ... which leaves white the one user with a session from 10.0.0.7.
    let white = client
        .redirect(from("10.0.0.7:50004"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (white.user_name.as_str(), reason(&white)),
        ("christopher.white", pb::RedirectReason::ExistingSession)
    );

    // However many users share the cut name.
    let katherines = (1..=40)
        .map(|n| session_from(n, &format!("katherine.{n}"), &format!("10.1.0.{n}:4000")))
        .collect();
    let _c = FakeAgent::join(&broker.url(), description("ts-c", "farm", 100), katherines).await;
    let katherine = client
        .redirect(pb::RedirectRequest {
            client_address: "10.1.0.37:4001".into(),
            ..truncated("katherine")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (katherine.user_name.as_str(), reason(&katherine)),
        ("katherine.37", pb::RedirectReason::ExistingSession)
    );

    // A user whose whole name is the cut name, on another machine: theirs from anywhere but
    // where one of the longer names' sessions came from (there mstsc cut that user's name).
    let whole = vec![session_from(1, "christoph", "10.0.0.8:4000")];
    let _d = FakeAgent::join(&broker.url(), description("ts-d", "farm", 100), whole).await;
    for (client_address, machine, user) in [
        ("10.0.0.8:4001", "ts-d", "christoph"),
        ("10.0.0.9:4001", "ts-d", "christoph"),
        ("10.0.0.7:4001", "ts-a", "christopher.white"),
        ("10.0.0.5:4001", "ts-b", "christopher.jones"),
        ("", "ts-d", "christoph"),
    ] {
        let answer = client.redirect(from(client_address)).await.unwrap();
        let answer = answer.into_inner();
        assert_eq!(
            (answer.machine_name.as_str(), answer.user_name.as_str()),
            (machine, user),
            "from {client_address:?}"
        );
    }
    broker.stop().await;
}

async fn a_client_that_names_no_user_finds_the_one_user_with_sessions_from_its_address(
    database: &TestDatabase,
) {
    let broker = spawn_broker(&database.url, |_| {}).await;
    let mut client = broker.broker_client().await;
    let _a = FakeAgent::join(
        &broker.url(),
        description("ts-a", "farm", 100),
        vec![
            session_from(1, "dana", "10.0.0.7:50001"),
            session_from(2, "erin", "10.0.0.7:50002"),
        ],
    )
    .await;
    let mut b = FakeAgent::join(
        &broker.url(),
        description("ts-b", "farm", 100),
        vec![
            session_from(1, "frank", "[::ffff:10.0.0.5]:50000"),
            session_from(2, "gina", ""),
            session_from(3, "hank", ""),
        ],
    )
    .await;
    let anonymous = |client_address: &str| pb::RedirectRequest {
        farm: "farm".into(),
        client_address: client_address.to_owned(),
        ..Default::default()
    };
    // ts-b is the fuller machine: only frank's session sends this client there.
    let frank = client.redirect(anonymous("10.0.0.5:61000")).await.unwrap();
    let frank = frank.into_inner();
    assert_eq!(
        (
            frank.machine_name.as_str(),
            frank.user_name.as_str(),
            reason(&frank)
        ),
        ("ts-b", "frank", pb::RedirectReason::ExistingSession)
    );
    // Two users behind 10.0.0.7, nobody from 10.0.0.9, no address: new logons as before.
    for client_address in ["10.0.0.7:3000", "10.0.0.9:3000", ""] {
        let answer = client.redirect(anonymous(client_address)).await.unwrap();
        let answer = answer.into_inner();
        assert_eq!(
            (answer.user_name.as_str(), reason(&answer)),
            ("", pb::RedirectReason::LoadBalanced),
            "from {client_address:?}"
        );
    }
    // What is not an address is refused, naming the field (it would match nobody).
    for bad in ["garbage", "10.0.0.5:99999", "localhost:3389"] {
        let refused = client.redirect(anonymous(bad)).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{bad}");
        assert!(refused.message().contains("client_address"), "{refused:?}");
    }
    // Once frank logs off, his address is nobody's.
    b.logoff(1, "frank").await.unwrap();
    let after = client.redirect(anonymous("10.0.0.5:61001")).await.unwrap();
    assert_eq!(
        reason(&after.into_inner()),
        pb::RedirectReason::LoadBalanced
    );
    broker.stop().await;
}
