//! Another agent speaking as this machine. The broker ends a machine's stream when a newer
//! connection for the same machine arrives ("took over"). An agent that reconnects itself never
//! sees that on the stream it uses (it has left the old one), so an agent whose *current*
//! stream, READY and acknowledged, is taken over knows that another process connected under
//! its machine name — most often a cloned server that kept the name. (A takeover before READY
//! may still be this agent's own earlier attempt, processed late by a busy broker: that is
//! retried as any other break.) Reconnecting at once would take the machine back,
//! the other agent would do the same, and the machine's sessions would flip between the two
//! servers' at every turn. So the displaced agent says so and stays off the broker until the
//! machine is free again (the other agent's stream ended: UNREACHABLE, REMOVED or unknown),
//! asking the broker every `check_every` (10 s by default).

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tsbroker_common::proto::v1 as pb;

use super::StreamContext;

/// Whether the stream ended because another connection took the machine over.
pub(crate) fn taken_over(error: &anyhow::Error) -> bool {
    error
        .chain()
        .filter_map(|cause| cause.downcast_ref::<tonic::Status>())
        .any(|status| status.code() == tonic::Code::Aborted)
}

/// Waits until the broker shows the machine free (no other agent's stream on it), or until
/// `shutdown`; false on shutdown.
pub(crate) async fn wait_until_free(
    context: &StreamContext,
    check_every: Duration,
    shutdown: &CancellationToken,
) -> bool {
    let request = pb::GetMachineRequest {
        machine: Some(pb::MachineRef {
            farm: context.description.farm.clone(),
            machine_name: context.description.name.clone(),
            ..Default::default()
        }),
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return false,
            () = tokio::time::sleep(check_every) => {}
        }
        let mut broker = context.link.broker();
        match broker.get_machine(request.clone()).await {
            Ok(machine) => {
                let state = machine.into_inner().state;
                if state == pb::MachineState::Unreachable as i32
                    || state == pb::MachineState::Removed as i32
                {
                    return true;
                }
                tracing::debug!(state, "the machine is still another agent's");
            }
            Err(status) if status.code() == tonic::Code::NotFound => return true,
            Err(status) => {
                tracing::debug!(
                    code = ?status.code(),
                    message = status.message(),
                    "cannot ask the broker whether the machine is free"
                );
                // That replica may be gone: ask the next (the front door's calls follow).
                if status.code() == tonic::Code::Unavailable
                    && let Some(url) = context.link.fail_over(false)
                {
                    tracing::info!(broker = url, "trying the next broker replica");
                }
            }
        }
    }
}
