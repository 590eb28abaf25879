//! Resolving a `MachineRef` (an id, or a farm and a name) to a machine. A reference that gives
//! both must name the same machine: a script that fills in every field never acts on another
//! machine than the one it named.

use crate::error::ApiError;
use crate::store::{MachineRecord, Store};
use tsbroker_common::proto::v1 as pb;
use tsbroker_common::{ValidationError, validate};

/// The names an error gives the reference's fields: those of a `MachineRef` in a request's
/// `machine` field, or of a request that has the three fields itself (`ListSessions`).
pub struct FieldNames {
    pub whole: &'static str,
    pub farm: &'static str,
    pub machine_name: &'static str,
    pub machine_id: &'static str,
}

/// A `MachineRef` in a request's `machine` field.
pub const IN_MACHINE: FieldNames = FieldNames {
    whole: "machine",
    farm: "machine.farm",
    machine_name: "machine.machine_name",
    machine_id: "machine.machine_id",
};

/// The request's own `farm`, `machine_name` and `machine_id`.
pub const TOP_LEVEL: FieldNames = FieldNames {
    whole: "machine_id",
    farm: "farm",
    machine_name: "machine_name",
    machine_id: "machine_id",
};

pub async fn resolve(
    store: &dyn Store,
    reference: &pb::MachineRef,
) -> Result<MachineRecord, ApiError> {
    resolve_fields(store, reference, &IN_MACHINE).await
}

/// [`resolve`], errors naming the fields as `fields` says.
pub async fn resolve_fields(
    store: &dyn Store,
    reference: &pb::MachineRef,
    fields: &FieldNames,
) -> Result<MachineRecord, ApiError> {
    let farm = (!reference.farm.is_empty())
        .then(|| validate::farm_name(fields.farm, &reference.farm))
        .transpose()?;
    let name = (!reference.machine_name.is_empty())
        .then(|| validate::machine_name(fields.machine_name, &reference.machine_name))
        .transpose()?;
    let found = if !reference.machine_id.is_empty() {
        let id = validate::machine_id(fields.machine_id, &reference.machine_id)?;
        let found = store.get_machine(id).await?;
        if let Some(machine) = &found {
            check_same_machine(machine, farm.as_deref(), name.as_deref(), fields.whole)?;
        }
        found
    } else if let (Some(farm), Some(name)) = (&farm, &name) {
        store.find_machine(farm, name).await?
    } else {
        return Err(ValidationError::new(
            fields.whole,
            "give machine_id, or farm and machine_name",
        )
        .into());
    };
    found.ok_or_else(|| {
        let what = if reference.machine_id.is_empty() {
            format!(
                "machine {:?} in farm {:?}",
                reference.machine_name, reference.farm
            )
        } else {
            format!("machine {}", reference.machine_id)
        };
        ApiError::NotFound(what)
    })
}

/// The farm and name given beside an id must be the id's machine's (the name in any case, as
/// a lookup by name).
fn check_same_machine(
    machine: &MachineRecord,
    farm: Option<&str>,
    name: Option<&str>,
    field: &'static str,
) -> Result<(), ValidationError> {
    let farm_differs = farm.is_some_and(|farm| farm != machine.farm);
    let name_differs = name.is_some_and(|name| !name.eq_ignore_ascii_case(&machine.name));
    if farm_differs || name_differs {
        // Names only the fields given: "farm", "machine_name" or both.
        let given = match (farm.is_some(), name.is_some()) {
            (true, true) => "farm and machine_name say",
            (true, false) => "farm says",
            _ => "machine_name says",
        };
        return Err(ValidationError::new(
            field,
            format!(
                "machine_id {} is {:?} in farm {:?}, not what {given}; \
                 give machine_id alone, or farm and machine_name",
                machine.id, machine.name, machine.farm
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::machine_load;

    #[test]
    fn a_farm_or_name_beside_an_id_must_be_the_ids_machine() {
        let machine = MachineRecord::clone(&machine_load(1, 100, 0).machine);
        let (farm, name) = (machine.farm.clone(), machine.name.clone());
        assert!(check_same_machine(&machine, None, None, "machine").is_ok());
        assert!(check_same_machine(&machine, Some(&farm), Some(&name), "machine").is_ok());
        assert!(
            check_same_machine(&machine, None, Some(&name.to_ascii_uppercase()), "machine").is_ok()
        );
        assert!(check_same_machine(&machine, Some(&farm), None, "machine").is_ok());
        let refused = check_same_machine(&machine, Some(&farm), Some("other.example"), "machine")
            .unwrap_err();
        assert!(refused.reason.contains(&name), "{refused}");
        assert!(
            check_same_machine(&machine, Some("another-farm"), Some(&name), "machine").is_err()
        );
        let farm_only = check_same_machine(&machine, Some("another-farm"), None, "machine");
        assert!(
            farm_only
                .unwrap_err()
                .reason
                .contains("not what farm says;"),
            "names only the field given"
        );
    }
}
