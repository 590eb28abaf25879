//! `tsbroker.v1.Broker`: the redirect decision and the read-only queries.

use super::{CoreCell, convert, machine_ref};
use crate::decision::RedirectQuery;
use crate::error::ApiError;
use crate::metrics::CodeLabels;
use crate::store::SessionFilter;
use tonic::{Request, Response, Status};
use tsbroker_common::model::{self, SessionState};
use tsbroker_common::proto::v1 as pb;
use tsbroker_common::validate;

const DEFAULT_PAGE_SIZE: u32 = 1000;
const MAX_PAGE_SIZE: u32 = 10_000;
/// Most bytes of sessions a `ListSessions` page carries: under the 4 MiB that gRPC clients
/// accept by default (grpcurl's, tonic's, grpc-go's), with room to spare. 10,000 sessions with
/// long names and domains take ~6 MB: such a page ends early, with a token for the rest.
const MAX_PAGE_BYTES: usize = 3 << 20;
/// Most machines a Redirect may exclude (a front door tries a few candidates, not the farm).
const MAX_EXCLUDED_MACHINES: usize = 32;

pub struct BrokerApi {
    core: CoreCell,
}

impl BrokerApi {
    pub fn new(core: CoreCell) -> Self {
        BrokerApi { core }
    }
}

fn redirect_query(request: &pb::RedirectRequest) -> Result<RedirectQuery, ApiError> {
    // A `DOMAIN\user` cookie passed on whole (no `domain` given) is taken apart as the front
    // door does: `CORP\bob` is user `bob` of domain `CORP`, `CORP\` names no user.
    let (domain, user) = match request.user_name.split_once('\\') {
        Some((domain, user)) if request.domain.is_empty() => (domain, user),
        _ => (request.domain.as_str(), request.user_name.as_str()),
    };
    let user_name = if user.is_empty() {
        String::new()
    } else if request.user_name_may_be_truncated {
        validate::cut_user_name("user_name", user)?
    } else {
        validate::user_name("user_name", user)?
    };
    if !request.receiving_machine_id.is_empty() {
        validate::machine_id("receiving_machine_id", &request.receiving_machine_id)?;
    }
    let client_address = validate::client_address("client_address", &request.client_address)?;
    if request.exclude_machine_ids.len() > MAX_EXCLUDED_MACHINES {
        return Err(tsbroker_common::ValidationError::new(
            "exclude_machine_ids",
            format!(
                "{} ids; at most {MAX_EXCLUDED_MACHINES}",
                request.exclude_machine_ids.len()
            ),
        )
        .into());
    }
    let excluded_machines = request
        .exclude_machine_ids
        .iter()
        .map(|id| validate::machine_id("exclude_machine_ids", id))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RedirectQuery {
        farm: validate::farm_name("farm", &request.farm)?,
        user_name,
        domain: validate::domain("domain", domain)?,
        user_name_may_be_truncated: request.user_name_may_be_truncated,
        client_address,
        excluded_machines,
        plugin_budget: Default::default(),
    })
}

#[tonic::async_trait]
impl pb::broker_server::Broker for BrokerApi {
    // A debug span: at `info` its cost (a span registered and its fields formatted for every
    // decision) was 3 % of the broker's CPU at 15,000 decisions/s; the warnings a decision can
    // raise name the farm and the user themselves.
    #[tracing::instrument(level = "debug", skip_all, fields(farm = %request.get_ref().farm, user = %request.get_ref().user_name))]
    async fn redirect(
        &self,
        request: Request<pb::RedirectRequest>,
    ) -> Result<Response<pb::RedirectResponse>, Status> {
        let core = self.core.get()?;
        let started = std::time::Instant::now();
        let decided = match redirect_query(request.get_ref()) {
            Ok(query) => core.decider.redirect(&query).await,
            Err(error) => Err(error),
        };
        core.metrics
            .redirect_seconds
            .observe(started.elapsed().as_secs_f64());
        let answer = match decided {
            Ok(answer) => answer,
            Err(error) => {
                // A store error is logged as it becomes a status: with the farm and the user.
                let status = tracing::info_span!(
                    "redirect",
                    farm = %request.get_ref().farm,
                    user = %request.get_ref().user_name
                )
                .in_scope(|| tonic::Status::from(error));
                core.metrics
                    .redirect_errors
                    .get_or_create(&CodeLabels {
                        code: format!("{:?}", status.code()),
                    })
                    .inc();
                return Err(status);
            }
        };
        tracing::debug!(target = %answer.target.name, reason = ?answer.reason, "redirect");
        Ok(Response::new(pb::RedirectResponse {
            machine_id: answer
                .target
                .machine_id
                .map(|id| id.to_string())
                .unwrap_or_default(),
            machine_name: answer.target.name,
            address: answer.target.address,
            reason: answer.reason as i32,
            session_id: answer.session_id.unwrap_or(0),
            user_name: answer.user_name,
            front_door: answer.target.front_door,
        }))
    }

    async fn list_machines(
        &self,
        request: Request<pb::ListMachinesRequest>,
    ) -> Result<Response<pb::ListMachinesResponse>, Status> {
        let farm = &request.get_ref().farm;
        let farm = if farm.is_empty() {
            None
        } else {
            Some(validate::farm_name("farm", farm).map_err(ApiError::from)?)
        };
        let core = self.core.for_reads()?;
        let machines = core
            .store
            .list_machines(farm.as_deref())
            .await
            .map_err(ApiError::from)?;
        if machines.is_empty()
            && let Some(farm) = &farm
        {
            known_farm(core.store.as_ref(), farm).await?;
        }
        let cutoff = core.decider.lease_cutoff(core.store.now());
        Ok(Response::new(pb::ListMachinesResponse {
            machines: machines
                .iter()
                .map(|machine| convert::machine_seen(machine, cutoff))
                .collect(),
        }))
    }

    async fn get_machine(
        &self,
        request: Request<pb::GetMachineRequest>,
    ) -> Result<Response<pb::Machine>, Status> {
        let reference = request.into_inner().machine.unwrap_or_default();
        let core = self.core.for_reads()?;
        let machine = machine_ref::resolve(core.store.as_ref(), &reference).await?;
        let cutoff = core.decider.lease_cutoff(core.store.now());
        Ok(Response::new(convert::machine_seen(&machine, cutoff)))
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let request = request.into_inner();
        let mut filter = session_filter(&request)?;
        let core = self.core.for_reads()?;
        let reference = pb::MachineRef {
            machine_id: request.machine_id.clone(),
            farm: request.farm.clone(),
            machine_name: request.machine_name.clone(),
        };
        if !request.machine_name.is_empty() {
            if request.farm.is_empty() && request.machine_id.is_empty() {
                return Err(ApiError::from(tsbroker_common::ValidationError::new(
                    "machine_name",
                    "give farm (or machine_id) too: machine names are per farm",
                ))
                .into());
            }
            let machine = machine_ref::resolve_fields(
                core.store.as_ref(),
                &reference,
                &machine_ref::TOP_LEVEL,
            )
            .await?;
            filter.machine = Some(machine.id);
        }
        upn_fallback(core.store.as_ref(), &mut filter).await?;
        let page_size = filter.limit as usize;
        // One row more than the page: whether another page follows, so that the last page
        // (even a full one) comes without a token.
        filter.limit += 1;
        let mut sessions = core
            .store
            .list_sessions(&filter)
            .await
            .map_err(ApiError::from)?;
        if sessions.is_empty() && request.page_token.is_empty() {
            // Nothing listed: say so when what the filter names does not exist, or a machine
            // is not in the farm named beside it (a typo is not "no sessions"), as every call
            // naming a farm or machine does.
            if filter.machine.is_some() && request.machine_name.is_empty() {
                machine_ref::resolve_fields(
                    core.store.as_ref(),
                    &reference,
                    &machine_ref::TOP_LEVEL,
                )
                .await?;
            }
            if let Some(farm) = &filter.farm {
                known_farm(core.store.as_ref(), farm).await?;
            }
        }
        let mut more = sessions.len() > page_size;
        sessions.truncate(page_size);
        let mut listed: Vec<pb::Session> = sessions.iter().map(convert::session).collect();
        let fitting = fitting_in_a_page(&listed);
        if fitting < listed.len() {
            more = true;
            listed.truncate(fitting);
            sessions.truncate(fitting);
        }
        let next_page_token = match sessions.last() {
            Some(last) if more => {
                super::page_token::next(last.machine_id, last.session_id, &request)
            }
            _ => String::new(),
        };
        Ok(Response::new(pb::ListSessionsResponse {
            sessions: listed,
            next_page_token,
        }))
    }

    async fn list_farms(
        &self,
        _request: Request<pb::ListFarmsRequest>,
    ) -> Result<Response<pb::ListFarmsResponse>, Status> {
        let core = self.core.for_reads()?;
        let farms = core.store.list_farms().await.map_err(ApiError::from)?;
        let machines = core
            .store
            .list_machines(None)
            .await
            .map_err(ApiError::from)?;
        let cutoff = core.decider.lease_cutoff(core.store.now());
        Ok(Response::new(pb::ListFarmsResponse {
            farms: convert::farms_seen(&farms, &machines, cutoff),
        }))
    }
}

/// How many of `sessions`, from the first, fit in [`MAX_PAGE_BYTES`] (at least one).
fn fitting_in_a_page(sessions: &[pb::Session]) -> usize {
    use prost::Message;
    let mut bytes = 0;
    for (index, session) in sessions.iter().enumerate() {
        let length = session.encoded_len();
        // The field's tag and length prefix.
        bytes += length + 1 + prost::length_delimiter_len(length);
        if bytes > MAX_PAGE_BYTES && index > 0 {
            return index;
        }
    }
    sessions.len()
}

/// A user named in `user@domain` form (`alice@corp.example`) is taken as `Redirect` takes it:
/// the sessions reported under that name, or, when it has none (in the farm named, if one is;
/// of the domain asked for, if one is), those of its user part (`alice`: how PAM reports a
/// Linux logon). Each page decides it again.
async fn upn_fallback(
    store: &dyn crate::store::Store,
    filter: &mut SessionFilter,
) -> Result<(), ApiError> {
    let Some(user) = filter.user_key.as_deref().and_then(model::upn_user_part) else {
        return Ok(());
    };
    let user = model::user_key(user);
    let probe = SessionFilter {
        farm: filter.farm.clone(),
        user_key: filter.user_key.clone(),
        domain: filter.domain.clone(),
        limit: 1,
        ..Default::default()
    };
    if store.list_sessions(&probe).await?.is_empty() {
        filter.user_key = Some(user);
    }
    Ok(())
}

/// NOT_FOUND unless `farm` is one the broker knows (one a machine has joined, or with a policy
/// set).
async fn known_farm(store: &dyn crate::store::Store, farm: &str) -> Result<(), ApiError> {
    let farms = store.list_farms().await?;
    if farms.iter().any(|known| known.name == farm) {
        Ok(())
    } else {
        Err(ApiError::NotFound(format!("farm {farm:?}")))
    }
}

fn session_filter(request: &pb::ListSessionsRequest) -> Result<SessionFilter, ApiError> {
    let optional = |text: &str| (!text.is_empty()).then(|| text.to_owned());
    let farm = optional(&request.farm)
        .map(|farm| validate::farm_name("farm", &farm))
        .transpose()?;
    let machine = optional(&request.machine_id)
        .map(|id| validate::machine_id("machine_id", &id))
        .transpose()?;
    // `DOMAIN\user`, as Redirect takes it: that user's sessions in that domain (or in none);
    // `\user` is the user's, of any domain.
    let (domain, user) = match request.user_name.split_once('\\') {
        Some((domain, user)) if !user.is_empty() => {
            let domain = (!domain.is_empty()).then_some(domain);
            let domain = domain.map(|domain| validate::domain("user_name", domain));
            (domain.transpose()?, user)
        }
        Some(_) => {
            let problem = format!("{:?} is neither a user nor DOMAIN\\user", request.user_name);
            return Err(tsbroker_common::ValidationError::new("user_name", problem).into());
        }
        None => (None, request.user_name.as_str()),
    };
    let user_key = optional(user)
        .map(|user| validate::user_name("user_name", &user).map(|user| model::user_key(&user)))
        .transpose()?;
    let state = match request.state {
        0 => None,
        state => Some(SessionState::from_proto("state", state)?),
    };
    let limit = match request.page_size {
        0 => DEFAULT_PAGE_SIZE,
        size if size > MAX_PAGE_SIZE => {
            return Err(tsbroker_common::ValidationError::new(
                "page_size",
                format!("{size} is more than {MAX_PAGE_SIZE}"),
            )
            .into());
        }
        size => size,
    };
    Ok(SessionFilter {
        farm,
        machine,
        user_key,
        domain,
        state,
        after: super::page_token::after(request)?,
        limit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_of_sessions_stays_under_what_clients_accept() {
        let session = |size: usize| pb::Session {
            user_name: "u".repeat(size),
            domain: "d".repeat(size),
            ..Default::default()
        };
        let small: Vec<pb::Session> = (0..10).map(|_| session(10)).collect();
        assert_eq!(fitting_in_a_page(&small), 10);
        assert_eq!(fitting_in_a_page(&[]), 0);
        let large: Vec<pb::Session> = (0..10_000).map(|_| session(256)).collect();
        let fitting = fitting_in_a_page(&large);
        assert!(fitting > 1000 && fitting < 10_000, "{fitting}");
        let page = pb::ListSessionsResponse {
            sessions: large[..fitting].to_vec(),
            next_page_token: "x".repeat(64),
        };
        use prost::Message;
        assert!(page.encoded_len() <= MAX_PAGE_BYTES + 100);
        assert!(page.encoded_len() + 600 > MAX_PAGE_BYTES);
    }

    #[test]
    fn redirect_queries_are_checked() {
        let good = pb::RedirectRequest {
            user_name: "alice".into(),
            farm: "default".into(),
            ..Default::default()
        };
        assert!(redirect_query(&good).is_ok());
        let no_farm = pb::RedirectRequest {
            farm: String::new(),
            ..good.clone()
        };
        assert!(redirect_query(&no_farm).is_err());
        let long_user = pb::RedirectRequest {
            user_name: "x".repeat(257),
            ..good.clone()
        };
        assert!(redirect_query(&long_user).is_err());
        let bad_machine = pb::RedirectRequest {
            receiving_machine_id: "nope".into(),
            ..good.clone()
        };
        assert!(redirect_query(&bad_machine).is_err());
        let id = uuid::Uuid::from_u128(7);
        let excluding = pb::RedirectRequest {
            exclude_machine_ids: vec![id.to_string()],
            ..good.clone()
        };
        assert_eq!(redirect_query(&excluding).unwrap().excluded_machines, [id]);
        let bad_exclusion = pb::RedirectRequest {
            exclude_machine_ids: vec!["ts1".into()],
            ..good.clone()
        };
        let status = Status::from(redirect_query(&bad_exclusion).unwrap_err());
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("exclude_machine_ids"),
            "{status:?}"
        );
        let too_many = pb::RedirectRequest {
            exclude_machine_ids: vec![id.to_string(); MAX_EXCLUDED_MACHINES + 1],
            ..good
        };
        assert!(redirect_query(&too_many).is_err());
    }

    #[test]
    fn sessions_of_a_domain_user_are_listed_by_user_and_domain() {
        let filter = |user: &str| {
            session_filter(&pb::ListSessionsRequest {
                user_name: user.into(),
                ..Default::default()
            })
        };
        let corp = filter("CORP\\Alice").unwrap();
        assert_eq!(corp.user_key.as_deref(), Some("alice"));
        assert_eq!(corp.domain.as_deref(), Some("CORP"));
        let plain = filter("alice").unwrap();
        assert_eq!(
            (plain.user_key.as_deref(), plain.domain),
            (Some("alice"), None)
        );
        let any_domain = filter("\\alice").unwrap();
        assert_eq!(
            (any_domain.user_key.as_deref(), any_domain.domain),
            (Some("alice"), None)
        );
        for odd in ["CORP\\", "\\"] {
            let status = Status::from(filter(odd).unwrap_err());
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{odd}");
            assert!(status.message().contains("DOMAIN\\user"), "{status:?}");
        }
    }

    #[test]
    fn a_user_name_with_a_domain_is_taken_apart_as_the_front_door_does() {
        let named = |user: &str, domain: &str| {
            let query = redirect_query(&pb::RedirectRequest {
                user_name: user.into(),
                domain: domain.into(),
                farm: "default".into(),
                ..Default::default()
            })
            .unwrap();
            (query.domain, query.user_name)
        };
        let pair = |domain: &str, user: &str| (domain.to_owned(), user.to_owned());
        assert_eq!(named("CORP\\bob", ""), pair("CORP", "bob"));
        assert_eq!(named("CORP\\", ""), pair("CORP", ""));
        assert_eq!(named("\\bob", ""), pair("", "bob"));
        // A domain given: the name is taken as it is (and refused only for what it holds).
        assert_eq!(named("bob", "CORP"), pair("CORP", "bob"));
        assert_eq!(named("CORP\\bob", "CORP"), pair("CORP", "CORP\\bob"));
    }
}
