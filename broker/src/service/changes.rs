//! Routes the store's change feed (`Store::subscribe_machine_changes`: machine ids) to the agent
//! streams of those machines. One task reads the feed; each stream registers the machine it
//! speaks for and is woken only for that machine (or for every machine when the feed lagged or
//! announced the nil id: changes may have been missed), instead of every stream reading every
//! change — at a broker restart 10,000 streams announce their ADDED, which as a broadcast would
//! wake every stream 10,000 times.

use crate::store::Store;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::{Notify, broadcast};
use uuid::Uuid;

type Routes = HashMap<Uuid, HashMap<Uuid, Arc<Notify>>>;

/// The routes from machine ids to the streams registered for them.
#[derive(Default)]
pub struct ChangeRouter {
    routes: Mutex<Routes>,
}

/// A stream's registration: `changed()` wakes when its machine changed; dropping it ends the
/// registration.
pub struct ChangeSubscription {
    router: Arc<ChangeRouter>,
    machine: Uuid,
    key: Uuid,
    notify: Arc<Notify>,
}

impl ChangeRouter {
    /// Starts the task that reads the store's change feed.
    pub fn start(store: &dyn Store) -> Arc<ChangeRouter> {
        let router = Arc::new(ChangeRouter::default());
        tokio::spawn(forward(
            Arc::downgrade(&router),
            store.subscribe_machine_changes(),
        ));
        router
    }

    /// Registers a stream (`key`, unique per stream) for `machine`'s changes.
    pub fn subscribe(self: &Arc<Self>, machine: Uuid, key: Uuid) -> ChangeSubscription {
        let notify = Arc::new(Notify::new());
        self.routes()
            .entry(machine)
            .or_default()
            .insert(key, notify.clone());
        ChangeSubscription {
            router: self.clone(),
            machine,
            key,
            notify,
        }
    }

    /// Wakes the streams of `machine`, or every stream for `None`.
    pub fn changed(&self, machine: Option<Uuid>) {
        let routes = self.routes();
        let wake = |streams: &HashMap<Uuid, Arc<Notify>>| {
            for notify in streams.values() {
                notify.notify_one();
            }
        };
        match machine {
            Some(machine) => {
                if let Some(streams) = routes.get(&machine) {
                    wake(streams);
                }
            }
            None => routes.values().for_each(wake),
        }
    }

    fn routes(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl ChangeSubscription {
    pub fn machine(&self) -> Uuid {
        self.machine
    }

    /// Waits for a change of the machine (one that came while nobody waited counts).
    pub async fn changed(&self) {
        self.notify.notified().await;
    }
}

impl Drop for ChangeSubscription {
    fn drop(&mut self) {
        let mut routes = self.router.routes();
        if let Some(streams) = routes.get_mut(&self.machine) {
            streams.remove(&self.key);
            if streams.is_empty() {
                routes.remove(&self.machine);
            }
        }
    }
}

async fn forward(router: std::sync::Weak<ChangeRouter>, mut feed: broadcast::Receiver<Uuid>) {
    loop {
        let change = feed.recv().await;
        let Some(router) = router.upgrade() else {
            return;
        };
        match change {
            Ok(machine) if machine.is_nil() => router.changed(None),
            Ok(machine) => router.changed(Some(machine)),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::debug!(missed, "machine-change feed lagged; waking every stream");
                router.changed(None);
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn woken(subscription: &ChangeSubscription) -> bool {
        tokio::time::timeout(Duration::from_millis(50), subscription.changed())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn only_the_machines_streams_wake() {
        let router = Arc::new(ChangeRouter::default());
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let old = router.subscribe(a, Uuid::new_v4());
        let new = router.subscribe(a, Uuid::new_v4());
        let other = router.subscribe(b, Uuid::new_v4());
        router.changed(Some(a));
        assert!(woken(&old).await && woken(&new).await);
        assert!(!woken(&other).await);
        router.changed(None);
        assert!(woken(&other).await);
        drop((old, new, other));
        assert!(router.routes().is_empty());
    }
}
