//! `tsbroker.v1.Admin`: drain, weights, limits, removal and farm policy. Every change is in
//! the store at once, so every replica's next `Redirect` sees it; the machine's agent is told
//! through the change feed (see `gateway`).

use super::{CoreCell, convert, machine_ref};
use crate::decision::policy::PolicyRegistry;
use crate::error::ApiError;
use crate::plugin::notices::{self, ChangedField};
use crate::store::{MachineChange, Store};
use tonic::{Request, Response, Status};
use tsbroker_common::model::MachineState;
use tsbroker_common::proto::v1 as pb;
use tsbroker_common::{ValidationError, validate};

pub struct AdminApi {
    core: CoreCell,
    policies: PolicyRegistry,
}

impl AdminApi {
    pub fn new(core: CoreCell, policies: PolicyRegistry) -> Self {
        AdminApi { core, policies }
    }

    fn store(&self) -> Result<&dyn Store, Status> {
        Ok(self.core.with_database()?.store.as_ref())
    }

    async fn change(
        &self,
        by: String,
        reference: Option<pb::MachineRef>,
        change: MachineChange,
    ) -> Result<pb::Machine, Status> {
        let core = self.core.with_database()?;
        let store = core.store.as_ref();
        let machine = machine_ref::resolve(store, &reference.unwrap_or_default()).await?;
        let machine = store
            .change_machine(machine.id, change, store.now())
            .await
            .map_err(ApiError::from)?;
        let field = match change {
            MachineChange::Drain(_) => ChangedField::Draining,
            MachineChange::Weight(_) => ChangedField::Weight,
            MachineChange::SessionLimit(_) => ChangedField::SessionLimit,
        };
        core.plugins
            .notify(&machine.farm, notices::machine_changed(&machine, &[field]));
        tracing::info!(machine = %machine.name, farm = %machine.farm, %change, %by, "machine changed by admin");
        let cutoff = core.decider.lease_cutoff(store.now());
        Ok(convert::machine_seen(&machine, cutoff))
    }
}

/// Who made an administrator's change, for the log: the caller's address, and whether it
/// presented the admin token (the only identity `Admin` knows).
fn caller<T>(request: &Request<T>) -> String {
    let address = request.remote_addr().map_or_else(
        || "-".to_owned(),
        |address| address.ip().to_canonical().to_string(),
    );
    if request.metadata().contains_key("authorization") {
        format!("{address} (admin token)")
    } else {
        address
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminApi {
    async fn drain_machine(
        &self,
        request: Request<pb::MachineRef>,
    ) -> Result<Response<pb::Machine>, Status> {
        let by = caller(&request);
        Ok(Response::new(
            self.change(by, Some(request.into_inner()), MachineChange::Drain(true))
                .await?,
        ))
    }

    async fn undrain_machine(
        &self,
        request: Request<pb::MachineRef>,
    ) -> Result<Response<pb::Machine>, Status> {
        let by = caller(&request);
        Ok(Response::new(
            self.change(by, Some(request.into_inner()), MachineChange::Drain(false))
                .await?,
        ))
    }

    async fn set_machine_weight(
        &self,
        request: Request<pb::SetMachineWeightRequest>,
    ) -> Result<Response<pb::Machine>, Status> {
        let by = caller(&request);
        let request = request.into_inner();
        let weight = match request.weight {
            0 => None,
            weight => Some(validate::weight("weight", weight, false).map_err(ApiError::from)?),
        };
        Ok(Response::new(
            self.change(by, request.machine, MachineChange::Weight(weight))
                .await?,
        ))
    }

    async fn set_session_limit(
        &self,
        request: Request<pb::SetSessionLimitRequest>,
    ) -> Result<Response<pb::Machine>, Status> {
        let by = caller(&request);
        let request = request.into_inner();
        if request.clear && request.session_limit != 0 {
            return Err(ApiError::from(ValidationError::new(
                "session_limit",
                "give a limit or clear, not both (clear gives the agent's limit back)",
            ))
            .into());
        }
        let limit = (!request.clear).then_some(request.session_limit);
        Ok(Response::new(
            self.change(by, request.machine, MachineChange::SessionLimit(limit))
                .await?,
        ))
    }

    async fn remove_machine(
        &self,
        request: Request<pb::RemoveMachineRequest>,
    ) -> Result<Response<pb::RemoveMachineResponse>, Status> {
        let by = caller(&request);
        let request = request.into_inner();
        let machine =
            machine_ref::resolve(self.store()?, &request.machine.unwrap_or_default()).await?;
        let connected = matches!(
            machine.machine_state(),
            MachineState::Joining | MachineState::Ready
        );
        if connected && !request.force {
            return Err(ApiError::FailedPrecondition(format!(
                "machine {:?} is connected; stop its agent first, or pass force to make it shut down",
                machine.name
            ))
            .into());
        }
        let core = self.core.with_database()?;
        let sessions_removed = core
            .store
            .remove_machine(machine.id)
            .await
            .map_err(ApiError::from)?;
        let notice =
            notices::machine_removed(&machine.id.to_string(), &machine.name, &machine.farm);
        core.plugins.notify(&machine.farm, notice);
        tracing::info!(machine = %machine.name, farm = %machine.farm, sessions_removed, %by, "machine removed by admin");
        Ok(Response::new(pb::RemoveMachineResponse {
            sessions_removed: u32::try_from(sessions_removed).unwrap_or(u32::MAX),
        }))
    }

    async fn set_farm_policy(
        &self,
        request: Request<pb::SetFarmPolicyRequest>,
    ) -> Result<Response<pb::Farm>, Status> {
        let by = caller(&request);
        let request = request.into_inner();
        let farm = validate::farm_name("farm", &request.farm).map_err(ApiError::from)?;
        if self.policies.get(&request.policy).is_none() {
            let known = self.policies.names().join(", ");
            return Err(ApiError::from(ValidationError::new(
                "policy",
                format!(
                    "unknown policy {} (known: {known})",
                    validate::excerpt(&request.policy)
                ),
            ))
            .into());
        }
        let core = self.core.with_database()?;
        let store = core.store.as_ref();
        let record = store
            .set_farm_policy(&farm, &request.policy)
            .await
            .map_err(ApiError::from)?;
        tracing::info!(%farm, policy = %request.policy, %by, "farm policy changed by admin");
        let machines = store
            .list_machines(Some(&farm))
            .await
            .map_err(ApiError::from)?;
        let cutoff = core.decider.lease_cutoff(store.now());
        let seen = convert::farms_seen(std::slice::from_ref(&record), &machines, cutoff);
        Ok(Response::new(
            seen.into_iter()
                .next()
                .unwrap_or_else(|| convert::farm(&record)),
        ))
    }
}
