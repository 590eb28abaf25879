//! The plug-in's part of a decision: an external host for a user with no session in the farm,
//! and the plug-in's keep-or-replace answer to the policy's pick. Both together are bounded
//! by the farm's deadline (the query's `plugin_budget`); any failure keeps the broker's own answer (and is counted by the link).

use super::policy::{ChoiceContext, PolicyRegistry};
use super::{RedirectAnswer, RedirectQuery, Target, group_pool};
use crate::decision::farm_settings::GroupRule;
use crate::error::ApiError;
use crate::plugin::{PluginLink, Suggestion};
use crate::service::convert;
use crate::store::{PlacementRequest, Store, records::classify_machines};
use std::sync::Arc;
use tsbroker_common::proto::v1 as pb;
use uuid::Uuid;

/// Asks the farm's plug-in (when it can place users outside the farm) for an external host.
pub async fn external_session(
    link: Option<&Arc<PluginLink>>,
    query: &RedirectQuery,
) -> Option<RedirectAnswer> {
    let link = link?;
    let request = pb::GetUserExternalSessionRequest {
        user_name: query.user_name.clone(),
        domain: query.domain.clone(),
        farm: query.farm.clone(),
        client_address: query.client_address.clone(),
    };
    let (address, host_name) = link.external_session(request, &query.plugin_budget).await?;
    Some(RedirectAnswer {
        target: Target {
            machine_id: None,
            name: host_name,
            address,
            front_door: false,
        },
        reason: pb::RedirectReason::External,
        session_id: None,
        user_name: query.user_name.clone(),
        policy: None,
    })
}

pub struct PluginStep<'a> {
    pub store: &'a dyn Store,
    pub policies: &'a PolicyRegistry,
    pub link: &'a Arc<PluginLink>,
}

impl PluginStep<'_> {
    /// The machine the plug-in chose, if it named one (`None`: the policy picks when the logon
    /// is placed): computed on a snapshot of the candidates, re-checked by the caller under the
    /// farm's lock.
    pub async fn preference(
        &self,
        query: &RedirectQuery,
        request: &PlacementRequest<'_>,
        context: &ChoiceContext<'_>,
        group: Option<&GroupRule>,
    ) -> Result<Option<Uuid>, ApiError> {
        let Some(policy) = self.store.farm_policy(&query.farm).await? else {
            return Ok(None);
        };
        let machines = self.store.list_machines(Some(&query.farm)).await?;
        let loads = classify_machines(machines, request);
        let eligible: Vec<_> = loads
            .into_iter()
            .filter(|load| load.ineligible.is_none())
            .collect();
        let candidates = group_pool(group, &eligible);
        // A preview: the placement chooses for real once the plug-in has answered.
        let Some(broker_pick) = self
            .policies
            .get_or_default(&policy)
            .preview(context, &candidates)
        else {
            return Ok(None);
        };
        let suggestion = self
            .link
            .suggest(
                pb::GetMostSuitableServerRequest {
                    user_name: query.user_name.clone(),
                    domain: query.domain.clone(),
                    farm: query.farm.clone(),
                    candidates: candidates
                        .iter()
                        .map(|load| pb::Candidate {
                            machine: Some(convert::machine(&load.machine)),
                        })
                        .collect(),
                    broker_pick: broker_pick.to_string(),
                    client_address: query.client_address.clone(),
                },
                &query.plugin_budget,
            )
            .await;
        // A machine the plug-in names is its choice, even the one it was shown: that pick was
        // a preview, and the placement (other logons placed meanwhile) may choose another.
        Ok(match suggestion {
            Suggestion::Machine(machine) => Some(machine),
            Suggestion::Keep | Suggestion::Fallback(_) => None,
        })
    }
}
