//! The in-memory half of placing a batch of new logons, shared by both backends: given the
//! farm's machines (read under the farm's lock, or the cached copy) and the users' pending
//! logons, decides each request in order, counting each pick as load for the next. The
//! backend then writes the new pending logons in one statement and commits.

use super::BatchChooser;
use super::candidates::CandidateSet;
use super::records::{Choice, MachineRecord, Placement, PlacementRequest};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use uuid::Uuid;

/// What a batch decided: an answer per request, and the pending logons to record
/// (request index, machine).
pub(crate) struct PlannedBatch {
    pub placements: Vec<Placement>,
    pub new_pending: Vec<(usize, Uuid)>,
}

/// Decides every request of the batch. `pending` maps user keys to the machine of their
/// unexpired pending logon (as read from the database); it and `machines` are updated with
/// the batch's picks. `with_sessions` holds the users (of requests that `check_sessions`) who
/// have a session in the farm.
pub(crate) fn plan(
    requests: &[PlacementRequest<'_>],
    policy: &str,
    choose: &BatchChooser<'_>,
    machines: &mut Vec<Arc<MachineRecord>>,
    pending: &mut HashMap<String, Uuid>,
    with_sessions: &HashSet<String>,
) -> PlannedBatch {
    let mut placements = Vec::with_capacity(requests.len());
    let mut new_pending = Vec::new();
    let Some(first) = requests.first() else {
        return PlannedBatch {
            placements,
            new_pending,
        };
    };
    let mut farm = CandidateSet::new(std::mem::take(machines), first);
    for (index, request) in requests.iter().enumerate() {
        if request.check_sessions && with_sessions.contains(request.user_key) {
            placements.push(Placement::HasSession);
            continue;
        }
        farm.follow_terms(request);
        let pending_on = pending
            .get(request.user_key)
            .and_then(|machine| farm.machine(*machine));
        if let Some(target) = pending_on
            && target.takes_its_users_back(request.lease_cutoff)
            && !request.excluded.contains(&target.id)
        {
            placements.push(Placement::AlreadyPending(MachineRecord::clone(target)));
            continue;
        }
        let moved_from = pending_on.map(|machine| machine.id);
        let chosen = match choose(index, policy, &farm.candidates_for(request)) {
            Choice::Machine(id) if farm.is_candidate(id, request) => Some(id),
            Choice::Machine(_) | Choice::Nothing => None,
        };
        let Some(chosen) = chosen else {
            placements.push(Placement::NoCandidate(farm.all_for(request)));
            continue;
        };
        // The pending logon moves here from the machine that had it.
        if let Some(previous) = moved_from {
            farm.add_pending(previous, -1);
        }
        let Some(placed) = farm
            .add_pending(chosen, 1)
            .map(|machine| MachineRecord::clone(machine))
        else {
            placements.push(Placement::NoCandidate(farm.all_for(request)));
            continue;
        };
        pending.insert(request.user_key.to_owned(), chosen);
        new_pending.push((index, chosen));
        placements.push(Placement::Placed(placed));
    }
    *machines = farm.into_machines();
    PlannedBatch {
        placements,
        new_pending,
    }
}

/// Puts the rows of machines that changed in place of their old copies; `false` (and the copy
/// then must be read whole) when one is new to the copy.
pub(crate) fn merge_changed(
    machines: &mut [Arc<MachineRecord>],
    changed: Vec<MachineRecord>,
) -> bool {
    if changed.is_empty() {
        return true;
    }
    let at: HashMap<Uuid, usize> = machines
        .iter()
        .enumerate()
        .map(|(index, machine)| (machine.id, index))
        .collect();
    for machine in changed {
        let Some(&index) = at.get(&machine.id) else {
            return false;
        };
        machines[index] = Arc::new(machine);
    }
    true
}

/// Sets each machine's logons in flight from the farm's counts by machine; a machine with
/// none in the counts has none.
pub(crate) fn set_pending_counts(machines: &mut [MachineRecord], counts: Vec<(Uuid, i64)>) {
    let counts: HashMap<Uuid, i64> = counts.into_iter().collect();
    for machine in machines {
        machine.pending_logons = counts.get(&machine.id).copied().unwrap_or(0);
    }
}

/// The keys of an `IN (…)` list, the last repeated up to the next power of two: a batch's
/// lookups then have one of a few statement texts, which each connection prepares once.
pub(crate) fn padded_keys<'k, 'a>(keys: &'k [&'a str]) -> Vec<&'k &'a str> {
    let Some(last) = keys.last() else {
        return Vec::new();
    };
    let mut padded: Vec<&&str> = keys.iter().collect();
    padded.resize(keys.len().next_power_of_two(), last);
    padded
}

/// `SELECT user_key, machine_id` of the unexpired pending logons of `users` keys in a farm:
/// `$1` farm, `$2` now, `$3…` the keys; with `sessions`, also `(user_key, NULL)` for each of
/// those users who has a session in the farm (a key may come back more than once).
pub fn select_pending_of_users(users: usize, sessions: bool) -> String {
    let rows: Vec<String> = (0..users).map(|at| format!("(${})", 3 + at)).collect();
    let rows = rows.join(", ");
    // One probe of the primary key per user (a subquery per row of the key list), whatever the
    // planner believes of the table. As `user_key IN (…)` both planners, without statistics
    // (SQLite keeps none; PostgreSQL's table is new), read every pending logon of the farm
    // instead: 20-40 ms a batch at 20,000 pending logons. (On PostgreSQL the only index that
    // starts with the farm is the primary key: see migration 0004.) The expiry is tested on
    // the row found, not in the WHERE clause: a plan made while the table was empty would
    // otherwise take the expiry index and read every pending logon not yet expired.
    let mut statement = format!(
        "SELECT user_key, machine_id FROM (SELECT k.column1 AS user_key, \
         (SELECT CASE WHEN p.expires_at > $2 THEN p.machine_id END FROM pending_logons p \
         WHERE p.farm = $1 AND p.user_key = k.column1) AS machine_id \
         FROM (VALUES {rows}) AS k) AS found WHERE machine_id IS NOT NULL"
    );
    if sessions {
        // Also one probe of (farm, user_key) per user. As `user_key IN (…)`, PostgreSQL's plan
        // made while the table was small (a new database: autovacuum analyses it a minute
        // later at the earliest) takes the index by farm alone and filters every session of
        // the farm: 15-120 ms a batch by the end of a 10,000-user storm.
        statement.push_str(&format!(
            " UNION ALL SELECT user_key, CAST(NULL AS uuid) FROM (SELECT k.column1 AS user_key, \
             (SELECT 1 FROM sessions s WHERE s.farm = $1 AND s.user_key = k.column1 LIMIT 1) \
             AS held FROM (VALUES {rows}) AS k) AS holding WHERE held IS NOT NULL"
        ));
    }
    statement
}

/// Records `rows` pending logons in one statement: `$1` farm, `$2` created, `$3` expires,
/// then (user key, machine) per row.
pub(crate) fn upsert_pending_rows(rows: usize) -> String {
    let values: Vec<String> = (0..rows)
        .map(|row| format!("($1, ${}, ${}, $2, $3)", 4 + 2 * row, 5 + 2 * row))
        .collect();
    format!(
        "INSERT INTO pending_logons (farm, user_key, machine_id, created_at, expires_at) \
         VALUES {} ON CONFLICT (farm, user_key) DO UPDATE SET machine_id = excluded.machine_id, \
         created_at = excluded.created_at, expires_at = excluded.expires_at",
        values.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_machines_replace_their_copies_and_new_ones_need_a_full_read() {
        use crate::store::test_support::machine_load;
        let copy = |index: u32, sessions: i64| {
            MachineRecord::clone(&machine_load(index, 100, sessions).machine)
        };
        let mut machines: Vec<Arc<MachineRecord>> =
            (0..3).map(|index| Arc::new(copy(index, 0))).collect();
        assert!(merge_changed(&mut machines, vec![copy(1, 7)]));
        let sessions: Vec<i64> = machines.iter().map(|m| m.session_count).collect();
        assert_eq!(sessions, [0, 7, 0]);
        assert!(!merge_changed(&mut machines, vec![copy(9, 1)]));
    }

    #[test]
    fn key_lists_are_padded_to_a_power_of_two() {
        let keys = ["a", "b", "c"];
        let padded: Vec<&str> = padded_keys(&keys).into_iter().copied().collect();
        assert_eq!(padded, ["a", "b", "c", "c"]);
        assert_eq!(padded_keys(&keys[..2]).len(), 2);
        assert!(padded_keys(&[]).is_empty());
    }

    #[test]
    fn statements_number_their_parameters() {
        assert_eq!(
            select_pending_of_users(2, false),
            super::super::sql::PENDING_OF_TWO_USERS
        );
        assert!(select_pending_of_users(2, true).ends_with(
            "UNION ALL SELECT user_key, CAST(NULL AS uuid) FROM (SELECT k.column1 AS user_key, \
             (SELECT 1 FROM sessions s WHERE s.farm = $1 AND s.user_key = k.column1 LIMIT 1) \
             AS held FROM (VALUES ($3), ($4)) AS k) AS holding WHERE held IS NOT NULL"
        ));
        let upsert = upsert_pending_rows(2);
        assert!(upsert.contains("VALUES ($1, $4, $5, $2, $3), ($1, $6, $7, $2, $3) ON CONFLICT"));
    }
}
