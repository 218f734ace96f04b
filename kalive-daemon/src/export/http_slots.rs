//! The HTTP server's connection slots. At most `capacity` connections are open at once; when a
//! new one arrives at the cap, it takes the slot of a connection that is not using it: one with
//! no request in progress (idle between requests, or still sending its request's headers), or
//! one whose response has been waiting for its reader longer than the response timeout. Among
//! those the client address holding the most slots loses first, its longest-unused connection
//! first, so a port scanner, a broken client or a pile of half-sent requests cannot lock a
//! scraper out. Only when every slot is serving a request is the newcomer refused.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

/// The open connections; shared by the accept loop and every connection's `Slot`.
pub struct Slots {
    capacity: usize,
    response_timeout: Duration,
    open: Mutex<OpenConnections>,
}

#[derive(Default)]
struct OpenConnections {
    next_id: u64,
    by_id: HashMap<u64, OpenConnection>,
}

struct OpenConnection {
    peer: IpAddr,
    /// When its last request finished, or when it was accepted.
    last_used: Instant,
    /// When the request being answered arrived; None between requests.
    request_since: Option<Instant>,
    /// Cancelled when another connection takes this one's slot.
    evicted: CancellationToken,
}

/// A connection's place in `Slots`, given back when dropped.
pub struct Slot {
    slots: Arc<Slots>,
    id: u64,
    evicted: CancellationToken,
}

/// The outcome of `Slots::admit`.
pub enum Admission {
    Admitted(Slot),
    /// Every slot is serving a request.
    Full,
}

impl Slots {
    pub fn new(capacity: usize, response_timeout: Duration) -> Arc<Slots> {
        Arc::new(Slots {
            capacity,
            response_timeout,
            open: Mutex::new(OpenConnections::default()),
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn lock(&self) -> MutexGuard<'_, OpenConnections> {
        // A panic while holding this lock cannot leave the map half-changed (every change is
        // one insert or remove), so a poisoned lock is still consistent.
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Gives `peer`'s new connection a slot, taking an unused one at the cap.
    pub fn admit(self: &Arc<Self>, peer: IpAddr, now: Instant) -> Admission {
        let mut open = self.lock();
        if open.by_id.len() >= self.capacity {
            let Some(victim) = self.choose_victim(&open, now) else {
                return Admission::Full;
            };
            if let Some(evicted) = open.by_id.remove(&victim) {
                log::debug!(
                    "HTTP: closing an unused connection from {} to serve a new one (cap {})",
                    evicted.peer,
                    self.capacity
                );
                evicted.evicted.cancel();
            }
        }
        let id = open.next_id;
        open.next_id += 1;
        let evicted = CancellationToken::new();
        open.by_id.insert(
            id,
            OpenConnection {
                peer,
                last_used: now,
                request_since: None,
                evicted: evicted.clone(),
            },
        );
        Admission::Admitted(Slot {
            slots: self.clone(),
            id,
            evicted,
        })
    }

    /// The connection to close for a newcomer: idle ones before stalled responses, then the
    /// address with the most slots, then the longest unused.
    fn choose_victim(&self, open: &OpenConnections, now: Instant) -> Option<u64> {
        let mut per_peer: HashMap<IpAddr, usize> = HashMap::new();
        for connection in open.by_id.values() {
            *per_peer.entry(connection.peer).or_default() += 1;
        }
        open.by_id
            .iter()
            .filter_map(|(id, connection)| {
                let stalled = match connection.request_since {
                    None => false,
                    Some(since) if now.saturating_duration_since(since) > self.response_timeout => {
                        true
                    }
                    Some(_) => return None,
                };
                let held_by_peer = per_peer.get(&connection.peer).copied().unwrap_or(0);
                Some((
                    (
                        !stalled,
                        held_by_peer,
                        std::cmp::Reverse(connection.last_used),
                    ),
                    *id,
                ))
            })
            .max_by_key(|(rank, _)| *rank)
            .map(|(_, id)| id)
    }

    #[cfg(test)]
    fn open_connections(&self) -> usize {
        self.lock().by_id.len()
    }
}

impl Slot {
    /// Cancelled when a newcomer took this slot: the connection must close at once.
    pub fn evicted(&self) -> &CancellationToken {
        &self.evicted
    }

    /// A request arrived; until `RequestInProgress` drops, the slot is not taken away (unless
    /// the response waits for its reader longer than the response timeout).
    pub fn request_started(&self) -> RequestInProgress {
        if let Some(connection) = self.slots.lock().by_id.get_mut(&self.id) {
            connection.request_since = Some(Instant::now());
        }
        RequestInProgress {
            slots: self.slots.clone(),
            id: self.id,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.lock().by_id.remove(&self.id);
    }
}

/// Held by a response's body until hyper has taken all of it.
pub struct RequestInProgress {
    slots: Arc<Slots>,
    id: u64,
}

impl Drop for RequestInProgress {
    fn drop(&mut self) {
        if let Some(connection) = self.slots.lock().by_id.get_mut(&self.id) {
            connection.request_since = None;
            connection.last_used = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn peer(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    fn admitted(admission: Admission) -> Slot {
        match admission {
            Admission::Admitted(slot) => slot,
            Admission::Full => panic!("refused while a slot could be taken"),
        }
    }

    #[test]
    fn the_address_with_most_idle_connections_gives_up_its_oldest() {
        let slots = Slots::new(3, Duration::from_secs(30));
        let start = Instant::now();
        let scraper = admitted(slots.admit(peer(1), start));
        let scanner_old = admitted(slots.admit(peer(2), start + Duration::from_secs(1)));
        let scanner_new = admitted(slots.admit(peer(2), start + Duration::from_secs(2)));
        let newcomer = admitted(slots.admit(peer(3), start + Duration::from_secs(3)));
        assert!(scanner_old.evicted().is_cancelled());
        assert!(!scanner_new.evicted().is_cancelled());
        assert!(!scraper.evicted().is_cancelled());
        assert!(!newcomer.evicted().is_cancelled());
        assert_eq!(slots.open_connections(), 3);
    }

    #[test]
    fn a_request_in_progress_keeps_its_slot_until_its_response_stalls() {
        let slots = Slots::new(2, Duration::from_secs(30));
        let first = admitted(slots.admit(peer(1), Instant::now()));
        let second = admitted(slots.admit(peer(1), Instant::now()));
        let _first_busy = first.request_started();
        let second_busy = second.request_started();
        assert!(matches!(
            slots.admit(peer(2), Instant::now()),
            Admission::Full
        ));
        // A finished request frees its connection for the taking.
        drop(second_busy);
        let third = admitted(slots.admit(peer(2), Instant::now()));
        assert!(second.evicted().is_cancelled());
        assert!(!first.evicted().is_cancelled());
        // A response nobody reads for longer than the timeout loses its slot too, the longest
        // unused first.
        let _third_busy = third.request_started();
        let _fourth = admitted(slots.admit(peer(3), Instant::now() + Duration::from_secs(31)));
        assert!(first.evicted().is_cancelled());
    }

    #[test]
    fn a_dropped_slot_is_given_back() {
        let slots = Slots::new(1, Duration::from_secs(30));
        let only = admitted(slots.admit(peer(1), Instant::now()));
        let busy = only.request_started();
        assert!(matches!(
            slots.admit(peer(2), Instant::now()),
            Admission::Full
        ));
        drop(busy);
        drop(only);
        assert_eq!(slots.open_connections(), 0);
        let _next = admitted(slots.admit(peer(2), Instant::now()));
    }
}
