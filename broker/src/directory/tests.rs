//! The directory's states: a read of everything that fails (the database went away) leaves
//! the index in use answering, and one that succeeds installs the new index with the commits
//! made while it read; a user principal name asked with a domain.

use super::index::tests::{machine, row};
use super::*;
use crate::store::SessionRow;

fn shared() -> Shared {
    let (reloads, _requests) = mpsc::unbounded_channel();
    Shared {
        state: RwLock::new(State::Loading(Queue::default())),
        reloads,
        awake: Arc::new(wakefulness::Wakefulness::new()),
    }
}

fn index_with(rows: &[(u128, i64, &str)]) -> DirectoryIndex {
    let mut index = DirectoryIndex::default();
    for (machine_id, session_id, user) in rows {
        index.set_machine(
            uuid::Uuid::from_u128(*machine_id),
            Some(machine(*machine_id)),
        );
        index.upsert_session(row(*machine_id, *session_id, user, "disconnected"));
    }
    index
}

fn logon(machine_id: u128, session_id: i64, user: &str) -> DirectoryDelta {
    DirectoryDelta {
        upserts: vec![row(machine_id, session_id, user, "active")],
        ..DirectoryDelta::default()
    }
}

/// The sessions the index in use has of `user` (`None`: no index in use).
fn sessions(shared: &Shared, user: &str) -> Option<Vec<i64>> {
    shared.read(|index| {
        Some(
            index
                .sessions_of("f", user)
                .iter()
                .map(|s| s.session_id)
                .collect(),
        )
    })
}

#[test]
fn nothing_answers_before_the_first_read() {
    let shared = shared();
    shared.apply(logon(1, 7, "alice"));
    assert_eq!(sessions(&shared, "alice"), None);
    shared.reading_failed();
    assert_eq!(sessions(&shared, "alice"), None);
    // The commits made while it read are in the index it installs.
    assert!(shared.install(index_with(&[(1, 3, "bob")])));
    assert_eq!(sessions(&shared, "alice"), Some(vec![7]));
    assert_eq!(sessions(&shared, "bob"), Some(vec![3]));
}

#[test]
fn a_failed_reread_leaves_the_index_in_use_answering() {
    let shared = shared();
    assert!(shared.install(index_with(&[(1, 7, "alice")])));
    shared.begin_reading();
    shared.apply(logon(2, 9, "bob"));
    // The database went away under the read.
    shared.reading_failed();
    assert_eq!(sessions(&shared, "alice"), Some(vec![7]));
    assert_eq!(sessions(&shared, "bob"), Some(vec![9]));
    shared.apply(logon(2, 10, "carol"));
    assert_eq!(sessions(&shared, "carol"), Some(vec![10]));
}

#[test]
fn a_reread_answers_meanwhile_and_installs_the_new_index_with_the_commits_it_missed() {
    let shared = shared();
    assert!(shared.install(index_with(&[(1, 7, "alice"), (1, 8, "dave")])));
    shared.begin_reading();
    shared.apply(logon(2, 9, "bob"));
    assert_eq!(sessions(&shared, "alice"), Some(vec![7]));
    assert_eq!(sessions(&shared, "bob"), Some(vec![9]));
    // The database's truth: dave's session ended where this broker did not hear of it.
    assert!(shared.install(index_with(&[(1, 7, "alice")])));
    assert_eq!(sessions(&shared, "bob"), Some(vec![9]));
    assert_eq!(sessions(&shared, "dave"), Some(vec![]));
    // Too many commits during a read: nothing installed, the index in use goes on.
    shared.begin_reading();
    for session_id in 0..=MAX_QUEUED as i64 {
        shared.apply(logon(3, 100 + session_id, "erin"));
    }
    assert!(!shared.install(index_with(&[])));
    assert_eq!(sessions(&shared, "alice"), Some(vec![7]));
}

#[test]
fn a_principal_name_with_no_session_of_the_domain_asked_is_its_user_part() {
    let mut index = index_with(&[(2, 2, "erin")]);
    index.set_machine(uuid::Uuid::from_u128(1), Some(machine(1)));
    index.upsert_session(SessionRow {
        domain: "OTHER".into(),
        ..row(1, 1, "erin@corp.example", "disconnected")
    });
    let user_key = |user_name: &str, domain: &str| {
        let name = UserName {
            user_name,
            domain,
            may_be_cut: false,
        };
        lookup_in(&index, "f", &name, "").map(|answer| answer.user_key)
    };
    assert_eq!(user_key("erin@corp.example", "CORP").unwrap(), "erin");
    for domain in ["OTHER", "other", ""] {
        assert_eq!(
            user_key("erin@corp.example", domain).unwrap(),
            "erin@corp.example",
            "{domain}"
        );
    }
    // The user part has nothing of the domain either: the whole name stays.
    index.upsert_session(SessionRow {
        domain: "ELSE".into(),
        ..row(2, 2, "erin", "disconnected")
    });
    let name = UserName {
        user_name: "erin@corp.example",
        domain: "CORP",
        may_be_cut: false,
    };
    let answer = lookup_in(&index, "f", &name, "").unwrap();
    assert_eq!(answer.user_key, "erin@corp.example");
}

/// The log names a machine the directory knows by name and id, else by id.
#[test]
fn machines_are_labelled_by_name_once_known() {
    let shared = shared();
    let known = uuid::Uuid::from_u128(1);
    assert_eq!(shared.machine_label(known), known.to_string());
    assert!(shared.install(index_with(&[(1, 3, "bob")])));
    let name = machine(1).name;
    assert_eq!(shared.machine_label(known), format!("{name} ({known})"));
    let unknown = uuid::Uuid::from_u128(9);
    assert_eq!(shared.machine_label(unknown), unknown.to_string());
}
