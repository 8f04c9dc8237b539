//! Live push. The hub maps each user to the push streams of their devices;
//! the state machine tells it (through [`UpdateListener`]) when a user's
//! update sequence grows, and each stream's task sends what is new.
//!
//! A push is a hint: a watch channel holds only the latest pts per stream,
//! so a slow device costs no memory, and it catches up by sequence.

use hamgam_sync::UpdateListener;
use hamgam_types::{DeviceId, UserId};
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::watch;

struct Subscriber {
    id: u64,
    device: DeviceId,
    pts: watch::Sender<u64>,
}

/// Buckets of the revocation epochs (a fixed array: bounded memory, no locks).
const REVOCATION_BUCKETS: usize = 4096;

pub struct PushHub {
    subscribers: Mutex<HashMap<UserId, Vec<Subscriber>>>,
    next_id: AtomicU64,
    /// Bumped when any device of a user in the bucket is revoked, so a
    /// connection re-reads its device record only after a revocation.
    revocations: Box<[AtomicU64]>,
}

impl Default for PushHub {
    fn default() -> Self {
        PushHub {
            subscribers: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            revocations: (0..REVOCATION_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl std::fmt::Debug for PushHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushHub").finish_non_exhaustive()
    }
}

/// Keeps a push stream registered; dropping it unregisters.
pub(crate) struct Subscription<'a> {
    hub: &'a PushHub,
    user: UserId,
    id: u64,
    pub(crate) pts: watch::Receiver<u64>,
}

impl PushHub {
    pub fn new() -> PushHub {
        PushHub::default()
    }

    /// Registers a device's push stream, replacing the device's earlier one
    /// (its task sees its channel close and ends).
    pub(crate) fn subscribe(&self, user: UserId, device: DeviceId, pts: u64) -> Subscription<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = watch::channel(pts);
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        let list = subscribers.entry(user).or_default();
        list.retain(|s| s.device != device);
        list.push(Subscriber { id, device, pts: sender });
        Subscription { hub: self, user, id, pts: receiver }
    }

    /// The revocation epoch of `user`'s bucket.
    pub(crate) fn revocation_epoch(&self, user: UserId) -> u64 {
        self.revocations[(user.0 % REVOCATION_BUCKETS as u64) as usize].load(Ordering::Acquire)
    }
}

impl Drop for Subscription<'_> {
    fn drop(&mut self) {
        let mut subscribers = self.hub.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = subscribers.get_mut(&self.user) {
            list.retain(|s| s.id != self.id);
            if list.is_empty() {
                subscribers.remove(&self.user);
            }
        }
    }
}

impl UpdateListener for PushHub {
    fn device_revoked(&self, user: UserId) {
        self.revocations[(user.0 % REVOCATION_BUCKETS as u64) as usize].fetch_add(1, Ordering::AcqRel);
    }

    fn user_updated(&self, user: UserId, pts: u64) {
        let subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = subscribers.get(&user) {
            for subscriber in list {
                // Hints relayed from other nodes may arrive out of order.
                subscriber.pts.send_if_modified(|current| {
                    let newer = pts > *current;
                    if newer {
                        *current = pts;
                    }
                    newer
                });
            }
        }
    }
}
