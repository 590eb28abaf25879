//! What plug-ins are told: machine and session notifications in the Session Broker's order
//! (ADDED, RESYNC, CHANGED … REMOVED), built from the directory's records.

use crate::service::convert;
use crate::store::{MachineRecord, SessionRecord};
use tsbroker_common::model::{SessionEventKind, SessionInfo, millis_to_timestamp};
use tsbroker_common::proto::v1 as pb;

/// One notification waiting to be sent.
#[derive(Clone, Debug, PartialEq)]
pub enum Notice {
    Machine(Box<pb::MachineChangeNotificationRequest>),
    /// Session changes of one machine: live events (`notification` UNSPECIFIED, merged into
    /// batches when sent) or one batch of a RESYNC.
    Sessions(pb::SessionChangeNotificationRequest),
}

impl Notice {
    /// The machine the notice is about.
    pub fn machine_id(&self) -> &str {
        match self {
            Notice::Machine(request) => &request.machine_id,
            Notice::Sessions(request) => &request.machine_id,
        }
    }
}

/// ADDED with the whole machine.
pub fn machine_added(machine: &MachineRecord) -> Notice {
    machine_notice(
        pb::NotificationType::Added,
        convert::machine(machine),
        Vec::new(),
    )
}

/// A field of `Machine` that a CHANGED notification can carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangedField {
    State,
    Draining,
    Weight,
    SessionLimit,
}

/// CHANGED with only `fields` set (plus id, name and farm) and named in `changed_fields`.
pub fn machine_changed(machine: &MachineRecord, fields: &[ChangedField]) -> Notice {
    let full = convert::machine(machine);
    let mut changed = pb::Machine {
        id: full.id,
        name: full.name,
        farm: full.farm,
        ..Default::default()
    };
    let mut names = Vec::new();
    for field in fields {
        match field {
            ChangedField::State => {
                changed.state = full.state;
                names.push("state".to_owned());
            }
            ChangedField::Draining => {
                changed.draining = full.draining;
                names.push("draining".to_owned());
            }
            ChangedField::Weight => {
                changed.weight = full.weight;
                changed.weight_overridden = full.weight_overridden;
                names.push("weight".to_owned());
            }
            ChangedField::SessionLimit => {
                changed.session_limit = full.session_limit;
                changed.session_limit_overridden = full.session_limit_overridden;
                names.push("session_limit".to_owned());
            }
        }
    }
    machine_notice(pb::NotificationType::Changed, changed, names)
}

/// CHANGED carrying the machine's state.
pub fn machine_state_changed(machine: &MachineRecord) -> Notice {
    machine_changed(machine, &[ChangedField::State])
}

pub fn machine_removed(machine_id: &str, name: &str, farm: &str) -> Notice {
    machine_notice(
        pb::NotificationType::Removed,
        pb::Machine {
            id: machine_id.to_owned(),
            name: name.to_owned(),
            farm: farm.to_owned(),
            state: pb::MachineState::Removed as i32,
            ..Default::default()
        },
        Vec::new(),
    )
}

fn machine_notice(
    kind: pb::NotificationType,
    machine: pb::Machine,
    changed_fields: Vec<String>,
) -> Notice {
    Notice::Machine(Box::new(pb::MachineChangeNotificationRequest {
        r#type: kind as i32,
        machine_id: machine.id.clone(),
        machine: Some(machine),
        changed_fields,
    }))
}

/// A session of `machine` as plug-ins see it, from what an agent reported.
pub fn session_from_info(machine: &MachineRecord, session: &SessionInfo, now: i64) -> pb::Session {
    pb::Session {
        machine_id: machine.id.to_string(),
        machine_name: machine.name.clone(),
        farm: machine.farm.clone(),
        session_id: session.session_id,
        user_name: session.user_name.clone(),
        domain: session.domain.clone(),
        state: session.state.to_proto() as i32,
        client_address: session.client_address.clone(),
        logon_time: Some(millis_to_timestamp(session.logon_time_ms.unwrap_or(now))),
        state_changed: Some(millis_to_timestamp(now)),
    }
}

/// A live session event.
pub fn session_event(
    machine: &MachineRecord,
    kind: SessionEventKind,
    session: pb::Session,
) -> Notice {
    Notice::Sessions(pb::SessionChangeNotificationRequest {
        notification: pb::NotificationType::Unspecified as i32,
        machine_id: machine.id.to_string(),
        changes: vec![pb::SessionChange {
            r#type: kind.to_proto() as i32,
            session: Some(session),
        }],
        last_batch: true,
    })
}

/// RESYNC of a machine's sessions, in batches of at most `batch_size`; always at least one
/// batch (an empty one for a machine without sessions), the last with `last_batch` set.
pub fn sessions_resync(
    machine_id: &str,
    sessions: Vec<pb::Session>,
    batch_size: usize,
) -> Vec<Notice> {
    let changes: Vec<pb::SessionChange> = sessions
        .into_iter()
        .map(|session| pb::SessionChange {
            r#type: pb::SessionEventType::Unspecified as i32,
            session: Some(session),
        })
        .collect();
    let mut batches: Vec<Vec<pb::SessionChange>> = changes
        .chunks(batch_size.max(1))
        .map(<[pb::SessionChange]>::to_vec)
        .collect();
    if batches.is_empty() {
        batches.push(Vec::new());
    }
    let count = batches.len();
    batches
        .into_iter()
        .enumerate()
        .map(|(index, changes)| {
            Notice::Sessions(pb::SessionChangeNotificationRequest {
                notification: pb::NotificationType::Resync as i32,
                machine_id: machine_id.to_owned(),
                changes,
                last_batch: index + 1 == count,
            })
        })
        .collect()
}

/// A machine told whole, as a full resync tells each: ADDED, its sessions' RESYNC batches,
/// CHANGED with its state.
pub fn machine_whole(
    machine: &MachineRecord,
    sessions: Vec<pb::Session>,
    batch_size: usize,
) -> Vec<Notice> {
    let mut sequence = vec![machine_added(machine)];
    sequence.extend(sessions_resync(
        &machine.id.to_string(),
        sessions,
        batch_size,
    ));
    sequence.push(machine_state_changed(machine));
    sequence
}

/// A session from the directory, for a full RESYNC.
pub fn session_from_record(record: &SessionRecord) -> pb::Session {
    convert::session(record)
}

/// Merges live session notices into batches of at most `batch_size` changes per machine.
/// Between two notices that are not live session events (a machine's notice, a RESYNC batch),
/// which keep their places, the live events are grouped by machine, machines in the order of
/// their first event: each machine's events stay in their order (a farm's agents interleave
/// theirs, so merging only neighbours left most batches at one event).
pub fn merge_live_batches(notices: Vec<Notice>, batch_size: usize) -> Vec<Notice> {
    let batch_size = batch_size.max(1);
    let mut merged: Vec<Notice> = Vec::with_capacity(notices.len());
    let mut run: Vec<pb::SessionChangeNotificationRequest> = Vec::new();
    for notice in notices {
        match notice {
            Notice::Sessions(request)
                if request.notification == pb::NotificationType::Unspecified as i32 =>
            {
                match run
                    .iter_mut()
                    .find(|group| group.machine_id == request.machine_id)
                {
                    Some(group) => group.changes.extend(request.changes),
                    None => run.push(request),
                }
            }
            barrier => {
                flush_run(&mut run, batch_size, &mut merged);
                merged.push(barrier);
            }
        }
    }
    flush_run(&mut run, batch_size, &mut merged);
    merged
}

/// Each machine's grouped live events, in batches of at most `batch_size`.
fn flush_run(
    run: &mut Vec<pb::SessionChangeNotificationRequest>,
    batch_size: usize,
    merged: &mut Vec<Notice>,
) {
    for group in run.drain(..) {
        for changes in group.changes.chunks(batch_size) {
            merged.push(Notice::Sessions(pb::SessionChangeNotificationRequest {
                notification: group.notification,
                machine_id: group.machine_id.clone(),
                changes: changes.to_vec(),
                last_batch: true,
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(machine: &str, user: &str) -> Notice {
        Notice::Sessions(pb::SessionChangeNotificationRequest {
            notification: 0,
            machine_id: machine.into(),
            changes: vec![pb::SessionChange {
                r#type: pb::SessionEventType::Logon as i32,
                session: Some(pb::Session {
                    user_name: user.into(),
                    ..Default::default()
                }),
            }],
            last_batch: true,
        })
    }

    fn sizes(notices: &[Notice]) -> Vec<usize> {
        notices
            .iter()
            .map(|notice| match notice {
                Notice::Sessions(request) => request.changes.len(),
                Notice::Machine(_) => 0,
            })
            .collect()
    }

    #[test]
    fn live_events_merge_per_machine_up_to_the_batch_size() {
        let mut notices: Vec<_> = (0..60)
            .map(|user| live("m1", &format!("u{user}")))
            .collect();
        notices.push(live("m2", "x"));
        notices.push(live("m1", "y"));
        let merged = merge_live_batches(notices, 25);
        // m1's 61 events in order, then m2's.
        assert_eq!(sizes(&merged), vec![25, 25, 11, 1]);
        let users = |notice: &Notice| match notice {
            Notice::Sessions(request) => request
                .changes
                .iter()
                .map(|change| change.session.as_ref().unwrap().user_name.clone())
                .collect::<Vec<_>>(),
            Notice::Machine(_) => Vec::new(),
        };
        assert_eq!(users(&merged[2]).last().unwrap(), "y");
        assert_eq!(users(&merged[3]), vec!["x"]);
    }

    #[test]
    fn interleaved_machines_merge_but_not_across_a_machine_notice() {
        let mut notices = Vec::new();
        for user in 0..10 {
            notices.push(live("m1", &format!("a{user}")));
            notices.push(live("m2", &format!("b{user}")));
        }
        notices.push(machine_removed("m2", "m2", "farm"));
        notices.push(live("m1", "after"));
        let merged = merge_live_batches(notices, 25);
        assert_eq!(sizes(&merged), vec![10, 10, 0, 1]);
        assert_eq!(merged[2].machine_id(), "m2");
    }

    #[test]
    fn resync_batches_end_with_last_batch() {
        let sessions: Vec<_> = (0..51).map(|_| pb::Session::default()).collect();
        let batches = sessions_resync("m", sessions, 25);
        assert_eq!(sizes(&batches), vec![25, 25, 1]);
        let last: Vec<_> = batches
            .iter()
            .map(|notice| matches!(notice, Notice::Sessions(request) if request.last_batch))
            .collect();
        assert_eq!(last, vec![false, false, true]);
        let empty = sessions_resync("m", Vec::new(), 25);
        assert_eq!(sizes(&empty), vec![0]);
    }
}
