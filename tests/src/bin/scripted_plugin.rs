//! `scripted-plugin`: a `tsbroker.v1.Plugin` for the end-to-end tests. It records every call it
//! receives and answers decisions as a file tells it, so a test can make a real plug-in process
//! override the pick, err, hang or return a non-candidate, and check what the broker sent.
//!
//! ```text
//! scripted-plugin [--listen ADDR] [--record FILE] [--mode-file FILE] [--external]
//! ```
//!
//! - `--listen ADDR` (default `127.0.0.1:0`): the first line on stdout is `listening on ADDR`
//!   with the bound address; nothing else goes to stdout.
//! - `--record FILE`: one JSON object per call appended as a line, written when the call
//!   arrives (before any `hang`): `{"method": "...", ...the request's fields}`.
//! - `--mode-file FILE`: read on every `GetMostSuitableServer` and `GetUserExternalSession`; one
//!   of `keep` (empty answer; also when the file is missing or empty), `pick NAME` (the candidate
//!   of that name, else the id of a machine of that name from the notifications, else keep),
//!   `pick-upper NAME` (as `pick`, the id in upper case), `not-candidate` (a random UUID),
//!   `error` (INTERNAL), `unavailable` (UNAVAILABLE, as an overloaded plug-in says),
//!   `failed-precondition` (FAILED_PRECONDITION, asking to be initialized again; decisions
//!   only), `hang` (10 s, then keep), `external HOST:PORT [NAME]`
//!   (`GetUserExternalSession` answers it, with NAME or HOST as its host name;
//!   `GetMostSuitableServer` keeps), `fail-notifications` (notifications answer INTERNAL;
//!   decisions keep).
//! - `--external`: `Initialize` answers `supports_external_sessions = true`.
//! - `--slow-notifications`: every notification takes 10 s to answer (recorded on arrival).
//! - `--tls-cert FILE --tls-key FILE`: serves over TLS with that certificate and key.
//!
//! Notifications are acknowledged but in `fail-notifications`. Runs until SIGTERM or SIGINT.

use clap::Parser;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;
use tonic::{Request, Response, Status};
use tsbroker_common::proto::v1 as pb;
use tsbroker_common::proto::v1::plugin_server::{Plugin, PluginServer};
use tsbroker_common::serve::accepted_connections;

const HANG: Duration = Duration::from_secs(10);

#[derive(Debug, Parser)]
#[command(
    name = "scripted-plugin",
    about = "A scriptable tsbroker plug-in for the end-to-end tests"
)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    #[arg(long)]
    record: Option<PathBuf>,
    #[arg(long)]
    mode_file: Option<PathBuf>,
    #[arg(long)]
    external: bool,
    #[arg(long)]
    slow_notifications: bool,
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

#[derive(Debug, PartialEq)]
enum Mode {
    Keep,
    Pick(String),
    PickUpper(String),
    NotCandidate,
    Error,
    Unavailable,
    FailedPrecondition,
    Hang,
    External(String),
    FailNotifications,
    Invalid(String),
}

impl Mode {
    fn parse(text: &str) -> Mode {
        let text = text.trim();
        let (word, argument) = text.split_once(char::is_whitespace).unwrap_or((text, ""));
        let argument = argument.trim();
        match (word, argument.is_empty()) {
            ("" | "keep", true) => Mode::Keep,
            ("pick", false) => Mode::Pick(argument.to_owned()),
            ("pick-upper", false) => Mode::PickUpper(argument.to_owned()),
            ("not-candidate", true) => Mode::NotCandidate,
            ("error", true) => Mode::Error,
            ("unavailable", true) => Mode::Unavailable,
            ("failed-precondition", true) => Mode::FailedPrecondition,
            ("hang", true) => Mode::Hang,
            ("external", false) => Mode::External(argument.to_owned()),
            ("fail-notifications", true) => Mode::FailNotifications,
            _ => Mode::Invalid(text.to_owned()),
        }
    }
}

struct Scripted {
    record: Option<Mutex<File>>,
    mode_file: Option<PathBuf>,
    external: bool,
    slow_notifications: bool,
    /// Machine names by id, from notifications and candidates.
    names: Mutex<HashMap<String, String>>,
}

impl Scripted {
    /// The current mode and its text, for the record.
    fn mode(&self) -> (Mode, String) {
        let text = self
            .mode_file
            .as_ref()
            .and_then(|path| std::fs::read_to_string(path).ok())
            .unwrap_or_default();
        (Mode::parse(&text), text.trim().to_owned())
    }

    fn record(&self, line: Value) {
        let Some(file) = &self.record else { return };
        let mut file = file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // One write per line, to a file opened for appending.
        let written = file
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| file.flush());
        if let Err(error) = written {
            eprintln!("scripted-plugin: cannot record: {error}");
        }
    }

    /// How a notification (recorded already) is answered: slowly, with an error, or at once.
    async fn notified(&self) -> Result<(), Status> {
        if self.slow_notifications {
            tokio::time::sleep(HANG).await;
        }
        match self.mode().0 {
            Mode::FailNotifications => Err(Status::internal("scripted notification failure")),
            _ => Ok(()),
        }
    }

    fn learn_name(&self, id: &str, name: &str) {
        if !id.is_empty() && !name.is_empty() {
            self.names
                .lock()
                .unwrap()
                .insert(id.to_owned(), name.to_owned());
        }
    }

    fn name_of(&self, id: &str) -> String {
        self.names
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .unwrap_or_default()
    }

    fn id_named(&self, name: &str) -> Option<String> {
        let names = self.names.lock().unwrap();
        names
            .iter()
            .find(|(_, known)| known.as_str() == name)
            .map(|(id, _)| id.clone())
    }
}

/// An enum value's proto name without its prefix (`NOTIFICATION_TYPE_ADDED` → `ADDED`).
fn short(full_name: Option<&'static str>, value: i32) -> String {
    match full_name {
        Some(name) => {
            let prefixes = [
                "NOTIFICATION_TYPE_",
                "MACHINE_STATE_",
                "SESSION_STATE_",
                "SESSION_EVENT_TYPE_",
            ];
            let stripped = prefixes.iter().find_map(|prefix| name.strip_prefix(prefix));
            stripped.unwrap_or(name).to_owned()
        }
        None => format!("UNKNOWN({value})"),
    }
}

fn notification_name(value: i32) -> String {
    short(
        pb::NotificationType::try_from(value)
            .ok()
            .map(|v| v.as_str_name()),
        value,
    )
}

fn machine_state_name(value: i32) -> String {
    short(
        pb::MachineState::try_from(value)
            .ok()
            .map(|v| v.as_str_name()),
        value,
    )
}

fn session_state_name(value: i32) -> String {
    short(
        pb::SessionState::try_from(value)
            .ok()
            .map(|v| v.as_str_name()),
        value,
    )
}

fn event_name(value: i32) -> String {
    short(
        pb::SessionEventType::try_from(value)
            .ok()
            .map(|v| v.as_str_name()),
        value,
    )
}

#[tonic::async_trait]
impl Plugin for Scripted {
    async fn initialize(
        &self,
        request: Request<pb::InitializeRequest>,
    ) -> Result<Response<pb::InitializeResponse>, Status> {
        let request = request.into_inner();
        self.record(json!({
            "method": "Initialize",
            "broker_id": request.broker_id,
            "broker_version": request.broker_version,
            "farms": request.farms,
        }));
        Ok(Response::new(pb::InitializeResponse {
            supports_external_sessions: self.external,
            name: "scripted-plugin".to_owned(),
        }))
    }

    async fn terminated(
        &self,
        request: Request<pb::TerminatedRequest>,
    ) -> Result<Response<pb::TerminatedResponse>, Status> {
        self.record(json!({"method": "Terminated", "reason": request.into_inner().reason}));
        Ok(Response::new(pb::TerminatedResponse {}))
    }

    async fn get_most_suitable_server(
        &self,
        request: Request<pb::GetMostSuitableServerRequest>,
    ) -> Result<Response<pb::GetMostSuitableServerResponse>, Status> {
        let request = request.into_inner();
        let candidates: Vec<&pb::Machine> = request
            .candidates
            .iter()
            .filter_map(|c| c.machine.as_ref())
            .collect();
        for machine in &candidates {
            self.learn_name(&machine.id, &machine.name);
        }
        let (mode, mode_text) = self.mode();
        let answer = match &mode {
            Mode::Pick(name) | Mode::PickUpper(name) => {
                let id = candidates
                    .iter()
                    .find(|machine| &machine.name == name)
                    .map(|machine| machine.id.clone())
                    .or_else(|| self.id_named(name))
                    .unwrap_or_default();
                if matches!(mode, Mode::PickUpper(_)) {
                    id.to_uppercase()
                } else {
                    id
                }
            }
            Mode::NotCandidate => uuid::Uuid::new_v4().to_string(),
            _ => String::new(),
        };
        self.record(json!({
            "method": "GetMostSuitableServer",
            "user": request.user_name,
            "domain": request.domain,
            "farm": request.farm,
            "candidates": candidates.iter().map(|machine| machine.name.as_str()).collect::<Vec<_>>(),
            "broker_pick": self.name_of(&request.broker_pick),
            "broker_pick_id": request.broker_pick,
            "mode": mode_text,
            "answer": answer,
        }));
        match mode {
            Mode::Error => Err(Status::internal("scripted error")),
            Mode::Unavailable => Err(Status::unavailable("scripted: overloaded")),
            Mode::FailedPrecondition => Err(Status::failed_precondition("scripted: initialize me")),
            Mode::Invalid(text) => Err(Status::internal(format!("unknown mode {text:?}"))),
            Mode::Hang => {
                tokio::time::sleep(HANG).await;
                Ok(Response::new(pb::GetMostSuitableServerResponse::default()))
            }
            _ => Ok(Response::new(pb::GetMostSuitableServerResponse {
                machine_id: answer,
            })),
        }
    }

    async fn machine_change_notification(
        &self,
        request: Request<pb::MachineChangeNotificationRequest>,
    ) -> Result<Response<pb::MachineChangeNotificationResponse>, Status> {
        let request = request.into_inner();
        let machine = request.machine.unwrap_or_default();
        let machine_id = if request.machine_id.is_empty() {
            machine.id.clone()
        } else {
            request.machine_id
        };
        self.learn_name(&machine_id, &machine.name);
        self.record(json!({
            "method": "MachineChangeNotification",
            "type": notification_name(request.r#type),
            "machine_id": machine_id,
            "machine_name": self.name_of(&machine_id),
            "state": machine_state_name(machine.state),
            "draining": machine.draining,
            "weight": machine.weight,
            "changed_fields": request.changed_fields,
        }));
        self.notified().await?;
        Ok(Response::new(pb::MachineChangeNotificationResponse {}))
    }

    async fn session_change_notification(
        &self,
        request: Request<pb::SessionChangeNotificationRequest>,
    ) -> Result<Response<pb::SessionChangeNotificationResponse>, Status> {
        let request = request.into_inner();
        let changes: Vec<Value> = request
            .changes
            .iter()
            .map(|change| {
                let session = change.session.clone().unwrap_or_default();
                json!({
                    "type": event_name(change.r#type),
                    "session_id": session.session_id,
                    "user": session.user_name,
                    "domain": session.domain,
                    "state": session_state_name(session.state),
                })
            })
            .collect();
        self.record(json!({
            "method": "SessionChangeNotification",
            "notification": notification_name(request.notification),
            "machine_id": request.machine_id,
            "machine_name": self.name_of(&request.machine_id),
            "changes": changes,
            "last_batch": request.last_batch,
        }));
        self.notified().await?;
        Ok(Response::new(pb::SessionChangeNotificationResponse {}))
    }

    async fn get_user_external_session(
        &self,
        request: Request<pb::GetUserExternalSessionRequest>,
    ) -> Result<Response<pb::GetUserExternalSessionResponse>, Status> {
        let request = request.into_inner();
        let (mode, mode_text) = self.mode();
        let address = match &mode {
            Mode::External(address) => address.clone(),
            _ => String::new(),
        };
        self.record(json!({
            "method": "GetUserExternalSession",
            "user": request.user_name,
            "domain": request.domain,
            "farm": request.farm,
            "mode": mode_text,
            "answer": address,
        }));
        match mode {
            Mode::Error => Err(Status::internal("scripted error")),
            Mode::Invalid(text) => Err(Status::internal(format!("unknown mode {text:?}"))),
            Mode::Hang => {
                tokio::time::sleep(HANG).await;
                Ok(Response::new(pb::GetUserExternalSessionResponse::default()))
            }
            _ => {
                let (address, host_name) = match address.split_once(char::is_whitespace) {
                    Some((address, name)) => (address.to_owned(), name.to_owned()),
                    None => {
                        let host = address
                            .rsplit_once(':')
                            .map_or(address.as_str(), |(host, _)| host);
                        (address.clone(), host.to_owned())
                    }
                };
                Ok(Response::new(pb::GetUserExternalSessionResponse {
                    address,
                    host_name,
                }))
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    use anyhow::Context;
    let args = Args::parse();
    let record = match &args.record {
        Some(path) => {
            let file = OpenOptions::new().create(true).append(true).open(path);
            Some(Mutex::new(
                file.with_context(|| format!("open {}", path.display()))?,
            ))
        }
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    let local_address = listener
        .local_addr()
        .context("read the listening address")?;
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening on {local_address}")?;
        stdout.flush()?;
    }
    let plugin = Scripted {
        record,
        mode_file: args.mode_file,
        external: args.external,
        slow_notifications: args.slow_notifications,
        names: Mutex::new(HashMap::new()),
    };
    let mut builder = tonic::transport::Server::builder();
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        use tonic::transport::{Identity, ServerTlsConfig};
        let read = |path: &PathBuf| {
            std::fs::read(path).with_context(|| format!("read {}", path.display()))
        };
        let identity = Identity::from_pem(read(cert)?, read(key)?);
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(identity))
            .context("TLS settings")?;
    }
    let server = builder
        .add_service(PluginServer::new(plugin))
        .serve_with_incoming(accepted_connections(listener));
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        served = server => served.context("serve grpc")?,
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Mode;

    #[test]
    fn modes() {
        assert_eq!(Mode::parse(""), Mode::Keep);
        assert_eq!(Mode::parse("keep\n"), Mode::Keep);
        assert_eq!(
            Mode::parse("pick ts2.example.com\n"),
            Mode::Pick("ts2.example.com".into())
        );
        assert_eq!(Mode::parse("not-candidate"), Mode::NotCandidate);
        assert_eq!(Mode::parse("error"), Mode::Error);
        assert_eq!(Mode::parse("unavailable"), Mode::Unavailable);
        assert_eq!(Mode::parse("failed-precondition"), Mode::FailedPrecondition);
        assert_eq!(Mode::parse(" hang "), Mode::Hang);
        assert_eq!(Mode::parse("fail-notifications\n"), Mode::FailNotifications);
        assert_eq!(
            Mode::parse("external vdi:3389"),
            Mode::External("vdi:3389".into())
        );
        assert!(matches!(Mode::parse("pick"), Mode::Invalid(_)));
        assert!(matches!(Mode::parse("dance"), Mode::Invalid(_)));
    }
}
