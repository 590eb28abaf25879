//! From store records to the wire types operators see.

use crate::store::{FarmRecord, MachineRecord, SessionRecord};
use tsbroker_common::model::{SessionState, millis_to_timestamp};
use tsbroker_common::proto::v1 as pb;

/// The machine as operators should see it: a READY or JOINING machine whose lease ran out
/// before `lease_cutoff` is UNREACHABLE, as decisions take it — its agent went silent, or its
/// stream ended with a broker replica that died before it could mark the machine.
pub fn machine_seen(record: &MachineRecord, lease_cutoff: i64) -> pb::Machine {
    pb::Machine {
        state: record.state_seen(lease_cutoff).to_proto() as i32,
        ..machine(record)
    }
}

pub fn machine(record: &MachineRecord) -> pb::Machine {
    let last_load = record.load_cpu.map(|cpu| pb::LoadReport {
        session_count: record
            .load_sessions
            .unwrap_or(0)
            .clamp(0, i64::from(u32::MAX)) as u32,
        cpu_percent: cpu as f32,
        memory_percent: record.load_memory.unwrap_or(0.0) as f32,
        pending_logons: record
            .load_pending
            .unwrap_or(0)
            .clamp(0, i64::from(u32::MAX)) as u32,
    });
    pb::Machine {
        id: record.id.to_string(),
        name: record.name.clone(),
        farm: record.farm.clone(),
        address: record.address.clone(),
        weight: record.weight(),
        // What placements apply: a single-session machine's limit is 1, whatever is set.
        session_limit: record.capacity().map_or(0, |capacity| capacity as u32),
        single_session: record.single_session,
        agent_version: record.agent_version.clone(),
        state: record.machine_state().to_proto() as i32,
        draining: record.draining,
        session_count: record.session_count.clamp(0, i64::from(u32::MAX)) as u32,
        pending_logons: record.pending_logons.clamp(0, i64::from(u32::MAX)) as u32,
        last_load,
        last_seen: Some(millis_to_timestamp(record.last_seen_at)),
        ready_since: record.ready_since.map(millis_to_timestamp),
        weight_overridden: record.admin_weight.is_some(),
        session_limit_overridden: record.admin_session_limit.is_some(),
        front_door: record.front_door,
    }
}

pub fn session(record: &SessionRecord) -> pb::Session {
    pb::Session {
        machine_id: record.machine_id.to_string(),
        machine_name: record.machine_name.clone(),
        farm: record.farm.clone(),
        session_id: record.session_id.clamp(0, i64::from(u32::MAX)) as u32,
        user_name: record.user_name.clone(),
        domain: record.domain.clone(),
        state: SessionState::parse(&record.state)
            .map_or(pb::SessionState::Unspecified, SessionState::to_proto) as i32,
        client_address: record.client_address.clone(),
        logon_time: Some(millis_to_timestamp(record.logon_at)),
        state_changed: Some(millis_to_timestamp(record.state_changed_at)),
    }
}

/// `farms` with their count of READY machines taken as [`machine_seen`] takes them (a READY
/// machine whose lease ran out is not counted), from `machines` (theirs, or more).
pub fn farms_seen(
    farms: &[FarmRecord],
    machines: &[MachineRecord],
    lease_cutoff: i64,
) -> Vec<pb::Farm> {
    let mut ready: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
    for machine in machines {
        if machine.is_reachable(lease_cutoff) {
            *ready.entry(machine.farm.as_str()).or_default() += 1;
        }
    }
    farms
        .iter()
        .map(|record| FarmRecord {
            ready_machine_count: ready.get(record.name.as_str()).copied().unwrap_or(0),
            ..record.clone()
        })
        .map(|record| farm(&record))
        .collect()
}

pub fn farm(record: &FarmRecord) -> pb::Farm {
    let clamp = |value: i64| value.clamp(0, i64::from(u32::MAX)) as u32;
    pb::Farm {
        name: record.name.clone(),
        policy: record.policy.clone(),
        machine_count: clamp(record.machine_count),
        ready_machine_count: clamp(record.ready_machine_count),
        session_count: clamp(record.session_count),
    }
}

/// The settings an agent is told about.
pub fn settings(record: &MachineRecord) -> pb::MachineSettings {
    pb::MachineSettings {
        draining: record.draining,
        weight: record.weight(),
        session_limit: record.session_limit(),
    }
}
