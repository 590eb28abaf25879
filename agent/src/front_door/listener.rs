//! The accept loop and the life of one client connection: first packet within the client
//! timeout, PROXY header trust, the routing decision, then the splice.

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tsbroker_common::serve::AcceptPause;
use tsbroker_common::warning_limit::WarningLimit;

use super::per_client::{ClientCounts, Held};
use super::route::{self, Decision};
use super::{FrontDoorShared, first_packet, proxy_header, splice, x224};
use crate::metrics::Outcome;

/// Most times one new logon is sent somewhere (the broker's pick, then its next candidates)
/// before the local RDP service is the last resort.
pub const MAX_TARGETS: usize = 3;

/// Accepts connections until `shutdown`, at most `max_connections` at once, and at most
/// `max_connections_per_client` of them from one client address.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<FrontDoorShared>,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(shared.settings.max_connections));
    let mut pause = AcceptPause::new("front door");
    // Every accepted client connection inherits it.
    splice::keep_alive(&listener);
    let at_limit = WarningLimit::default();
    let per_client = ClientCounts::new(shared.settings.max_connections_per_client);
    loop {
        if permits.available_permits() == 0 {
            let limit = shared.settings.max_connections;
            match at_limit.warn_now() {
                Some(unwarned) => tracing::warn!(
                    max_connections = limit,
                    since_last_warning = unwarned,
                    "the front door holds max_connections: new clients wait until a connection \
                     ends (said at most once a minute)"
                ),
                None => tracing::debug!(max_connections = limit, "front door at max_connections"),
            }
        }
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = pause.next_connection(&listener) => accepted,
        };
        // An IPv4 client of a dual-stack [::] listener as its IPv4 address: `10.0.0.5:50000`
        // in the sessions, the broker's requests and the log, not `[::ffff:10.0.0.5]:50000`.
        let peer = route::canonical(peer);
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        let per_client = per_client.clone();
        let span = tracing::info_span!("client", client = %peer);
        tokio::spawn(
            async move {
                let _permit = permit;
                let Some(counted) = count_client(&shared, &per_client, peer).await else {
                    shared.metrics.connection(Outcome::Refused);
                    return;
                };
                let _open = shared.metrics.open_connection();
                handle(&shared, stream, peer, counted.past_the_cap, &shutdown).await;
            }
            .instrument(span),
        );
    }
    drop(listener);
    connections_ended(&permits, shared.settings.max_connections).await;
}

/// How long a stopping front door waits for its cut connections to record their ends.
const CUT_CONNECTIONS_WAIT: Duration = Duration::from_secs(2);

/// Returns once every connection task has ended (each holds one of the `total` permits), or
/// after [`CUT_CONNECTIONS_WAIT`]: the stop cuts them, and their ends (a session left
/// DISCONNECTED) are in the session table before the agent's stream sends its last changes.
async fn connections_ended(permits: &Arc<Semaphore>, total: usize) {
    let all = u32::try_from(total).unwrap_or(u32::MAX);
    if tokio::time::timeout(CUT_CONNECTIONS_WAIT, permits.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            open = total.saturating_sub(permits.available_permits()),
            "front-door connections still ending as the agent stops"
        );
    }
}

/// A new logon that every machine tried refused (this one's RDP service last), closed: said
/// as what happened — when the broker named no other machine, this one's service alone.
fn say_nobody_took(shared: &FrontDoorShared, refused: &[String]) {
    if refused.len() == 1 {
        tracing::warn!(
            local_rdp = %shared.settings.local_rdp,
            "this machine's RDP service did not take the connection and no other machine was \
             named, closing"
        );
    } else {
        tracing::warn!(
            refused = refused.len(),
            "no machine of the farm took the connection (this one's RDP service last), closing"
        );
    }
    shared.metrics.connection(Outcome::Refused);
}

/// How long a connection let past the per-client cap because it comes from a farm machine's
/// address has to show that it is that machine's front door (its PROXY header, sent with the
/// client's first packet as soon as it connects).
const FRONT_DOOR_PROOF_WAIT: Duration = Duration::from_secs(3);

/// A connection counted for its client's address.
struct Counted {
    _held: Held,
    /// Over the address's cap, let in only because the address is a farm machine's: it must
    /// come with another front door's PROXY header (users logged on to that machine can
    /// connect from its address too).
    past_the_cap: bool,
}

/// How often an address over the per-client cap that is not a farm machine's is looked up again
/// among the farm's machines (as often as the front door's own look at them, by default).
const STRANGER_RECHECK: Duration = Duration::from_secs(30);

/// Counts the connection for its client's address; `None` (and a warning once a minute) when
/// that address holds `max_connections_per_client` already and is not another front door of
/// the farm (which relays many clients).
async fn count_client(
    shared: &FrontDoorShared,
    per_client: &Arc<ClientCounts>,
    peer: SocketAddr,
) -> Option<Counted> {
    let holds = match per_client.take(peer.ip()) {
        Ok(held) => {
            return Some(Counted {
                _held: held,
                past_the_cap: false,
            });
        }
        Err(holds) => holds,
    };
    // A machine that joined since the list was fetched relays clients at once: the first
    // connection over the cap looks the address up in a list fetched after it came (at most
    // one refresh a second, shared); the address's next ones, for STRANGER_RECHECK, take that
    // answer without waiting.
    let since = per_client.looked_up_since(peer.ip(), STRANGER_RECHECK);
    if shared
        .machines
        .peer_listed_after(peer.ip(), since, &shared.settings.machine_id.to_string())
        .await
        .is_some()
    {
        return Some(Counted {
            _held: per_client.take_anyway(peer.ip()),
            past_the_cap: true,
        });
    }
    static OVER: LazyLock<WarningLimit> = LazyLock::new(Default::default);
    match OVER.warn_now() {
        Some(unwarned) => tracing::warn!(
            client = %peer.ip(),
            holds,
            since_last_warning = unwarned,
            "a client address holds max_connections_per_client: its new connections are \
             closed (said at most once a minute)"
        ),
        None => {
            tracing::debug!(client = %peer.ip(), holds, "over max_connections_per_client, closing")
        }
    }
    None
}

/// One client connection, start to end. Logs its own failures and counts what became of it
/// once that is known (before the splice, which may last for hours).
pub async fn handle(
    shared: &FrontDoorShared,
    mut client: TcpStream,
    peer: SocketAddr,
    past_the_cap: bool,
    shutdown: &CancellationToken,
) {
    let wait = if past_the_cap {
        shared.settings.client_timeout.min(FRONT_DOOR_PROOF_WAIT)
    } else {
        shared.settings.client_timeout
    };
    let read = tokio::time::timeout(wait, first_packet::read(&mut client));
    let first = tokio::select! {
        () = shutdown.cancelled() => return,
        read = read => read,
    };
    let first = match first {
        Ok(Ok(first)) => first,
        Ok(Err(error)) => {
            static NOT_RDP: LazyLock<WarningLimit> = LazyLock::new(Default::default);
            let why = error.to_string();
            say_bad_request(&NOT_RDP, &why, "not an RDP connection request, closing");
            shared.metrics.connection(Outcome::BadRequest);
            return;
        }
        Err(_) => {
            // Apart from the junk: a real client on a slow link ends up here too.
            static TIMED_OUT: LazyLock<WarningLimit> = LazyLock::new(Default::default);
            let message = "no complete first packet within the client timeout, closing";
            say_bad_request(&TIMED_OUT, "timeout", message);
            shared.metrics.connection(Outcome::BadRequest);
            return;
        }
    };
    let hint = &first.request.hint;
    tracing::debug!(?hint, protocols = ?first.request.requested_protocols, "connection request");
    if past_the_cap && first.proxied.is_none() {
        let why = "over max_connections_per_client from a farm machine's address, without \
                   another front door's proxy header";
        say_refused(Refusal::Proxy, why, "connection refused");
        shared.metrics.connection(Outcome::Refused);
        return;
    }

    if let Some(header) = first.proxied {
        // Already routed by another front door: never ask the broker again (no loops).
        let this_machine = shared.settings.machine_id.to_string();
        let Some(super::machines::Peer { machine, shares_ip }) =
            shared.machines.peer(peer.ip(), &this_machine).await
        else {
            let why = if shared.machines.is_own_address(peer.ip(), &this_machine) {
                // A machine never relays to itself.
                "proxy header from this machine's own address, where no other machine of the \
                 farm is: from one of its users, or from a machine that advertises an address \
                 of the other IP family"
            } else {
                "proxy header from a peer that is not a machine of the farm"
            };
            say_refused(Refusal::Proxy, why, "connection refused");
            shared.metrics.connection(Outcome::Refused);
            return;
        };
        if !machine.front_door {
            let why = format!(
                "proxy header from {}, a machine without a front door",
                machine.name
            );
            say_refused(Refusal::Proxy, &why, "connection refused");
            shared.metrics.connection(Outcome::Refused);
            return;
        }
        if let Some(key) = &shared.header_key
            && let Err(why) = key.check(&header, proxy_header::now_secs())
        {
            // A user logged on to that machine can connect from it too: only a header signed
            // with the farm's agent token comes from its front door.
            let why = format!("proxy header from {} refused: {why}", machine.name);
            say_refused(Refusal::Proxy, &why, "connection refused");
            shared.metrics.connection(Outcome::Refused);
            return;
        }
        let client_address = header.source.unwrap_or(peer);
        let user = match hint {
            super::x224::RoutingHint::UserName(name) => route::user_from_cookie(name),
            _ => None,
        };
        // Agents on one host share its address: the log does not name one of them as sure.
        let from_machine: std::borrow::Cow<str> = match shares_ip {
            true => format!("{} (or another front door at {})", machine.name, peer.ip()).into(),
            false => machine.name.as_str().into(),
        };
        tracing::info!(%from_machine, client = %client_address, user = %route::user_label(user.as_ref()), "connection routed here by another front door");
        match splice::open_local(shared, &first.packet).await {
            Ok(upstream) => {
                shared.metrics.connection(Outcome::ProxiedIn);
                splice::to_local(
                    shared,
                    &mut client,
                    upstream,
                    client_address,
                    user,
                    shutdown,
                )
                .await;
            }
            Err(error) => {
                say_target_refused(&error, &first.request, "");
                shared.metrics.connection(Outcome::Refused);
            }
        }
        return;
    }

    let arrived_at = || client.local_addr().unwrap_or(peer);
    let this_machine = shared.settings.machine_id.to_string();
    // Machines that refused this connection; a new logon is placed again without them.
    let mut refused: Vec<String> = Vec::new();
    let packet = &first.packet;
    let request = &first.request;
    let mut attempts = 0;
    let user = loop {
        attempts += 1;
        let decision = route::decide(shared, hint, peer, arrived_at, &refused).await;
        let (machine_id, retry, error, user) = match decision {
            Decision::Refuse { why, by_broker, .. } => {
                let kind = if by_broker {
                    Refusal::ByBroker
                } else {
                    Refusal::Rules
                };
                say_refused(kind, &why, "connection refused");
                shared.metrics.connection(Outcome::Refused);
                return;
            }
            Decision::Local { .. } if refused.contains(&this_machine) => {
                say_nobody_took(shared, &refused);
                return;
            }
            Decision::Local {
                user,
                why,
                new_logon,
            } => match splice::open_local(shared, packet).await {
                Ok(upstream) => {
                    tracing::info!(user = %route::user_label(user.as_ref()), why, "routing to the local rdp service");
                    shared.metrics.connection(Outcome::Local);
                    splice::to_local(shared, &mut client, upstream, peer, user, shutdown).await;
                    return;
                }
                Err(error) if splice::is_local_shortage(&error) => {
                    short_of_resources(shared, &error);
                    return;
                }
                Err(error) if new_logon && refused_the_request(&error, request).is_none() => {
                    (this_machine.clone(), true, error, user)
                }
                Err(error) => {
                    say_target_refused(&error, request, "");
                    shared.metrics.connection(Outcome::Refused);
                    return;
                }
            },
            Decision::Remote {
                machine_id,
                machine_name,
                address,
                reconnection,
                external,
                user,
                why,
            } => {
                match splice::open_remote(shared, &address, &client, peer, packet, external).await {
                    Ok(upstream) => {
                        tracing::info!(user = %route::user_label(user.as_ref()), machine = %machine_name, %machine_id, %address, why, "routing to another machine");
                        shared.metrics.connection(Outcome::Remote);
                        splice::to_remote(shared, &mut client, upstream, shutdown).await;
                        return;
                    }
                    Err(error) if splice::is_local_shortage(&error) => {
                        short_of_resources(shared, &error);
                        return;
                    }
                    Err(error) if reconnection => {
                        // The user's session is there: another machine would open a second one.
                        tracing::warn!(machine = %machine_name, error = format!("{error:#}"), "machine of the user's session refused the connection, closing");
                        shared.metrics.connection(Outcome::Refused);
                        return;
                    }
                    Err(error) if refused_the_request(&error, request).is_some() => {
                        say_target_refused(&error, request, "");
                        shared.metrics.connection(Outcome::Refused);
                        return;
                    }
                    // A plug-in's host outside the farm has no id the broker could leave out.
                    Err(error) => (machine_id.clone(), !machine_id.is_empty(), error, user),
                }
            }
        };
        if !refused.contains(&machine_id) {
            refused.push(machine_id);
        }
        if retry && attempts < MAX_TARGETS {
            tracing::warn!(
                error = format!("{error:#}"),
                "a new logon's machine refused the connection, asking the broker for the next candidate"
            );
            continue;
        }
        tracing::warn!(
            error = format!("{error:#}"),
            "a new logon's machine refused the connection"
        );
        break user;
    };
    // The last resort for a new logon: this machine's RDP service, unless it refused too.
    if refused.contains(&this_machine) {
        say_nobody_took(shared, &refused);
        return;
    }
    match splice::open_local(shared, packet).await {
        Ok(upstream) => {
            tracing::info!(user = %route::user_label(user.as_ref()), "routing the new logon to the local rdp service");
            shared.metrics.connection(Outcome::Local);
            splice::to_local(shared, &mut client, upstream, peer, user, shutdown).await;
        }
        Err(error) => {
            say_target_refused(&error, request, " too");
            shared.metrics.connection(Outcome::Refused);
        }
    }
}

/// The oddity of `request` ([`x224::ConnectionRequest::oddity`]) when the target ended the
/// connection on it without answering (`splice::ended_on_the_request`): then it refused that
/// request, not the connection (RDP services answer what clients send), and the machine is
/// neither left out of a new logon's placement nor said to be failing — a stranger's odd
/// bytes must not keep new logons off healthy machines.
fn refused_the_request(
    error: &anyhow::Error,
    request: &x224::ConnectionRequest,
) -> Option<&'static str> {
    request
        .oddity()
        .filter(|_| splice::ended_on_the_request(error))
}

/// A connection closed because a target refused it: a request with an oddity that the target
/// ended at once is said as the client's doing (at info, at most once a minute); anything else
/// is this machine's RDP service failing (`too`: after every other machine refused a new
/// logon), said as an error at most once a minute with how many came since, so that a
/// service down under a logon storm cannot fill the log.
fn say_target_refused(error: &anyhow::Error, request: &x224::ConnectionRequest, too: &str) {
    if let Some(oddity) = refused_the_request(error, request) {
        static ODD: LazyLock<WarningLimit> = LazyLock::new(Default::default);
        let why = format!("{error:#}, on a request with {oddity}");
        let message = "the target ended the connection on this client's request without \
                       answering (it answers what RDP clients send), closing";
        say_bad_request(&ODD, &why, message);
        return;
    }
    static DOWN: LazyLock<WarningLimit> = LazyLock::new(Default::default);
    let error = format!("{error:#}");
    match DOWN.warn_now() {
        Some(unwarned) => tracing::error!(
            error,
            since_last_said = unwarned,
            "local rdp service refused the connection{too}, closing (said at most once a minute)"
        ),
        None => tracing::debug!(
            error,
            "local rdp service refused the connection{too}, closing"
        ),
    }
}

/// The agent itself could not make the connection (out of file descriptors or memory): nobody
/// else is to blame, and the client is closed.
fn short_of_resources(shared: &FrontDoorShared, error: &anyhow::Error) {
    tracing::error!(
        error = format!("{error:#}"),
        "this agent is out of file descriptors or memory: cannot connect onwards, closing (raise LimitNOFILE= or lower max_connections)"
    );
    shared.metrics.connection(Outcome::Refused);
}

/// Who refused a connection, each with its own once-a-minute warning: a burst of one kind
/// does not hide the first of another (a forged PROXY header seconds after a user was
/// turned away).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// The broker turned the user away.
    ByBroker,
    /// A PROXY header (or its absence past the per-client cap) that this front door does not
    /// trust: a relayed connection that is not another front door's.
    Proxy,
    /// This front door's own rules (a routing token it does not route, a draining machine).
    Rules,
}

/// A refused connection: a warning at most once a minute for each kind with how many were
/// refused since (a storm of turned-away users, or a stranger's probes, cannot fill the log);
/// in between, a user the broker turned away at info, the others at debug.
fn say_refused(kind: Refusal, why: &str, message: &'static str) {
    static LIMITS: LazyLock<[WarningLimit; 3]> = LazyLock::new(Default::default);
    let limit = &LIMITS[kind as usize];
    match limit.warn_now() {
        Some(unwarned) => tracing::warn!(
            why,
            since_last_warning = unwarned,
            "{message} (warned at most once a minute)"
        ),
        None if kind == Refusal::ByBroker => tracing::info!(why, "{message}"),
        None => tracing::debug!(why, "{message}"),
    }
}

/// A connection that brought no RDP connection request (a scanner, a health check, a stray
/// HTTP request, a client too slow): said at info at most once a minute per kind with how many
/// came since, at debug always (the connections metric counts them as `bad_request`).
fn say_bad_request(limit: &WarningLimit, why: &str, message: &'static str) {
    match limit.warn_now() {
        Some(unwarned) => {
            tracing::info!(
                why,
                since_last_said = unwarned,
                "{message} (said at most once a minute)"
            )
        }
        None => tracing::debug!(why, "{message}"),
    }
}
