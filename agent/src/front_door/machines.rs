//! The front door's view of its farm: the machines `Broker.ListMachines` returns, refreshed
//! every 30 s and at once when a lookup misses, with the IP addresses their names and
//! advertised hosts resolve to (`host_cache.rs` keeps those for a while). It answers "is this
//! peer a machine of the farm?" (to trust a PROXY header) and "which READY machine does this
//! routing token name?" (so the front door is never an open proxy). Every refresh reads the
//! whole farm from the broker's database; a miss covers what a longer period could miss (a
//! machine that joined or came back), so the period only bounds how long a machine that left
//! stays trusted. A replica that does not answer is passed over for the next, as for a
//! `Redirect`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddrV4};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio_util::sync::CancellationToken;
use tsbroker_common::proto::v1 as pb;

use super::broker_absence::replica_cannot_answer;
use super::host_cache::HostCache;
use super::ip_families::FamilyWarnings;
use super::route::REPLICA_PATIENCE;
use crate::broker_link::BrokerLink;

const LIST_TIMEOUT: Duration = Duration::from_secs(3);
/// How old a host's addresses may be at a periodic refresh, and at one after a miss. Every
/// agent resolves every machine's names: at 30 s, a 1,000-machine farm's agents sent its DNS
/// servers ~33,000 lookups a second. An address that changed is still found at once: the
/// first connection from it misses, and a miss resolves answers over 5 s old again.
const HOST_TTL: Duration = Duration::from_secs(300);
const HOST_TTL_AFTER_MISS: Duration = Duration::from_secs(5);
/// A miss triggers a refresh, at most this often (a miss soon after a refresh waits for the
/// next one).
const MIN_REFRESH_GAP: Duration = Duration::from_secs(1);

/// One machine of the farm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnownMachine {
    pub id: String,
    pub name: String,
    /// Advertised "host:port".
    pub address: String,
    pub ready: bool,
    /// What the name and the advertised host resolve to.
    pub ips: Vec<IpAddr>,
    pub port: u16,
    /// The address is a tsagent front door (it takes a PROXY v2 header).
    pub front_door: bool,
}

#[derive(Default)]
struct CacheState {
    machines: Vec<KnownMachine>,
    /// The last attempt, successful or not (limits on-demand refreshes).
    attempted: Option<Instant>,
}

/// Shared, cheap to clone.
#[derive(Clone)]
pub struct MachineCache {
    link: Arc<BrokerLink>,
    farm: String,
    state: Arc<RwLock<CacheState>>,
    refreshing: Arc<tokio::sync::Mutex<()>>,
    hosts: Arc<HostCache>,
    /// This machine's id, when it is known: machines of another IP family are then warned
    /// about.
    this_machine: Option<String>,
    families: Arc<FamilyWarnings>,
}

/// The machine a connection from another machine's address comes from.
#[derive(Clone, Debug)]
pub struct Peer {
    /// One of the farm's machines at the address, one with a front door first (the one that
    /// may relay clients).
    pub machine: KnownMachine,
    /// Other machines with front doors share the address, or this machine does (several agents
    /// on one host, some perhaps joined since the list was read): which one relayed a
    /// connection is not known.
    pub shares_ip: bool,
}

/// The machine of `machines` at `ip` (canonical form) other than `this_machine` (an id: a
/// machine never relays to itself, and a PROXY header from its own address alone comes from
/// one of its users, or from a machine advertising an address of the other IP family): see
/// [`Peer`].
fn machine_at(machines: &[KnownMachine], ip: IpAddr, this_machine: &str) -> Option<Peer> {
    let mut at_ip = machines
        .iter()
        .filter(|machine| machine.ips.contains(&ip) && machine.id != this_machine);
    let first = at_ip.next()?;
    let mut front_doors = std::iter::once(first)
        .chain(at_ip)
        .filter(|machine| machine.front_door);
    let machine = front_doors.next().unwrap_or(first).clone();
    let this_one_there = || {
        machines
            .iter()
            .any(|machine| machine.id == this_machine && machine.ips.contains(&ip))
    };
    let shares_ip = front_doors.next().is_some() || this_one_there();
    Some(Peer { machine, shares_ip })
}

/// Splits "host:port", removing brackets around an IPv6 host.
pub fn split_host_port(address: &str) -> Option<(&str, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|host| host.strip_suffix(']'))
        .unwrap_or(host);
    Some((host, port.parse().ok()?))
}

/// The farm's machine as the cache keeps it, with what its advertised host and its name
/// resolve to (`None` for a removed machine or an address without a port).
fn known(machine: pb::Machine, addresses: &HashMap<String, Vec<IpAddr>>) -> Option<KnownMachine> {
    if machine.state == pb::MachineState::Removed as i32 {
        return None;
    }
    let (host, port) = split_host_port(&machine.address)?;
    let mut ips = addresses.get(host).cloned().unwrap_or_default();
    ips.extend(addresses.get(&machine.name).into_iter().flatten().copied());
    ips.sort();
    ips.dedup();
    Some(KnownMachine {
        ready: machine.state == pb::MachineState::Ready as i32,
        id: machine.id,
        name: machine.name,
        address: machine.address,
        ips,
        port,
        front_door: machine.front_door,
    })
}

impl MachineCache {
    pub fn new(link: Arc<BrokerLink>, farm: String) -> Self {
        Self::with_hosts(link, farm, HostCache::default())
    }

    /// With `hosts` resolving the machines' names (tests count its lookups).
    pub fn with_hosts(link: Arc<BrokerLink>, farm: String, hosts: HostCache) -> Self {
        MachineCache {
            link,
            farm,
            state: Arc::new(RwLock::new(CacheState::default())),
            refreshing: Arc::new(tokio::sync::Mutex::new(())),
            hosts: Arc::new(hosts),
            this_machine: None,
            families: Arc::default(),
        }
    }

    /// Of the front door of `this_machine` (its id): warns of the farm's machines that
    /// advertise addresses of another IP family (`ip_families.rs`), and knows its own address.
    pub fn of_machine(mut self, this_machine: String) -> Self {
        self.this_machine = Some(this_machine);
        self
    }

    /// Asks the broker for the farm's machines; the previous list stays on failure.
    pub async fn refresh(&self) -> anyhow::Result<()> {
        let _one_at_a_time = self.refreshing.lock().await;
        self.refresh_locked(HOST_TTL).await
    }

    /// A refresh whose host names' addresses may be `host_ttl` old.
    async fn refresh_locked(&self, host_ttl: Duration) -> anyhow::Result<()> {
        if let Ok(mut state) = self.state.write() {
            state.attempted = Some(Instant::now());
        }
        let machines = self.list_machines().await?;
        let listed: Vec<pb::Machine> = machines
            .into_iter()
            .filter(|machine| machine.farm == self.farm)
            .collect();
        let hosts: Vec<&str> = listed
            .iter()
            .filter_map(|machine| {
                let (host, _) = split_host_port(&machine.address)?;
                Some([host, machine.name.as_str()])
            })
            .flatten()
            .collect();
        let addresses = self.hosts.addresses(&hosts, host_ttl).await;
        let machines: Vec<KnownMachine> = listed
            .into_iter()
            .filter_map(|machine| known(machine, &addresses))
            .collect();
        if let Some(this_machine) = &self.this_machine {
            self.families.check(&machines, this_machine);
        }
        let mut state = self
            .state
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        state.machines = machines;
        Ok(())
    }

    /// The farm's machines from the replica in use, or, when it does not answer within
    /// `REPLICA_PATIENCE` (frozen, cut off, restarting), from the next ones, as a `Redirect`
    /// is asked: all within `LIST_TIMEOUT`.
    async fn list_machines(&self) -> anyhow::Result<Vec<pb::Machine>> {
        let request = pb::ListMachinesRequest {
            farm: self.farm.clone(),
        };
        let deadline = tokio::time::Instant::now() + LIST_TIMEOUT;
        let replicas = self.link.replicas();
        let first = self.link.in_use();
        let mut failed = anyhow::anyhow!("list machines: timed out");
        for replica in 0..replicas {
            let patience = if replica + 1 == replicas {
                deadline
            } else {
                deadline.min(tokio::time::Instant::now() + REPLICA_PATIENCE)
            };
            let mut broker = self.link.broker_at(first + replica);
            match tokio::time::timeout_at(patience, broker.list_machines(request.clone())).await {
                Ok(Ok(response)) => return Ok(response.into_inner().machines),
                // A farm the broker does not know yet has no machines (this one's ADDED may be
                // on its way: the first agent of a new farm asks before it is stored).
                Ok(Err(status)) if status.code() == tonic::Code::NotFound => return Ok(Vec::new()),
                Ok(Err(status)) if !replica_cannot_answer(&status) => {
                    return Err(anyhow::Error::from(status).context("list machines"));
                }
                Ok(Err(status)) => failed = anyhow::Error::from(status).context("list machines"),
                Err(_) => failed = anyhow::anyhow!("list machines: timed out"),
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
        }
        Err(failed)
    }

    /// Refreshes at once, then every `interval` (give or take a tenth, so that agents started
    /// together do not ask together) until `shutdown`.
    pub async fn refresh_every(self, interval: Duration, shutdown: CancellationToken) {
        let mut failing = false;
        let mut pause = Duration::ZERO;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
            pause = interval.mul_f64(rand::rng().random_range(0.9..=1.1));
            match self.refresh().await {
                Ok(()) => failing = false,
                Err(error) if !failing => {
                    failing = true;
                    tracing::warn!(
                        error = crate::broker_client::describe(&error),
                        "could not refresh the farm's machines"
                    );
                }
                Err(_) => {}
            }
        }
    }

    /// Makes sure the list was fetched after `missed_at`, the moment a lookup found nothing:
    /// a machine that joined since the last refresh is then found. Refreshes at most once
    /// per `MIN_REFRESH_GAP` (a refresh tried moments ago is waited out, not skipped), and
    /// callers that missed together share one refresh.
    async fn refresh_after(&self, missed_at: Instant) {
        let _one_at_a_time = self.refreshing.lock().await;
        let attempted = self
            .state
            .read()
            .map(|state| state.attempted)
            .unwrap_or(None);
        if let Some(attempted) = attempted {
            if attempted >= missed_at {
                // Somebody refreshed after the miss: that list is fresh enough.
                return;
            }
            let since = attempted.elapsed();
            if since < MIN_REFRESH_GAP {
                tokio::time::sleep(MIN_REFRESH_GAP - since).await;
            }
        }
        if let Err(error) = self.refresh_locked(HOST_TTL_AFTER_MISS).await {
            tracing::debug!(
                error = crate::broker_client::describe(&error),
                "on-demand refresh of the farm's machines failed"
            );
        }
    }

    fn find<T>(&self, pick: impl Fn(&[KnownMachine]) -> Option<T>) -> Option<T> {
        let state = self
            .state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        pick(&state.machines)
    }

    /// The machine of the farm at `ip` other than `this_machine` (its id), if any (refreshing
    /// on a miss, so that a machine that joined moments ago is known).
    pub async fn peer(&self, ip: IpAddr, this_machine: &str) -> Option<Peer> {
        self.peer_listed_after(ip, Instant::now(), this_machine)
            .await
    }

    /// The machine of the farm at `ip` other than `this_machine`, from a list fetched after
    /// `since` (refreshing on a miss when the list is older).
    pub async fn peer_listed_after(
        &self,
        ip: IpAddr,
        since: Instant,
        this_machine: &str,
    ) -> Option<Peer> {
        let ip = ip.to_canonical();
        let lookup = |machines: &[KnownMachine]| machine_at(machines, ip, this_machine);
        if let Some(machine) = self.find(lookup) {
            return Some(machine);
        }
        self.refresh_after(since).await;
        self.find(lookup)
    }

    /// Whether `ip` is one of `this_machine`'s (an id) addresses, as the list last read says.
    pub fn is_own_address(&self, ip: IpAddr, this_machine: &str) -> bool {
        let ip = ip.to_canonical();
        self.find(|machines| {
            Some(
                machines
                    .iter()
                    .any(|machine| machine.id == this_machine && machine.ips.contains(&ip)),
            )
        })
        .unwrap_or(false)
    }

    /// The READY machine a routing token names: one whose host resolves to the token's IP
    /// and whose advertised port is the token's port. Without such an exact match the list is
    /// refreshed first (the machine may have joined moments ago, and another machine at the
    /// same IP must not stand in for it); then the machine at the token's IP on another port
    /// is taken when it is the only one there (a token may name the RDP port behind a front
    /// door), and none when several share the IP (containers, NAT): which one it meant is not
    /// known.
    pub async fn routing_target(&self, token: SocketAddrV4) -> Option<KnownMachine> {
        let ip = IpAddr::V4(*token.ip());
        let lookup = |machines: &[KnownMachine]| {
            let at_ip: Vec<&KnownMachine> = machines
                .iter()
                .filter(|machine| machine.ready && machine.ips.contains(&ip))
                .collect();
            match at_ip.iter().find(|machine| machine.port == token.port()) {
                Some(exact) => Some((*exact).clone()),
                None => match at_ip.as_slice() {
                    [only] => Some((*only).clone()),
                    _ => None,
                },
            }
        };
        if let Some(machine) = self.find(lookup)
            && machine.port == token.port()
        {
            return Some(machine);
        }
        self.refresh_after(Instant::now()).await;
        self.find(lookup)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(name: &str, address: &str) -> pb::Machine {
        pb::Machine {
            id: tsbroker_common::model::machine_id("default", name).to_string(),
            name: name.into(),
            farm: "default".into(),
            address: address.into(),
            state: pb::MachineState::Ready as i32,
            front_door: true,
            ..Default::default()
        }
    }

    /// A fake broker listing `machines`, and a link to it.
    async fn broker_with(
        machines: Vec<pb::Machine>,
    ) -> (crate::test_support::FakeBroker, Arc<BrokerLink>) {
        let fake = crate::test_support::FakeBroker::default();
        fake.with(|state| state.machines = machines);
        let url = fake.serve(CancellationToken::new()).await;
        let link = BrokerLink::new(
            std::slice::from_ref(&url),
            0,
            &Default::default(),
            Default::default(),
        )
        .unwrap();
        (fake, link)
    }

    /// A machine's own address is told apart from a stranger's (for the refusal's log line).
    #[tokio::test]
    async fn a_machine_knows_its_own_address() {
        let (_fake, link) = broker_with(vec![ready("ts1.example", "127.0.0.1:4000")]).await;
        let ts1 = tsbroker_common::model::machine_id("default", "ts1.example").to_string();
        let cache = MachineCache::new(link, "default".into()).of_machine(ts1.clone());
        cache.refresh().await.unwrap();
        let own: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(cache.is_own_address(own, &ts1));
        assert!(cache.is_own_address("::ffff:127.0.0.1".parse().unwrap(), &ts1));
        assert!(!cache.is_own_address(own, "another machine"));
        assert!(!cache.is_own_address("127.0.0.2".parse().unwrap(), &ts1));
        assert!(cache.peer(own, &ts1).await.is_none());
    }

    /// A machine that joins right after a refresh is found at once, not after the next one.
    #[tokio::test]
    async fn a_miss_moments_after_a_refresh_refreshes_again() {
        let (fake, link) = broker_with(vec![ready("ts1.example", "127.0.0.1:4000")]).await;
        let cache = MachineCache::new(link, "default".into());
        cache.refresh().await.unwrap();
        assert!(
            cache
                .peer("127.0.0.1".parse().unwrap(), "elsewhere")
                .await
                .is_some()
        );

        fake.with(|state| state.machines.push(ready("ts2.example", "192.0.2.5:3389")));
        let token: SocketAddrV4 = "192.0.2.5:3389".parse().unwrap();
        let started = Instant::now();
        let found = cache.routing_target(token).await;
        assert_eq!(
            found.map(|machine| machine.name),
            Some("ts2.example".into())
        );
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(
            cache
                .peer("192.0.2.5".parse().unwrap(), "elsewhere")
                .await
                .is_some()
        );

        // A machine that joins at the IP of a known one: its token finds it, not the other.
        fake.with(|state| state.machines.push(ready("ts3.example", "127.0.0.1:5000")));
        let token: SocketAddrV4 = "127.0.0.1:5000".parse().unwrap();
        let found = cache.routing_target(token).await;
        assert_eq!(
            found.map(|machine| machine.name),
            Some("ts3.example".into())
        );
        // A port no machine advertises: the one machine at that IP stands for it (the RDP
        // port behind its front door); where several share the IP, none does.
        let token: SocketAddrV4 = "192.0.2.5:3390".parse().unwrap();
        assert_eq!(
            cache
                .routing_target(token)
                .await
                .map(|machine| machine.name),
            Some("ts2.example".into())
        );
        let token: SocketAddrV4 = "127.0.0.1:3389".parse().unwrap();
        assert!(cache.routing_target(token).await.is_none());
        // Still nobody at an address of no machine.
        assert!(
            cache
                .peer("198.51.100.1".parse().unwrap(), "elsewhere")
                .await
                .is_none()
        );
    }

    /// With several replicas, one that does not answer (frozen: it takes connections and says
    /// nothing) is passed over: the next one's list is taken, within the replica patience.
    #[tokio::test]
    async fn a_replica_that_does_not_answer_is_passed_over() {
        let fake = crate::test_support::FakeBroker::default();
        fake.with(|state| state.machines = vec![ready("ts1.example", "127.0.0.1:4000")]);
        let answering = fake.serve(CancellationToken::new()).await;
        let frozen = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let frozen_url = format!("http://{}", frozen.local_addr().unwrap());
        let _held = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((connection, _)) = frozen.accept().await {
                held.push(connection);
            }
        });
        let urls = [frozen_url, answering];
        let link = BrokerLink::new(&urls, 0, &Default::default(), Default::default()).unwrap();
        assert_eq!(link.in_use(), 0, "the frozen replica is this agent's own");
        let cache = MachineCache::new(link, "default".into());
        let started = Instant::now();
        cache.refresh().await.unwrap();
        assert!(started.elapsed() < LIST_TIMEOUT, "{:?}", started.elapsed());
        assert!(
            cache
                .peer("127.0.0.1".parse().unwrap(), "elsewhere")
                .await
                .is_some()
        );
    }

    /// Refreshes every few seconds (and after misses) do not resolve the farm's names each
    /// time: a name is asked again only once its answer is old.
    #[tokio::test]
    async fn refreshes_reuse_what_names_resolved_to() {
        use std::sync::atomic::Ordering;
        let (_fake, link) = broker_with(vec![
            ready("ts1.farm", "ts1.farm:3389"),
            ready("ts2.farm", "192.0.2.2:3389"),
        ])
        .await;
        let (hosts, asked) = super::super::host_cache::tests::counting();
        let cache = MachineCache::with_hosts(link, "default".into(), hosts);
        for _ in 0..3 {
            cache.refresh().await.unwrap();
        }
        // ts1.farm (its name and host), ts2.farm (its name; its host is an address): once each.
        assert_eq!(asked.load(Ordering::SeqCst), 2);
        let ts1 = cache
            .peer("192.0.2.1".parse().unwrap(), "elsewhere")
            .await
            .unwrap();
        assert_eq!(ts1.machine.name, "ts1.farm");
        assert!(
            cache
                .peer("192.0.2.2".parse().unwrap(), "elsewhere")
                .await
                .is_some()
        );
        assert_eq!(asked.load(Ordering::SeqCst), 2);
        // A miss refreshes the list at once, asking again only for answers over 5 s old.
        assert!(
            cache
                .peer("198.51.100.7".parse().unwrap(), "elsewhere")
                .await
                .is_none()
        );
        assert_eq!(asked.load(Ordering::SeqCst), 2);
    }

    /// Agents on one host share its address: the machine a relayed connection comes from is
    /// one of them with a front door (an agent without one there must not refuse it), and the
    /// log is told when several have one, or this machine is there too.
    #[test]
    fn a_peer_address_several_machines_share_is_the_front_doors() {
        let at = |name: &str, ip: &str, front_door: bool| KnownMachine {
            id: name.into(),
            name: name.into(),
            address: format!("{ip}:3389"),
            ready: true,
            ips: vec![ip.parse().unwrap()],
            port: 3389,
            front_door,
        };
        let mut machines = vec![
            at("plain", "10.0.0.1", false),
            at("door", "10.0.0.1", true),
            at("alone", "10.0.0.3", false),
        ];
        let peer = |machines: &[KnownMachine], ip: &str| {
            let peer = machine_at(machines, ip.parse().unwrap(), "elsewhere").unwrap();
            (peer.machine.name, peer.shares_ip)
        };
        assert_eq!(peer(&machines, "10.0.0.1"), ("door".into(), false));
        assert_eq!(peer(&machines, "10.0.0.3"), ("alone".into(), false));
        assert!(machine_at(&machines, "10.0.0.9".parse().unwrap(), "elsewhere").is_none());
        machines.push(at("door2", "10.0.0.1", true));
        assert_eq!(peer(&machines, "10.0.0.1"), ("door".into(), true));
        // Never this machine itself: relayed by the other front door there, or by none; which
        // one is not sure (another agent there may have joined since the list was read).
        let from_door = machine_at(&machines, "10.0.0.1".parse().unwrap(), "door").unwrap();
        assert_eq!(
            (from_door.machine.name, from_door.shares_ip),
            ("door2".into(), true)
        );
        assert!(machine_at(&machines, "10.0.0.3".parse().unwrap(), "alone").is_none());
    }

    #[test]
    fn host_and_port_split() {
        assert_eq!(
            split_host_port("ts1.example:3389"),
            Some(("ts1.example", 3389))
        );
        assert_eq!(split_host_port("[::1]:3389"), Some(("::1", 3389)));
        assert_eq!(split_host_port("ts1"), None);
        assert_eq!(split_host_port("ts1:x"), None);
    }
}
