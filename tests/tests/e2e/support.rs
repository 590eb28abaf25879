//! Shared bits of the end-to-end tests: running a test on both stores, and small calls.

use tonic::transport::Channel;
use tsbroker_common::proto::v1 as pb;
use tsbroker_common::proto::v1::broker_client::BrokerClient;

/// Declares each listed `async fn(&TestDatabase)` as a test on SQLite and one on PostgreSQL.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let database = tsbroker_tests::TestDatabase::new(tsbroker_tests::Backend::Sqlite).await;
                    super::$name(&database).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let database = tsbroker_tests::TestDatabase::new(tsbroker_tests::Backend::Postgres).await;
                    super::$name(&database).await;
                    database.drop_database().await;
                }
            )*
        }
    };
}
pub(crate) use on_both_stores;

pub async fn redirect(
    client: &mut BrokerClient<Channel>,
    farm: &str,
    user: &str,
) -> Result<pb::RedirectResponse, tonic::Status> {
    let request = pb::RedirectRequest {
        user_name: user.to_owned(),
        farm: farm.to_owned(),
        ..Default::default()
    };
    client
        .redirect(request)
        .await
        .map(tonic::Response::into_inner)
}

pub fn reason(response: &pb::RedirectResponse) -> pb::RedirectReason {
    pb::RedirectReason::try_from(response.reason).unwrap_or(pb::RedirectReason::Unspecified)
}

pub fn by_name(farm: &str, name: &str) -> pb::MachineRef {
    pb::MachineRef {
        machine_id: String::new(),
        farm: farm.to_owned(),
        machine_name: name.to_owned(),
    }
}

pub async fn machine(client: &mut BrokerClient<Channel>, farm: &str, name: &str) -> pb::Machine {
    client
        .get_machine(pb::GetMachineRequest {
            machine: Some(by_name(farm, name)),
        })
        .await
        .expect("machine exists")
        .into_inner()
}

/// The sessions `ListSessions` answers for `request` (one page).
pub async fn listed_sessions(
    mut client: BrokerClient<Channel>,
    request: impl tonic::IntoRequest<pb::ListSessionsRequest>,
) -> Vec<pb::Session> {
    let listed = client.list_sessions(request).await.expect("ListSessions");
    listed.into_inner().sessions
}

/// Polls `check` until it holds or `seconds` pass.
pub async fn eventually<F, Fut>(seconds: u64, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached in {seconds}s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The broker's Prometheus text from its metrics port.
pub async fn scrape(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("metrics port");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    text
}

/// The sum of the samples whose line contains every fragment.
pub fn counter(metrics: &str, fragments: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|line| {
            !line.starts_with('#') && fragments.iter().all(|fragment| line.contains(fragment))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
