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

/// Serves until `shutdown`, then removes the socket file.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    handler: ControlHandler,
    shutdown: CancellationToken,
) {
    let mut pause = AcceptPause::new("control socket");
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                pause.after_success();
                let handler = handler.clone();
                tokio::spawn(async move {
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
    let _ = std::fs::remove_file(&path);
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
