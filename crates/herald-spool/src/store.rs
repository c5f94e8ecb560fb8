//! [`SpoolStore`]: the spool as a producer's [`Store`], so that
//! `ProducerBuilder::store(SpoolStore::open(config)?.0)` makes every accepted message survive a
//! crash.

use std::sync::{Arc, Mutex, PoisonError};

use herald_core::{Message, ProducerBuilder, Store, StoreError, StoreToken, StoreUsage, Submitted};

use crate::metrics::SpoolMetrics;

use crate::{Cursor, Recovery, Spool, SpoolConfig, SpoolError, SpoolId};

/// Bytes of recovered records read per [`Store::recover`] call at most (besides the count).
const RECOVER_BYTES: u64 = 16 << 20;

/// How long a [`Store::read_from`] that finds nothing readable waits for the spool's writer.
const READ_BACK_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// A [`Spool`] a producer keeps its accepted messages in (see
/// `herald_core::ProducerBuilder::store`).
pub struct SpoolStore {
    spool: Arc<Spool>,
    /// Reads what the spool held at open, until it has all been read.
    recovering: Mutex<Option<Cursor>>,
    /// The first id appended after the open: recovery reads the ids before it.
    recovered_until: SpoolId,
    /// Reads back what this run spilled ([`Store::read_from`]); made at the first read.
    live: Mutex<Option<Cursor>>,
    describe: String,
    max_bytes: u64,
    metrics: SpoolMetrics,
}

impl std::fmt::Debug for SpoolStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpoolStore")
            .field("dir", &self.spool.dir())
            .finish_non_exhaustive()
    }
}

impl SpoolStore {
    /// Opens the spool (see [`Spool::open`]): what it recovered is what the producer sends
    /// first.
    pub fn open(config: SpoolConfig) -> Result<(Self, Recovery), SpoolError> {
        let max_bytes = config.max_bytes;
        let (spool, recovery) = Spool::open(config)?;
        let cursor = spool.cursor().until(recovery.first_new_id());
        let describe = format!("spool {}", spool.dir().display());
        Ok((
            Self {
                spool: Arc::new(spool),
                recovering: Mutex::new(Some(cursor)),
                recovered_until: recovery.first_new_id(),
                live: Mutex::new(None),
                describe,
                max_bytes,
                metrics: SpoolMetrics::new(max_bytes),
            },
            recovery,
        ))
    }

    /// The spool, for its [`stats`](Spool::stats).
    pub fn spool(&self) -> &Spool {
        &self.spool
    }
}

fn store_error(e: &SpoolError) -> StoreError {
    if e.is_full() {
        StoreError::full(e.to_string())
    } else {
        StoreError::failed(e.to_string())
    }
}

impl Store for SpoolStore {
    fn submit(&self, messages: &[Message]) -> Result<Submitted, StoreError> {
        let ticket = self.spool.submit(messages).map_err(|e| store_error(&e))?;
        let tokens = ticket.ids().iter().map(|id| id.as_u64()).collect();
        Ok(Submitted {
            tokens,
            durable: Box::pin(async move { ticket.await.map(|_| ()).map_err(|e| store_error(&e)) }),
        })
    }

    fn settle(&self, tokens: &[StoreToken]) {
        let ids: Vec<SpoolId> = tokens.iter().copied().map(SpoolId::from_u64).collect();
        if let Err(e) = self.spool.settle_all(&ids) {
            // Not settled: the messages come back after a restart (duplicates, never a loss).
            tracing::warn!(
                spool = %self.spool.dir().display(),
                messages = ids.len(),
                error = %e,
                "could not record that messages ended; they will be sent again after a restart"
            );
        }
    }

    fn recover(&self, max: usize) -> Result<Vec<(StoreToken, Message)>, StoreError> {
        let mut recovering = self
            .recovering
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(cursor) = recovering.as_mut() else {
            return Ok(Vec::new());
        };
        let at = Cursor::position(cursor);
        let batch = match cursor.read_batch(max, RECOVER_BYTES) {
            Ok(batch) => batch,
            Err(e) => {
                // A read that fails part-way has moved the cursor past what it read before
                // failing: the next call starts again at `at`, so that none of those records
                // is skipped (they would come back only with the next producer, after
                // newer messages of their keys).
                let mut again = self.spool.cursor().until(self.recovered_until);
                again.skip_to(at);
                *cursor = again;
                return Err(store_error(&e));
            }
        };
        if batch.is_empty() {
            // All read: the cursor goes (a cursor keeps the spool's directory open).
            *recovering = None;
        }
        Ok(batch
            .into_iter()
            .map(|r| (r.id.as_u64(), r.message))
            .collect())
    }

    fn reads_back(&self) -> bool {
        true
    }

    fn read_from(
        &self,
        first: StoreToken,
        max: usize,
    ) -> Result<Vec<(StoreToken, Message)>, StoreError> {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        let cursor = live.get_or_insert_with(|| self.spool.cursor());
        cursor.skip_to(SpoolId::from_u64(first));
        let mut read = cursor.read_batch(max, RECOVER_BYTES);
        if matches!(&read, Ok(batch) if batch.is_empty()) && cursor.wait(READ_BACK_WAIT) {
            read = cursor.read_batch(max, RECOVER_BYTES);
        }
        let batch = match read {
            Ok(batch) => batch,
            Err(e) => {
                // A read that fails part-way has moved the cursor past what it read before
                // failing: the next read starts with a new cursor, at `first`, so that none
                // of those is skipped (and taken for a damaged record).
                *live = None;
                return Err(store_error(&e));
            }
        };
        Ok(batch
            .into_iter()
            .map(|r| (r.id.as_u64(), r.message))
            .collect())
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn usage(&self) -> Option<StoreUsage> {
        let stats = self.spool.stats();
        self.metrics.observe(&stats);
        Some(StoreUsage::new(
            stats.pending_messages,
            stats.disk_bytes,
            self.max_bytes,
        ))
    }
}

/// `builder.spool(SpoolConfig::new(dir))?`: a producer that keeps every accepted message in a
/// spool (see [`ProducerBuilder::store`]).
pub trait ProducerBuilderExt: Sized {
    /// Opens the spool in `config`'s directory ([`SpoolStore::open`]; fails if another
    /// process holds it, naming it) and makes it the producer's store. What the spool holds
    /// from an earlier run is sent first; the recovery (and any damage found) is logged.
    fn spool(self, config: SpoolConfig) -> Result<Self, SpoolError>;
}

impl ProducerBuilderExt for ProducerBuilder {
    fn spool(self, config: SpoolConfig) -> Result<Self, SpoolError> {
        let (store, recovery) = SpoolStore::open(config)?;
        let dir = store.spool().dir().display().to_string();
        if !recovery.damage.is_empty() {
            tracing::warn!(
                spool = %dir,
                corrupt_records = recovery.damage.corrupt_records,
                torn_bytes = recovery.damage.torn_bytes(),
                "the spool was damaged (a crash mid-write, or a bad disk): damaged records are \
                 skipped and counted, the rest is sent; `herald spool check` reports where"
            );
        }
        if recovery.pending_messages > 0 {
            tracing::info!(
                spool = %dir,
                pending_messages = recovery.pending_messages,
                pending_bytes = recovery.pending_bytes,
                "spool opened with messages from an earlier run: they are sent first"
            );
        }
        Ok(self.store(store))
    }
}
