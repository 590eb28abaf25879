//! The `tsbroker.v1.Plugin` service: notifications go into the view, decisions come from the
//! policy, external hosts from the file. Every call is logged; every decision at `info`.
//!
//! Notifications that arrive before the first `Initialize` of this process (the plug-in
//! restarted and the broker has not noticed yet) are refused with FAILED_PRECONDITION: the view
//! has missed everything before them, and a failed notification makes the broker initialize the
//! plug-in again and send a full resync. Decisions meanwhile keep the broker's pick.

use crate::external::ExternalHosts;
use crate::policy::{self, Choice};
use crate::view::FarmView;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use tonic::{Request, Response, Status};
use tsbroker_common::proto::v1 as pb;
use tsbroker_common::proto::v1::plugin_server::Plugin;

pub struct ExamplePlugin {
    /// Short critical sections only, never held across an `.await`.
    view: Mutex<FarmView>,
    /// Set by the first `Initialize`; until then notifications are refused.
    initialized: AtomicBool,
    external: ExternalHosts,
}

impl ExamplePlugin {
    pub fn new(external: ExternalHosts) -> ExamplePlugin {
        ExamplePlugin {
            view: Mutex::new(FarmView::default()),
            initialized: AtomicBool::new(false),
            external,
        }
    }

    fn view(&self) -> MutexGuard<'_, FarmView> {
        // A panic while holding the lock leaves a view no worse than a missed notification;
        // the next Initialize rebuilds it anyway.
        self.view.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// FAILED_PRECONDITION before the first `Initialize` (this process restarted, or the broker
    /// never reached it), so that the broker initializes it and resyncs.
    fn check_initialized(&self, what: &str) -> Result<(), Status> {
        if self.initialized.load(Ordering::Acquire) {
            return Ok(());
        }
        tracing::warn!(
            what,
            "call before Initialize; asking the broker to start over"
        );
        Err(Status::failed_precondition(
            "plug-in not initialized: call Initialize and send a full resync",
        ))
    }
}

/// `NOTIFICATION_TYPE_ADDED` → `ADDED`, for the log.
fn notification_name(value: i32) -> &'static str {
    pb::NotificationType::try_from(value)
        .map(|kind| kind.as_str_name().trim_start_matches("NOTIFICATION_TYPE_"))
        .unwrap_or("UNKNOWN")
}

#[tonic::async_trait]
impl Plugin for ExamplePlugin {
    async fn initialize(
        &self,
        request: Request<pb::InitializeRequest>,
    ) -> Result<Response<pb::InitializeResponse>, Status> {
        let request = request.into_inner();
        self.view().clear();
        self.initialized.store(true, Ordering::Release);
        let supports_external_sessions = !self.external.is_empty();
        tracing::info!(
            broker_id = %request.broker_id,
            broker_version = %request.broker_version,
            farms = ?request.farms,
            external = supports_external_sessions,
            "initialized by the broker; view cleared, waiting for the resync"
        );
        Ok(Response::new(pb::InitializeResponse {
            supports_external_sessions,
            name: concat!(env!("CARGO_PKG_NAME"), " ", env!("CARGO_PKG_VERSION")).to_owned(),
        }))
    }

    async fn terminated(
        &self,
        request: Request<pb::TerminatedRequest>,
    ) -> Result<Response<pb::TerminatedResponse>, Status> {
        // The broker is going away; keep serving: it initializes us again when it is back.
        tracing::info!(reason = %request.into_inner().reason, "broker terminated");
        Ok(Response::new(pb::TerminatedResponse {}))
    }

    async fn get_most_suitable_server(
        &self,
        request: Request<pb::GetMostSuitableServerRequest>,
    ) -> Result<Response<pb::GetMostSuitableServerResponse>, Status> {
        // After a restart this plug-in knows nothing: asking the broker to start over gets it
        // an Initialize and a full resync (the broker keeps its own pick meanwhile).
        self.check_initialized("GetMostSuitableServer")?;
        let request = request.into_inner();
        let decision = policy::choose(&self.view(), &request);
        let broker_pick = request
            .candidates
            .iter()
            .filter_map(|candidate| candidate.machine.as_ref())
            .find(|machine| machine.id == request.broker_pick)
            .map_or(request.broker_pick.as_str(), |machine| {
                machine.name.as_str()
            });
        match &decision.choice {
            Choice::Keep { reason } => tracing::info!(
                user = %request.user_name, domain = %request.domain, farm = %request.farm,
                broker_pick, loads = %decision.loads_line(), %reason,
                "keeping the broker's pick"
            ),
            Choice::Machine { name, .. } => tracing::info!(
                user = %request.user_name, domain = %request.domain, farm = %request.farm,
                broker_pick, chosen = %name, loads = %decision.loads_line(),
                "chose the fewest active sessions per weight"
            ),
        }
        Ok(Response::new(pb::GetMostSuitableServerResponse {
            machine_id: decision.machine_id().to_owned(),
        }))
    }

    async fn machine_change_notification(
        &self,
        request: Request<pb::MachineChangeNotificationRequest>,
    ) -> Result<Response<pb::MachineChangeNotificationResponse>, Status> {
        self.check_initialized("MachineChangeNotification")?;
        let request = request.into_inner();
        let warnings = self.view().apply_machine_change(&request);
        let name = request
            .machine
            .as_ref()
            .map_or("", |machine| machine.name.as_str());
        tracing::debug!(
            kind = notification_name(request.r#type), machine_id = %request.machine_id, machine = name,
            "machine notification"
        );
        for warning in warnings {
            tracing::warn!(%warning, "machine notification partly ignored");
        }
        // OK even when the view could not use it: an error would make the broker initialize
        // and resync all over again.
        Ok(Response::new(pb::MachineChangeNotificationResponse {}))
    }

    async fn session_change_notification(
        &self,
        request: Request<pb::SessionChangeNotificationRequest>,
    ) -> Result<Response<pb::SessionChangeNotificationResponse>, Status> {
        self.check_initialized("SessionChangeNotification")?;
        let request = request.into_inner();
        let (warnings, summary, farm_totals) = {
            let mut view = self.view();
            let warnings = view.apply_session_change(&request);
            let summary = view.machine(&request.machine_id).map(|machine| {
                (
                    machine.name.clone(),
                    machine.active_sessions(),
                    machine.disconnected_sessions(),
                )
            });
            (
                warnings,
                summary,
                (view.machine_count(), view.session_count()),
            )
        };
        let (machine, active, disconnected) = summary.unwrap_or_default();
        let resync_done =
            request.notification == pb::NotificationType::Resync as i32 && request.last_batch;
        if resync_done {
            let (machines_in_view, sessions_in_view) = farm_totals;
            tracing::info!(
                %machine, active, disconnected, machines_in_view, sessions_in_view,
                "machine resynced"
            );
        } else {
            tracing::debug!(
                kind = notification_name(request.notification), %machine, changes = request.changes.len(),
                last_batch = request.last_batch, active, disconnected, "session notification"
            );
        }
        for warning in warnings {
            tracing::warn!(%warning, "session notification partly ignored");
        }
        Ok(Response::new(pb::SessionChangeNotificationResponse {}))
    }

    async fn get_user_external_session(
        &self,
        request: Request<pb::GetUserExternalSessionRequest>,
    ) -> Result<Response<pb::GetUserExternalSessionResponse>, Status> {
        self.check_initialized("GetUserExternalSession")?;
        let request = request.into_inner();
        let answer = match self.external.lookup(&request.user_name, &request.domain) {
            Some((address, host_name)) => {
                tracing::info!(
                    user = %request.user_name, domain = %request.domain, farm = %request.farm,
                    %address, "sending the user to their dedicated host"
                );
                pb::GetUserExternalSessionResponse {
                    address: address.to_owned(),
                    host_name: host_name.to_owned(),
                }
            }
            None => {
                tracing::debug!(user = %request.user_name, farm = %request.farm, "no dedicated host");
                pb::GetUserExternalSessionResponse::default()
            }
        };
        Ok(Response::new(answer))
    }
}

#[cfg(test)]
mod tests {
    //! The broker's calls, in the order it makes them, straight through the service trait.

    use super::*;
    use crate::view::testing::*;
    use pb::SessionState::{Active, Disconnected};

    async fn initialize(plugin: &ExamplePlugin) -> pb::InitializeResponse {
        let request = pb::InitializeRequest {
            broker_id: "b1".into(),
            broker_version: "0.1.0".into(),
            farms: vec!["default".into()],
        };
        plugin
            .initialize(Request::new(request))
            .await
            .unwrap()
            .into_inner()
    }

    /// ADDED, RESYNC in batches of 25, CHANGED to READY: what the broker sends for a machine.
    async fn resync_machine(
        plugin: &ExamplePlugin,
        id: &str,
        name: &str,
        sessions: Vec<pb::Session>,
    ) {
        plugin
            .machine_change_notification(Request::new(added(id, name, 100)))
            .await
            .unwrap();
        let batches: Vec<Vec<pb::Session>> = if sessions.is_empty() {
            vec![Vec::new()]
        } else {
            sessions.chunks(25).map(<[pb::Session]>::to_vec).collect()
        };
        let count = batches.len();
        for (index, batch) in batches.into_iter().enumerate() {
            let request = resync_batch(id, batch, index + 1 == count);
            plugin
                .session_change_notification(Request::new(request))
                .await
                .unwrap();
        }
        let ready = changed_state(id, pb::MachineState::Ready);
        plugin
            .machine_change_notification(Request::new(ready))
            .await
            .unwrap();
    }

    async fn ask(plugin: &ExamplePlugin, broker_pick: &str) -> String {
        let candidates = [("m1", "ts1"), ("m2", "ts2")]
            .map(|(id, name)| pb::Candidate {
                machine: Some(machine(id, name, 100)),
            })
            .to_vec();
        let request = pb::GetMostSuitableServerRequest {
            user_name: "newcomer".into(),
            farm: "default".into(),
            candidates,
            broker_pick: broker_pick.into(),
            ..Default::default()
        };
        plugin
            .get_most_suitable_server(Request::new(request))
            .await
            .unwrap()
            .into_inner()
            .machine_id
    }

    #[tokio::test]
    async fn initialize_and_resync_rebuild_the_view_and_drive_the_choice() {
        let plugin = ExamplePlugin::new(ExternalHosts::default());
        let answer = initialize(&plugin).await;
        assert!(!answer.supports_external_sessions);
        assert!(answer.name.starts_with("tsbroker-plugin-example"));

        // ts1: 3 active + 30 disconnected; ts2: 10 active. The broker (counting all) picks ts2.
        let ts1 = (0..3)
            .map(|number| session("m1", number, "a", Active))
            .chain((100..130).map(|number| session("m1", number, "d", Disconnected)))
            .collect();
        let ts2 = (0..10)
            .map(|number| session("m2", number, "a", Active))
            .collect();
        resync_machine(&plugin, "m1", "ts1", ts1).await;
        resync_machine(&plugin, "m2", "ts2", ts2).await;
        assert_eq!(plugin.view().session_count(), 43);
        assert_eq!(ask(&plugin, "m2").await, "m1");
        assert_eq!(
            ask(&plugin, "m1").await,
            "",
            "the broker's pick is already the best"
        );

        // The plug-in comes back: Initialize forgets everything; until the resync is through the
        // broker's pick stands.
        initialize(&plugin).await;
        assert_eq!(plugin.view().machine_count(), 0);
        assert_eq!(ask(&plugin, "m2").await, "");
        resync_machine(
            &plugin,
            "m1",
            "ts1",
            (0..12).map(|n| session("m1", n, "a", Active)).collect(),
        )
        .await;
        resync_machine(&plugin, "m2", "ts2", Vec::new()).await;
        assert_eq!(ask(&plugin, "m1").await, "m2");

        // Live: 12 logons on ts2, and ts1's users disconnect: ts1 is now the lighter one.
        let logons: Vec<_> = (0..12)
            .map(|n| (pb::SessionEventType::Logon, n, "b"))
            .collect();
        plugin
            .session_change_notification(Request::new(events("m2", &logons)))
            .await
            .unwrap();
        let disconnects: Vec<_> = (0..12)
            .map(|n| (pb::SessionEventType::Disconnect, n, "a"))
            .collect();
        plugin
            .session_change_notification(Request::new(events("m1", &disconnects)))
            .await
            .unwrap();
        assert_eq!(ask(&plugin, "m2").await, "m1");
    }

    #[tokio::test]
    async fn external_sessions_come_from_the_file() {
        let hosts =
            ExternalHosts::parse("[external]\nalice = \"vdi-alice.example.com:3389\"\n").unwrap();
        let plugin = ExamplePlugin::new(hosts);
        assert!(initialize(&plugin).await.supports_external_sessions);
        let ask = |user: &str| pb::GetUserExternalSessionRequest {
            user_name: user.into(),
            farm: "default".into(),
            ..Default::default()
        };
        let answer = plugin
            .get_user_external_session(Request::new(ask("ALICE")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.address, "vdi-alice.example.com:3389");
        assert_eq!(answer.host_name, "vdi-alice.example.com");
        let answer = plugin
            .get_user_external_session(Request::new(ask("bob")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.address, "");
    }

    #[tokio::test]
    async fn calls_before_initialize_are_refused_so_that_the_broker_starts_over() {
        let plugin = ExamplePlugin::new(ExternalHosts::default());
        let early = plugin
            .machine_change_notification(Request::new(added("m1", "ts1", 100)))
            .await;
        assert_eq!(early.unwrap_err().code(), tonic::Code::FailedPrecondition);
        let early = events("m1", &[(pb::SessionEventType::Logon, 1, "x")]);
        let early = plugin
            .session_change_notification(Request::new(early))
            .await;
        assert_eq!(early.unwrap_err().code(), tonic::Code::FailedPrecondition);
        let request = pb::GetMostSuitableServerRequest {
            user_name: "early".into(),
            ..Default::default()
        };
        let early = plugin.get_most_suitable_server(Request::new(request)).await;
        assert_eq!(early.unwrap_err().code(), tonic::Code::FailedPrecondition);
        initialize(&plugin).await;
        assert!(
            plugin
                .machine_change_notification(Request::new(added("m1", "ts1", 100)))
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn notifications_the_view_cannot_use_are_still_acknowledged() {
        let plugin = ExamplePlugin::new(ExternalHosts::default());
        initialize(&plugin).await;
        let stray = changed_state("unknown", pb::MachineState::Ready);
        assert!(
            plugin
                .machine_change_notification(Request::new(stray))
                .await
                .is_ok()
        );
        let stray = events("unknown", &[(pb::SessionEventType::Logon, 1, "x")]);
        assert!(
            plugin
                .session_change_notification(Request::new(stray))
                .await
                .is_ok()
        );
    }
}
