//! Tests of undoing a cut cookie's wrong guess (`cut_guess.rs`): `christoph` is also the whole
//! name of a user, not only the first 9 characters of `christopher.jones`.

use std::time::Duration;

use super::tests::drain as events;
use super::*;
use tsbroker_common::model::SessionEventKind::{Disconnect, Logon, Reconnect};

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

/// `christopher.jones` left session 12, opened from 10.0.0.5.
fn jones_left(directory: &Directory) {
    let jones = report("christopher.jones", 12, "10.0.0.5");
    directory.apply(Logon, jones.clone()).unwrap();
    directory.apply(Disconnect, jones).unwrap();
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
    assert_eq!(
        seen(&directory, 12),
        (RecordState::Active, "10.0.0.9:40000".into())
    );
    // xrdp logs christoph on (PAM sees the front door's loopback hop): the guess was wrong.
    christoph_logs_on(&directory);
    assert_eq!(
        seen(&directory, 12),
        (RecordState::Disconnected, "10.0.0.5".into()),
        "jones's session is as he left it"
    );
    assert_eq!(
        seen(&directory, 13),
        (RecordState::Active, "10.0.0.9:40000".into())
    );
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
    directory
        .apply(Reconnect, report("christopher.jones", 12, "127.0.0.1"))
        .unwrap();
    // Then a new user `christoph` connects: the cookie ties them to jones's session too, and
    // their logon tells the two connections apart.
    let newcomer = cut_cookie_from(&directory, "10.0.0.9:40000");
    christoph_logs_on(&directory);
    assert_eq!(
        seen(&directory, 12),
        (RecordState::Active, "10.0.0.5:40000".into())
    );
    assert_eq!(
        seen(&directory, 13),
        (RecordState::Active, "10.0.0.9:40000".into())
    );
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
    assert_eq!(
        seen(&directory, 14),
        (RecordState::Active, "10.0.0.5:40000".into())
    );
    assert_eq!(
        seen(&directory, 12),
        (RecordState::Disconnected, "10.0.0.5:40000".into())
    );
    directory.front_door_detach(jones, LONG);
    assert_eq!(seen(&directory, 14).0, RecordState::Disconnected);
}
