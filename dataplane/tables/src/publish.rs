//! Publication of immutable snapshots: one writer (control side), many readers (hot path).
//!
//! The contract:
//!
//! - The control thread builds a complete, immutable value and hands it to
//!   [`Publisher::publish`], which swaps it in atomically ([`arc_swap::ArcSwap`]). Readers see the
//!   old value or the new one, never a mix.
//! - A worker owns a [`Reader`] and calls [`Reader::load`] once per batch: one atomic load and a
//!   pointer compare when nothing changed, no lock, no write to shared memory, never a wait.
//! - A replaced value is *retired*, not dropped: the publisher keeps a reference and frees it in
//!   [`Publisher::reclaim`] once it holds the only one, i.e. once every reader has loaded
//!   something newer. Freeing a snapshot (megabytes, possibly `munmap`) therefore always happens
//!   on the control thread, never inside a worker's batch.
//!
//! Why reference counts are enough to know that no reader is left: a reader only obtains a
//! reference by loading the *current* value, and `ArcSwap`'s swap returns only after turning every
//! in-flight load of the old value into a counted reference (arc-swap's "debt" payment). After the
//! swap, the count of a retired value can only go down.

use std::fmt;
use std::sync::Arc;

use arc_swap::{ArcSwap, Cache};

/// The writer side. Not `Clone`: there is one publisher per table.
pub struct Publisher<T> {
    current: Arc<ArcSwap<T>>,
    /// Replaced values some reader may still hold, oldest first.
    retired: Vec<Arc<T>>,
    published: u64,
}

impl<T> fmt::Debug for Publisher<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field("published", &self.published)
            .field("retired", &self.retired.len())
            .finish_non_exhaustive()
    }
}

impl<T> Publisher<T> {
    /// A publisher whose readers start with `initial`.
    pub fn new(initial: Arc<T>) -> Self {
        Publisher { current: Arc::new(ArcSwap::new(initial)), retired: Vec::new(), published: 0 }
    }

    /// A reader for a worker (or any thread). Cheap; make one per worker, not one per batch.
    pub fn reader(&self) -> Reader<T> {
        Reader { cache: Cache::new(Arc::clone(&self.current)) }
    }

    /// Make `next` the value readers load from now on; retire the previous one and free whatever
    /// retired values no reader holds any more. Returns how many were freed.
    pub fn publish(&mut self, next: Arc<T>) -> usize {
        let old = self.current.swap(next);
        self.retired.push(old);
        self.published += 1;
        self.reclaim()
    }

    /// Free every retired value that no reader holds; returns how many were freed. Call it after
    /// publishing (done for you) and now and then while nothing is published, so that the last
    /// retired value does not wait for the next change.
    pub fn reclaim(&mut self) -> usize {
        let before = self.retired.len();
        // strong_count == 1: only this list refers to it, and no reader can obtain it again (it is
        // not current), so dropping it here is the last drop.
        self.retired.retain(|v| Arc::strong_count(v) > 1);
        before - self.retired.len()
    }

    /// Retired values still held by some reader (a worker that has not loaded since).
    pub fn retired(&self) -> usize {
        self.retired.len()
    }

    /// The current value (for the control side's own inspection).
    pub fn current(&self) -> Arc<T> {
        self.current.load_full()
    }

    /// How many values were published since [`Publisher::new`].
    pub fn published(&self) -> u64 {
        self.published
    }
}

/// The reader side, one per worker. Holds a reference to the last value it loaded until it loads
/// again, so a worker that stops calling [`Reader::load`] keeps that value alive (and it shows in
/// [`Publisher::retired`]); a worker that loads once per batch holds at most one old value.
pub struct Reader<T> {
    cache: Cache<Arc<ArcSwap<T>>, Arc<T>>,
}

impl<T> fmt::Debug for Reader<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reader").finish_non_exhaustive()
    }
}

impl<T> Reader<T> {
    /// The current value. Hot path: no lock, no allocation; when nothing was published since the
    /// last call it is an atomic load and a compare. Call it once per batch and use the result for
    /// the whole batch, so that one batch sees one snapshot.
    #[inline]
    pub fn load(&mut self) -> &Arc<T> {
        self.cache.load()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retired_values_wait_for_their_last_reader() {
        let mut p = Publisher::new(Arc::new(0u32));
        let mut r = p.reader();
        assert_eq!(**r.load(), 0);
        let first = Arc::downgrade(&p.current());
        // The reader still holds 0: it is retired, not freed.
        assert_eq!(p.publish(Arc::new(1)), 0);
        assert_eq!(p.retired(), 1);
        assert!(first.upgrade().is_some());
        // Publishing again frees nothing while the reader sits on 0.
        assert_eq!(p.publish(Arc::new(2)), 1, "1 was never loaded, so it goes at once");
        assert_eq!(p.retired(), 1);
        assert_eq!(**r.load(), 2);
        assert_eq!(p.reclaim(), 1);
        assert_eq!(p.retired(), 0);
        assert!(first.upgrade().is_none());
        assert_eq!(p.published(), 2);
        assert_eq!(*p.current(), 2);
    }

    /// Records the thread that dropped it.
    struct Tracked(Arc<std::sync::Mutex<Vec<std::thread::ThreadId>>>);

    impl Drop for Tracked {
        fn drop(&mut self) {
            self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(std::thread::current().id());
        }
    }

    #[test]
    fn a_reader_moving_on_never_frees_a_snapshot_itself() {
        let drops = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut p = Publisher::new(Arc::new(Tracked(Arc::clone(&drops))));
        let mut r = p.reader();
        let (loaded_tx, loaded_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::spawn(move || {
            r.load();
            loaded_tx.send(()).ok();
            go_rx.recv().ok();
            // Loads the new value and lets go of the old one: the last reference is the
            // publisher's, so nothing is dropped here.
            r.load();
            std::thread::current().id()
        });
        loaded_rx.recv().ok();
        assert_eq!(p.publish(Arc::new(Tracked(Arc::clone(&drops)))), 0, "the worker still holds it");
        go_tx.send(()).ok();
        let worker_id = worker.join().expect("worker");
        assert!(drops.lock().expect("lock").is_empty());
        assert_eq!(p.reclaim(), 1);
        assert_eq!(*drops.lock().expect("lock"), vec![std::thread::current().id()]);
        assert_ne!(worker_id, std::thread::current().id());
    }
}
