//! How many connections each client address holds open through the front door, so that one
//! address (a scanner, someone holding connection requests open) cannot take every one of
//! `max_connections` and lock real users out. Other front doors of the farm relay many
//! clients each and are not counted against it (the listener lets them past the cap).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Debug)]
pub struct ClientCounts {
    limit: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
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

    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts one more connection from `ip`, unless the address holds the limit already
    /// (`Err` with how many it holds).
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Result<Held, usize> {
        let ip = ip.to_canonical();
        let mut held = self.lock();
        let count = held.entry(ip).or_default();
        if *count >= self.limit {
            return Err(*count);
        }
        *count += 1;
        Ok(Held {
            counts: self.clone(),
            ip,
        })
    }

    /// Counts one more connection from `ip` whatever it holds (another front door's).
    pub fn take_anyway(self: &Arc<Self>, ip: IpAddr) -> Held {
        let ip = ip.to_canonical();
        *self.lock().entry(ip).or_default() += 1;
        Held {
            counts: self.clone(),
            ip,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut held = self.counts.lock();
        if let Some(count) = held.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
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
}
