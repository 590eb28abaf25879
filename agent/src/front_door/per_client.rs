//! How many connections each client address holds open through the front door, so that one
//! address (a scanner, someone holding connection requests open) cannot take every one of
//! `max_connections` and lock real users out. Other front doors of the farm relay many
//! clients each and are not counted against it (the listener lets them past the cap).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct ClientCounts {
    limit: usize,
    held: Mutex<HashMap<IpAddr, Address>>,
}

/// What is known of one address while it holds connections.
#[derive(Debug, Default)]
struct Address {
    held: usize,
    /// When this address, over the limit, was last looked up among the farm's machines (a
    /// machine that joined moments ago relays clients before this front door's next look).
    looked_up: Option<Instant>,
}

/// One connection counted for its address until it is dropped.
#[derive(Debug)]
pub struct Held {
    counts: Arc<ClientCounts>,
    ip: IpAddr,
}

impl ClientCounts {
    pub fn new(limit: usize) -> Arc<ClientCounts> {
        Arc::new(ClientCounts {
            limit,
            held: Mutex::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, Address>> {
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts one more connection from `ip`, unless the address holds the limit already
    /// (`Err` with how many it holds).
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Result<Held, usize> {
        let ip = ip.to_canonical();
        let mut held = self.lock();
        let address = held.entry(ip).or_default();
        if address.held >= self.limit {
            return Err(address.held);
        }
        address.held += 1;
        Ok(Held {
            counts: self.clone(),
            ip,
        })
    }

    /// Counts one more connection from `ip` whatever it holds (another front door's).
    pub fn take_anyway(self: &Arc<Self>, ip: IpAddr) -> Held {
        let ip = ip.to_canonical();
        self.lock().entry(ip).or_default().held += 1;
        Held {
            counts: self.clone(),
            ip,
        }
    }

    /// When `ip` was first looked up among the farm's machines in the last `recheck`: that
    /// moment, or now (noted) when it was not, or longer ago. A look after that moment answers
    /// for the address; the connections it holds keep the note.
    pub fn looked_up_since(&self, ip: IpAddr, recheck: Duration) -> Instant {
        let now = Instant::now();
        let mut held = self.lock();
        let Some(address) = held.get_mut(&ip.to_canonical()) else {
            return now;
        };
        match address.looked_up {
            Some(at) if now.duration_since(at) < recheck => at,
            _ => *address.looked_up.insert(now),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut held = self.counts.lock();
        if let Some(address) = held.get_mut(&self.ip) {
            address.held -= 1;
            if address.held == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_holds_at_most_the_limit_and_gets_its_slots_back() {
        let counts = ClientCounts::new(2);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        let first = counts.take(ip).unwrap();
        let _second = counts.take(mapped).unwrap();
        assert_eq!(
            counts.take(ip).unwrap_err(),
            2,
            "the same address, seen on [::]"
        );
        assert!(counts.take("192.0.2.2".parse().unwrap()).is_ok());
        let relayed = counts.take_anyway(ip);
        drop(first);
        drop(relayed);
        assert!(counts.take(ip).is_ok());
        drop(_second);
        assert!(counts.lock().is_empty(), "counts go back down to none");
    }

    #[test]
    fn an_address_is_looked_up_once_in_a_while() {
        let counts = ClientCounts::new(1);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let _held = counts.take(ip).unwrap();
        let first = counts.looked_up_since(ip, Duration::from_secs(30));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(
            counts.looked_up_since(mapped, Duration::from_secs(30)),
            first
        );
        std::thread::sleep(Duration::from_millis(5));
        assert!(counts.looked_up_since(ip, Duration::from_millis(1)) > first);
    }
}
