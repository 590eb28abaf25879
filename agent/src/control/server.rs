//! The agent's side of the control socket: binds it owner-only, answers one JSON request per
//! connection from the session table, and removes the socket file when the agent stops.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tsbroker_common::model::SessionEventKind;
use tsbroker_common::serve::AcceptPause;

use super::{AgentStatus, MAX_LINE, Request, Response, SessionArgs};
use crate::directory::{Directory, SessionRequest};
use crate::front_door::x224::split_domain;
use crate::stream::SharedStatus;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long requests under way when the agent stops get to be answered (within the agent's
/// own stop grace).
const ANSWER_AT_STOP: Duration = Duration::from_secs(3);

/// Answers control requests.
#[derive(Clone)]
pub struct ControlHandler {
    pub directory: Directory,
    pub status: SharedStatus,
    pub machine_name: String,
    pub farm: String,
    pub advertise: String,
    pub front_door: Option<String>,
}

impl ControlHandler {
    pub fn handle(&self, request: Request) -> Response {
        let (kind, args) = match request {
            Request::List => {
                return Response::Sessions {
                    sessions: self.directory.list(),
                };
            }
            Request::Status => {
                return Response::Status {
                    status: Box::new(self.status()),
                };
            }
            Request::Logon(args) => (SessionEventKind::Logon, args),
            Request::Disconnect(args) => (SessionEventKind::Disconnect, args),
            Request::Reconnect(args) => (SessionEventKind::Reconnect, args),
            Request::Logoff(args) => (SessionEventKind::Logoff, args),
        };
        match self.directory.apply(kind, session_request(args)) {
            Ok(session) => {
                tracing::info!(
                    event = ?kind,
                    session_id = session.session_id,
                    user = %session.user_name,
                    "session event from the control socket"
                );
                let ended = kind == SessionEventKind::Logoff;
                Response::Session {
                    session,
                    ended,
                    unsaved: self.directory.save_failing(),
                }
            }
            Err(error) => Response::Error {
                message: error.to_string(),
            },
        }
    }

    fn status(&self) -> AgentStatus {
        let link = self
            .status
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        AgentStatus {
            machine_name: self.machine_name.clone(),
            farm: self.farm.clone(),
            advertise: self.advertise.clone(),
            front_door: self.front_door.clone(),
            link,
            session_table_unsaved: self.directory.save_failing(),
        }
    }
}

fn session_request(args: SessionArgs) -> SessionRequest {
    // "DOMAIN\user" without --domain: the domain is the part before the backslash.
    let (user_name, domain) = match args.domain {
        Some(domain) => (args.user, domain),
        None => match split_domain(&args.user) {
            (Some(domain), user) => (user.to_owned(), domain.to_owned()),
            (None, user) => (user.to_owned(), String::new()),
        },
    };
    SessionRequest {
        user_name,
        domain,
        session_id: args.session_id,
        client_address: args.client_address.unwrap_or_default(),
        known_only: args.known_only,
    }
}

/// Binds the socket at `path`: creates its directory, replaces a stale socket file (refusing
/// when another agent still answers there), and makes it owner-only.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("create directory {}", parent.display()))?;
    }
    if let Ok(metadata) = std::fs::symlink_metadata(path) {
        if !metadata.file_type().is_socket() {
            bail!("{} exists and is not a socket", path.display());
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("another agent is listening on {}", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("remove stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("bind control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restrict control socket {}", path.display()))?;
    Ok(listener)
}

/// Serves until `shutdown`, then removes the socket file (if it is still this agent's). A
/// socket file removed or replaced meanwhile (a cleanup of /run, a mistaken `rm`) is bound
/// again within [`SOCKET_CHECK`]: PAM's and xrdp's events would otherwise be lost without a
/// word while the agent looked healthy to the broker.
pub async fn serve(
    mut listener: UnixListener,
    path: PathBuf,
    handler: ControlHandler,
    shutdown: CancellationToken,
) {
    let mut pause = AcceptPause::new("control socket");
    let mut ours = socket_identity(&path);
    let mut check = tokio::time::interval(SOCKET_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut rebind_failed = false;
    // Requests being answered: on shutdown each gets its answer (an event applied and not
    // answered would be sent again by `tsagent session …`, and a logoff then says there is no
    // such session).
    let mut in_flight = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => continue,
            _ = check.tick() => {
                let now = socket_identity(&path);
                if now.is_some() && now == ours {
                    continue;
                }
                match bind(&path) {
                    Ok(bound) => {
                        listener = bound;
                        ours = socket_identity(&path);
                        rebind_failed = false;
                        tracing::warn!(path = %path.display(), "the control socket was removed or replaced: bound again");
                    }
                    Err(error) if !rebind_failed => {
                        rebind_failed = true;
                        tracing::error!(error = format!("{error:#}"), "the control socket was removed or replaced and cannot be bound again: session events from PAM and xrdp do not reach this agent");
                    }
                    Err(_) => {}
                }
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                pause.after_success();
                let handler = handler.clone();
                in_flight.spawn(async move {
                    let answered =
                        tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &handler)).await;
                    match answered {
                        Ok(Ok(())) => {}
                        Ok(Err(error)) => {
                            tracing::debug!(
                                error = format!("{error:#}"),
                                "control connection failed"
                            )
                        }
                        Err(_) => tracing::debug!("control connection timed out"),
                    }
                });
            }
            Err(error) => pause.after_error(&error).await,
        }
    }
    drop(listener);
    let answered = async { while in_flight.join_next().await.is_some() {} };
    if tokio::time::timeout(ANSWER_AT_STOP, answered)
        .await
        .is_err()
    {
        tracing::warn!("control requests still unanswered at the agent's stop");
    }
    if ours.is_some() && socket_identity(&path) == ours {
        let _ = std::fs::remove_file(&path);
    }
}

/// How often the socket file is checked for being still this agent's.
const SOCKET_CHECK: Duration = Duration::from_secs(5);

/// The file at `path` (device and inode), `None` when there is none.
fn socket_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|metadata| (metadata.dev(), metadata.ino()))
}

async fn answer(stream: UnixStream, handler: &ControlHandler) -> anyhow::Result<()> {
    let (reader, mut writer) = stream.into_split();
    let mut line = Vec::new();
    BufReader::new(reader.take(MAX_LINE as u64 + 1))
        .read_until(b'\n', &mut line)
        .await
        .context("read request")?;
    let response = if line.len() > MAX_LINE {
        Response::Error {
            message: "request too long".to_owned(),
        }
    } else {
        match serde_json::from_slice::<Request>(&line) {
            Ok(request) => {
                // The table is saved to disk (fsync) on every change: off the async threads.
                let handler = handler.clone();
                tokio::task::spawn_blocking(move || handler.handle(request))
                    .await
                    .context("handle request")?
            }
            Err(error) => Response::Error {
                message: format!("bad request: {error}"),
            },
        }
    };
    let mut bytes = serde_json::to_vec(&response).context("encode response")?;
    bytes.push(b'\n');
    writer.write_all(&bytes).await.context("write response")?;
    writer.shutdown().await.context("close response")?;
    Ok(())
}
