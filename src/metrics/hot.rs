//! Counters bumped on the packet path: one cache-padded row of cells per thread, summed into
//! the exported counters when `/metrics` renders.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam::utils::CachePadded;
use metrics::Counter;

/// Rows of hot-counter cells: one per thread (threads beyond [`HOT_ROWS`] share rows).
pub(super) const HOT_ROWS: usize = 16;
/// Hot counters per node (cells per row).
const HOT_COLS: usize = 32;

/// One thread's cells of every hot counter of a node, on cache lines of its own.
type HotRow = CachePadded<[AtomicU64; HOT_COLS]>;

/// This thread's row (assigned round-robin the first time a thread counts).
fn hot_row() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static ROW: usize = NEXT.fetch_add(1, Ordering::Relaxed) % HOT_ROWS;
    }
    ROW.with(|r| *r)
}

/// A counter bumped on the packet path: each thread adds to its own cache-padded cell, and the
/// cells are summed into the exported counter when `/metrics` is rendered. Increments from one
/// thread never contend with another core's.
#[derive(Clone)]
pub struct HotCounter {
    rows: Arc<[HotRow]>,
    col: usize,
}

impl HotCounter {
    /// Adds `n`.
    #[inline]
    pub fn increment(&self, n: u64) {
        self.rows[hot_row()][self.col].fetch_add(n, Ordering::Relaxed);
    }

    /// The sum over every thread.
    pub fn value(&self) -> u64 {
        self.rows
            .iter()
            .map(|r| r[self.col].load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }
}

/// Hands out the hot counters of one node and remembers which exported counter each feeds.
pub(super) struct HotCounters {
    rows: Arc<[HotRow]>,
    pub(super) exported: Vec<(HotCounter, Counter)>,
}

impl HotCounters {
    pub(super) fn new() -> Self {
        Self {
            rows: (0..HOT_ROWS)
                .map(|_| CachePadded::new(std::array::from_fn(|_| AtomicU64::new(0))))
                .collect(),
            exported: Vec::new(),
        }
    }

    /// A hot counter summed into `to` at each render.
    pub(super) fn feed(&mut self, to: Counter) -> HotCounter {
        let col = self.exported.len();
        assert!(col < HOT_COLS, "more hot counters than HOT_COLS");
        let h = HotCounter {
            rows: self.rows.clone(),
            col,
        };
        self.exported.push((h.clone(), to));
        h
    }
}
