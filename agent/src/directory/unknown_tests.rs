//! Tests of tying front-door connections to the sessions PAM and xrdp's reconnect hook report
//! when the client named no user (`unknown.rs`) or named them in `user@domain` form.

use std::time::Duration;

use super::tests::drain as events;
use super::*;
use tsbroker_common::model::SessionEventKind::{Disconnect, Logoff, Logon, Reconnect};

pub(super) const ENDED: Option<Duration> = Some(Duration::from_secs(120));

pub(super) fn request(user: &str, session_id: u32) -> SessionRequest {
    SessionRequest {
        user_name: user.to_owned(),
        session_id: Some(session_id),
        ..Default::default()
    }
}

pub(super) fn state_of(directory: &Directory, session_id: u32) -> Option<RecordState> {
    directory
        .list()
        .into_iter()
        .find(|record| record.session_id == session_id)
        .map(|record| record.state)
}

#[test]
fn the_only_connection_without_a_user_holds_the_session_pam_reports() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, mut receiver) = Directory::open(dir.path()).unwrap();
    // A client given a collection sends no cookie; xrdp logs the user on as display 10.
    let connection = directory.front_door_attach_unknown(None);
    directory.apply(Logon, request("ann", 10)).unwrap();
    assert_eq!(state_of(&directory, 10), Some(RecordState::Active));
    directory.front_door_detach_unknown(connection, ENDED);
    assert_eq!(state_of(&directory, 10), Some(RecordState::Disconnected));
    assert_eq!(
        events(&mut receiver),
        vec![(Logon, 10, "ann".into()), (Disconnect, 10, "ann".into())]
    );

    // Back without a cookie: xrdp's reconnect hook reports display 10, and the connection's
    // end disconnects it again.
    let connection = directory.front_door_attach_unknown(None);
    directory.apply(Reconnect, request("ann", 10)).unwrap();
    directory.front_door_detach_unknown(connection, ENDED);
    assert_eq!(state_of(&directory, 10), Some(RecordState::Disconnected));
    assert_eq!(
        events(&mut receiver),
        vec![
            (Reconnect, 10, "ann".into()),
            (Disconnect, 10, "ann".into())
        ]
    );
}

#[test]
fn the_matched_connection_gives_the_session_its_clients_address() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, _receiver) = Directory::open(dir.path()).unwrap();
    let client = "10.0.0.8:50123".parse().unwrap();
    let connection = directory.front_door_attach_unknown(Some(client));
    // xrdp behind the front door: PAM_RHOST is the front door's loopback connection.
    let logon = SessionRequest {
        client_address: "127.0.0.1".into(),
        ..request("ann", 10)
    };
    let record = directory.apply(Logon, logon).unwrap();
    assert_eq!(record.client_address, "10.0.0.8:50123");
    directory.front_door_detach_unknown(connection, ENDED);
    let sessions = directory.list();
    assert_eq!(sessions[0].client_address, "10.0.0.8:50123");
}

#[test]
fn with_two_candidates_nothing_is_matched_until_both_have_ended() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, mut receiver) = Directory::open(dir.path()).unwrap();
    let first = directory.front_door_attach_unknown(None);
    let second = directory.front_door_attach_unknown(None);
    directory.apply(Logon, request("ann", 10)).unwrap();
    directory.front_door_detach_unknown(first, ENDED);
    // Her client may be the one still open.
    assert_eq!(state_of(&directory, 10), Some(RecordState::Active));
    assert_eq!(events(&mut receiver), vec![(Logon, 10, "ann".into())]);
    // Her client was one of the two: both gone, she is.
    directory.front_door_detach_unknown(second, ENDED);
    assert_eq!(state_of(&directory, 10), Some(RecordState::Disconnected));
    assert_eq!(events(&mut receiver), vec![(Disconnect, 10, "ann".into())]);

    // A cookie logon still waiting for its PAM logon is a candidate too.
    let unknown = directory.front_door_attach_unknown(None);
    let ben = directory.front_door_attach("ben", "", "").unwrap();
    directory.apply(Logon, request("cat", 11)).unwrap();
    directory.front_door_detach_unknown(unknown, ENDED);
    assert_eq!(state_of(&directory, 11), Some(RecordState::Active));
    // Ben's own logon is matched by name, as always.
    directory.apply(Logon, request("ben", 12)).unwrap();
    directory.front_door_detach(ben, ENDED);
    assert_eq!(state_of(&directory, 12), Some(RecordState::Disconnected));
    assert_eq!(state_of(&directory, 11), Some(RecordState::Disconnected));
}

#[test]
fn a_cookie_with_another_name_gives_way_to_pams() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, mut receiver) = Directory::open(dir.path()).unwrap();
    // The client typed an alias the directory service knows; PAM reports the user as "ann".
    let attached = directory
        .front_door_attach("asmith", "", "10.0.0.9:5000")
        .unwrap();
    let phantom = attached.session_id;
    directory.apply(Logon, request("ann", 10)).unwrap();
    let sessions = directory.list();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert_eq!(
        (sessions[0].session_id, sessions[0].user_name.as_str()),
        (10, "ann")
    );
    directory.front_door_detach(attached, ENDED);
    assert_eq!(state_of(&directory, 10), Some(RecordState::Disconnected));
    assert_eq!(
        events(&mut receiver),
        vec![
            (Logon, phantom, "asmith".into()),
            (Logoff, phantom, "asmith".into()),
            (Logon, 10, "ann".into()),
            (Disconnect, 10, "ann".into()),
        ]
    );
}

#[test]
fn a_connection_already_holding_the_session_is_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, _receiver) = Directory::open(dir.path()).unwrap();
    directory.apply(Logon, request("ann", 10)).unwrap();
    directory.apply(Disconnect, request("ann", 10)).unwrap();
    // Ann comes back with her cookie while someone else sits at xrdp's login screen.
    let ann = directory.front_door_attach("ann", "", "").unwrap();
    let unknown = directory.front_door_attach_unknown(None);
    directory.apply(Reconnect, request("ann", 10)).unwrap();
    directory.front_door_detach_unknown(unknown, ENDED);
    assert_eq!(state_of(&directory, 10), Some(RecordState::Active));
    directory.front_door_detach(ann, ENDED);
    assert_eq!(state_of(&directory, 10), Some(RecordState::Disconnected));
}

#[test]
fn principal_names_are_the_users_pam_reports() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, _receiver) = Directory::open(dir.path()).unwrap();
    // Two logons at once, each cookie in user@domain form: no elimination, the names match.
    let ann = directory
        .front_door_attach("ann@example.com", "", "")
        .unwrap();
    let bob = directory
        .front_door_attach("bob@example.com", "", "")
        .unwrap();
    directory.apply(Logon, request("bob", 11)).unwrap();
    directory.apply(Logon, request("ann", 10)).unwrap();
    assert_eq!(directory.list().len(), 2, "{:?}", directory.list());
    directory.front_door_detach(ann, ENDED);
    assert_eq!(state_of(&directory, 10), Some(RecordState::Disconnected));
    assert_eq!(state_of(&directory, 11), Some(RecordState::Active));
    // Back with the same cookie: a reconnection to ann's session.
    let again = directory
        .front_door_attach("ANN@example.com", "", "")
        .unwrap();
    assert_eq!((again.session_id, again.pending_logon), (10, false));
    assert_eq!(state_of(&directory, 10), Some(RecordState::Active));
    directory.front_door_detach(again, ENDED);
    directory.front_door_detach(bob, ENDED);
    assert_eq!(state_of(&directory, 11), Some(RecordState::Disconnected));
}

#[test]
fn a_new_client_without_a_name_takes_over_a_session_matched_the_same_way() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, _receiver) = Directory::open(dir.path()).unwrap();
    let first = directory.front_door_attach_unknown(None);
    directory.apply(Logon, request("ann", 10)).unwrap();
    // Ann connects from a second device, again without a cookie; xrdp hands her session to it
    // (the reconnect hook reports it) and drops the first client.
    let second = directory.front_door_attach_unknown(None);
    directory.apply(Reconnect, request("ann", 10)).unwrap();
    directory.front_door_detach_unknown(first, ENDED);
    assert_eq!(state_of(&directory, 10), Some(RecordState::Active));
    directory.front_door_detach_unknown(second, ENDED);
    assert_eq!(state_of(&directory, 10), Some(RecordState::Disconnected));
}

#[test]
fn a_session_its_user_named_is_not_taken_by_a_connection_without_a_name() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, _receiver) = Directory::open(dir.path()).unwrap();
    directory.apply(Logon, request("ann", 10)).unwrap();
    directory.apply(Disconnect, request("ann", 10)).unwrap();
    // Ann is back with her cookie; someone else sits at xrdp's login screen. The reconnect
    // hook's report is about ann's connection.
    let ann = directory.front_door_attach("ann", "", "").unwrap();
    let stranger = directory.front_door_attach_unknown(None);
    directory.apply(Reconnect, request("ann", 10)).unwrap();
    directory.front_door_detach_unknown(stranger, ENDED);
    assert_eq!(state_of(&directory, 10), Some(RecordState::Active));
    directory.front_door_detach(ann, ENDED);
    assert_eq!(state_of(&directory, 10), Some(RecordState::Disconnected));
}

/// xrdp gives a returning client a new session (the old session an orphan of a restarted
/// sesman; another screen size under `Policy=UBD`): the connection the
/// cookie tied to the old session holds the new one once PAM reports it, and the old one is
/// disconnected again. Else the new one stayed ACTIVE after its client left, and the old
/// one took the client's state.
#[test]
fn a_returning_client_given_a_new_session_holds_that_one() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, mut receiver) = Directory::open(dir.path()).unwrap();
    let first = directory
        .front_door_attach("tu3", "", "10.0.0.3:1000")
        .unwrap();
    directory.apply(Logon, request("tu3", 10)).unwrap();
    directory.front_door_detach(first, ENDED);
    assert_eq!(state_of(&directory, 10), Some(RecordState::Disconnected));
    events(&mut receiver);

    let back = directory
        .front_door_attach("tu3", "", "10.0.0.3:2000")
        .unwrap();
    assert_eq!(back.session_id, 10);
    directory.apply(Logon, request("tu3", 11)).unwrap();
    assert_eq!(state_of(&directory, 10), Some(RecordState::Disconnected));
    assert_eq!(state_of(&directory, 11), Some(RecordState::Active));
    assert_eq!(
        events(&mut receiver),
        vec![
            (Reconnect, 10, "tu3".into()),
            (Disconnect, 10, "tu3".into()),
            (Logon, 11, "tu3".into())
        ]
    );
    // Its client leaves: the new session is disconnected.
    directory.front_door_detach(back, ENDED);
    assert_eq!(state_of(&directory, 11), Some(RecordState::Disconnected));
    assert_eq!(events(&mut receiver), vec![(Disconnect, 11, "tu3".into())]);

    // Back again; the cookie ties the connection to one of the two, xrdp reattaches the other
    // (its reconnect hook says which): the hook's word wins.
    let again = directory
        .front_door_attach("tu3", "", "10.0.0.3:3000")
        .unwrap();
    let other = if again.session_id == 10 { 11 } else { 10 };
    directory.apply(Reconnect, request("tu3", other)).unwrap();
    assert_eq!(state_of(&directory, other), Some(RecordState::Active));
    assert_eq!(
        state_of(&directory, again.session_id),
        Some(RecordState::Disconnected)
    );
    directory.front_door_detach(again, ENDED);
    assert_eq!(state_of(&directory, other), Some(RecordState::Disconnected));

    // Two devices: the first holds tu5's session 15; the second, tied by its cookie to 15
    // too, is given session 16. Session 15 stays ACTIVE under the first device.
    let device_one = directory
        .front_door_attach("tu5", "", "10.0.0.4:1000")
        .unwrap();
    directory.apply(Logon, request("tu5", 15)).unwrap();
    let device_two = directory
        .front_door_attach("tu5", "", "10.0.0.5:1000")
        .unwrap();
    assert_eq!(device_two.session_id, 15);
    directory.apply(Logon, request("tu5", 16)).unwrap();
    let address_of = |session_id| {
        let records = directory.list();
        let record = records
            .into_iter()
            .find(|record| record.session_id == session_id);
        record.map(|record| (record.state, record.client_address))
    };
    assert_eq!(
        address_of(15),
        Some((RecordState::Active, "10.0.0.4:1000".into()))
    );
    assert_eq!(
        address_of(16),
        Some((RecordState::Active, "10.0.0.5:1000".into()))
    );
    directory.front_door_detach(device_one, ENDED);
    assert_eq!(state_of(&directory, 15), Some(RecordState::Disconnected));
    assert_eq!(state_of(&directory, 16), Some(RecordState::Active));
    directory.front_door_detach(device_two, ENDED);
    assert_eq!(state_of(&directory, 16), Some(RecordState::Disconnected));

    // Another user's logon never takes tu3's connection.
    let tu3 = directory
        .front_door_attach("tu3", "", "10.0.0.3:4000")
        .unwrap();
    directory.apply(Logon, request("tu4", 20)).unwrap();
    directory.front_door_detach(tu3, ENDED);
    assert_eq!(
        state_of(&directory, tu3.session_id),
        Some(RecordState::Disconnected)
    );
    assert_eq!(state_of(&directory, 20), Some(RecordState::Active));
}
