//! Tests of reports that come after their client left (`late_reports.rs`).

use super::tests::drain as events;
use super::unknown_tests::{ENDED, request as report, state_of};
use super::*;
use tsbroker_common::model::SessionEventKind::{Disconnect, Logon, Reconnect};

#[test]
fn a_reconnection_reported_after_the_client_left_leaves_the_session_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, mut receiver) = Directory::open(dir.path()).unwrap();
    directory.apply(Logon, report("ann", 10)).unwrap();
    directory.apply(Disconnect, report("ann", 10)).unwrap();
    // ann comes back and drops at once; xrdp's reconnect hook runs after.
    let back = directory
        .front_door_attach("ann", "", "10.0.0.8:4000")
        .unwrap();
    directory.front_door_detach(back, ENDED);
    events(&mut receiver);
    let reported = directory.apply(Reconnect, report("ann", 10)).unwrap();
    assert_eq!(reported.state, RecordState::Disconnected);
    assert_eq!(state_of(&directory, 10), Some(RecordState::Disconnected));
    let said = events(&mut receiver)
        .into_iter()
        .map(|(kind, id, _)| (kind, id));
    assert_eq!(
        said.collect::<Vec<_>>(),
        [(Reconnect, 10), (Disconnect, 10)]
    );
}

#[test]
fn a_logon_reported_after_its_unnamed_client_left_is_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, _receiver) = Directory::open(dir.path()).unwrap();
    // A client given a collection (no cookie) drops while xrdp starts the session.
    let unknown = directory.front_door_attach_unknown(None);
    directory.front_door_detach_unknown(unknown, ENDED);
    directory.apply(Logon, report("bob", 11)).unwrap();
    assert_eq!(state_of(&directory, 11), Some(RecordState::Disconnected));
}

#[test]
fn a_report_no_ended_connection_could_be_is_taken_as_it_comes() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, _receiver) = Directory::open(dir.path()).unwrap();
    // Another user's connection ended: it was not cat's client.
    let dan = directory
        .front_door_attach("dan", "", "10.0.0.9:4000")
        .unwrap();
    directory.front_door_detach(dan, ENDED);
    directory.apply(Logon, report("cat", 12)).unwrap();
    assert_eq!(state_of(&directory, 12), Some(RecordState::Active));
    // A machine without a front door (or no connection lately): as reported.
    let dir = tempfile::tempdir().unwrap();
    let (directory, _receiver) = Directory::open(dir.path()).unwrap();
    directory.apply(Logon, report("cat", 12)).unwrap();
    directory.apply(Disconnect, report("cat", 12)).unwrap();
    directory.apply(Reconnect, report("cat", 12)).unwrap();
    assert_eq!(state_of(&directory, 12), Some(RecordState::Active));
}

/// A known limit (see `late_reports.rs`): the first one's late report takes the second's
/// connection, and the second's own report finds its client gone.
#[test]
fn a_late_report_before_a_connected_clients_own_is_a_known_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, _receiver) = Directory::open(dir.path()).unwrap();
    // Two clients given a collection: the first drops, the second stays.
    let gone = directory.front_door_attach_unknown(None);
    let staying = directory.front_door_attach_unknown(None);
    directory.front_door_detach_unknown(gone, ENDED);
    // The first one's logon is reported late, then the second's: either may be either.
    directory.apply(Logon, report("oto", 94)).unwrap();
    directory.apply(Logon, report("pia", 95)).unwrap();
    assert_eq!(state_of(&directory, 94), Some(RecordState::Active));
    assert_eq!(state_of(&directory, 95), Some(RecordState::Disconnected));
    // Both are disconnected once it has left.
    directory.front_door_detach_unknown(staying, ENDED);
    assert_eq!(state_of(&directory, 94), Some(RecordState::Disconnected));
    assert_eq!(state_of(&directory, 95), Some(RecordState::Disconnected));
}

#[test]
fn a_client_that_logged_on_and_left_is_no_candidate_for_the_next_logon() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, _receiver) = Directory::open(dir.path()).unwrap();
    // A collection client logs on (matched) and leaves; another comes and logs on at once.
    let first = directory.front_door_attach_unknown(Some("10.0.0.1:4000".parse().unwrap()));
    directory.apply(Logon, report("oto", 94)).unwrap();
    directory.front_door_detach_unknown(first, ENDED);
    let second = directory.front_door_attach_unknown(Some("10.0.0.2:4000".parse().unwrap()));
    directory.apply(Logon, report("pia", 95)).unwrap();
    // The first one held its own session: the second is the only candidate, and
    // the session gets its client's address.
    let sessions = directory.list();
    let pia = sessions.iter().find(|record| record.session_id == 95);
    assert_eq!(pia.unwrap().client_address, "10.0.0.2:4000");
    directory.front_door_detach_unknown(second, ENDED);
    assert_eq!(state_of(&directory, 95), Some(RecordState::Disconnected));
}
