//! Where a connection goes, from its routing hint: the broker's Redirect answer for a user
//! name (or for no hint), a READY machine of the farm for a routing token, or a refusal. The
//! local RDP service is the answer whenever the broker cannot be asked (after riding out a
//! broker restart: `broker_absence.rs`), but not when the broker answers that no machine may
//! take a new logon now (`refuses_new_logons`).

use std::net::SocketAddr;
use std::sync::LazyLock;
use std::time::Duration;

use tonic::Code;
use tsbroker_common::proto::v1 as pb;
use tsbroker_common::validate;
use tsbroker_common::warning_limit::WarningLimit;

use super::x224::{RoutingHint, split_domain};
use super::{FrontDoorShared, broker_absence};
use crate::directory::TRUNCATED_COOKIE_LEN;

const REDIRECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a client waits at most for a farm full for now to take its logon, and how often
/// the broker is asked again meanwhile.
const FULL_PATIENCE: Duration = Duration::from_secs(10);
const FULL_RETRY: Duration = Duration::from_millis(500);

/// How long one replica of several is given to answer before the next is asked.
pub(super) const REPLICA_PATIENCE: Duration = Duration::from_secs(1);

/// How long a `Redirect` waits while the brokers are silent ([`BrokerAbsence::silent`]).
///
/// [`BrokerAbsence::silent`]: broker_absence::BrokerAbsence::silent
const SILENT_PATIENCE: Duration = Duration::from_millis(500);

/// How long a `Redirect` may wait in all while a broker keeps answering the front door's other
/// calls (see [`broker_busy`]), as a client waits for a full farm ([`FULL_PATIENCE`]).
const BUSY_PATIENCE: Duration = Duration::from_secs(10);
/// A broker that answered another call within this is there, and busy.
const BUSY_SIGN: Duration = Duration::from_secs(1);
/// How much longer such a call is given each time.
const BUSY_STEP: Duration = Duration::from_millis(500);

/// Whether a `Redirect` past the front door's wait ([`REDIRECT_TIMEOUT`]) waits on: a broker
/// answered another of this front door's calls a moment ago, so it is there and the calls are
/// queued (a burst of connections on this front door's channel to it, or on its CPU), and
/// deciding alone would send a returning user to a second session; at most [`BUSY_PATIENCE`]
/// from `asked`. A broker away (stopped, frozen, cut off) answers none: its clients still go
/// to the local RDP service after the usual wait.
fn broker_busy(shared: &FrontDoorShared, asked: std::time::Instant) -> bool {
    asked.elapsed() < BUSY_PATIENCE && shared.broker_absence.answered_within(BUSY_SIGN)
}

/// The user a connection is for, as far as the front door can tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectingUser {
    pub user_name: String,
    pub domain: String,
    /// The cookie had mstsc's 9 characters: the name may be the start of a longer one (with a
    /// `DOMAIN\` in the cookie, the cut may fall in the user part, leaving it shorter).
    pub may_be_truncated: bool,
    /// The name the cookie carried, when the broker named the user otherwise (a cut name
    /// resolved to the full one): the session table keeps that tie as a guess.
    pub cookie_name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// This machine's RDP service.
    Local {
        user: Option<ConnectingUser>,
        why: String,
        /// The broker placed a new logon here: if the RDP service refuses it, the broker may
        /// be asked for the next candidate.
        new_logon: bool,
    },
    /// Another machine of the farm (or, for a plug-in's EXTERNAL pick, a host outside it).
    Remote {
        machine_id: String,
        machine_name: String,
        address: String,
        /// The user has a session there (or the token named it): never moved elsewhere.
        reconnection: bool,
        /// The target is not a front door of the farm (a plain RDP service, or a plug-in's
        /// host outside the farm): no PROXY header.
        external: bool,
        user: Option<ConnectingUser>,
        /// Why there, for the log (the broker's reason, or the routing token).
        why: String,
    },
    /// Closed after the request: `by_broker` when the broker said no machine may take the
    /// logon (a real user turned away), else a hint that leads nowhere in the farm (a
    /// stranger's routing token or collection); `full` when the farm is full for now
    /// (RESOURCE_EXHAUSTED), which may change within seconds.
    Refuse {
        why: String,
        by_broker: bool,
        full: bool,
    },
}

/// The user as the log shows them: `DOMAIN\user`, `user`, or `-` when the client named nobody.
/// The user as logs show it; a control character (the front door takes no ASCII one, but a
/// cookie may carry U+0080-U+009F) written escaped, as `\u{9b}`.
pub(super) fn user_label(user: Option<&ConnectingUser>) -> String {
    let label = match user {
        Some(user) if !user.domain.is_empty() => format!("{}\\{}", user.domain, user.user_name),
        Some(user) => user.user_name.clone(),
        None => return "-".to_owned(),
    };
    if !label.chars().any(char::is_control) {
        return label;
    }
    label
        .chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// The user a `mstshash` cookie names. Spaces around the name are taken for a client's
/// padding (the broker refuses a user name with them) and dropped — but for the end of a
/// cookie cut to nine characters, where the space is the cut name's own (`mary ann ` of
/// `mary ann lee`).
pub(super) fn user_from_cookie(name: &str) -> Option<ConnectingUser> {
    let (domain, user) = split_domain(name);
    let may_be_truncated = name.chars().count() == TRUNCATED_COOKIE_LEN
        || user.chars().count() == TRUNCATED_COOKIE_LEN;
    let user = if may_be_truncated {
        user.trim_start()
    } else {
        user.trim()
    };
    if user.is_empty() {
        return None;
    }
    let domain = domain.unwrap_or_default().trim();
    // A name the broker would refuse (a control character: bytes 0x80-0x9F of an ANSI code
    // page read as Latin-1) names no one it can look up: the client is taken as naming no
    // user, so the broker still decides (a full farm's refusal, the limits), rather than
    // this front door alone.
    let valid = if may_be_truncated {
        validate::cut_user_name("user_name", user)
    } else {
        validate::user_name("user_name", user)
    }
    .and_then(|_| validate::domain("domain", domain));
    if let Err(error) = valid {
        tracing::debug!(cookie = %name.escape_debug(), %error, "a cookie's user name that the broker would refuse: taken as naming no user");
        return None;
    }
    Some(ConnectingUser {
        user_name: user.to_owned(),
        domain: domain.to_owned(),
        may_be_truncated,
        cookie_name: None,
    })
}

/// `address` with an IPv4-mapped IPv6 address (`[::ffff:10.0.0.5]:3389`) as plain IPv4.
pub(super) use tsbroker_common::model::canonical_socket_address as canonical;

/// Decides for a connection that did not come from another front door; `arrived_at` gives
/// the address the client connected to (asked of the socket only for a routing token);
/// `refused` lists the machines (ids) that already refused this connection, which the broker
/// is told to leave out of a new logon's placement.
pub async fn decide(
    shared: &FrontDoorShared,
    hint: &RoutingHint,
    client: SocketAddr,
    arrived_at: impl Fn() -> SocketAddr,
    refused: &[String],
) -> Decision {
    match hint {
        // On a dual-stack [::] listener the address arrived at is IPv4-mapped: compare the
        // plain IPv4 form with the token's.
        RoutingHint::RoutingToken(token) if SocketAddr::V4(*token) == canonical(arrived_at()) => {
            Decision::Local {
                user: None,
                why: "routing token names this front door".to_owned(),
                new_logon: false,
            }
        }
        RoutingHint::UserName(name) => {
            redirect(shared, user_from_cookie(name), client, refused).await
        }
        RoutingHint::RoutingToken(token) => match shared.machines.routing_target(*token).await {
            Some(machine) if shared.is_this_machine(&machine.id) => Decision::Local {
                user: None,
                why: "routing token names this machine".to_owned(),
                new_logon: false,
            },
            Some(machine) => Decision::Remote {
                machine_id: machine.id,
                machine_name: machine.name,
                address: machine.address,
                reconnection: true,
                external: !machine.front_door,
                user: None,
                why: "routing token".to_owned(),
            },
            None => Decision::Refuse {
                why: format!(
                    "routing token {token} names no ready machine of the farm (none at that \
                     address, or several at its IP and none on its port)"
                ),
                by_broker: false,
                full: false,
            },
        },
        // Spelt exactly as the farm: the broker's farm names are case-sensitive (`default`
        // and `Default` are two farms), and a collection is one of them.
        RoutingHint::Collection(farm) if *farm == shared.settings.farm => {
            redirect(shared, None, client, refused).await
        }
        RoutingHint::Collection(farm) => Decision::Refuse {
            why: format!("collection {farm:?} is not this farm"),
            by_broker: false,
            full: false,
        },
        RoutingHint::None | RoutingHint::Unrecognized(_) => {
            redirect(shared, None, client, refused).await
        }
    }
}

/// Asks the broker ([`ask_broker`]). A farm full for now (every machine at its cap of logons
/// in flight or its session limit, or a group's: RESOURCE_EXHAUSTED) is asked again every
/// [`FULL_RETRY`] for up to [`FULL_PATIENCE`], the client waiting for its Connection Confirm
/// meanwhile, as in a queue: a logon storm's logons complete within seconds and free their
/// machines' caps. The metrics count the connection's answer once, its wait in the queue
/// included: a storm whose logons all got a machine counts no failure.
async fn redirect(
    shared: &FrontDoorShared,
    user: Option<ConnectingUser>,
    client: SocketAddr,
    refused: &[String],
) -> Decision {
    let started = std::time::Instant::now();
    loop {
        let (decision, failure) = ask_broker(shared, user.clone(), client, refused).await;
        match &decision {
            Decision::Refuse { full: true, .. }
                if started.elapsed() + FULL_RETRY < FULL_PATIENCE =>
            {
                tokio::time::sleep(FULL_RETRY).await;
            }
            _ => {
                let waited = started.elapsed().as_secs_f64();
                shared.metrics.redirect(waited, failure);
                return decision;
            }
        }
    }
}

/// Asks the broker once (each replica in turn when several do not answer); the local RDP
/// service when it cannot answer. With the decision, why the broker gave no machine (a gRPC
/// code's name, or `timeout`), if it did not.
async fn ask_broker(
    shared: &FrontDoorShared,
    user: Option<ConnectingUser>,
    client: SocketAddr,
    refused: &[String],
) -> (Decision, Option<String>) {
    let (user_name, domain, user_name_may_be_truncated) = match &user {
        Some(user) => (
            user.user_name.clone(),
            user.domain.clone(),
            user.may_be_truncated,
        ),
        None => (String::new(), String::new(), false),
    };
    let request = pb::RedirectRequest {
        user_name,
        domain,
        farm: shared.settings.farm.clone(),
        receiving_machine_id: shared.settings.machine_id.to_string(),
        client_address: client.to_string(),
        user_name_may_be_truncated,
        exclude_machine_ids: refused.to_vec(),
    };
    let asked = std::time::Instant::now();
    // Brokers silent for a while (a partition drops the packets): each client waits a moment,
    // not the whole wait, before the local RDP service (a broker back answers within it).
    let wait = if shared
        .broker_absence
        .silent(asked, shared.stream_down_since())
    {
        SILENT_PATIENCE
    } else {
        REDIRECT_TIMEOUT
    };
    let deadline = tokio::time::Instant::from_std(asked + wait);
    let replicas = shared.link.replicas();
    let mut first_replica = shared.link.in_use();
    let mut attempts = 0u32;
    // With several replicas, one that does not answer (frozen, cut off, gone) is given
    // `REPLICA_PATIENCE` before the next is asked: the stream's replica may be the one away.
    // One that answers that its database is away is passed over at once: the others may
    // reach theirs (decided alone here, a new user connecting twice through two front doors
    // would get two sessions).
    let mut replica = 0;
    let answer = loop {
        attempts += 1;
        let mut broker = shared.link.broker_at(first_replica + replica);
        let last_replica = replica + 1 >= replicas;
        let patience = if last_replica {
            deadline
        } else {
            deadline.min(tokio::time::Instant::now() + REPLICA_PATIENCE)
        };
        let call = broker.redirect(request.clone());
        tokio::pin!(call);
        let mut patience = patience;
        let answer = loop {
            match tokio::time::timeout_at(patience, &mut call).await {
                Err(_) if last_replica && broker_busy(shared, asked) => {
                    let longest = tokio::time::Instant::from_std(asked + BUSY_PATIENCE);
                    patience = (tokio::time::Instant::now() + BUSY_STEP).min(longest);
                }
                answer => break answer,
            }
        };
        let replica_away = match &answer {
            Ok(Ok(_)) => false,
            Ok(Err(status)) => broker_absence::replica_cannot_answer(status),
            Err(_) => true,
        };
        if replica_away && !last_replica && tokio::time::Instant::now() < deadline {
            replica += 1;
            continue;
        }
        replica = 0;
        first_replica = shared.link.in_use();
        match &answer {
            Ok(Err(status)) if broker_absence::broker_away(status) => {
                let now = std::time::Instant::now();
                if shared.broker_absence.away(now, shared.stream_down_since())
                    && tokio::time::Instant::from_std(now + broker_absence::RETRY_PAUSE) < deadline
                {
                    tokio::time::sleep(broker_absence::RETRY_PAUSE).await;
                    continue;
                }
            }
            Ok(_) => shared.broker_absence.answered(),
            Err(_) => {}
        }
        break answer;
    };
    if attempts > 1 && matches!(answer, Ok(Ok(_))) {
        tracing::info!(
            user = %user_label(user.as_ref()),
            waited_ms = asked.elapsed().as_millis() as u64,
            attempts,
            "a broker answered after a retry (a replica away, or a broker restarting); routing as it answers"
        );
    }
    let failure = match &answer {
        Ok(Ok(_)) => None,
        Ok(Err(status)) => Some(format!("{:?}", status.code())),
        Err(_) => Some("timeout".to_owned()),
    };
    let response = match answer {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => return (after_error(shared, user, client, &status), failure),
        Err(_) => {
            shared.broker_absence.went_unanswered();
            // Each connection's own line says where it went: said once a minute with how many
            // came since, so that a partition or a burst cannot fill the log.
            static LATE: LazyLock<WarningLimit> = LazyLock::new(Default::default);
            match LATE.warn_now() {
                Some(unwarned) => tracing::warn!(
                    since_last_warning = unwarned,
                    "broker did not answer the redirect in time: this front door decides alone (its RDP service, unless this machine drains) \
                     (warned at most once a minute)"
                ),
                None => tracing::info!(
                    "broker did not answer the redirect in time: this front door decides alone (its RDP service, unless this machine drains)"
                ),
            }
            let decision = undecided(shared, user, client, "broker timed out".to_owned());
            return (decision, failure);
        }
    };
    // The broker may have resolved a truncated cookie to the user's full name.
    let user = match user {
        Some(mut user) if !response.user_name.is_empty() => {
            let cookie_name = std::mem::replace(&mut user.user_name, response.user_name);
            user.cookie_name = Some(cookie_name);
            Some(user)
        }
        other => other,
    };
    let reason = pb::RedirectReason::try_from(response.reason).unwrap_or_default();
    if shared.is_this_machine(&response.machine_id) {
        let decision = Decision::Local {
            user,
            why: format!("broker chose this machine ({})", reason.as_str_name()),
            new_logon: reason != pb::RedirectReason::ExistingSession,
        };
        return (decision, None);
    }
    let decision = Decision::Remote {
        machine_id: response.machine_id,
        machine_name: response.machine_name,
        address: response.address,
        reconnection: reason == pb::RedirectReason::ExistingSession,
        external: reason == pb::RedirectReason::External || !response.front_door,
        user,
        why: format!("broker: {}", reason.as_str_name()),
    };
    (decision, None)
}

/// What a broker's error means for the connection: a refusal when it is the broker's answer
/// that no machine may take a new logon (`refuses_new_logons`), else the local RDP service
/// (`undecided`).
fn after_error(
    shared: &FrontDoorShared,
    user: Option<ConnectingUser>,
    client: SocketAddr,
    status: &tonic::Status,
) -> Decision {
    if refuses_new_logons(status, shared.draining()) {
        return Decision::Refuse {
            why: format!(
                "the broker takes no new logon for {} now ({:?}: {})",
                user_label(user.as_ref()),
                status.code(),
                status.message()
            ),
            by_broker: true,
            full: status.code() == Code::ResourceExhausted,
        };
    }
    match status.code() {
        Code::InvalidArgument if user.is_none() => {
            tracing::info!(
                message = status.message(),
                "broker cannot place a connection without a user name: this front door decides alone (its RDP service, unless this machine drains)"
            );
        }
        // Each connection's own line says where it went; these are warned once a minute
        // with how many came since, so that a broker outage, or a stranger's cookies that the
        // broker refuses, cannot fill the log.
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded => {
            static AWAY: LazyLock<WarningLimit> = LazyLock::new(Default::default);
            match AWAY.warn_now() {
                Some(unwarned) => tracing::warn!(
                    code = ?status.code(),
                    message = status.message(),
                    since_last_warning = unwarned,
                    "broker unreachable or without a ready machine: this front door decides alone (its RDP service, unless this machine drains) \
                     (warned at most once a minute)"
                ),
                None => tracing::info!(
                    code = ?status.code(),
                    message = status.message(),
                    "broker unreachable or without a ready machine: this front door decides alone (its RDP service, unless this machine drains)"
                ),
            }
        }
        code => {
            static REFUSED: LazyLock<WarningLimit> = LazyLock::new(Default::default);
            match REFUSED.warn_now() {
                Some(unwarned) => tracing::warn!(
                    ?code,
                    message = status.message(),
                    since_last_warning = unwarned,
                    "broker refused the redirect: this front door decides alone (its RDP service, unless this machine drains) \
                     (warned at most once a minute)"
                ),
                None => tracing::debug!(
                    ?code,
                    message = status.message(),
                    "broker refused the redirect: this front door decides alone (its RDP service, unless this machine drains)"
                ),
            }
        }
    }
    // "Unavailable" is both a broker's answer and tonic's word for no broker reached.
    let why = if super::broker_absence::broker_away(status) {
        format!("no broker reached: {}", status.message())
    } else {
        format!("broker answered {:?}", status.code())
    };
    undecided(shared, user, client, why)
}

/// No broker decided (none answered, its database is away, it refused the hint): the local
/// RDP service, unless this machine drains and holds no session this connection would return
/// to — then it is a new logon the operator ruled out here, and refused.
fn undecided(
    shared: &FrontDoorShared,
    user: Option<ConnectingUser>,
    client: SocketAddr,
    why: String,
) -> Decision {
    let returning = || {
        let named = user
            .as_ref()
            .map(|user| (user.user_name.as_str(), user.domain.as_str()));
        shared.directory.may_return_here(named, &client.to_string())
    };
    if shared.draining() && !returning() {
        return Decision::Refuse {
            why: format!(
                "this machine drains, and {} has no session here to return to ({why})",
                user_label(user.as_ref())
            ),
            by_broker: true,
            full: false,
        };
    }
    Decision::Local {
        user,
        why,
        new_logon: false,
    }
}

/// Whether `status` is the broker's own answer that no machine may take this new logon now —
/// every machine at its session limit or cap of logons in flight, a group without fallback
/// (RESOURCE_EXHAUSTED), or nothing ready to take it while this machine drains (UNAVAILABLE,
/// neither a broker that cannot be reached nor its database away, which say to retry) — so
/// that the local RDP service would be the very logon the operator ruled out. An UNAVAILABLE
/// while this machine does not drain (the farm's agents not back yet after a broker restart)
/// still goes to the local RDP service.
fn refuses_new_logons(status: &tonic::Status, this_machine_drains: bool) -> bool {
    match status.code() {
        Code::ResourceExhausted => !broker_absence::broker_away(status),
        Code::Unavailable => {
            this_machine_drains
                && !broker_absence::broker_away(status)
                && !status
                    .metadata()
                    .contains_key(tsbroker_common::proto::RETRY_AFTER_MS_METADATA)
        }
        _ => false,
    }
}

#[cfg(test)]
mod label_tests {
    use super::{ConnectingUser, user_label};

    #[test]
    fn control_characters_in_a_user_label_are_escaped() {
        let user = |name: &str, domain: &str| ConnectingUser {
            user_name: name.to_owned(),
            domain: domain.to_owned(),
            may_be_truncated: false,
            cookie_name: None,
        };
        assert_eq!(user_label(Some(&user("alice", "CORP"))), "CORP\\alice");
        assert_eq!(user_label(Some(&user("jürgen", ""))), "jürgen");
        assert_eq!(
            user_label(Some(&user("ali\u{9b}31mce", ""))),
            "ali\\u{9b}31mce"
        );
        assert_eq!(user_label(None), "-");
    }
}

#[cfg(test)]
mod refusal_tests {
    use super::refuses_new_logons;
    use tonic::Status;

    #[test]
    fn a_full_farm_refuses_and_nothing_ready_refuses_only_while_this_machine_drains() {
        let full = Status::resource_exhausted("no machine in farm \"f\" can take a new logon now");
        assert!(refuses_new_logons(&full, false));
        let nothing_ready = Status::unavailable("no machine in farm \"f\" is ready");
        assert!(refuses_new_logons(&nothing_ready, true));
        assert!(!refuses_new_logons(&nothing_ready, false));
        let mut database_away = Status::unavailable("the broker's database is unavailable");
        database_away.metadata_mut().insert(
            tsbroker_common::proto::RETRY_AFTER_MS_METADATA,
            tonic::metadata::MetadataValue::from(1000u64),
        );
        assert!(!refuses_new_logons(&database_away, true));
        assert!(!refuses_new_logons(&Status::internal("bug"), true));
        assert!(!refuses_new_logons(&Status::not_found("farm"), true));
    }
}

#[cfg(test)]
mod cookie_tests {
    #[test]
    fn a_cookie_cut_to_nine_characters_may_hold_a_cut_name_with_or_without_a_domain() {
        let cut = |cookie: &str| super::user_from_cookie(cookie).map(|user| user.may_be_truncated);
        assert_eq!(cut("administr"), Some(true));
        assert_eq!(cut("CORP\\caro"), Some(true));
        assert_eq!(cut("CORP\\administr"), Some(true));
        assert_eq!(cut("carol"), Some(false));
        assert_eq!(cut("CORP\\carol"), Some(false));
        assert_eq!(cut("CORP\\"), None);
    }

    #[test]
    fn spaces_around_a_name_are_padding_but_for_the_end_of_a_cut_one() {
        let named = |cookie: &str| {
            super::user_from_cookie(cookie).map(|user| (user.domain, user.user_name))
        };
        let plain = |domain: &str, user: &str| Some((domain.to_owned(), user.to_owned()));
        assert_eq!(named("kate  "), plain("", "kate"));
        assert_eq!(named(" kate"), plain("", "kate"));
        assert_eq!(named(" CORP \\ kate "), plain("CORP", "kate"));
        assert_eq!(named("mary ann "), plain("", "mary ann "));
        assert_eq!(named("   "), None);
    }

    #[test]
    fn a_name_the_broker_would_refuse_names_no_user() {
        let named = |cookie: &str| super::user_from_cookie(cookie).is_some();
        // U+0085 and U+009B: bytes 0x85 and 0x9B of a cookie that is not UTF-8.
        assert!(!named("new\u{85}bie"));
        assert!(!named("CORP\u{9b}\\kate"));
        assert!(!named(&"x".repeat(300)));
        assert!(named("Jos\u{e9}"));
        assert!(named("mary ann "));
    }
}

#[cfg(test)]
mod canonical_tests {
    use std::net::SocketAddr;

    #[test]
    fn an_ipv4_mapped_address_compares_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:10.0.0.5]:3389".parse().unwrap();
        let plain: SocketAddr = "10.0.0.5:3389".parse().unwrap();
        assert_eq!(super::canonical(mapped), plain);
        let v6: SocketAddr = "[2001:db8::1]:3389".parse().unwrap();
        assert_eq!(super::canonical(v6), v6);
    }
}
