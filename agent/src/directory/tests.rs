//! Tests of the table's rules and of its persistence.

use super::*;
use tsbroker_common::model::SessionEventKind::{Disconnect, Logoff, Logon, Reconnect};

fn request(user: &str, session_id: Option<u32>) -> SessionRequest {
    SessionRequest {
        user_name: user.to_owned(),
        session_id,
        ..Default::default()
    }
}

fn drain(events: &mut DirectoryEvents) -> Vec<(SessionEventKind, u32, String)> {
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
    // The connection's end disconnects the merged session only if it is still attached.
    directory.front_door_detach(attached);
    assert!(drain(&mut events).is_empty());
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
    directory.front_door_detach(attached);
    assert_eq!(directory.list()[0].state, RecordState::Active);
    directory.front_door_detach(newer);
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
    directory.front_door_detach(again);
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
                },
            )
            .unwrap();
        directory.apply(Disconnect, request("alice", None)).unwrap();
        directory.front_door_attach("bob", "", "").unwrap();
    }
    let (directory, _events) = Directory::open(dir.path()).unwrap();
    let sessions = directory.list();
    assert_eq!(sessions.len(), 2);
    assert_eq!(sessions[0].session_id, 10);
    assert_eq!(sessions[0].domain, "CORP");
    assert_eq!(sessions[0].state, RecordState::Disconnected);
    assert_eq!(sessions[1].attachment, 0);
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
