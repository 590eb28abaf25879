//! What the farm's machines' host names resolve to, kept for a while. The front door's list of
//! machines is fetched periodically and again when a lookup misses; resolving every machine's
//! names each time sent two DNS queries per machine per refresh from every agent (with the
//! refresh every 5 s, as it was, 16,000 a second from the 200 agents of a 200-machine farm). A
//! name is now resolved again once its answer is older than the caller allows (5 min for the
//! periodic refresh, 5 s after a miss); a name that did not resolve is tried again after 5 s at
//! most.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;

const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);
/// A name that did not resolve is tried again after this at most.
const RETRY_FAILED_AFTER: Duration = Duration::from_secs(5);

/// Resolves one host name: its addresses, or `None` when it does not resolve.
pub type Resolver = Arc<dyn Fn(String) -> BoxFuture<'static, Option<Vec<IpAddr>>> + Send + Sync>;

struct Entry {
    ips: Option<Vec<IpAddr>>,
    at: Instant,
}

/// Shared by the refreshes of one front door's list.
pub struct HostCache {
    entries: Mutex<HashMap<String, Entry>>,
    resolver: Resolver,
}

impl Default for HostCache {
    fn default() -> Self {
        HostCache::with_resolver(Arc::new(|host| Box::pin(system_resolve(host))))
    }
}

/// The system's resolver (getaddrinfo, off the runtime's threads), within a few seconds.
async fn system_resolve(host: String) -> Option<Vec<IpAddr>> {
    let lookup =
        tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host.as_str(), 0))).await;
    match lookup {
        Ok(Ok(addresses)) => Some(
            addresses
                .map(|address| address.ip().to_canonical())
                .collect(),
        ),
        _ => {
            tracing::debug!(host, "could not resolve a farm machine's host");
            None
        }
    }
}

impl HostCache {
    pub fn with_resolver(resolver: Resolver) -> Self {
        HostCache {
            entries: Mutex::new(HashMap::new()),
            resolver,
        }
    }

    /// The addresses of each of `hosts` (an address written as one stands for itself): those
    /// resolved within `fresh_for` as they were, the others resolved now, side by side. Names
    /// not asked for are forgotten.
    pub async fn addresses(
        &self,
        hosts: &[&str],
        fresh_for: Duration,
    ) -> HashMap<String, Vec<IpAddr>> {
        let mut found = HashMap::new();
        let mut stale = Vec::new();
        {
            let mut entries = self.lock();
            entries.retain(|host, _| hosts.contains(&host.as_str()));
            for &host in hosts {
                if let Ok(ip) = host.parse::<IpAddr>() {
                    found.insert(host.to_owned(), vec![ip.to_canonical()]);
                    continue;
                }
                match entries.get(host) {
                    Some(entry) if entry.at.elapsed() < fresh_for.min(lifetime(entry)) => {
                        found.insert(host.to_owned(), entry.ips.clone().unwrap_or_default());
                    }
                    _ => stale.push(host.to_owned()),
                }
            }
        }
        stale.sort_unstable();
        stale.dedup();
        let answers =
            futures::future::join_all(stale.iter().map(|host| (self.resolver)(host.clone()))).await;
        let mut entries = self.lock();
        for (host, ips) in stale.into_iter().zip(answers) {
            found.insert(host.clone(), ips.clone().unwrap_or_default());
            entries.insert(
                host,
                Entry {
                    ips,
                    at: Instant::now(),
                },
            );
        }
        found
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// How long an answer may be used at most: a failure only briefly.
fn lifetime(entry: &Entry) -> Duration {
    match entry.ips {
        Some(_) => Duration::MAX,
        None => RETRY_FAILED_AFTER,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A cache whose resolver knows `ts1.farm` (192.0.2.1) and counts what it is asked.
    pub(crate) fn counting() -> (HostCache, Arc<AtomicUsize>) {
        let asked = Arc::new(AtomicUsize::new(0));
        let counter = asked.clone();
        let cache = HostCache::with_resolver(Arc::new(move |host: String| {
            counter.fetch_add(1, Ordering::SeqCst);
            Box::pin(
                async move { (host == "ts1.farm").then(|| vec!["192.0.2.1".parse().unwrap()]) },
            )
        }));
        (cache, asked)
    }

    #[tokio::test]
    async fn names_are_resolved_again_only_once_their_answer_is_too_old() {
        let (cache, asked) = counting();
        let hosts = ["ts1.farm", "gone.farm", "192.0.2.9", "ts1.farm"];
        let long = Duration::from_secs(30);
        let found = cache.addresses(&hosts, long).await;
        assert_eq!(
            asked.load(Ordering::SeqCst),
            2,
            "each name once, no address"
        );
        assert_eq!(
            found["ts1.farm"],
            vec!["192.0.2.1".parse::<IpAddr>().unwrap()]
        );
        assert!(found["gone.farm"].is_empty());
        assert_eq!(
            found["192.0.2.9"],
            vec!["192.0.2.9".parse::<IpAddr>().unwrap()]
        );

        // Within the time allowed: nothing is asked again, the answers are the same.
        assert_eq!(cache.addresses(&hosts, long).await, found);
        assert_eq!(asked.load(Ordering::SeqCst), 2);
        // A caller that allows no age has both asked again.
        cache.addresses(&hosts, Duration::ZERO).await;
        assert_eq!(asked.load(Ordering::SeqCst), 4);
        // A name no longer asked for is forgotten; asked for again, it is resolved again.
        cache.addresses(&["ts1.farm"], long).await;
        assert_eq!(asked.load(Ordering::SeqCst), 4);
        cache.addresses(&["ts1.farm", "gone.farm"], long).await;
        assert_eq!(asked.load(Ordering::SeqCst), 5);
    }
}
