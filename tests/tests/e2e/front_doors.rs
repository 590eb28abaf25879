//! Front doors handing a client to one another over real TCP on a host with several addresses:
//! each machine's front door listens on, and is advertised at, an address of its own
//! (127.0.0.2 and 127.0.0.3 stand for servers' second addresses). A front door trusts a PROXY
//! header only from a machine of the farm, by the address the connection comes from, so the
//! sender must connect from the address it advertises, not from the kernel's first choice
//! (127.0.0.1 here). Clients connect from addresses of their own too, which is how a cut
//! cookie two users share is told apart.

use crate::support::{eventually, listed_sessions};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tsagent::FrontDoorBind;
use tsbroker_common::proto::v1 as pb;
use tsbroker_tests::{TestAgent, TestBroker, TestDatabase, spawn_broker};

/// A stand-in RDP service: echoes what it gets, and reports each connection's first bytes.
pub(crate) async fn rdp_stand_in() -> (String, mpsc::UnboundedReceiver<Vec<u8>>) {
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
                // Held open until the client goes, as an RDP session is.
                while matches!(stream.read(&mut chunk).await, Ok(count) if count > 0) {}
            });
        }
    });
    (address, receiver)
}

/// TPKT + X.224 Connection Request with the user's `mstshash` cookie and an RDP negotiation
/// request (MS-RDPBCGR 2.2.1.1).
pub(crate) fn connection_request(user: &str) -> Vec<u8> {
    with_cookie(&format!("Cookie: mstshash={user}\r\n"))
}

/// TPKT + X.224 Connection Request with `cookie` (empty: none, as mstsc with a collection's
/// load-balancing info or no saved user name sends it) and an RDP negotiation request.
fn with_cookie(cookie: &str) -> Vec<u8> {
    let negotiation = [0x01, 0x00, 0x08, 0x00, 0x03, 0x00, 0x00, 0x00];
    let mut x224 = vec![0xe0, 0, 0, 0, 0, 0];
    x224.extend_from_slice(cookie.as_bytes());
    x224.extend_from_slice(&negotiation);
    let total = 4 + 1 + x224.len();
    let mut packet = vec![3, 0, (total >> 8) as u8, total as u8, x224.len() as u8];
    packet.extend_from_slice(&x224);
    packet
}

async fn machine_on(
    broker: &TestBroker,
    name: &str,
    ip: &str,
    local_rdp: &str,
    token: Option<&str>,
) -> TestAgent {
    let listener = std::net::TcpListener::bind((ip, 0)).unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let local_rdp = local_rdp.to_owned();
    let token = token.map(str::to_owned);
    TestAgent::start(&broker.url(), name, move |config| {
        config.advertise = address;
        config.front_door = Some(FrontDoorBind::Listener(listener));
        config.local_rdp = local_rdp;
        config.agent_token = token;
    })
    .await
}

/// A broker and two machines with front doors, ts-a on 127.0.0.2 and ts-b on 127.0.0.3, each
/// with a stand-in RDP service whose connections' first bytes arrive on `a_seen` / `b_seen`.
struct Farm {
    _database: TestDatabase,
    broker: TestBroker,
    a: TestAgent,
    b: TestAgent,
    a_seen: mpsc::UnboundedReceiver<Vec<u8>>,
    b_seen: mpsc::UnboundedReceiver<Vec<u8>>,
}

impl Farm {
    async fn start() -> Farm {
        Farm::start_with_token(None).await
    }

    /// The farm with `--agent-token` set on the broker and both agents.
    async fn start_with_token(token: Option<&str>) -> Farm {
        let database = TestDatabase::sqlite();
        let broker = spawn_broker(&database.url, |config| {
            config.agent_token = token.map(|token| tsbroker::config::Secret(token.to_owned()));
        })
        .await;
        let (a_rdp, a_seen) = rdp_stand_in().await;
        let (b_rdp, b_seen) = rdp_stand_in().await;
        let a = machine_on(&broker, "ts-a", "127.0.0.2", &a_rdp, token).await;
        let b = machine_on(&broker, "ts-b", "127.0.0.3", &b_rdp, token).await;
        Farm {
            _database: database,
            broker,
            a,
            b,
            a_seen,
            b_seen,
        }
    }

    /// Asserts that `request` reached `machine`'s RDP service ("ts-a" or "ts-b") and not the
    /// other's.
    async fn assert_reached(&mut self, machine: &str, request: &[u8]) {
        let (there, elsewhere) = match machine {
            "ts-a" => (&mut self.a_seen, &mut self.b_seen),
            _ => (&mut self.b_seen, &mut self.a_seen),
        };
        let seen = tokio::time::timeout(Duration::from_secs(5), there.recv()).await;
        assert_eq!(seen.unwrap().unwrap(), request, "at {machine}");
        assert!(elsewhere.try_recv().is_err(), "not only at {machine}");
    }

    /// The machine ("ts-a" or "ts-b") whose RDP service got the next connection.
    async fn landed(&mut self) -> &'static str {
        let landed = async {
            tokio::select! {
                Some(_) = self.a_seen.recv() => "ts-a",
                Some(_) = self.b_seen.recv() => "ts-b",
            }
        };
        tokio::time::timeout(Duration::from_secs(5), landed)
            .await
            .expect("the connection reached an RDP service")
    }

    fn agent(&self, machine: &str) -> &TestAgent {
        match machine {
            "ts-a" => &self.a,
            _ => &self.b,
        }
    }

    async fn stop(self) {
        self.a.stop().await;
        self.b.stop().await;
        self.broker.stop().await;
    }
}

/// Waits until the broker lists `count` sessions in the default farm.
async fn sessions_listed(broker: &TestBroker, count: usize) {
    let client = broker.broker_client().await;
    eventually(10, || {
        let mut client = client.clone();
        async move {
            let request = pb::ListSessionsRequest {
                farm: "default".into(),
                ..Default::default()
            };
            let listed = client.list_sessions(request).await.unwrap().into_inner();
            listed.sessions.len() == count
        }
    })
    .await;
}

/// Connects to `front_door` from `source` (an address of this host) and sends `request`;
/// returns the open connection once the request came back through the stand-in RDP service
/// it reached.
async fn connect_from(
    source: &str,
    front_door: std::net::SocketAddr,
    request: &[u8],
) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut connection = socket.connect(front_door).await.unwrap();
    connection.write_all(request).await.unwrap();
    let mut back = vec![0u8; request.len()];
    tokio::time::timeout(Duration::from_secs(5), connection.read_exact(&mut back))
        .await
        .expect("an answer through the front doors")
        .expect("the connection stays open");
    assert_eq!(back, request);
    connection
}

/// PAM's report of a logon behind the front door: the client address it sees is the front
/// door's loopback hop.
async fn pam_logon(agent: &TestAgent, user: &str, session_id: &str) {
    agent
        .cli(&[
            "session",
            "logon",
            "--user",
            user,
            "--session-id",
            session_id,
            "--client-address",
            "127.0.0.1",
        ])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_front_door_reaches_another_from_the_address_it_advertises() {
    let mut farm = Farm::start().await;
    farm.b
        .cli(&["session", "logon", "--user", "alice", "--session-id", "5"])
        .await;
    sessions_listed(&farm.broker, 1).await;

    // alice connects to A's front door; her session is on B.
    let request = connection_request("alice");
    connect_from("127.0.0.1", farm.a.front_door.unwrap(), &request).await;
    farm.assert_reached("ts-b", &request).await;
    farm.stop().await;
}

/// mstsc cuts `christopher.jones` and `christopher.smith` both to `christoph`: each client
/// reaches the session that was opened from its address, through either front door. The
/// sessions' addresses are the front doors' view of their clients (PAM's, behind a front door,
/// would be loopback, which the agent never keeps).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shared_cut_cookie_reaches_the_session_opened_from_the_client() {
    let mut farm = Farm::start().await;
    let mut placed = Vec::new();
    for (client, user, session_id) in [
        ("127.0.0.60", "christopher.jones", "5"),
        ("127.0.0.61", "christopher.smith", "6"),
    ] {
        // Logged on through A's front door (placed by load), confirmed by PAM there.
        let request = connection_request(user);
        let connection = connect_from(client, farm.a.front_door.unwrap(), &request).await;
        let machine = farm.landed().await;
        pam_logon(farm.agent(machine), user, session_id).await;
        placed.push((client, machine, connection));
    }
    assert_ne!(placed[0].1, placed[1].1, "one on each machine");
    sessions_listed(&farm.broker, 2).await;
    let machines: Vec<_> = placed
        .into_iter()
        .map(|(client, machine, connection)| {
            drop(connection);
            (client, machine)
        })
        .collect();

    let request = connection_request("christoph");
    for (client, machine) in machines {
        for front_door in [farm.a.front_door.unwrap(), farm.b.front_door.unwrap()] {
            let _held = connect_from(client, front_door, &request).await;
            farm.assert_reached(machine, &request).await;
        }
    }
    farm.stop().await;
}

/// A client that names no user (no cookie) is placed anywhere the first time; once its user's
/// session there is known with the client's address (the front door's view, not the loopback
/// one PAM gets behind it), it is sent back to that session from any front door.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_naming_no_user_returns_to_the_session_opened_from_its_address() {
    let mut farm = Farm::start().await;
    let request = with_cookie("");
    let first = connect_from("127.0.0.70", farm.b.front_door.unwrap(), &request).await;
    // Placed as a new logon: on either machine.
    let there = farm.landed().await;
    let (agent, other) = match there {
        "ts-a" => (&farm.a, &farm.b),
        _ => (&farm.b, &farm.a),
    };
    // xrdp logs frank on while the client is connected; PAM_RHOST is the front door's hop.
    pam_logon(agent, "frank", "7").await;
    sessions_listed(&farm.broker, 1).await;
    drop(first);
    let client = farm.broker.broker_client().await;
    eventually(10, || {
        let mut client = client.clone();
        async move {
            let request = pb::ListSessionsRequest {
                user_name: "frank".into(),
                ..Default::default()
            };
            let listed = client.list_sessions(request).await.unwrap().into_inner();
            listed.sessions.first().is_some_and(|session| {
                session.client_address.starts_with("127.0.0.70:")
                    && session.state == pb::SessionState::Disconnected as i32
            })
        }
    })
    .await;

    // Back, without a cookie, through the other machine's front door.
    let _second = connect_from("127.0.0.70", other.front_door.unwrap(), &request).await;
    farm.assert_reached(there, &request).await;
    farm.stop().await;
}

/// Sends `request` to `front_door` and returns whether the front door closed the connection
/// without an answer (refused) rather than splicing it to an RDP service.
pub(crate) async fn refused(front_door: std::net::SocketAddr, request: &[u8]) -> bool {
    let mut connection = tokio::net::TcpStream::connect(front_door).await.unwrap();
    connection.write_all(request).await.unwrap();
    let mut back = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), connection.read_to_end(&mut back));
    matches!(read.await, Ok(Ok(0)))
}

/// Every machine draining: a new user's client is refused at the front door (not handed to its
/// own drained RDP service), a returning user still reaches their session, and once a machine
/// is back the new user lands there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drained_farm_refuses_new_logons_at_the_front_door() {
    let mut farm = Farm::start().await;
    farm.b
        .cli(&["session", "logon", "--user", "bob", "--session-id", "7"])
        .await;
    sessions_listed(&farm.broker, 1).await;
    let mut admin = farm.broker.admin_client().await;
    for machine in ["ts-a", "ts-b"] {
        admin
            .drain_machine(crate::support::by_name("default", machine))
            .await
            .unwrap();
    }
    eventually(10, || async {
        farm.a.running().link_status().draining && farm.b.running().link_status().draining
    })
    .await;

    let newcomer = connection_request("carol");
    assert!(refused(farm.a.front_door.unwrap(), &newcomer).await);
    assert!(refused(farm.b.front_door.unwrap(), &newcomer).await);
    assert!(farm.a_seen.try_recv().is_err() && farm.b_seen.try_recv().is_err());

    let returning = connection_request("bob");
    let _bob = connect_from("127.0.0.1", farm.a.front_door.unwrap(), &returning).await;
    farm.assert_reached("ts-b", &returning).await;

    admin
        .undrain_machine(crate::support::by_name("default", "ts-a"))
        .await
        .unwrap();
    let _carol = connect_from("127.0.0.1", farm.b.front_door.unwrap(), &newcomer).await;
    farm.assert_reached("ts-a", &newcomer).await;
    farm.stop().await;
}

/// Once agents need a token, so does the Broker service: a stranger on the network can neither
/// book logons in flight through Redirect (which filled every machine's cap and refused real
/// users) nor list the sessions; the front doors, which send the agent token, route as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_an_agent_token_the_broker_answers_only_callers_that_have_one() {
    const TOKEN: &str = "agent-token-for-the-farm";
    let mut farm = Farm::start_with_token(Some(TOKEN)).await;
    let mut client = farm.broker.broker_client().await;
    let redirect = pb::RedirectRequest {
        user_name: "mallory".into(),
        farm: "default".into(),
        ..Default::default()
    };
    let refused = client.redirect(redirect.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let listing = pb::ListSessionsRequest {
        farm: "default".into(),
        ..Default::default()
    };
    let refused = client.list_sessions(listing.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let refused = client
        .list_farms(pb::ListFarmsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let with_token = |message| {
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
        request
    };
    let listed = client.list_sessions(with_token(listing)).await.unwrap();
    assert!(listed.into_inner().sessions.is_empty());

    farm.b
        .cli(&["session", "logon", "--user", "bob", "--session-id", "7"])
        .await;
    eventually(10, || {
        let request = with_token(pb::ListSessionsRequest {
            farm: "default".into(),
            ..Default::default()
        });
        let listed = listed_sessions(client.clone(), request);
        async move { listed.await.len() == 1 }
    })
    .await;
    let returning = connection_request("bob");
    let _bob = connect_from("127.0.0.1", farm.a.front_door.unwrap(), &returning).await;
    farm.assert_reached("ts-b", &returning).await;
    farm.stop().await;
}

/// Each token opens its own services: the agent token on `Admin` is a known caller without
/// the right (PERMISSION_DENIED), an unknown token an unauthenticated one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_agent_token_does_not_open_the_admin_service() {
    const AGENT: &str = "agent-token-for-the-farm";
    const ADMIN: &str = "admin-token-for-the-farm";
    let database = TestDatabase::sqlite();
    let broker = spawn_broker(&database.url, |config| {
        config.agent_token = Some(tsbroker::config::Secret(AGENT.into()));
        config.admin_token = Some(tsbroker::config::Secret(ADMIN.into()));
    })
    .await;
    let mut admin = broker.admin_client().await;
    let policy = |token: &str| {
        let mut request = tonic::Request::new(pb::SetFarmPolicyRequest {
            farm: "nofarm".into(),
            policy: "session-count".into(),
        });
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        request
    };
    let refused = admin.set_farm_policy(policy(AGENT)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let refused = admin
        .set_farm_policy(policy("not-a-token-we-know"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    // Let in: the farm is unknown.
    let answered = admin.set_farm_policy(policy(ADMIN)).await.unwrap_err();
    assert_eq!(answered.code(), tonic::Code::NotFound, "{answered:?}");
    broker.stop().await;
}

/// One client address holds at most `--max-connections-per-client` connections: more from it
/// are closed at once (they had waited in the kernel's queue once it held every slot), and
/// clients from other addresses are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_client_address_cannot_take_every_connection() {
    let database = TestDatabase::sqlite();
    let broker = spawn_broker(&database.url, |_| {}).await;
    let (rdp, _seen) = rdp_stand_in().await;
    let agent = TestAgent::start_with_front_door(&broker.url(), "ts-a", &rdp, |config| {
        config.max_connections_per_client = 2;
        // Machines that join are found by the looks a connection asks for, not by the timer.
        config.machine_refresh = Duration::from_secs(600);
    })
    .await;
    let door = agent.front_door.unwrap();
    let from = |source: &'static str| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        socket.connect(door).await.unwrap()
    };
    // Two connections that send nothing yet hold this address's two slots.
    let _held = [from("127.0.0.5").await, from("127.0.0.5").await];
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = from("127.0.0.5").await;
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(3), third.read(&mut byte))
        .await
        .expect("closed at once, not at the client timeout");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let _alice = connect_from("127.0.0.6", door, &connection_request("alice")).await;

    // Another front door (a farm machine's address) relays many clients and is let past the
    // cap, with its PROXY header; a user logged on to that machine, who can connect from its
    // address too, is not: a silent connection over the cap is closed within 3 s.
    let broker_url = broker.url();
    let front_door_at = |name: &'static str, address: &'static str| {
        let machine = pb::MachineDescription {
            address: format!("{address}:3389"),
            front_door: true,
            ..tsbroker_tests::fake_agent::machine(name, "default", 100)
        };
        tsbroker_tests::FakeAgent::join(&broker_url, machine, vec![])
    };
    let _relay = front_door_at("ts-f", "127.0.0.7").await;
    let relayed_from = |source: &'static str, user: &'static str| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        let mut connection = socket.connect(door).await.unwrap();
        let client = "192.0.2.10:50000".parse().unwrap();
        let header = tsagent::front_door::proxy_header::encode(client, door, None, 0);
        let request = connection_request(user);
        connection
            .write_all(&[header, request.clone()].concat())
            .await
            .unwrap();
        let mut back = vec![0u8; request.len()];
        tokio::time::timeout(Duration::from_secs(5), connection.read_exact(&mut back))
            .await
            .expect("relayed to the local RDP service")
            .unwrap();
        connection
    };
    let relayed = |user: &'static str| relayed_from("127.0.0.7", user);
    let _first_relayed = relayed("carol").await;
    // A header from this machine's own address, where no other machine is, is one of its
    // users' (a machine never relays to itself): refused, not taken as its own front door's.
    let mut own = tokio::net::TcpStream::connect(door).await.unwrap();
    let client = "192.0.2.11:50000".parse().unwrap();
    let header = tsagent::front_door::proxy_header::encode(client, door, None, 0);
    own.write_all(&[header, connection_request("mallory")].concat())
        .await
        .unwrap();
    let read = tokio::time::timeout(Duration::from_secs(5), own.read(&mut byte))
        .await
        .expect("refused at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let _silent = from("127.0.0.7").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let mut over = from("127.0.0.7").await;
    let read = tokio::time::timeout(Duration::from_secs(6), over.read(&mut byte))
        .await
        .expect("closed within the wait for a front door's header, not the client timeout");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let _more_relayed = [relayed("dave").await, relayed("erin").await];

    // A machine that joined since this front door last looked at the farm, whose first relayed
    // connections come over the cap (two silent ones hold its slots): the address is looked up
    // again rather than taken for a stranger's.
    let _joined = front_door_at("ts-g", "127.0.0.8").await;
    let _silent_from_joined = [from("127.0.0.8").await, from("127.0.0.8").await];
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _burst = tokio::join!(
        relayed_from("127.0.0.8", "gina"),
        relayed_from("127.0.0.8", "hank"),
        relayed_from("127.0.0.8", "ivan"),
    );
    // The stranger's address is still one: over the cap, closed.
    let mut fourth = from("127.0.0.5").await;
    let read = tokio::time::timeout(Duration::from_secs(3), fourth.read(&mut byte))
        .await
        .expect("closed at once, not at the client timeout");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    agent.stop().await;
    broker.stop().await;
}

/// The farm's sessions as (user, state, client IP), sorted.
async fn farm_sessions(broker: &TestBroker) -> Vec<(String, &'static str, String)> {
    let mut client = broker.broker_client().await;
    let request = pb::ListSessionsRequest {
        farm: "default".into(),
        ..Default::default()
    };
    let listed = client.list_sessions(request).await.unwrap().into_inner();
    let mut sessions: Vec<_> = listed
        .sessions
        .iter()
        .map(|session| {
            let state = match pb::SessionState::try_from(session.state) {
                Ok(pb::SessionState::Active) => "active",
                Ok(pb::SessionState::Disconnected) => "disconnected",
                _ => "unspecified",
            };
            let ip = tsbroker_common::model::client_ip(&session.client_address);
            let ip = ip.map(|ip| ip.to_string()).unwrap_or_default();
            (session.user_name.clone(), state, ip)
        })
        .collect();
    sessions.sort();
    sessions
}

/// `christoph` is a user's whole name and what mstsc makes of `christopher.jones`: the
/// newcomer's client is sent to jones's machine (his session may be theirs) and tied to his
/// session there until PAM reports the newcomer's own logon; from then on the newcomer's
/// session is the connected one, and jones's is as he left it, also after the newcomer leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_user_a_cut_cookie_took_for_another_gets_their_own_session_at_logon() {
    let mut farm = Farm::start().await;
    let jones = connection_request("christopher.jones");
    let connection = connect_from("127.0.0.60", farm.a.front_door.unwrap(), &jones).await;
    let machine = farm.landed().await;
    pam_logon(farm.agent(machine), "christopher.jones", "5").await;
    drop(connection);
    let session = |user: &str, state, ip: &str| (user.to_owned(), state, ip.to_owned());
    let jones_left = session("christopher.jones", "disconnected", "127.0.0.60");
    let listed = vec![jones_left.clone()];
    eventually(10, || async { farm_sessions(&farm.broker).await == listed }).await;

    let request = connection_request("christoph");
    let front_door = farm.agent(machine).front_door.unwrap();
    let newcomer = connect_from("127.0.0.62", front_door, &request).await;
    farm.assert_reached(machine, &request).await;
    pam_logon(farm.agent(machine), "christoph", "6").await;
    let listed = vec![
        session("christoph", "active", "127.0.0.62"),
        jones_left.clone(),
    ];
    eventually(10, || async { farm_sessions(&farm.broker).await == listed }).await;

    drop(newcomer);
    let newcomer_left = session("christoph", "disconnected", "127.0.0.62");
    let listed = vec![newcomer_left.clone(), jones_left.clone()];
    eventually(10, || async { farm_sessions(&farm.broker).await == listed }).await;

    // Each comes back, through the other machine's front door too, with the same cookie:
    // each to their own session, told apart by where they connect from.
    let other = farm.agent(if machine == "ts-a" { "ts-b" } else { "ts-a" });
    let front_doors = [front_door, other.front_door.unwrap()];
    for (client, user) in [
        ("127.0.0.62", "christoph"),
        ("127.0.0.60", "christopher.jones"),
    ] {
        for front_door in front_doors {
            let back = connect_from(client, front_door, &request).await;
            farm.assert_reached(machine, &request).await;
            let mut listed = vec![newcomer_left.clone(), jones_left.clone()];
            for listed in &mut listed {
                if listed.0 == user {
                    listed.1 = "active";
                }
            }
            eventually(10, || async { farm_sessions(&farm.broker).await == listed }).await;
            drop(back);
            let listed = vec![newcomer_left.clone(), jones_left.clone()];
            eventually(10, || async { farm_sessions(&farm.broker).await == listed }).await;
        }
    }
    farm.stop().await;
}

/// Several agents on one host share its address. One without a front door there (listed
/// first, by name) does not make the connections another relays from that address look like a
/// stranger's PROXY header: the receiving front door takes them from the one with a front door.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_from_a_host_that_also_runs_an_agent_without_a_front_door_is_taken() {
    let database = TestDatabase::sqlite();
    let broker = spawn_broker(&database.url, |_| {}).await;
    let (b_rdp, mut b_seen) = rdp_stand_in().await;
    let listener = std::net::TcpListener::bind(("127.0.0.3", 0)).unwrap();
    let b_address = listener.local_addr().unwrap().to_string();
    let b = TestAgent::start(&broker.url(), "ts-b", move |config| {
        config.advertise = b_address;
        config.front_door = Some(FrontDoorBind::Listener(listener));
        config.local_rdp = b_rdp;
        // Its list of the farm's machines is fresh when the relayed connection comes.
        config.machine_refresh = Duration::from_millis(200);
    })
    .await;
    let (a_rdp, _a_seen) = rdp_stand_in().await;
    let a = machine_on(&broker, "ts-a", "127.0.0.2", &a_rdp, None).await;
    let plain = TestAgent::start(&broker.url(), "aa-plain", |config| {
        config.advertise = "127.0.0.2:3999".into();
    })
    .await;
    b.cli(&["session", "logon", "--user", "alice", "--session-id", "5"])
        .await;
    sessions_listed(&broker, 1).await;
    tokio::time::sleep(Duration::from_millis(600)).await;

    let request = connection_request("alice");
    let _held = connect_from("127.0.0.1", a.front_door.unwrap(), &request).await;
    let seen = tokio::time::timeout(Duration::from_secs(5), b_seen.recv()).await;
    assert_eq!(seen.unwrap().unwrap(), request);
    plain.stop().await;
    a.stop().await;
    b.stop().await;
    broker.stop().await;
}
