//! The maintenance lease: which process does the scheduled work (rotation periods, due
//! destructions, the expiry sweep, the store scrub) when several replicas serve one store.
//!
//! Two meta rows hold it: [`LEASE_META`] (the holder, its fence token, and a nonce the
//! holder renews) and [`FENCE_META`] (the token of the latest holder). Every write of the
//! scheduled work expects the fence row to hold the writer's token ([`Fence::expect`]),
//! so a holder that stalled (a paused VM, a lost network) and was taken over cannot write
//! once its successor has: its writes fail with [`StoreError::Conflict`] and write nothing.
//!
//! Timing, on each process's monotonic clock (passed in as `now`; tests move it):
//! - the holder renews every `ttl / 4` (a new nonce, compare-and-set on the row it wrote)
//!   and does scheduled work only while its last renewal is less than `ttl / 2` old
//!   ([`Lease::fence`]);
//! - a contender takes the lease over once it has seen the same row, unchanged, for
//!   `ttl` (compare-and-set on that row; the fence token goes up by one);
//! - a free row (none yet, or released by a holder that stopped) is taken at once, and so
//!   is any row when no other process can write the store ([`Store::exclusive`]: redb).
//!
//! So the scheduled work moves to a survivor at most `ttl + ttl / 4` (plus one store
//! round trip) after the holder's last renewal, and a holder stops working `ttl / 2`
//! after its last renewal, before anyone can take over.
//!
//! [`Store::exclusive`]: crate::store::Store::exclusive

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::registry::{Registry, RegistryError, WriteOp};
use crate::store::StoreError;

/// The lease row: postcard of [`LeaseRecord`].
pub const LEASE_META: &str = "maintenance_lease";
/// The fence row: the token of the latest holder, u64 big-endian.
pub const FENCE_META: &str = "maintenance_fence";

/// The default lease time (`maintenance_lease_secs`).
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

#[derive(Serialize, Deserialize)]
struct LeaseRecord {
    /// Who holds it ([`Lease::me`]); empty: released.
    holder: String,
    token: u64,
    /// Changed at each renewal, so contenders see that the holder lives.
    nonce: [u8; 16],
}

/// Errors of the lease.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("the maintenance lease row in the store cannot be read: {0}")]
    Record(#[source] postcard::Error),
    #[error("the maintenance fence row in the store is not an 8-byte token")]
    FenceRow,
    #[error("no random bytes for the lease nonce")]
    Rng,
    #[error("the maintenance lease's state lock is poisoned")]
    Poisoned,
}

impl From<StoreError> for LeaseError {
    fn from(e: StoreError) -> Self {
        Self::Registry(e.into())
    }
}

/// The right to do scheduled work, as of one renewal: the token every fenced write
/// expects to find in [`FENCE_META`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fence(u64);

impl Fence {
    pub fn token(&self) -> u64 {
        self.0
    }

    /// The write that makes a group fail unless this is still the latest holder's token.
    pub fn expect(&self) -> WriteOp {
        WriteOp::ExpectMeta { key: FENCE_META, value: Some(self.0.to_be_bytes().to_vec()) }
    }
}

/// What a [`Lease::tick`] found or did.
#[derive(Debug, PartialEq, Eq)]
pub enum Tick {
    /// This process took the lease (`from`: the holder before, if any held it).
    Took { token: u64, from: Option<String> },
    /// This process holds it and renewed it.
    Renewed,
    /// This process held it, and another took it over.
    Lost { to: Option<String> },
    /// Another holds it (`first`: for the first time this process sees that row).
    Following { holder: String, first: bool },
}

struct Held {
    row: Vec<u8>,
    token: u64,
    renewed: Instant,
}

#[derive(Default)]
struct State {
    held: Option<Held>,
    /// The other holder's row as first seen, and when.
    seen: Option<(Vec<u8>, Instant)>,
}

/// One process's side of the lease.
pub struct Lease {
    me: String,
    ttl: Duration,
    state: std::sync::Mutex<State>,
    /// One tick at a time (the tick reads, then writes).
    ticking: tokio::sync::Mutex<()>,
}

impl Lease {
    /// `me` names this process in the row and in the logs of the others (e.g. its listen
    /// address and a random suffix); `ttl` at least 1 s.
    pub fn new(me: String, ttl: Duration) -> Self {
        Self { me, ttl: ttl.max(Duration::from_secs(1)), state: Default::default(), ticking: Default::default() }
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How often [`tick`](Self::tick) should run.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 4
    }

    /// The fence to do scheduled work with, if this process holds the lease and renewed it
    /// less than `ttl / 2` before `now`.
    pub fn fence(&self, now: Instant) -> Option<Fence> {
        let state = self.state.lock().ok()?;
        let held = state.held.as_ref()?;
        (now.saturating_duration_since(held.renewed) < self.ttl / 2).then_some(Fence(held.token))
    }

    /// Renews, takes or watches the lease (see the module docs). A store error leaves
    /// what this process holds as it is: its fence then expires `ttl / 2` after the last
    /// renewal that worked.
    pub async fn tick(&self, store: &Registry, now: Instant) -> Result<Tick, LeaseError> {
        let _one = self.ticking.lock().await;
        let row = store.get_meta(LEASE_META)?;
        let held = self.state.lock().map_err(|_| LeaseError::Poisoned)?.held.as_ref().map(|h| (h.row.clone(), h.token));
        let exclusive = store.store().exclusive();
        if let Some((mine, token)) = held {
            // Nobody else can write the store: nothing to renew.
            if exclusive && row.as_deref() == Some(mine.as_slice()) {
                self.update(|s| s.held = Some(Held { row: mine, token, renewed: now }))?;
                return Ok(Tick::Renewed);
            }
            if row.as_deref() == Some(mine.as_slice()) {
                let next = self.record(token)?;
                let ops = vec![WriteOp::ExpectMeta { key: LEASE_META, value: Some(mine) }, WriteOp::PutMeta { key: LEASE_META, value: next.clone() }];
                return match store.write(WriteOp::Atomic(ops)).await {
                    Ok(()) => {
                        self.update(|s| s.held = Some(Held { row: next, token, renewed: now }))?;
                        Ok(Tick::Renewed)
                    }
                    Err(RegistryError::Store(StoreError::Conflict { .. })) => self.lost(store.get_meta(LEASE_META)?),
                    Err(e) => Err(e.into()),
                };
            }
            return self.lost(row);
        }
        let current = row.as_deref().map(decode).transpose()?;
        if let (Some(row), Some(LeaseRecord { holder, .. })) = (&row, &current)
            && !holder.is_empty()
            && !exclusive
        {
            let holder = holder.clone();
            let since = {
                let mut s = self.state.lock().map_err(|_| LeaseError::Poisoned)?;
                match &s.seen {
                    Some((seen, since)) if seen == row => *since,
                    _ => {
                        s.seen = Some((row.clone(), now));
                        return Ok(Tick::Following { holder, first: true });
                    }
                }
            };
            if now.saturating_duration_since(since) < self.ttl {
                return Ok(Tick::Following { holder, first: false });
            }
        }
        // Take it: the row as read, the fence as read, both compared and set at once.
        let fence = store.get_meta(FENCE_META)?;
        let last = match fence.as_deref() {
            None => 0,
            Some(b) => u64::from_be_bytes(<[u8; 8]>::try_from(b).map_err(|_| LeaseError::FenceRow)?),
        };
        let token = last.checked_add(1).ok_or(LeaseError::FenceRow)?;
        let next = self.record(token)?;
        let ops = vec![
            WriteOp::ExpectMeta { key: LEASE_META, value: row },
            WriteOp::ExpectMeta { key: FENCE_META, value: fence },
            WriteOp::PutMeta { key: FENCE_META, value: token.to_be_bytes().to_vec() },
            WriteOp::PutMeta { key: LEASE_META, value: next.clone() },
        ];
        match store.write(WriteOp::Atomic(ops)).await {
            Ok(()) => {
                self.update(|s| {
                    s.held = Some(Held { row: next, token, renewed: now });
                    s.seen = None;
                })?;
                let from = current.map(|r| r.holder).filter(|h| !h.is_empty() && *h != self.me);
                Ok(Tick::Took { token, from })
            }
            // Another contender was first: follow it from the next tick on.
            Err(RegistryError::Store(StoreError::Conflict { .. })) => {
                self.update(|s| s.seen = None)?;
                let holder = store.get_meta(LEASE_META)?.as_deref().map(decode).transpose()?.map(|r| r.holder).unwrap_or_default();
                Ok(Tick::Following { holder, first: true })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Gives the lease up (at shutdown), so another process takes it at its next tick
    /// instead of after `ttl`. False if this process did not hold it.
    pub async fn release(&self, store: &Registry) -> Result<bool, LeaseError> {
        let _one = self.ticking.lock().await;
        let held = self.state.lock().map_err(|_| LeaseError::Poisoned)?.held.take();
        let Some(held) = held else { return Ok(false) };
        let free = postcard::to_allocvec(&LeaseRecord { holder: String::new(), token: held.token, nonce: [0; 16] }).map_err(LeaseError::Record)?;
        let ops = vec![WriteOp::ExpectMeta { key: LEASE_META, value: Some(held.row) }, WriteOp::PutMeta { key: LEASE_META, value: free }];
        match store.write(WriteOp::Atomic(ops)).await {
            Ok(()) => Ok(true),
            Err(RegistryError::Store(StoreError::Conflict { .. })) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn lost(&self, row: Option<Vec<u8>>) -> Result<Tick, LeaseError> {
        self.update(|s| s.held = None)?;
        let to = row.as_deref().map(decode).transpose()?.map(|r| r.holder).filter(|h| !h.is_empty());
        Ok(Tick::Lost { to })
    }

    fn record(&self, token: u64) -> Result<Vec<u8>, LeaseError> {
        let nonce: [u8; 16] = ring::rand::generate(&ring::rand::SystemRandom::new()).map_err(|_| LeaseError::Rng)?.expose();
        postcard::to_allocvec(&LeaseRecord { holder: self.me.clone(), token, nonce }).map_err(LeaseError::Record)
    }

    fn update(&self, f: impl FnOnce(&mut State)) -> Result<(), LeaseError> {
        let mut s = self.state.lock().map_err(|_| LeaseError::Poisoned)?;
        f(&mut s);
        Ok(())
    }
}

fn decode(b: &[u8]) -> Result<LeaseRecord, LeaseError> {
    postcard::from_bytes(b).map_err(LeaseError::Record)
}
