//! Tests of the table's rules and of its persistence.

use std::time::Duration;

use super::*;
use tsbroker_common::model::SessionEventKind::{Disconnect, Logoff, Logon, Reconnect};

fn request(user: &str, session_id: Option<u32>) -> SessionRequest {
    SessionRequest {
        user_name: user.to_owned(),
        session_id,
        ..Default::default()
    }
}

/// A connection that ended well within the default grace, and one that outlasted it.
const SHORT: Option<Duration> = Some(Duration::from_secs(2));
const LONG: Option<Duration> = Some(Duration::from_secs(45));

pub(super) fn drain(events: &mut DirectoryEvents) -> Vec<(SessionEventKind, u32, String)> {
    let mut seen = Vec::new();
    while let Ok(event) = events.try_recv() {
        seen.push((
            event.kind,
            event.session.session_id,
            event.session.user_name,
        ));
    }
    seen
}

/// Whether the user's session is unconfirmed; `None` when the user has none.
fn unconfirmed(directory: &Directory, user: &str) -> Option<bool> {
    let records = directory.list();
    let record = records.into_iter().find(|record| record.user_name == user);
    record.map(|record| record.unconfirmed)
}

/// The users whose sessions ended (LOGOFF) in the events so far.
fn logoffs(events: &mut DirectoryEvents) -> Vec<String> {
    let ended = drain(events)
        .into_iter()
        .filter(|(kind, _, _)| *kind == Logoff);
    ended.map(|(_, _, user)| user).collect()
}

#[test]
fn logon_without_id_allocates_and_events_are_numbered() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, mut events) = Directory::open(dir.path()).unwrap();
    let first = directory.apply(Logon, request("alice", None)).unwrap();
    let second = directory.apply(Logon, request("bob", None)).unwrap();
    assert_eq!(first.session_id, FIRST_ALLOCATED_SESSION_ID);
    assert_eq!(second.session_id, FIRST_ALLOCATED_SESSION_ID + 1);
    let first_event = events.try_recv().unwrap();
    let second_event = events.try_recv().unwrap();
    assert_eq!((first_event.version, second_event.version), (1, 2));
    assert_eq!(directory.snapshot().0, 2);
}

#[test]
fn events_without_id_act_on_the_users_most_recent_session() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, mut events) = Directory::open(dir.path()).unwrap();
    directory.apply(Logon, request("alice", Some(10))).unwrap();
    directory.apply(Logon, request("alice", Some(11))).unwrap();
    let disconnected = directory.apply(Disconnect, request("ALICE", None)).unwrap();
    assert_eq!(disconnected.state, RecordState::Disconnected);
    // Reconnect prefers the disconnected session.
    let reconnected = directory.apply(Reconnect, request("alice", None)).unwrap();
    assert_eq!(reconnected.session_id, disconnected.session_id);
    let logged_off = directory.apply(Logoff, request("alice", Some(10))).unwrap();
    assert_eq!(logged_off.session_id, 10);
    assert_eq!(directory.list().len(), 1);
    assert_eq!(
        directory.apply(Logoff, request("alice", Some(10))),
        Err(DirectoryError::NoSuchSession(
            "10 for user \"alice\"".into()
        ))
    );
    assert!(matches!(
        directory.apply(Disconnect, request("bob", Some(11))),
        Err(DirectoryError::WrongUser { .. })
    ));
    assert!(directory.apply(Logoff, request("carol", None)).is_err());
    assert_eq!(drain(&mut events).len(), 5);
}

#[test]
fn unknown_session_reported_disconnected_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, mut events) = Directory::open(dir.path()).unwrap();
    let record = directory
        .apply(Disconnect, request("dave", Some(12)))
        .unwrap();
    assert_eq!(record.state, RecordState::Disconnected);
    let kinds: Vec<_> = drain(&mut events).into_iter().map(|e| e.0).collect();
    assert_eq!(kinds, vec![Logon, Disconnect]);
}

#[test]
fn bad_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, _events) = Directory::open(dir.path()).unwrap();
    assert!(matches!(
        directory.apply(Logon, request("", None)),
        Err(DirectoryError::Invalid(_))
    ));
    assert!(directory.apply(Logon, request("a\u{7}b", None)).is_err());
    assert!(directory.front_door_attach("", "", "").is_none());
}

#[test]
fn the_front_doors_loopback_hop_does_not_replace_the_clients_address() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, _events) = Directory::open(dir.path()).unwrap();
    let with_address = |user: &str, session_id, address: &str| SessionRequest {
        client_address: address.to_owned(),
        ..request(user, session_id)
    };
    let attached = directory
        .front_door_attach("christoph", "", "10.0.0.9:5000")
        .unwrap();
    // xrdp behind the front door sees the front door's connection: PAM_RHOST is loopback.
    let merged = directory
        .apply(
            Logon,
            with_address("christopher.jones", Some(12), "127.0.0.1"),
        )
        .unwrap();
    assert_eq!(merged.client_address, "10.0.0.9:5000");
    directory.front_door_detach(attached, LONG);
    let again = directory
        .apply(
            Reconnect,
            with_address("christopher.jones", Some(12), "::1"),
        )
        .unwrap();
    assert_eq!(again.client_address, "10.0.0.9:5000");
    // A real address replaces it; a loopback one is never kept, even where nothing better is
    // known (it would steer clients that reach a front door from this host to the session).
    let moved = directory
        .apply(
            Reconnect,
            with_address("christopher.jones", Some(12), "192.0.2.7"),
        )
        .unwrap();
    assert_eq!(moved.client_address, "192.0.2.7");
    let local = directory
        .apply(Logon, with_address("root", Some(13), "127.0.0.1"))
        .unwrap();
    assert_eq!(local.client_address, "");
    // Not an address at all: left out, the logon still counts.
    let odd = directory
        .apply(Logon, with_address("eve", Some(14), "not-an-address"))
        .unwrap();
    assert_eq!((odd.session_id, odd.client_address.as_str()), (14, ""));
}

#[test]
fn a_cut_cookie_two_users_share_attaches_the_session_from_the_clients_address() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, _events) = Directory::open(dir.path()).unwrap();
    let logon = |user: &str, session_id, address: &str| SessionRequest {
        client_address: address.to_owned(),
        ..request(user, Some(session_id))
    };
    for (user, session_id, address) in [
        ("christopher.jones", 12, "10.0.0.5"),
        ("christopher.smith", 13, "10.0.0.6"),
    ] {
        directory
            .apply(Logon, logon(user, session_id, address))
            .unwrap();
        directory
            .apply(Disconnect, request(user, Some(session_id)))
            .unwrap();
    }
    let address_of = |session_id| {
        let sessions = directory.list();
        let record = sessions
            .iter()
            .find(|record| record.session_id == session_id);
        record.unwrap().client_address.clone()
    };
    // smith's session is the newer: without the address, the cookie would attach it.
    let jones = directory
        .front_door_attach("christoph", "", "10.0.0.5:40000")
        .unwrap();
    assert_eq!(jones.session_id, 12);
    assert_eq!(address_of(12), "10.0.0.5:40000");
    directory.front_door_detach(jones, LONG);
    // From an address neither has: a guess, which lends its address to nobody.
    let guess = directory
        .front_door_attach("christoph", "", "10.0.0.9:40000")
        .unwrap();
    assert_eq!(
        (address_of(12), address_of(13)),
        ("10.0.0.5:40000".to_owned(), "10.0.0.6".to_owned())
    );
    directory.front_door_detach(guess, LONG);
}

#[test]
fn a_second_connection_that_ends_leaves_the_first_holding_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, mut events) = Directory::open(dir.path()).unwrap();
    directory.apply(Logon, request("conf", Some(10))).unwrap();
    let first = directory
        .front_door_attach("conf", "", "10.0.0.1:1000")
        .unwrap();
    // A second client for the same user that gives up at once (a probe, a wrong password).
    let second = directory
        .front_door_attach("conf", "", "10.0.0.2:2000")
        .unwrap();
    drain(&mut events);
    directory.front_door_detach(second, SHORT);
    let record = directory.list().remove(0);
    assert_eq!(
        (record.state, record.client_address.as_str()),
        (RecordState::Active, "10.0.0.1:1000"),
        "still connected through the first"
    );
    assert_eq!(drain(&mut events), vec![(Reconnect, 10, "conf".into())]);
    directory.front_door_detach(first, LONG);
    assert_eq!(directory.list()[0].state, RecordState::Disconnected);
    assert_eq!(drain(&mut events), vec![(Disconnect, 10, "conf".into())]);
}

/// mstsc cuts the whole cookie: `CORP\\kwilliams` arrives as user `kwil` of domain `CORP`,
/// `mary ann lee` as `mary ann ` (the space is the cut name's). Both find their user's session
/// here as the broker does (a connection another front door relays is not asked about).
#[test]
fn a_cookie_cut_with_its_domain_or_after_a_space_finds_its_session() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, _events) = Directory::open(dir.path()).unwrap();
    let with_domain = SessionRequest {
        domain: "CORP".into(),
        ..request("kwilliams", Some(50))
    };
    directory.apply(Logon, with_domain).unwrap();
    directory
        .apply(Logon, request("mary ann lee", Some(14)))
        .unwrap();
    directory
        .apply(Disconnect, request("mary ann lee", Some(14)))
        .unwrap();
    let kwilliams = directory.front_door_attach("kwil", "CORP", "").unwrap();
    assert_eq!(kwilliams.session_id, 50);
    let mary = directory.front_door_attach("mary ann ", "", "").unwrap();
    assert_eq!(mary.session_id, 14);
    assert_eq!(directory.list().len(), 2, "no new session for either");
    // A cut name with a space that is no one's is an unknown user's connection (its logon
    // names it): no session is made under a name the broker would refuse.
    assert!(directory.front_door_attach("anna bel ", "", "").is_none());
    // Not cut (4 + 1 + 3 characters): not a prefix.
    assert!(!directory.may_return_here(Some(("kwi", "CORP")), ""));
}

#[test]
fn front_door_logon_merges_with_the_real_logon() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, mut events) = Directory::open(dir.path()).unwrap();
    // mstsc cut "alexander.long" to 9 characters.
    let attached = directory
        .front_door_attach("alexander", "", "10.0.0.9:5000")
        .unwrap();
    assert_eq!(directory.counts(), (1, 1));
    let merged = directory
        .apply(Logon, request("alexander.long", Some(12)))
        .unwrap();
    assert_eq!(merged.session_id, 12);
    assert_eq!(merged.client_address, "10.0.0.9:5000");
    assert_eq!(merged.origin, Origin::Control);
    assert_eq!(directory.list().len(), 1);
    assert_eq!(directory.counts(), (1, 0));
    assert_eq!(
        drain(&mut events),
        vec![
            (Logon, attached.session_id, "alexander".into()),
            (Logoff, attached.session_id, "alexander".into()),
            (Logon, 12, "alexander.long".into()),
        ]
    );
    // The connection still holds the merged session under its new id: its end disconnects
    // it (xrdp has no disconnect hook; this is how the broker learns the user left).
    directory.front_door_detach(attached, SHORT);
    assert_eq!(
        drain(&mut events),
        vec![(Disconnect, 12, "alexander.long".into())]
    );
    let sessions = directory.list();
    assert_eq!(sessions.len(), 1);
    assert_eq!(
        (sessions[0].session_id, sessions[0].state),
        (12, RecordState::Disconnected)
    );
    assert!(!sessions[0].unconfirmed);
    // Back through the front door: a reconnection to session 12, whose end disconnects it.
    let again = directory.front_door_attach("alexander", "", "").unwrap();
    assert_eq!(again.session_id, 12);
    assert_eq!(directory.list()[0].state, RecordState::Active);
    directory.front_door_detach(again, SHORT);
    assert_eq!(directory.list()[0].state, RecordState::Disconnected);
    assert_eq!(kinds(&mut events), vec![Reconnect, Disconnect]);
}

#[test]
fn front_door_reconnects_and_detaches() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, mut events) = Directory::open(dir.path()).unwrap();
    directory.apply(Logon, request("bob", Some(3))).unwrap();
    directory
        .apply(Disconnect, request("bob", Some(3)))
        .unwrap();
    drain(&mut events);
    let attached = directory
        .front_door_attach("Bob", "", "10.0.0.1:1")
        .unwrap();
    assert_eq!(attached.session_id, 3);
    let newer = directory
        .front_door_attach("bob", "", "10.0.0.2:2")
        .unwrap();
    // The older connection ending does not disconnect the session the newer one holds.
    directory.front_door_detach(attached, SHORT);
    assert_eq!(directory.list()[0].state, RecordState::Active);
    directory.front_door_detach(newer, SHORT);
    assert_eq!(directory.list()[0].state, RecordState::Disconnected);
    assert_eq!(
        drain(&mut events)
            .into_iter()
            .map(|e| e.0)
            .collect::<Vec<_>>(),
        vec![Reconnect, Reconnect, Disconnect]
    );
    // A logoff while attached: the connection's end changes nothing.
    let again = directory.front_door_attach("bob", "", "").unwrap();
    directory.apply(Logoff, request("bob", None)).unwrap();
    directory.front_door_detach(again, SHORT);
    assert!(directory.list().is_empty());
}

#[test]
fn table_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (directory, _events) = Directory::open(dir.path()).unwrap();
        directory
            .apply(
                Logon,
                SessionRequest {
                    user_name: "alice".into(),
                    domain: "CORP".into(),
                    session_id: Some(10),
                    client_address: "192.0.2.1:40000".into(),
                    ..Default::default()
                },
            )
            .unwrap();
        directory.apply(Disconnect, request("alice", None)).unwrap();
        directory.apply(Logon, request("dave", Some(11))).unwrap();
        // bob's connection is still open when the agent ends without cutting it (a crash).
        directory.front_door_attach("bob", "", "").unwrap();
        assert!(directory.flush());
    }
    let (directory, _events) = Directory::open(dir.path()).unwrap();
    let sessions = directory.list();
    assert_eq!(sessions.len(), 3);
    assert_eq!(sessions[0].session_id, 10);
    assert_eq!(sessions[0].domain, "CORP");
    assert_eq!(sessions[0].state, RecordState::Disconnected);
    // A session no front-door connection held keeps its state.
    assert_eq!(
        (sessions[1].session_id, sessions[1].state),
        (11, RecordState::Active)
    );
    // bob's client went with the agent's process: disconnected, and nothing holds it.
    assert_eq!(sessions[2].user_name, "bob");
    assert_eq!(sessions[2].state, RecordState::Disconnected);
    assert_eq!(sessions[2].attachment, 0);
    // Allocation goes on after the ids used before the restart.
    let next = directory.apply(Logon, request("carol", None)).unwrap();
    assert_eq!(next.session_id, FIRST_ALLOCATED_SESSION_ID + 1);
    assert!(!dir.path().join("sessions.json.tmp").exists());
}

#[test]
fn unreadable_table_is_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("sessions.json"), b"{not json").unwrap();
    let (directory, _events) = Directory::open(dir.path()).unwrap();
    assert!(directory.list().is_empty());
    let moved = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .any(|entry| entry.file_name().to_string_lossy().contains("corrupt"));
    assert!(moved);
}

#[test]
fn a_table_file_not_in_utf8_is_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("sessions.json"),
        b"{\"format\": 1, \xff\xfe}",
    )
    .unwrap();
    let (directory, _events) = Directory::open(dir.path()).unwrap();
    assert!(directory.list().is_empty());
    assert!(!dir.path().join("sessions.json").exists());
}

#[test]
fn bad_records_in_the_table_file_cost_only_themselves() {
    let dir = tempfile::tempdir().unwrap();
    let record = |id: u32, user: &str, state: &str| {
        format!(
            r#"{{"session_id": {id}, "user_name": "{user}", "state": "{state}",
                "logon_time_ms": 1700000000000, "changed_ms": 1700000000000,
                "origin": "control"}}"#
        )
    };
    let sessions = [
        record(1, "alice", "disconnected"),
        // A state a newer agent might write.
        record(2, "bob", "suspended"),
        // A name the broker refuses (a control character): its RESYNC would be refused.
        record(3, "car\\u0007ol", "active"),
        record(4, "dave", "active"),
    ];
    std::fs::write(
        dir.path().join("sessions.json"),
        format!(
            r#"{{"format": 1, "next_session_id": 100000, "sessions": [{}]}}"#,
            sessions.join(",")
        ),
    )
    .unwrap();
    let (directory, _events) = Directory::open(dir.path()).unwrap();
    let users: Vec<String> = directory
        .list()
        .into_iter()
        .map(|record| record.user_name)
        .collect();
    assert_eq!(users, ["alice", "dave"]);
}

fn kinds(events: &mut DirectoryEvents) -> Vec<SessionEventKind> {
    drain(events).into_iter().map(|event| event.0).collect()
}

#[test]
fn a_short_unconfirmed_front_door_logon_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, mut events) = Directory::open(dir.path()).unwrap();
    // Anyone can put any name in the cookie: NLA refuses the logon, the connection ends.
    let attached = directory
        .front_door_attach("mallory", "", "10.0.0.9:5000")
        .unwrap();
    assert!(attached.pending_logon);
    assert!(directory.list()[0].unconfirmed);
    directory.front_door_detach(attached, SHORT);
    assert!(directory.list().is_empty());
    assert_eq!(kinds(&mut events), vec![Logon, Logoff]);
    // Nothing left on disk either.
    drop(directory);
    let (directory, _events) = Directory::open(dir.path()).unwrap();
    assert!(directory.list().is_empty());
}

#[test]
fn a_confirmed_front_door_logon_is_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, mut events) = Directory::open(dir.path()).unwrap();
    // Any control-socket event for the session confirms it, here a reconnect without an id.
    let attached = directory.front_door_attach("alice", "", "").unwrap();
    let confirmed = directory.apply(Reconnect, request("alice", None)).unwrap();
    assert_eq!(confirmed.session_id, attached.session_id);
    assert!(!confirmed.unconfirmed);
    directory.front_door_detach(attached, SHORT);
    let sessions = directory.list();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].state, RecordState::Disconnected);
    assert_eq!(kinds(&mut events), vec![Logon, Reconnect, Disconnect]);

    // Merged with the logon PAM reports under its own id (xrdp's display number): the
    // connection holds the session under that id, and its end disconnects it.
    let attached = directory.front_door_attach("bob", "", "").unwrap();
    directory.apply(Logon, request("bob", Some(7))).unwrap();
    directory.front_door_detach(attached, SHORT);
    let bob = directory
        .list()
        .into_iter()
        .find(|record| record.user_name == "bob")
        .unwrap();
    assert_eq!((bob.session_id, bob.state), (7, RecordState::Disconnected));
    assert!(!bob.unconfirmed);
    // A newer connection took the session over: the older one's end leaves it active.
    let older = directory.front_door_attach("bob", "", "").unwrap();
    let newer = directory.front_door_attach("bob", "", "").unwrap();
    directory.front_door_detach(older, SHORT);
    let state = |name: &str| {
        directory
            .list()
            .into_iter()
            .find(|record| record.user_name == name)
            .map(|record| record.state)
    };
    assert_eq!(state("bob"), Some(RecordState::Active));
    directory.front_door_detach(newer, SHORT);
    assert_eq!(state("bob"), Some(RecordState::Disconnected));
    // PAM's logon without an id merges into the front door's session, keeping its id, and
    // the connection's end disconnects it.
    let attached = directory.front_door_attach("carol", "", "").unwrap();
    directory.apply(Logon, request("carol", None)).unwrap();
    directory.front_door_detach(attached, SHORT);
    let carol = directory
        .list()
        .into_iter()
        .find(|record| record.user_name == "carol")
        .unwrap();
    assert_eq!(
        (carol.session_id, carol.state),
        (attached.session_id, RecordState::Disconnected)
    );
}

#[test]
fn a_long_unconfirmed_front_door_logon_is_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, mut events) = Directory::open(dir.path()).unwrap();
    let attached = directory.front_door_attach("alice", "", "").unwrap();
    directory.front_door_detach(attached, LONG);
    let sessions = directory.list();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].state, RecordState::Disconnected);
    // The connection that lasted vouches for the logon.
    assert!(!sessions[0].unconfirmed);
    assert_eq!(kinds(&mut events), vec![Logon, Disconnect]);

    // A grace of zero keeps every session, however short its connection.
    drop(directory);
    let (directory, mut events) = Directory::open(dir.path()).unwrap();
    let directory = directory.with_unconfirmed_logon_grace(Duration::ZERO);
    let attached = directory.front_door_attach("bob", "", "").unwrap();
    directory.front_door_detach(attached, Some(Duration::from_millis(1)));
    assert_eq!(directory.list().len(), 2);
    assert_eq!(kinds(&mut events), vec![Logon, Disconnect]);
    // The grace is a setting: a short one makes a 2-second connection long enough.
    let directory = directory.with_unconfirmed_logon_grace(Duration::from_secs(1));
    let attached = directory.front_door_attach("carol", "", "").unwrap();
    directory.front_door_detach(attached, SHORT);
    assert_eq!(directory.list().len(), 3);
    assert_eq!(kinds(&mut events), vec![Logon, Disconnect]);
    // A connection the agent cut while stopping says nothing about the logon.
    let attached = directory.front_door_attach("dave", "", "").unwrap();
    directory.front_door_detach(attached, None);
    let dave = directory
        .list()
        .into_iter()
        .find(|record| record.user_name == "dave")
        .unwrap();
    assert_eq!(dave.state, RecordState::Disconnected);
    assert!(dave.unconfirmed);
}

/// The agent stopping cuts its connections: one that had lasted the grace confirms its logon
/// as an ended one would; one that had not leaves it undecided, and the next agent process
/// removes it the grace after its start unless something confirmed it or a connection holds
/// it by then (the soak run found such sessions left disconnected for good).
#[test]
fn logons_left_undecided_by_a_stop_are_settled_after_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, _events) = Directory::open(dir.path()).unwrap();
    let erin = directory.front_door_attach("erin", "", "").unwrap();
    directory.front_door_cut(erin, Duration::from_secs(45));
    let dave = directory.front_door_attach("dave", "", "").unwrap();
    directory.front_door_cut(dave, Duration::from_secs(2));
    let frank = directory.front_door_attach("frank", "", "").unwrap();
    directory.front_door_cut(frank, Duration::from_secs(2));
    assert_eq!(unconfirmed(&directory, "erin"), Some(false));
    assert_eq!(unconfirmed(&directory, "dave"), Some(true));
    assert!(directory.flush());
    drop(directory);

    let (directory, mut events) = Directory::open(dir.path()).unwrap();
    // frank's client came back and holds his session when the grace is up.
    let back = directory.front_door_attach("frank", "", "").unwrap();
    directory.settle_undecided();
    assert_eq!(unconfirmed(&directory, "erin"), Some(false));
    assert_eq!(unconfirmed(&directory, "dave"), None);
    assert_eq!(unconfirmed(&directory, "frank"), Some(true));
    assert_eq!(logoffs(&mut events), ["dave"]);
    // Settled once: frank's session is decided by his connection from now on.
    directory.front_door_detach(back, LONG);
    directory.settle_undecided();
    assert_eq!(unconfirmed(&directory, "frank"), Some(false));
}

/// A crash sees no connection end: a connection still open when it has lasted the grace
/// confirms its logon then, and the table saved before the crash keeps it confirmed (it was
/// removed as undecided after the restart, and its user placed on another machine).
#[test]
fn a_connection_open_past_the_grace_confirms_its_logon_before_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, _events) = Directory::open(dir.path()).unwrap();
    let gina = directory.front_door_attach("gina", "", "").unwrap();
    assert!(gina.may_confirm, "the front door watches whether it lasts");
    // hank's connection is open too, but has not lasted the grace.
    directory.front_door_attach("hank", "", "").unwrap();
    directory.front_door_outlasted_grace(&gina);
    assert_eq!(unconfirmed(&directory, "gina"), Some(false));
    assert_eq!(unconfirmed(&directory, "hank"), Some(true));
    // The crash: the table as the writer last saved it, no connection ended.
    assert!(directory.flush());
    drop(directory);
    let (directory, mut events) = Directory::open(dir.path()).unwrap();
    directory.settle_undecided();
    assert_eq!(unconfirmed(&directory, "gina"), Some(false));
    assert_eq!(
        unconfirmed(&directory, "hank"),
        None,
        "never lasted: removed"
    );
    assert_eq!(logoffs(&mut events), ["hank"]);

    // Where a local source confirms logons, how long a connection lasts does not.
    directory.apply(Logon, request("ivan", Some(7))).unwrap();
    // Back to her confirmed session, or a new logon where PAM confirms logons: nothing to watch.
    let back = directory.front_door_attach("gina", "", "").unwrap();
    assert!(!back.may_confirm);
    let jo = directory.front_door_attach("jo", "", "").unwrap();
    assert!(!jo.may_confirm);
    directory.front_door_outlasted_grace(&jo);
    assert_eq!(unconfirmed(&directory, "jo"), Some(true));
}

/// xrdp's reconnect hook asks for known sessions only: any local user can run it (through
/// sudo), and made-up display numbers were each taken for a session that started unseen,
/// filling the machine's session limit with sessions nothing would ever end.
#[test]
fn an_event_for_known_sessions_only_makes_none_up() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, mut events) = Directory::open(dir.path()).unwrap();
    let known_only = |user: &str, session_id| SessionRequest {
        known_only: true,
        ..request(user, Some(session_id))
    };
    let refused = directory.apply(Reconnect, known_only("mallory", 55));
    assert!(
        matches!(refused, Err(DirectoryError::NotKnown(_))),
        "{refused:?}"
    );
    assert!(directory.list().is_empty());
    assert!(drain(&mut events).is_empty());
    // A session the table holds is reconnected as ever; another user's is still refused.
    directory.apply(Logon, request("ann", Some(10))).unwrap();
    directory.apply(Disconnect, request("ann", None)).unwrap();
    let back = directory.apply(Reconnect, known_only("ann", 10)).unwrap();
    assert_eq!(back.state, RecordState::Active);
    let refused = directory.apply(Reconnect, known_only("mallory", 10));
    assert!(
        matches!(refused, Err(DirectoryError::WrongUser { .. })),
        "{refused:?}"
    );
    // Without it, a session that started unseen (before the agent) is taken as it is.
    directory
        .apply(Reconnect, request("bob", Some(12)))
        .unwrap();
    assert_eq!(directory.list().len(), 2);
}

#[test]
fn a_reconnection_is_never_removed() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, _events) = Directory::open(dir.path()).unwrap();
    // A session PAM reported; a failed reconnection to it (wrong password) is short.
    directory.apply(Logon, request("alice", Some(3))).unwrap();
    directory.apply(Disconnect, request("alice", None)).unwrap();
    let attached = directory.front_door_attach("alice", "", "").unwrap();
    assert!(!attached.pending_logon);
    directory.front_door_detach(attached, SHORT);
    assert_eq!(directory.list()[0].state, RecordState::Disconnected);

    // Without a local source (another machine's table): a front-door session that outlasted
    // the grace once, then a short reconnection.
    let dir = tempfile::tempdir().unwrap();
    let (directory, mut events) = Directory::open(dir.path()).unwrap();
    let first = directory.front_door_attach("bob", "", "").unwrap();
    directory.front_door_detach(first, LONG);
    let again = directory.front_door_attach("bob", "", "").unwrap();
    assert_eq!(again.session_id, first.session_id);
    assert!(!again.pending_logon);
    directory.front_door_detach(again, SHORT);
    let states: Vec<_> = directory
        .list()
        .into_iter()
        .map(|record| (record.user_name, record.state))
        .collect();
    assert_eq!(states, vec![("bob".to_owned(), RecordState::Disconnected)]);
    drain(&mut events);

    // An unconfirmed session from before a restart (its connection did not survive it) is
    // a session the user had here: a short reconnection leaves it.
    let carol = directory.front_door_attach("carol", "", "").unwrap();
    drop(directory);
    let (directory, _events) = Directory::open(dir.path()).unwrap();
    assert!(directory.list()[1].unconfirmed);
    let again = directory.front_door_attach("carol", "", "").unwrap();
    assert_eq!(again.session_id, carol.session_id);
    assert!(!again.pending_logon);
    directory.front_door_detach(again, SHORT);
    assert_eq!(directory.list().len(), 2);
    assert_eq!(directory.list()[1].state, RecordState::Disconnected);
}

#[test]
fn with_a_local_source_only_its_report_confirms_a_front_door_logon() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, mut events) = Directory::open(dir.path()).unwrap();
    directory.apply(Logon, request("alice", Some(3))).unwrap();
    drain(&mut events);
    // A made-up name held past the grace at the login screen: PAM never reports it, and its
    // end removes it however long it lasted.
    let mallory = directory.front_door_attach("mallory", "", "").unwrap();
    directory.front_door_detach(mallory, LONG);
    assert_eq!(directory.list().len(), 1);
    assert_eq!(kinds(&mut events), vec![Logon, Logoff]);
    // A logon PAM reports stays when its connection ends, however short.
    let bob = directory.front_door_attach("bob", "", "").unwrap();
    directory.apply(Logon, request("bob", Some(4))).unwrap();
    directory.front_door_detach(bob, SHORT);
    let bob = directory
        .list()
        .into_iter()
        .find(|record| record.user_name == "bob");
    assert_eq!(
        bob.map(|record| record.state),
        Some(RecordState::Disconnected)
    );

    // After a restart, until a local source reports a logon again, a connection's length
    // confirms as before.
    drop(directory);
    let (directory, mut events) = Directory::open(dir.path()).unwrap();
    let trudy = directory.front_door_attach("trudy", "", "").unwrap();
    directory.front_door_detach(trudy, LONG);
    assert_eq!(directory.list().len(), 3);
    assert_eq!(kinds(&mut events), vec![Logon, Disconnect]);
    directory.apply(Logon, request("carol", Some(5))).unwrap();
    drain(&mut events);
    let eve = directory.front_door_attach("eve", "", "").unwrap();
    directory.front_door_detach(eve, LONG);
    assert_eq!(directory.list().len(), 4);
    assert_eq!(kinds(&mut events), vec![Logon, Logoff]);
}

#[test]
fn a_reconnect_hook_alone_does_not_stop_a_connections_length_confirming() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, mut events) = Directory::open(dir.path()).unwrap();
    // xrdp's reconnect hook without PAM: reconnects and disconnects, never a logon.
    let alice = directory.front_door_attach("alice", "", "").unwrap();
    directory.front_door_detach(alice, LONG);
    directory.apply(Reconnect, request("alice", None)).unwrap();
    directory.apply(Disconnect, request("alice", None)).unwrap();
    drain(&mut events);
    let bob = directory.front_door_attach("bob", "", "").unwrap();
    directory.front_door_detach(bob, LONG);
    assert_eq!(directory.list().len(), 2);
    assert_eq!(kinds(&mut events), vec![Logon, Disconnect]);
}

#[test]
fn sessions_only_the_front_door_knows_of_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, mut events) = Directory::open(dir.path()).unwrap();
    // One user still connected, from the start.
    let held = directory.front_door_attach("held", "", "").unwrap();
    for user in 0..MAX_FRONT_DOOR_SESSIONS + 5 {
        let attached = directory
            .front_door_attach(&format!("u{user}"), "", "")
            .unwrap();
        directory.front_door_detach(attached, LONG);
    }
    let sessions = directory.list();
    assert_eq!(sessions.len(), MAX_FRONT_DOOR_SESSIONS);
    let names: std::collections::BTreeSet<String> = sessions
        .into_iter()
        .map(|record| record.user_name)
        .collect();
    // The connected session stays; the six disconnected longest went, each with a LOGOFF.
    assert!(names.contains("held"));
    for dropped in 0..6 {
        assert!(!names.contains(&format!("u{dropped}")), "u{dropped} kept");
    }
    assert!(names.contains("u6"));
    let logoffs: Vec<String> = drain(&mut events)
        .into_iter()
        .filter(|(kind, ..)| *kind == Logoff)
        .map(|(_, _, user)| user)
        .collect();
    assert_eq!(logoffs, ["u0", "u1", "u2", "u3", "u4", "u5"]);
    directory.front_door_detach(held, LONG);
}

#[test]
fn concurrent_connections_of_a_failed_logon_leave_no_session() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, mut events) = Directory::open(dir.path()).unwrap();
    // The second connection joins the first one's unconfirmed logon: it is not a reconnection
    // to a session the user had, whichever connection ends first.
    let first = directory.front_door_attach("mallory", "", "").unwrap();
    let second = directory.front_door_attach("mallory", "", "").unwrap();
    assert_eq!(second.session_id, first.session_id);
    assert!(second.pending_logon);
    directory.front_door_detach(first, SHORT);
    assert_eq!(directory.list().len(), 1);
    directory.front_door_detach(second, SHORT);
    assert!(directory.list().is_empty());
    assert_eq!(kinds(&mut events), vec![Logon, Reconnect, Logoff]);

    let first = directory.front_door_attach("mallory", "", "").unwrap();
    let second = directory.front_door_attach("mallory", "", "").unwrap();
    directory.front_door_detach(second, SHORT);
    // The first connection is still open: its session stays, connected through it.
    assert_eq!(directory.list().len(), 1);
    assert_eq!(directory.list()[0].state, RecordState::Active);
    directory.front_door_detach(first, SHORT);
    assert!(directory.list().is_empty());
    assert_eq!(kinds(&mut events), vec![Logon, Reconnect, Logoff]);

    // A real logon that lasts, and a failed attempt at the same name meanwhile: the session
    // stays, and once the real connection outlasted the grace it is confirmed.
    let real = directory.front_door_attach("alice", "", "").unwrap();
    let failed = directory.front_door_attach("alice", "", "").unwrap();
    directory.front_door_detach(failed, SHORT);
    directory.front_door_detach(real, LONG);
    let sessions = directory.list();
    assert_eq!(sessions.len(), 1);
    assert!(!sessions[0].unconfirmed);
    assert_eq!(sessions[0].state, RecordState::Disconnected);
}

#[test]
fn tables_without_the_unconfirmed_flag_are_read_as_confirmed() {
    let dir = tempfile::tempdir().unwrap();
    // A table written before the flag existed: a front-door session, active.
    std::fs::write(
        dir.path().join("sessions.json"),
        r#"{
  "format": 1,
  "next_session_id": 100001,
  "sessions": [
    {
      "session_id": 100000,
      "user_name": "alice",
      "domain": "",
      "state": "active",
      "client_address": "10.0.0.9:5000",
      "logon_time_ms": 1700000000000,
      "changed_ms": 1700000000000,
      "origin": "front_door",
      "attachment": 4
    }
  ]
}"#,
    )
    .unwrap();
    let (directory, mut events) = Directory::open(dir.path()).unwrap();
    let sessions = directory.list();
    assert_eq!(sessions.len(), 1);
    assert!(!sessions[0].unconfirmed);
    // It counts as a session the user had: a short connection to it only disconnects it.
    let attached = directory.front_door_attach("alice", "", "").unwrap();
    assert!(!attached.pending_logon);
    directory.front_door_detach(attached, SHORT);
    assert_eq!(directory.list()[0].state, RecordState::Disconnected);
    assert_eq!(kinds(&mut events), vec![Reconnect, Disconnect]);

    // The flag is written and read back.
    directory.front_door_attach("bob", "", "").unwrap();
    assert!(directory.flush());
    let text = std::fs::read_to_string(dir.path().join("sessions.json")).unwrap();
    assert!(text.contains("\"unconfirmed\": true"), "{text}");
    assert!(text.contains("\"unconfirmed\": false"), "{text}");
    drop(directory);
    let (directory, _events) = Directory::open(dir.path()).unwrap();
    let flags: Vec<_> = directory
        .list()
        .into_iter()
        .map(|record| (record.user_name, record.unconfirmed))
        .collect();
    assert_eq!(flags, vec![("alice".into(), false), ("bob".into(), true)]);
}

/// Whether a connection has a session here to return to: by the cookie's name (cut by mstsc
/// too), or, naming no user, by a session opened from its client's IP.
#[test]
fn a_connection_may_return_to_a_session_by_name_or_by_its_address() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, _events) = Directory::open(dir.path()).unwrap();
    directory
        .apply(
            Logon,
            SessionRequest {
                client_address: "192.0.2.7:50000".into(),
                ..request("christopher.jones", Some(3))
            },
        )
        .unwrap();
    for (user, client, expected) in [
        (Some(("christopher.jones", "")), "198.51.100.1:1", true),
        (Some(("christoph", "")), "198.51.100.1:1", true),
        (Some(("CHRISTOPHER.JONES", "CORP")), "198.51.100.1:1", true),
        (Some(("carol", "")), "192.0.2.7:1", false),
        (None, "192.0.2.7:1", true),
        (None, "198.51.100.1:1", false),
    ] {
        assert_eq!(
            directory.may_return_here(user, client),
            expected,
            "{user:?} from {client}"
        );
    }
}
