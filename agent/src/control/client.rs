//! The CLI's side of the control socket: sends one request, reads one response, and prints
//! it for people (`session list` as a table).

use std::io::ErrorKind;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, anyhow};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::{AgentStatus, MAX_LINE, Request, Response};
use crate::directory::{RecordState, SessionRecord};

const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an agent that is not running is looked for again (`call_waiting`).
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Sends `request` to the agent listening on `socket` and returns its response.
pub async fn call(socket: &Path, request: &Request) -> anyhow::Result<Response> {
    call_waiting(socket, request, Duration::ZERO).await
}

/// [`call`], waiting up to `wait` for an agent that is not running (no socket, or nobody
/// listening on it): an agent restarting (`systemctl restart`, or after a crash) is back
/// within seconds, and a session event it would miss meanwhile is lost for good (a logoff
/// missed leaves a session that never ends). An agent that closes the connection without an
/// answer (it was killed while the request waited) is asked again, within the same `wait`,
/// when that is safe ([`Request::may_be_repeated`]: the event names its session, so applying
/// it again leaves it as it is; a logoff asked again finds no session, and says so).
pub async fn call_waiting(
    socket: &Path,
    request: &Request,
    wait: Duration,
) -> anyhow::Result<Response> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let stream = loop {
            match UnixStream::connect(socket).await {
                Ok(stream) => break stream,
                Err(error)
                    if matches!(
                        error.kind(),
                        ErrorKind::NotFound | ErrorKind::ConnectionRefused
                    ) && tokio::time::Instant::now() + RETRY_PAUSE <= deadline =>
                {
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(error) => return Err(connect_error(socket, &error, wait)),
            }
        };
        let exchanged = tokio::time::timeout(CALL_TIMEOUT, exchange(stream, request))
            .await
            .map_err(|_| anyhow!("the agent at {} did not answer in time", socket.display()))?;
        match exchanged {
            Ok(response) => return Ok(response),
            Err(Exchange::Closed(_))
                if request.may_be_repeated()
                    && tokio::time::Instant::now() + RETRY_PAUSE <= deadline =>
            {
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            Err(Exchange::Closed(error)) => {
                return Err(error.context(format!(
                    "the agent at {} closed the connection without answering (it stopped or \
                     restarted): the event may not have been applied",
                    socket.display()
                )));
            }
            Err(Exchange::Failed(error)) => return Err(error),
        }
    }
}

/// How an exchange with the agent failed.
enum Exchange {
    /// The agent closed the connection before it answered.
    Closed(anyhow::Error),
    Failed(anyhow::Error),
}

impl Exchange {
    /// `error` while doing `what`: the connection closed by the agent, or another failure.
    fn of_io(error: std::io::Error, what: &'static str) -> Exchange {
        let closed = matches!(
            error.kind(),
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::UnexpectedEof
        );
        let error = anyhow::Error::from(error).context(what);
        if closed {
            Exchange::Closed(error)
        } else {
            Exchange::Failed(error)
        }
    }
}

fn connect_error(socket: &Path, error: &std::io::Error, waited: Duration) -> anyhow::Error {
    match error.kind() {
        ErrorKind::NotFound | ErrorKind::ConnectionRefused if waited.is_zero() => anyhow!(
            "agent not running (nothing listening on {})",
            socket.display()
        ),
        ErrorKind::NotFound | ErrorKind::ConnectionRefused => anyhow!(
            "agent not running (nothing listening on {} within {} s)",
            socket.display(),
            waited.as_secs_f32()
        ),
        ErrorKind::PermissionDenied => anyhow!(
            "permission denied on {} (the control socket is owner-only)",
            socket.display()
        ),
        _ => anyhow!("connect to {}: {error}", socket.display()),
    }
}

async fn exchange(stream: UnixStream, request: &Request) -> Result<Response, Exchange> {
    let (reader, mut writer) = stream.into_split();
    let mut bytes = serde_json::to_vec(request)
        .context("encode request")
        .map_err(Exchange::Failed)?;
    bytes.push(b'\n');
    if let Err(error) = writer.write_all(&bytes).await {
        return Err(Exchange::of_io(error, "send request"));
    }
    let mut line = Vec::new();
    if let Err(error) = BufReader::new(reader.take(MAX_LINE as u64))
        .read_until(b'\n', &mut line)
        .await
    {
        return Err(Exchange::of_io(error, "read response"));
    }
    if line.is_empty() {
        return Err(Exchange::Closed(anyhow!("no response")));
    }
    serde_json::from_slice(&line)
        .context("the agent's response is not understood")
        .map_err(Exchange::Failed)
}

/// Human-readable text for a response; `Err` carries the agent's error message.
pub fn render(response: &Response) -> Result<String, String> {
    match response {
        Response::Error { message } => Err(message.clone()),
        Response::Session {
            session,
            ended,
            unsaved,
        } => {
            let text = format!(
                "session {} of {} {}",
                session.session_id,
                qualified_user(session),
                if *ended {
                    "ended"
                } else {
                    match session.state {
                        RecordState::Active => "is active",
                        RecordState::Disconnected => "is disconnected",
                    }
                }
            );
            if *unsaved {
                return Err(format!(
                    "{text}, but the agent cannot save its session table (see its log): \
                     this event is lost if the agent restarts before it can"
                ));
            }
            Ok(text)
        }
        Response::Sessions { sessions } => Ok(session_table(sessions)),
        Response::Status { status } => Ok(status_text(status)),
    }
}

fn qualified_user(session: &SessionRecord) -> String {
    if session.domain.is_empty() {
        session.user_name.clone()
    } else {
        format!("{}\\{}", session.domain, session.user_name)
    }
}

fn state_text(state: RecordState) -> &'static str {
    match state {
        RecordState::Active => "active",
        RecordState::Disconnected => "disconnected",
    }
}

fn time_text(millis: i64) -> String {
    let time = u64::try_from(millis)
        .ok()
        .map(|millis| std::time::UNIX_EPOCH + Duration::from_millis(millis));
    match time {
        Some(time) => humantime::format_rfc3339_seconds(time).to_string(),
        None => "-".to_owned(),
    }
}

/// The sessions as an aligned table.
pub fn session_table(sessions: &[SessionRecord]) -> String {
    let header = ["ID", "USER", "STATE", "CLIENT", "LOGON", "SOURCE"].map(str::to_owned);
    let mut rows = vec![header];
    for session in sessions {
        rows.push([
            session.session_id.to_string(),
            qualified_user(session),
            state_text(session.state).to_owned(),
            if session.client_address.is_empty() {
                "-".to_owned()
            } else {
                session.client_address.clone()
            },
            time_text(session.logon_time_ms),
            match session.origin {
                crate::directory::Origin::Control => "control".to_owned(),
                crate::directory::Origin::FrontDoor => "front-door".to_owned(),
            },
        ]);
    }
    let mut widths = [0usize; 6];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        text.push_str(cells.join("  ").trim_end());
        text.push('\n');
    }
    if sessions.is_empty() {
        text.push_str("(no sessions)\n");
    }
    text.trim_end().to_owned()
}

fn status_text(status: &AgentStatus) -> String {
    let link = &status.link;
    let broker = if link.connected {
        format!("connected (machine id {})", link.machine_id)
    } else if link.last_error.is_empty() {
        "not connected".to_owned()
    } else {
        format!("not connected: {}", link.last_error)
    };
    let table = if status.session_table_unsaved {
        "NOT SAVED: the state directory cannot be written (see the agent's log)"
    } else {
        "saved"
    };
    let limit = match (link.single_session, link.session_limit) {
        (true, _) => "1 (single-session mode)".to_owned(),
        (false, 0) => "none".to_owned(),
        (false, limit) => limit.to_string(),
    };
    format!(
        "machine: {} in farm {}\nadvertised: {}\nfront door: {}\nbroker: {broker}\nsession table: {table}\nsettings: weight {}, session limit {limit}, {}",
        status.machine_name,
        status.farm,
        status.advertise,
        status.front_door.as_deref().unwrap_or("off"),
        link.weight,
        if link.draining {
            "draining"
        } else {
            "not draining"
        },
    )
}
