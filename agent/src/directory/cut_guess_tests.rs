//! Tests of undoing a cut cookie's wrong guess (`cut_guess.rs`): `christoph` is also the whole
//! name of a user, not only the first 9 characters of `christopher.jones`.

use std::time::Duration;

use super::tests::drain as events;
use super::*;
use tsbroker_common::model::SessionEventKind::{self, Disconnect, Logon, Reconnect};

const LONG: Option<Duration> = Some(Duration::from_secs(120));

fn report(user: &str, session_id: u32, address: &str) -> SessionRequest {
    SessionRequest {
        user_name: user.to_owned(),
        session_id: Some(session_id),
        client_address: address.to_owned(),
        ..Default::default()
    }
}

/// A session's state and client address.
fn seen(directory: &Directory, session_id: u32) -> (RecordState, String) {
    let sessions = directory.list();
    let record = sessions
        .into_iter()
        .find(|record| record.session_id == session_id)
        .expect("the session is in the table");
    (record.state, record.client_address)
}

/// A connection with mstsc's cookie for both `christoph` and `christopher.jones`.
fn cut_cookie_from(directory: &Directory, client: &str) -> Attachment {
    directory
        .front_door_attach("christoph", "", client)
        .unwrap()
}

/// PAM reports the logon of `christoph` (session 13) behind the front door.
fn christoph_logs_on(directory: &Directory) {
    let logon = report("christoph", 13, "127.0.0.1");
    directory.apply(Logon, logon).unwrap();
}

/// Asserts session `session_id`'s state and client address.
fn expect(directory: &Directory, session_id: u32, state: RecordState, address: &str) {
    assert_eq!(
        seen(directory, session_id),
        (state, address.to_owned()),
        "session {session_id}"
    );
}

/// xrdp's reconnect hook reports `christopher.jones`'s session 12.
fn jones_reconnection_reported(directory: &Directory) {
    let reconnection = report("christopher.jones", 12, "127.0.0.1");
    directory.apply(Reconnect, reconnection).unwrap();
}

/// `user` logged on (session `session_id`, from `address`) and left.
fn logged_on_and_left(directory: &Directory, user: &str, session_id: u32, address: &str) {
    let logon = report(user, session_id, address);
    directory.apply(Logon, logon.clone()).unwrap();
    directory.apply(Disconnect, logon).unwrap();
}

/// `christopher.jones` left session 12, opened from 10.0.0.5.
fn jones_left(directory: &Directory) {
    logged_on_and_left(directory, "christopher.jones", 12, "10.0.0.5");
}

#[test]
fn a_logon_of_the_whole_name_takes_the_connection_a_cut_cookie_gave_another_users_session() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, mut receiver) = Directory::open(dir.path()).unwrap();
    jones_left(&directory);
    events(&mut receiver);
    // A new user `christoph` connects; the cookie may be jones's, cut: the guess ties it there.
    let newcomer = cut_cookie_from(&directory, "10.0.0.9:40000");
    assert_eq!(newcomer.session_id, 12);
    expect(&directory, 12, RecordState::Active, "10.0.0.9:40000");
    // xrdp logs christoph on (PAM sees the front door's loopback hop): the guess was wrong.
    christoph_logs_on(&directory);
    expect(&directory, 12, RecordState::Disconnected, "10.0.0.5");
    expect(&directory, 13, RecordState::Active, "10.0.0.9:40000");
    // The newcomer leaving disconnects their own session, not jones's.
    directory.front_door_detach(newcomer, LONG);
    assert_eq!(seen(&directory, 13).0, RecordState::Disconnected);
    assert_eq!(seen(&directory, 12).0, RecordState::Disconnected);
    assert_eq!(
        events(&mut receiver),
        vec![
            (Reconnect, 12, "christopher.jones".into()),
            (Disconnect, 12, "christopher.jones".into()),
            (Logon, 13, "christoph".into()),
            (Disconnect, 13, "christoph".into()),
        ]
    );
}

#[test]
fn a_guess_a_local_source_confirmed_is_not_undone_by_another_users_logon() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, _receiver) = Directory::open(dir.path()).unwrap();
    jones_left(&directory);
    // jones comes back (mstsc cut his name) and xrdp's reconnect hook says so.
    let jones = cut_cookie_from(&directory, "10.0.0.5:40000");
    jones_reconnection_reported(&directory);
    // Then a new user `christoph` connects: the cookie ties them to jones's session too, and
    // their logon tells the two connections apart.
    let newcomer = cut_cookie_from(&directory, "10.0.0.9:40000");
    christoph_logs_on(&directory);
    expect(&directory, 12, RecordState::Active, "10.0.0.5:40000");
    expect(&directory, 13, RecordState::Active, "10.0.0.9:40000");
    directory.front_door_detach(newcomer, LONG);
    assert_eq!(seen(&directory, 13).0, RecordState::Disconnected);
    assert_eq!(seen(&directory, 12).0, RecordState::Active);
    directory.front_door_detach(jones, LONG);
    assert_eq!(seen(&directory, 12).0, RecordState::Disconnected);
}

#[test]
fn with_two_guesses_that_could_be_the_logon_nothing_is_undone() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, _receiver) = Directory::open(dir.path()).unwrap();
    jones_left(&directory);
    // Two clients with the cut cookie, nothing reported of either: either may be the logon.
    let first = cut_cookie_from(&directory, "10.0.0.5:40000");
    let second = cut_cookie_from(&directory, "10.0.0.9:40000");
    christoph_logs_on(&directory);
    assert_eq!(seen(&directory, 13), (RecordState::Active, String::new()));
    assert_eq!(seen(&directory, 12).0, RecordState::Active);
    directory.front_door_detach(first, LONG);
    directory.front_door_detach(second, LONG);
    assert_eq!(seen(&directory, 12).0, RecordState::Disconnected);
}

#[test]
fn the_users_own_new_session_is_not_taken_for_another_users() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, _receiver) = Directory::open(dir.path()).unwrap();
    jones_left(&directory);
    let jones = cut_cookie_from(&directory, "10.0.0.5:40000");
    // xrdp gives jones a new session (another screen size under Policy=UBD): his connection
    // holds it, and his old session is disconnected again, with the address he came from.
    directory
        .apply(Logon, report("christopher.jones", 14, "127.0.0.1"))
        .unwrap();
    expect(&directory, 14, RecordState::Active, "10.0.0.5:40000");
    expect(&directory, 12, RecordState::Disconnected, "10.0.0.5:40000");
    directory.front_door_detach(jones, LONG);
    assert_eq!(seen(&directory, 14).0, RecordState::Disconnected);
}

/// The sessions' (id, state, address) in the events so far.
fn said(receiver: &mut DirectoryEvents) -> Vec<(SessionEventKind, u32, String)> {
    let mut seen = Vec::new();
    while let Ok(event) = receiver.try_recv() {
        let session = event.session;
        seen.push((event.kind, session.session_id, session.client_address));
    }
    seen
}

#[test]
fn a_longer_names_reconnection_takes_the_connection_a_whole_names_session_was_given() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, _receiver) = Directory::open(dir.path()).unwrap();
    jones_left(&directory);
    // `christoph` left session 13 after jones: the newer of the two the cookie names.
    logged_on_and_left(&directory, "christoph", 13, "10.0.0.9");
    // jones comes back from an address neither session has: tied to christoph's session.
    let jones = cut_cookie_from(&directory, "10.0.0.7:40000");
    assert_eq!(jones.session_id, 13);
    // xrdp reconnects him to his own session, and its hook says so.
    jones_reconnection_reported(&directory);
    expect(&directory, 12, RecordState::Active, "10.0.0.7:40000");
    expect(&directory, 13, RecordState::Disconnected, "10.0.0.9");
    directory.front_door_detach(jones, LONG);
    assert_eq!(seen(&directory, 12).0, RecordState::Disconnected);
}

#[test]
fn the_broker_hears_the_address_given_back_to_a_session_another_client_holds() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, mut receiver) = Directory::open(dir.path()).unwrap();
    jones_left(&directory);
    let jones = cut_cookie_from(&directory, "10.0.0.5:40000");
    jones_reconnection_reported(&directory);
    let newcomer = cut_cookie_from(&directory, "10.0.0.9:40000");
    said(&mut receiver);
    christoph_logs_on(&directory);
    // jones is still connected: his session stays ACTIVE, with his address again.
    expect(&directory, 12, RecordState::Active, "10.0.0.5:40000");
    assert_eq!(
        said(&mut receiver),
        vec![
            (Reconnect, 12, "10.0.0.5:40000".into()),
            (Logon, 13, "10.0.0.9:40000".into()),
        ]
    );
    directory.front_door_detach(newcomer, LONG);
    directory.front_door_detach(jones, LONG);
}

#[test]
fn a_reconnection_takes_back_the_connection_a_logon_from_elsewhere_took() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, _receiver) = Directory::open(dir.path()).unwrap();
    jones_left(&directory);
    let jones = cut_cookie_from(&directory, "10.0.0.5:40000");
    // Before xrdp's reconnect hook reports jones, `christoph` logs on past the front door
    // (no connection of their own): the only connection that could be theirs is jones's.
    christoph_logs_on(&directory);
    assert_eq!(seen(&directory, 12).0, RecordState::Disconnected);
    // jones's reconnection, reported, takes it back.
    jones_reconnection_reported(&directory);
    expect(&directory, 12, RecordState::Active, "10.0.0.5:40000");
    directory.front_door_detach(jones, LONG);
    assert_eq!(seen(&directory, 12).0, RecordState::Disconnected);
    assert_eq!(seen(&directory, 13).1, "");
}

#[test]
fn a_reported_reconnection_gives_the_session_its_guessed_clients_address() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, _receiver) = Directory::open(dir.path()).unwrap();
    jones_left(&directory);
    logged_on_and_left(&directory, "christopher.smith", 13, "10.0.0.6");
    // From an address neither has: a guess among two users, which lends its address to nobody.
    let client = cut_cookie_from(&directory, "10.0.0.9:40000");
    assert_eq!(client.session_id, 13);
    expect(&directory, 13, RecordState::Active, "10.0.0.6");
    // xrdp's hook says smith reconnected: the connection is his, and so is its address.
    let reconnection = report("christopher.smith", 13, "127.0.0.1");
    directory.apply(Reconnect, reconnection).unwrap();
    expect(&directory, 13, RecordState::Active, "10.0.0.9:40000");
    expect(&directory, 12, RecordState::Disconnected, "10.0.0.5");
    directory.front_door_detach(client, LONG);
    expect(&directory, 13, RecordState::Disconnected, "10.0.0.9:40000");
}

#[test]
fn two_clients_with_one_cut_cookie_back_at_once_leave_no_session_active() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, _receiver) = Directory::open(dir.path()).unwrap();
    jones_left(&directory);
    logged_on_and_left(&directory, "christoph", 13, "10.0.0.9");
    logged_on_and_left(&directory, "christopher.smith", 14, "10.0.0.6");
    // Two of them come back from new addresses: tied to the newest sessions, 14 and 13.
    let first = cut_cookie_from(&directory, "10.0.0.86:40000");
    let second = cut_cookie_from(&directory, "10.0.0.87:40000");
    assert_eq!((first.session_id, second.session_id), (14, 13));
    // jones reconnected, through one of the two; smith too, by the other: which is which is
    // not known, so nothing moves and no address is lent.
    jones_reconnection_reported(&directory);
    let smith = report("christopher.smith", 14, "127.0.0.1");
    directory.apply(Reconnect, smith).unwrap();
    expect(&directory, 12, RecordState::Active, "10.0.0.5");
    expect(&directory, 14, RecordState::Active, "10.0.0.6");
    // Both leave: every session is disconnected, jones's too, though no connection held it.
    directory.front_door_detach(first, LONG);
    expect(&directory, 12, RecordState::Active, "10.0.0.5");
    directory.front_door_detach(second, LONG);
    for session_id in [12, 13, 14] {
        assert_eq!(seen(&directory, session_id).0, RecordState::Disconnected);
    }
}

#[test]
fn newcomers_with_one_cut_cookie_at_once_leave_the_session_they_were_tied_to_its_own_address() {
    for last_to_leave in [0, 1] {
        let dir = tempfile::tempdir().unwrap();
        let (directory, mut receiver) = Directory::open(dir.path()).unwrap();
        jones_left(&directory);
        // Two new users whose cookies are jones's cut come at once: both tied to his session,
        // the second lending it its address.
        let clients = [
            cut_cookie_from(&directory, "10.0.0.41:40000"),
            cut_cookie_from(&directory, "10.0.0.42:40000"),
        ];
        assert_eq!((clients[0].session_id, clients[1].session_id), (12, 12));
        expect(&directory, 12, RecordState::Active, "10.0.0.42:40000");
        // PAM reports both logons: either connection could be either, so none is moved.
        christoph_logs_on(&directory);
        let christophe = report("christophe", 15, "127.0.0.1");
        directory.apply(Logon, christophe).unwrap();
        said(&mut receiver);
        let [first, second] = clients;
        let (early, late) = match last_to_leave {
            0 => (second, first),
            _ => (first, second),
        };
        directory.front_door_detach(early, LONG);
        directory.front_door_detach(late, LONG);
        // jones's session is as he left it, and the broker hears so: a newcomer's address
        // would send that newcomer back to it.
        expect(&directory, 12, RecordState::Disconnected, "10.0.0.5");
        let told = said(&mut receiver);
        assert!(
            told.contains(&(Disconnect, 12, "10.0.0.5".into())),
            "{last_to_leave}: {told:?}"
        );
        for newcomer in [13, 15] {
            assert_eq!(seen(&directory, newcomer).0, RecordState::Disconnected);
        }
    }
}

#[test]
fn a_guess_nothing_put_in_doubt_keeps_its_clients_address() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, _receiver) = Directory::open(dir.path()).unwrap();
    jones_left(&directory);
    // jones comes back from a new address without a reconnect hook to say so: the guess stands.
    let jones = cut_cookie_from(&directory, "10.0.0.7:40000");
    directory.front_door_detach(jones, LONG);
    expect(&directory, 12, RecordState::Disconnected, "10.0.0.7:40000");
}
