//! Resolving a `MachineRef` (an id, or a farm and a name) to a machine.

use crate::error::ApiError;
use crate::store::{MachineRecord, Store};
use tsbroker_common::proto::v1 as pb;
use tsbroker_common::{ValidationError, validate};

pub async fn resolve(
    store: &dyn Store,
    reference: &pb::MachineRef,
) -> Result<MachineRecord, ApiError> {
    let found = if !reference.machine_id.is_empty() {
        let id = validate::machine_id("machine.machine_id", &reference.machine_id)?;
        store.get_machine(id).await?
    } else if !reference.farm.is_empty() && !reference.machine_name.is_empty() {
        let farm = validate::farm_name("machine.farm", &reference.farm)?;
        let name = validate::machine_name("machine.machine_name", &reference.machine_name)?;
        store.find_machine(&farm, &name).await?
    } else {
        return Err(
            ValidationError::new("machine", "give machine_id, or farm and machine_name").into(),
        );
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
