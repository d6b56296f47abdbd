//! The telemetry outbox: a durable queue with group commit.
//!
//! Every acknowledged record must survive a power cut, and making anything durable costs
//! two trips to the disk (sled's flush waits for its write with `sync_file_range`, then
//! `fdatasync` flushes the disk's cache): ~0.3-0.4 ms here, against ~3 µs to insert a
//! 100-byte record. So appenders that arrive together share one commit. An appender only
//! encodes its record, queues it and gets an [`OutboxReceipt`]: a thread blocks on it, an
//! async task (a component's telemetry publish) awaits it without holding a worker thread.
//! Two threads of the outbox's own do the commits, in two stages that overlap:
//! - **writer**: takes every queued record (up to [`MAX_BATCH_RECORDS`] or
//!   [`MAX_BATCH_BYTES`]), drops what the bounds require, assigns consecutive sequence
//!   numbers and inserts the records and the sequence high-water mark, then takes the next
//!   batch;
//! - **syncer**: runs one sled flush and one `fdatasync` for everything written so far,
//!   publishes the new durable sequence number and resolves every receipt it covered.
//!
//! So the next batch is written while the previous one is being synced, and a sync covers
//! every batch written before it started. Measured (`benches/outbox.rs`): one commit at a
//! time (write and sync in one turn) gave ~20% less at 8 and 64 appenders; two concurrent
//! syncs gave less too (the disk serialises them). Appenders taking the write and sync
//! turns themselves (no threads of the outbox's own) saved a hand-off for a lone thread but
//! needed a thread per waiting appender: an async task cannot block on a turn.
//!
//! Closing the store stops both threads after they committed everything queued: a record
//! whose receipt was handed out is never dropped unwritten.
//!
//! Readers ([`Outbox::read`], [`Outbox::ack`], the watch channel) stop at the durable
//! sequence number, so nothing is sent before its appender could have been told it is
//! safe. Sequence numbers come from the high-water mark in `perch/meta`, never from the
//! last key in the tree, so they keep growing after the outbox was drained empty. The
//! number of records and their bytes are kept in memory (one scan at open), so the size
//! bound costs nothing per commit.

use std::collections::VecDeque;
use std::ops::Deref;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use sled::Tree;
use tokio::sync::watch;
use tracing::{debug, error, warn};

use super::{Disk, SledOptions};
use crate::error::sled_err;
use crate::receipt::{Completion, OutboxReceipt};
use crate::{OutboxRecord, OutboxStats, StoreError};

/// At most this many records are written in one batch (a sync covers every batch written
/// before it started); also the most expired records one write drops.
const MAX_BATCH_RECORDS: usize = 4096;

/// At most this many encoded bytes are written in one batch (or `outbox_max_bytes` when that
/// is smaller, so that a batch always fits once older records are dropped); a single larger
/// record is written on its own.
const MAX_BATCH_BYTES: u64 = 2 * 1024 * 1024;

/// `outbox_ack` removes records in batches of this many, so the commit it shares the tree
/// with never waits for a huge acknowledgement.
const ACK_CHUNK: usize = 4096;

/// Stack of each commit thread: they only call into sled and the file system.
const COMMIT_THREAD_STACK: usize = 256 * 1024;

/// `perch/meta` key: the last sequence number handed out (u64 BE).
pub(super) const LAST_SEQ_KEY: &[u8] = b"outbox-last-seq";
/// `perch/meta` key: records dropped by the bounds over the life of the store (u64 BE).
const DROPPED_KEY: &[u8] = b"outbox-dropped";

/// The outbox and its two commit threads, stopped (after committing what is queued) when
/// it is dropped.
pub(super) struct Outbox {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

pub(super) struct Shared {
    tree: Tree,
    meta: Tree,
    disk: Disk,
    max_bytes: u64,
    max_age_ms: Option<u64>,
    queue: Mutex<Queue>,
    /// The writer waits here for records to write (or for the outbox to close).
    queued: Condvar,
    /// The syncer waits here for records to sync (or for the writer to stop).
    written: Condvar,
    /// Counters that must agree with the tree: held while the tree's records are added or
    /// removed (a commit's write, an acknowledgement), not while syncing.
    state: Mutex<State>,
    durable: watch::Sender<u64>,
}

#[derive(Default)]
struct Queue {
    /// Records not written yet, oldest first.
    pending: VecDeque<Pending>,
    /// Records written to sled and waiting for the sync that makes them durable, with
    /// their sequence numbers, in order.
    unsynced: VecDeque<(u64, Arc<Completion>)>,
    /// The store is closing: the writer stops once nothing is pending.
    closing: bool,
    /// The writer stopped: the syncer stops once nothing is unsynced.
    writer_stopped: bool,
    /// Both threads stopped: new records are refused.
    stopped: bool,
}

struct Pending {
    encoded: Vec<u8>,
    done: Arc<Completion>,
}

struct State {
    /// Records in the tree (including a batch being synced).
    len: u64,
    /// Their encoded bytes.
    bytes: u64,
    /// The last sequence number handed out.
    last_seq: u64,
    /// The last sequence number known durable: readers and acknowledgements stop here.
    durable_seq: u64,
    dropped: u64,
    commits: u64,
}

/// Records a commit drops to honour the bounds, oldest first.
#[derive(Default)]
struct Drops {
    keys: Vec<[u8; 8]>,
    bytes: u64,
    expired: u64,
    first: u64,
    last: u64,
}

impl Deref for Outbox {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.shared
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.queue().closing = true;
        self.queued.notify_all();
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                error!("store.outbox_thread_panicked");
            }
        }
    }
}

impl Outbox {
    /// Loads the counters (one scan of the tree, plus the persisted high-water mark and drop
    /// counter) and starts the commit threads.
    pub(super) fn open(
        tree: Tree,
        meta: Tree,
        disk: Disk,
        options: &SledOptions,
    ) -> Result<Self, StoreError> {
        let path = disk.path().to_path_buf();
        let (mut len, mut bytes, mut last_key) = (0, 0, 0);
        for item in tree.iter() {
            let (key, value) = item.map_err(sled_err(|| "scanning the outbox".into()))?;
            len += 1;
            bytes += value.len() as u64;
            last_key = seq_of(&key)?;
        }
        let counter = |key: &[u8]| -> Result<u64, StoreError> {
            let raw = meta
                .get(key)
                .map_err(sled_err(|| "reading the outbox counters".into()))?;
            Ok(match raw {
                None => 0,
                Some(raw) => <[u8; 8]>::try_from(raw.as_ref())
                    .map(u64::from_be_bytes)
                    .unwrap_or_else(|_| {
                        warn!(
                            path = %path.display(),
                            key = %String::from_utf8_lossy(key),
                            len = raw.len(),
                            "store.outbox_counter_corrupt: counting from the records instead"
                        );
                        0
                    }),
            })
        };
        // A store written before the high-water mark existed has only its records to go by.
        let last_seq = counter(LAST_SEQ_KEY)?.max(last_key);
        let dropped = counter(DROPPED_KEY)?;
        debug!(len, bytes, last_seq, dropped, "store.outbox_open");
        let shared = Arc::new(Shared {
            tree,
            meta,
            disk,
            max_bytes: options.outbox_max_bytes,
            max_age_ms: options
                .outbox_max_age
                .map(|age| u64::try_from(age.as_millis()).unwrap_or(u64::MAX)),
            queue: Mutex::default(),
            queued: Condvar::new(),
            written: Condvar::new(),
            // `open` syncs before the store is used: whatever the tree holds is durable.
            state: Mutex::new(State {
                len,
                bytes,
                last_seq,
                durable_seq: last_seq,
                dropped,
                commits: 0,
            }),
            durable: watch::Sender::new(last_seq),
        });
        let mut outbox = Self {
            shared,
            threads: Vec::with_capacity(2),
        };
        for (name, run) in [
            ("perch-outbox-w", Shared::run_writer as fn(&Shared)),
            ("perch-outbox-s", Shared::run_syncer),
        ] {
            let shared = Arc::clone(&outbox.shared);
            let thread = std::thread::Builder::new()
                .name(name.into())
                .stack_size(COMMIT_THREAD_STACK)
                .spawn(move || {
                    let _stopped = StopGuard(&shared);
                    run(&shared);
                })
                .map_err(|source| StoreError::Io {
                    action: "start the outbox commit thread for",
                    path: path.clone(),
                    source,
                })?;
            // Dropping `outbox` on an error here stops the thread started before.
            outbox.threads.push(thread);
        }
        Ok(outbox)
    }
}

/// Marks the outbox stopped when a commit thread ends, however it ends, and fails every
/// receipt left, so no appender waits forever (only a panic leaves any: a thread that stops
/// normally committed everything first).
struct StopGuard<'a>(&'a Shared);

impl Drop for StopGuard<'_> {
    fn drop(&mut self) {
        let left: Vec<Arc<Completion>> = {
            let mut queue = self.0.queue();
            queue.stopped = true;
            queue.writer_stopped = true;
            let pending = std::mem::take(&mut queue.pending);
            let unsynced = std::mem::take(&mut queue.unsynced);
            pending
                .into_iter()
                .map(|p| p.done)
                .chain(unsynced.into_iter().map(|(_, done)| done))
                .collect()
        };
        self.0.written.notify_all();
        for done in left {
            done.complete(Err(self.0.stopped_error()));
        }
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stopped_error(&self) -> StoreError {
        StoreError::Unrecoverable {
            path: self.disk.path().to_path_buf(),
            reason: "the outbox stopped committing (its store is closing or a commit thread \
                     failed); the record was not acknowledged"
                .into(),
        }
    }

    /// Queues `record` for the next commit.
    pub(super) fn submit(&self, record: &OutboxRecord) -> OutboxReceipt {
        let encoded = match record.encode() {
            Ok(encoded) => encoded,
            Err(e) => return OutboxReceipt::refused(e),
        };
        if encoded.len() as u64 > self.max_bytes {
            return OutboxReceipt::refused(StoreError::Invalid {
                what: "outbox record",
                value: format!(
                    "{}/{} ({} bytes)",
                    record.component,
                    record.stream,
                    encoded.len()
                ),
                reason: "it is larger than the whole outbox may be (outbox_max_bytes)",
            });
        }
        let (receipt, done) = OutboxReceipt::pending();
        {
            let mut queue = self.queue();
            if queue.stopped || queue.closing {
                return OutboxReceipt::refused(self.stopped_error());
            }
            queue.pending.push_back(Pending { encoded, done });
        }
        self.queued.notify_one();
        receipt
    }

    /// The writer thread: writes the oldest queued records to sled, batch after batch,
    /// until the store closes and nothing is queued.
    fn run_writer(&self) {
        let cap_bytes = MAX_BATCH_BYTES.min(self.max_bytes);
        loop {
            let mut batch: Vec<Pending> = {
                let mut queue = self.queue();
                while queue.pending.is_empty() && !queue.closing {
                    queue = self
                        .queued
                        .wait(queue)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                if queue.pending.is_empty() {
                    queue.writer_stopped = true;
                    drop(queue);
                    self.written.notify_one();
                    return;
                }
                let (mut n, mut bytes) = (0, 0);
                for p in &queue.pending {
                    let len = p.encoded.len() as u64;
                    if n == MAX_BATCH_RECORDS || (n > 0 && bytes + len > cap_bytes) {
                        break;
                    }
                    n += 1;
                    bytes += len;
                }
                queue.pending.drain(..n).collect()
            };
            let n = batch.len();
            let written = self.disk.guarded(
                || format!("writing {n} outbox records"),
                || self.write_batch(&mut batch),
            );
            match written {
                Ok(first) => {
                    self.queue()
                        .unsynced
                        .extend((first..).zip(batch).map(|(seq, p)| (seq, p.done)));
                    self.written.notify_one();
                }
                Err(e) => {
                    for p in batch {
                        p.done.complete(Err(e.duplicate()));
                    }
                }
            }
        }
    }

    /// Writes the records the bounds drop, `batch` with consecutive sequence numbers and the
    /// high-water mark; returns the first sequence number. The sequence numbers are handed
    /// out even when this fails: what was written of the batch is taken out again.
    ///
    /// Plain sled inserts rather than one atomic `Batch`: sled 0.34 makes a batch atomic by
    /// rolling its IO buffer first (`pin_log`), one more synchronous write per commit, which
    /// cost a third of the throughput here (`benches/outbox.rs`, 64 appenders: ~45,000
    /// against ~70,000 records/s). Nothing needs the atomicity: records are acknowledged,
    /// readable and acknowledgeable by the broker only after a sync that began after this
    /// write (high-water mark included) returned, so a power cut in between loses only
    /// records nobody was told about, and no sequence number that left the store can come
    /// back. At worst it loses that commit's increment of the drop counter.
    fn write_batch(&self, batch: &mut [Pending]) -> Result<u64, StoreError> {
        let n = batch.len() as u64;
        let mut state = self.state();
        let first = state.last_seq + 1;
        let last = state.last_seq + n;
        let drops = self.plan_drops(&state, batch.iter().map(|p| p.encoded.len() as u64).sum())?;
        let action = || format!("writing outbox records {first}..={last}");
        let (mut added, mut added_bytes, mut removed, mut removed_bytes) = (0, 0, 0, 0);
        let written = (|| {
            for key in &drops.keys {
                if let Some(old) = self.tree.remove(&key[..])? {
                    removed += 1;
                    removed_bytes += old.len() as u64;
                }
            }
            for (seq, p) in (first..).zip(batch.iter_mut()) {
                let len = p.encoded.len() as u64;
                self.tree
                    .insert(&seq.to_be_bytes()[..], std::mem::take(&mut p.encoded))?;
                added += 1;
                added_bytes += len;
            }
            self.meta.insert(LAST_SEQ_KEY, &last.to_be_bytes()[..])?;
            if removed > 0 {
                self.meta
                    .insert(DROPPED_KEY, &(state.dropped + removed).to_be_bytes()[..])?;
            }
            Ok(())
        })();
        state.last_seq = last;
        state.len = state.len + added - removed;
        state.bytes = state.bytes + added_bytes - removed_bytes;
        state.dropped += removed;
        drop(state);
        if removed > 0 {
            warn!(
                dropped = removed,
                expired = drops.expired,
                first_seq = drops.first,
                last_seq = drops.last,
                bytes = removed_bytes,
                "store.outbox_dropped: the outbox is over its bounds, dropped the oldest records"
            );
        }
        if let Err(source) = written {
            self.roll_back(first, last);
            return Err(StoreError::Sled {
                action: action(),
                source,
            });
        }
        Ok(first)
    }

    /// The syncer thread: one sled flush and one `fdatasync` for everything written so far,
    /// then every receipt covered resolves; again until the writer stopped and nothing is
    /// left. On error nothing covered is acknowledged and its records are taken out of the
    /// tree again (their sequence numbers are not reused).
    fn run_syncer(&self) {
        loop {
            let (from, through) = {
                let mut queue = self.queue();
                while queue.unsynced.is_empty() && !queue.writer_stopped {
                    queue = self
                        .written
                        .wait(queue)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                match (queue.unsynced.front(), queue.unsynced.back()) {
                    (Some((from, _)), Some((through, _))) => (*from, *through),
                    _ => return,
                }
            };
            let synced = self.disk.guarded(
                || format!("syncing outbox records {from}..={through}"),
                || self.disk.flush_and_sync(),
            );
            match &synced {
                Ok(()) => {
                    {
                        let mut state = self.state();
                        state.durable_seq = state.durable_seq.max(through);
                        state.commits += 1;
                    }
                    self.durable.send_replace(through);
                    debug!(first_seq = from, last_seq = through, "store.outbox_commit");
                }
                Err(e) => {
                    error!(error = %e, first_seq = from, last_seq = through, "store.outbox_commit_failed");
                    self.roll_back(from, through);
                }
            }
            let covered: Vec<(u64, Arc<Completion>)> = {
                let mut queue = self.queue();
                let n = queue.unsynced.partition_point(|(seq, _)| *seq <= through);
                queue.unsynced.drain(..n).collect()
            };
            for (seq, done) in covered {
                done.complete(match &synced {
                    Ok(()) => Ok(seq),
                    Err(e) => Err(e.duplicate()),
                });
            }
        }
    }

    /// Which existing records to drop so the outbox, with `incoming` more bytes, stays
    /// within its bounds: oldest first, while over the byte bound or older than the age
    /// bound. Only durable records are candidates: a record whose appender still waits is
    /// never dropped (the bound may be exceeded by the records being synced meanwhile).
    fn plan_drops(&self, state: &State, incoming: u64) -> Result<Drops, StoreError> {
        let cutoff = self.max_age_ms.map(|age| now_ms().saturating_sub(age));
        let mut drops = Drops::default();
        let over = |freed: u64| state.bytes - freed + incoming > self.max_bytes;
        if cutoff.is_none() && !over(0) {
            return Ok(drops);
        }
        for item in self.tree.range(..=state.durable_seq.to_be_bytes()) {
            let (key, value) = item.map_err(sled_err(|| "reading the outbox".into()))?;
            // A record whose frame does not decode has no age and goes first.
            let expired = cutoff.is_some_and(|cutoff| {
                OutboxRecord::timestamp_of(&value).is_none_or(|ms| ms < cutoff)
            });
            // Expired records go at most a batch at a time, so a clock that jumps ahead does
            // not stall one commit with the whole outbox; later commits take the rest.
            if !over(drops.bytes) && (!expired || drops.keys.len() >= MAX_BATCH_RECORDS) {
                break;
            }
            let seq = seq_of(&key)?;
            if drops.keys.is_empty() {
                drops.first = seq;
            }
            drops.last = seq;
            drops.keys.push(seq.to_be_bytes());
            drops.bytes += value.len() as u64;
            drops.expired += u64::from(expired);
        }
        Ok(drops)
    }

    /// Takes records whose sync failed out of the tree so they are never sent
    /// unacknowledged.
    fn roll_back(&self, first: u64, last: u64) {
        let mut state = self.state();
        let (mut n, mut bytes) = (0, 0);
        let rolled_back = self.remove_range(first, last, usize::MAX, &mut n, &mut bytes);
        state.len -= n;
        state.bytes -= bytes;
        if let Err(e) = rolled_back {
            error!(
                error = %e,
                first_seq = first,
                last_seq = last,
                "store.outbox_roll_back_failed: the records stay and may be sent"
            );
        }
    }

    /// Removes up to `limit` records from `first` through `last`, counting them and their
    /// bytes. Plain removes, not a sled `Batch`: nothing needs them atomic (a removal a power
    /// cut undoes only means a record is sent again) and a batch costs sled an extra write.
    fn remove_range(
        &self,
        first: u64,
        last: u64,
        limit: usize,
        n: &mut u64,
        bytes: &mut u64,
    ) -> sled::Result<()> {
        let keys = self
            .tree
            .range(first.to_be_bytes()..=last.to_be_bytes())
            .keys()
            .take(limit)
            .collect::<sled::Result<Vec<_>>>()?;
        for key in keys {
            if let Some(old) = self.tree.remove(key)? {
                *n += 1;
                *bytes += old.len() as u64;
            }
        }
        Ok(())
    }

    pub(super) fn read(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, OutboxRecord)>, StoreError> {
        let durable = self.state().durable_seq;
        if limit == 0 || after >= durable {
            return Ok(Vec::new());
        }
        self.tree
            .range((after + 1).to_be_bytes()..=durable.to_be_bytes())
            .take(limit)
            .map(decode)
            .collect()
    }

    pub(super) fn recent(&self, limit: usize) -> Result<Vec<(u64, OutboxRecord)>, StoreError> {
        let durable = self.state().durable_seq;
        let mut out = self
            .tree
            .range(..=durable.to_be_bytes())
            .rev()
            .take(limit)
            .map(decode)
            .collect::<Result<Vec<_>, _>>()?;
        out.reverse();
        Ok(out)
    }

    pub(super) fn ack(&self, through: u64) -> Result<u64, StoreError> {
        let mut removed = 0;
        loop {
            let mut state = self.state();
            // Records still being committed are nobody's to acknowledge yet.
            let through = through.min(state.durable_seq);
            let (mut n, mut bytes) = (0, 0);
            let result = self.remove_range(0, through, ACK_CHUNK, &mut n, &mut bytes);
            state.len -= n;
            state.bytes -= bytes;
            drop(state);
            removed += n;
            result.map_err(sled_err(|| {
                format!("acknowledging outbox records to {through}")
            }))?;
            if n < ACK_CHUNK as u64 {
                break;
            }
        }
        debug!(through, removed, "store.outbox_ack");
        Ok(removed)
    }

    pub(super) fn stats(&self) -> Result<OutboxStats, StoreError> {
        // Under the lock so the counters and the first record agree.
        let state = self.state();
        let first = self
            .tree
            .first()
            .map_err(sled_err(|| "reading the outbox".into()))?;
        let (first_seq, oldest_ms) = match first {
            Some((key, value)) => (Some(seq_of(&key)?), OutboxRecord::timestamp_of(&value)),
            None => (None, None),
        };
        Ok(OutboxStats {
            len: state.len,
            bytes: state.bytes,
            first_seq,
            last_seq: state.last_seq,
            oldest_ms,
            dropped: state.dropped,
            commits: state.commits,
        })
    }

    pub(super) fn len(&self) -> u64 {
        self.state().len
    }

    pub(super) fn watch(&self) -> watch::Receiver<u64> {
        self.durable.subscribe()
    }
}

fn seq_of(key: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(key)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt {
            what: "an outbox key".into(),
            detail: format!("it is {} bytes, not 8", key.len()),
        })
}

fn decode(item: sled::Result<(sled::IVec, sled::IVec)>) -> Result<(u64, OutboxRecord), StoreError> {
    let (key, value) = item.map_err(sled_err(|| "reading the outbox".into()))?;
    let seq = seq_of(&key)?;
    let record = OutboxRecord::decode(&value).ok_or_else(|| StoreError::Corrupt {
        what: format!("outbox record {seq}"),
        detail: "its frame does not decode".into(),
    })?;
    Ok((seq, record))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
