//! Control protocol round trips over a real Unix socket in a temporary directory.

use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use super::client::{call, render};
use super::server::{ControlHandler, bind, serve};
use super::*;
use crate::directory::Directory;

fn args(user: &str, session_id: Option<u32>) -> SessionArgs {
    SessionArgs {
        user: user.to_owned(),
        session_id,
        ..Default::default()
    }
}

/// The handler of machine ts1 in farm default over `directory`.
fn handler_of(directory: Directory) -> ControlHandler {
    ControlHandler {
        directory,
        status: Arc::new(Mutex::new(Default::default())),
        machine_name: "ts1".into(),
        farm: "default".into(),
        advertise: "ts1:3389".into(),
        front_door: None,
    }
}

#[tokio::test]
async fn requests_round_trip_over_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run/control.sock");
    let (directory, _events) = Directory::open(dir.path()).unwrap();
    let handler = handler_of(directory);
    let listener = bind(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve(listener, path.clone(), handler, shutdown.clone()));

    let logon = Request::Logon(SessionArgs {
        domain: Some("CORP".into()),
        client_address: Some("192.0.2.7:50000".into()),
        ..args("alice", Some(10))
    });
    let Response::Session { session, .. } = call(&path, &logon).await.unwrap() else {
        panic!("expected a session");
    };
    assert_eq!(
        (session.session_id, session.user_name.as_str()),
        (10, "alice")
    );
    call(&path, &Request::Disconnect(args("alice", None)))
        .await
        .unwrap();
    let listed = call(&path, &Request::List).await.unwrap();
    let table = render(&listed).unwrap();
    assert!(table.contains("CORP\\alice"), "{table}");
    assert!(table.contains("disconnected"), "{table}");

    let Response::Session { session, .. } = call(&path, &Request::Logon(args("CORP\\carol", None)))
        .await
        .unwrap()
    else {
        panic!("expected a session");
    };
    assert_eq!(
        (session.domain.as_str(), session.user_name.as_str()),
        ("CORP", "carol")
    );
    let refused = call(&path, &Request::Logoff(args("bob", None)))
        .await
        .unwrap();
    assert!(render(&refused).unwrap_err().contains("no session"));
    let status = call(&path, &Request::Status).await.unwrap();
    assert!(render(&status).unwrap().contains("ts1 in farm default"));

    // A second agent on the same socket is refused.
    assert!(
        bind(&path)
            .unwrap_err()
            .to_string()
            .contains("another agent")
    );

    shutdown.cancel();
    server.await.unwrap();
    assert!(!path.exists());
    let error = call(&path, &Request::List).await.unwrap_err();
    assert!(error.to_string().contains("agent not running"), "{error}");

    // A session event waits for an agent that is restarting: its logoff is not lost.
    let (directory, _events) = Directory::open(dir.path()).unwrap();
    let handler = handler_of(directory.clone());
    let restarted = path.clone();
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let server = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
        let listener = bind(&restarted).unwrap();
        serve(listener, restarted, handler, stop).await;
    });
    let wait = std::time::Duration::from_secs(5);
    let logoff = Request::Logoff(args("alice", Some(10)));
    let answer = super::client::call_waiting(&path, &logoff, wait)
        .await
        .unwrap();
    assert!(render(&answer).unwrap().contains("ended"), "{answer:?}");
    let left = directory.list();
    assert!(left.iter().all(|s| s.user_name != "alice"), "{left:?}");
    shutdown.cancel();
    server.await.unwrap();
    // Waiting has its limit, which the error names.
    let error = super::client::call_waiting(&path, &logoff, std::time::Duration::from_millis(500))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("within 0.5 s"), "{error}");
}

#[tokio::test]
async fn a_removed_socket_file_is_bound_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.sock");
    let (directory, _events) = Directory::open(dir.path()).unwrap();
    let listener = bind(&path).unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve(
        listener,
        path.clone(),
        handler_of(directory),
        shutdown.clone(),
    ));
    call(&path, &Request::List).await.unwrap();
    std::fs::remove_file(&path).unwrap();
    assert!(call(&path, &Request::List).await.is_err());
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(8);
    while call(&path, &Request::List).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the socket is not back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    server.await.unwrap();
    assert!(!path.exists());
}

#[test]
fn an_event_the_agent_cannot_save_is_answered_as_such_and_status_says_so() {
    let dir = tempfile::tempdir().unwrap();
    // A directory where the temporary file goes: no table can be written (even by root).
    std::fs::create_dir(dir.path().join("sessions.json.tmp")).unwrap();
    let (directory, _events) = Directory::open(dir.path()).unwrap();
    let handler = handler_of(directory);
    let answer = handler.handle(Request::Logon(args("alice", Some(10))));
    let said = render(&answer).unwrap_err();
    assert!(
        said.contains("session 10 of alice is active, but the agent cannot save"),
        "{said}"
    );
    let Response::Status { status } = handler.handle(Request::Status) else {
        panic!("expected a status");
    };
    assert!(status.session_table_unsaved);
    let text = render(&Response::Status { status }).unwrap();
    assert!(text.contains("session table: NOT SAVED"), "{text}");
}

#[test]
fn status_names_the_session_limit_as_it_applies() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, _events) = Directory::open(dir.path()).unwrap();
    let handler = handler_of(directory);
    let shown = |change: &dyn Fn(&mut crate::stream::LinkStatus)| {
        change(&mut handler.status.lock().unwrap());
        let Response::Status { status } = handler.handle(Request::Status) else {
            panic!("expected a status");
        };
        render(&Response::Status { status }).unwrap()
    };
    assert!(shown(&|_| {}).contains("session limit none,"));
    assert!(shown(&|link| link.session_limit = 20).contains("session limit 20,"));
    let single = shown(&|link| link.single_session = true);
    assert!(
        single.contains("session limit 1 (single-session mode),"),
        "{single}"
    );
}

#[tokio::test]
async fn stale_socket_is_replaced_and_garbage_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let listener = bind(&path).unwrap();
    let (directory, _events) = Directory::open(dir.path()).unwrap();
    let handler = handler_of(directory);
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve(listener, path.clone(), handler, shutdown.clone()));
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::UnixStream::connect(&path).await.unwrap();
    stream.write_all(b"{\"op\":\"explode\"}\n").await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.contains("bad request"), "{answer}");
    shutdown.cancel();
    server.await.unwrap();
}

#[test]
fn wire_format_is_stable() {
    let request = Request::Logon(args("alice", Some(3)));
    assert_eq!(
        serde_json::to_string(&request).unwrap(),
        r#"{"op":"logon","user":"alice","session_id":3}"#
    );
    let list: Request = serde_json::from_str(r#"{"op":"list"}"#).unwrap();
    assert_eq!(list, Request::List);
}

/// An agent that closes the connection without answering (stopped, or killed, while the
/// request waited) is asked again within `--wait`; without a wait, the error says what
/// happened.
#[tokio::test]
async fn a_request_the_agent_dropped_unanswered_is_sent_again() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let agent = tokio::spawn(async move {
        let mut requests = Vec::new();
        for answers in [false, true, false] {
            let (stream, _) = listener.accept().await.unwrap();
            let (reader, mut writer) = stream.into_split();
            let mut line = String::new();
            BufReader::new(reader).read_line(&mut line).await.unwrap();
            requests.push(line);
            if answers {
                let mut answer = serde_json::to_vec(&Response::Error {
                    message: "answered".into(),
                })
                .unwrap();
                answer.push(b'\n');
                writer.write_all(&answer).await.unwrap();
            }
        }
        requests
    });
    let logoff = Request::Logoff(args("alice", Some(10)));
    let answered = super::client::call_waiting(&path, &logoff, std::time::Duration::from_secs(5))
        .await
        .unwrap();
    assert!(matches!(answered, Response::Error { message } if message == "answered"));
    let error = call(&path, &logoff).await.unwrap_err();
    assert!(
        format!("{error:#}").contains("closed the connection without answering"),
        "{error:#}"
    );
    let requests = agent.await.unwrap();
    assert_eq!(requests.len(), 3);
    assert!(requests.iter().all(|request| request == &requests[0]));
}

/// An event that names no session is not sent again: the agent may have applied it, and a
/// second logon would make a second session, a second logoff end another one.
#[tokio::test]
async fn an_event_without_a_session_number_is_not_sent_twice() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let agent = tokio::spawn(async move {
        let mut accepted = 0;
        while let Ok(Ok((stream, _))) =
            tokio::time::timeout(std::time::Duration::from_secs(1), listener.accept()).await
        {
            accepted += 1;
            drop(stream);
        }
        accepted
    });
    let logon = Request::Logon(args("alice", None));
    let error = super::client::call_waiting(&path, &logon, std::time::Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        format!("{error:#}").contains("may not have been applied"),
        "{error:#}"
    );
    assert_eq!(agent.await.unwrap(), 1);
    assert!(Request::Logoff(args("alice", Some(3))).may_be_repeated());
    assert!(!Request::Logoff(args("alice", None)).may_be_repeated());
    assert!(Request::Status.may_be_repeated());
}
