//! Front doors handing a client to one another over real TCP on a host with several addresses:
//! each machine's front door listens on, and is advertised at, an address of its own
//! (127.0.0.2 and 127.0.0.3 stand for servers' second addresses). A front door trusts a PROXY
//! header only from a machine of the farm, by the address the connection comes from, so the
//! sender must connect from the address it advertises, not from the kernel's first choice
//! (127.0.0.1 here).

use crate::support::eventually;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tsagent::FrontDoorBind;
use tsbroker_common::proto::v1 as pb;
use tsbroker_tests::{TestAgent, TestBroker, TestDatabase, spawn_broker};

/// A stand-in RDP service: echoes what it gets, and reports each connection's first bytes.
async fn rdp_stand_in() -> (String, mpsc::UnboundedReceiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let (seen, receiver) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut chunk = vec![0u8; 4096];
                if let Ok(count) = stream.read(&mut chunk).await
                    && count > 0
                {
                    let _ = seen.send(chunk[..count].to_vec());
                    let _ = stream.write_all(&chunk[..count]).await;
                }
            });
        }
    });
    (address, receiver)
}

/// TPKT + X.224 Connection Request with the user's `mstshash` cookie and an RDP negotiation
/// request (MS-RDPBCGR 2.2.1.1).
fn connection_request(user: &str) -> Vec<u8> {
    let cookie = format!("Cookie: mstshash={user}\r\n");
    let negotiation = [0x01, 0x00, 0x08, 0x00, 0x03, 0x00, 0x00, 0x00];
    let mut x224 = vec![0xe0, 0, 0, 0, 0, 0];
    x224.extend_from_slice(cookie.as_bytes());
    x224.extend_from_slice(&negotiation);
    let total = 4 + 1 + x224.len();
    let mut packet = vec![3, 0, (total >> 8) as u8, total as u8, x224.len() as u8];
    packet.extend_from_slice(&x224);
    packet
}

async fn machine_on(broker: &TestBroker, name: &str, ip: &str, local_rdp: &str) -> TestAgent {
    let listener = std::net::TcpListener::bind((ip, 0)).unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let local_rdp = local_rdp.to_owned();
    TestAgent::start(&broker.url(), name, move |config| {
        config.advertise = address;
        config.front_door = Some(FrontDoorBind::Listener(listener));
        config.local_rdp = local_rdp;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_front_door_reaches_another_from_the_address_it_advertises() {
    let database = TestDatabase::sqlite();
    let broker = spawn_broker(&database.url, |_| {}).await;
    let (a_rdp, mut a_seen) = rdp_stand_in().await;
    let (b_rdp, mut b_seen) = rdp_stand_in().await;
    let a = machine_on(&broker, "ts-a", "127.0.0.2", &a_rdp).await;
    let b = machine_on(&broker, "ts-b", "127.0.0.3", &b_rdp).await;
    b.cli(&["session", "logon", "--user", "alice", "--session-id", "5"])
        .await;
    let client = broker.broker_client().await;
    eventually(10, || {
        let mut client = client.clone();
        async move {
            let request = pb::ListSessionsRequest {
                user_name: "alice".into(),
                ..Default::default()
            };
            let listed = client.list_sessions(request).await.unwrap().into_inner();
            !listed.sessions.is_empty()
        }
    })
    .await;

    // alice connects to A's front door; her session is on B.
    let request = connection_request("alice");
    let mut connection = TcpStream::connect(a.front_door.unwrap()).await.unwrap();
    connection.write_all(&request).await.unwrap();
    let mut back = vec![0u8; request.len()];
    tokio::time::timeout(Duration::from_secs(5), connection.read_exact(&mut back))
        .await
        .expect("an answer through both front doors")
        .expect("the connection stays open");
    assert_eq!(back, request);
    let at_b = tokio::time::timeout(Duration::from_secs(5), b_seen.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(at_b, request);
    assert!(a_seen.try_recv().is_err(), "A's own RDP service got her");
    a.stop().await;
    b.stop().await;
    broker.stop().await;
}
