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
//! Records are stored in chunks of consecutive records, one sled value each
//! ([`chunk`](super::chunk)), because sled's cost is per key. Acknowledging and dropping
//! remove a prefix of the queue: the `head` sequence number (persisted in `perch/meta`)
//! says how far, whole chunks before it are removed and a chunk it points into stays until
//! its last record goes.
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
use tracing::{debug, error, info, warn};

use super::{Disk, OUTBOX_LEGACY, SledOptions, chunk};
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

/// Stack of each commit thread: they only call into sled and the file system.
const COMMIT_THREAD_STACK: usize = 256 * 1024;

/// `perch/meta` key: the last sequence number handed out (u64 BE).
pub(super) const LAST_SEQ_KEY: &[u8] = b"outbox-last-seq";
/// `perch/meta` key: records dropped by the bounds over the life of the store (u64 BE).
const DROPPED_KEY: &[u8] = b"outbox-dropped";
/// `perch/meta` key: every record up to this sequence number was acknowledged or dropped
/// (u64 BE). Written without a sync: a power cut may bring records back, which only means
/// they are sent again.
const HEAD_KEY: &[u8] = b"outbox-head";

/// Chunks `ack` removes per hold of the counters' lock, so a commit never waits for a huge
/// acknowledgement.
const ACK_CHUNKS: usize = 64;

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
    /// Records in the tree after `head` (including a batch being synced).
    len: u64,
    /// Their encoded bytes (the chunks' framing not counted).
    bytes: u64,
    /// Every record up to here was acknowledged or dropped.
    head: u64,
    /// The last sequence number handed out.
    last_seq: u64,
    /// The last sequence number known durable: readers and acknowledgements stop here.
    durable_seq: u64,
    dropped: u64,
    commits: u64,
}

/// Records a commit drops to honour the bounds: the oldest, from `first` through `last`.
#[derive(Default)]
struct Drops {
    records: u64,
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
    /// Loads the counters (one scan of the chunks, plus the persisted high-water mark, head
    /// and drop counter), moves records of the one-record-per-key layout in `legacy` into
    /// chunks, and starts the commit threads.
    pub(super) fn open(
        tree: Tree,
        legacy: Option<Tree>,
        meta: Tree,
        disk: Disk,
        options: &SledOptions,
    ) -> Result<Self, StoreError> {
        let path = disk.path().to_path_buf();
        if let Some(legacy) = legacy {
            migrate(&legacy, &tree, &disk)?;
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
        let head = counter(HEAD_KEY)?;
        let (mut len, mut bytes, mut last_key) = (0, 0, 0);
        for item in tree.iter() {
            let (key, value) = item.map_err(sled_err(|| "scanning the outbox".into()))?;
            let first = seq_of(&key)?;
            let (n, b) = live_in_chunk(first, &value, head, u64::MAX)?;
            len += n;
            bytes += b;
            last_key = first + chunk::count(first, &value)? - 1;
        }
        // A store written before the high-water mark existed has only its records to go by.
        let last_seq = counter(LAST_SEQ_KEY)?.max(last_key);
        let dropped = counter(DROPPED_KEY)?;
        debug!(len, bytes, head, last_seq, dropped, "store.outbox_open");
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
                head,
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
        for (name, syncer, run) in [
            ("perch-outbox-w", false, Shared::run_writer as fn(&Shared)),
            ("perch-outbox-s", true, Shared::run_syncer),
        ] {
            let shared = Arc::clone(&outbox.shared);
            let thread = std::thread::Builder::new()
                .name(name.into())
                .stack_size(COMMIT_THREAD_STACK)
                .spawn(move || {
                    let _stopped = StopGuard {
                        shared: &shared,
                        syncer,
                    };
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

/// Runs when a commit thread ends, however it ends. The writer's end lets the syncer stop
/// once it synced what was written. The syncer's end (normally the last) marks the outbox
/// stopped and fails every receipt left, so no appender waits forever: only a panic leaves
/// any, since a thread that stops normally committed everything first.
struct StopGuard<'a> {
    shared: &'a Shared,
    syncer: bool,
}

impl Drop for StopGuard<'_> {
    fn drop(&mut self) {
        let left: Vec<Arc<Completion>> = {
            let mut queue = self.shared.queue();
            queue.writer_stopped |= !self.syncer;
            if !self.syncer && !std::thread::panicking() {
                Vec::new()
            } else {
                queue.stopped = true;
                let pending = std::mem::take(&mut queue.pending);
                let unsynced = if self.syncer {
                    std::mem::take(&mut queue.unsynced)
                } else {
                    VecDeque::new()
                };
                pending
                    .into_iter()
                    .map(|p| p.done)
                    .chain(unsynced.into_iter().map(|(_, done)| done))
                    .collect()
            }
        };
        self.shared.written.notify_all();
        for done in left {
            done.complete(Err(self.shared.stopped_error()));
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
            let batch: Vec<Pending> = {
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
                || self.write_batch(&batch),
            );
            match written {
                Ok(first) => {
                    let mut queue = self.queue();
                    if queue.stopped {
                        // The syncer is gone: nobody will make these durable.
                        drop(queue);
                        for p in batch {
                            p.done.complete(Err(self.stopped_error()));
                        }
                        continue;
                    }
                    queue
                        .unsynced
                        .extend((first..).zip(batch).map(|(seq, p)| (seq, p.done)));
                    drop(queue);
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

    /// Drops what the bounds require, then writes `batch` as chunks with consecutive
    /// sequence numbers and the high-water mark; returns the first sequence number. The
    /// sequence numbers are handed out even when this fails: what was written of the batch
    /// is taken out again.
    ///
    /// Plain sled inserts rather than one atomic `Batch`: sled 0.34 makes a batch atomic by
    /// rolling its IO buffer first (`pin_log`), one more synchronous write per commit, which
    /// cost a third of the throughput here (`benches/outbox.rs`). Nothing needs the
    /// atomicity: records are acknowledged, readable and acknowledgeable by the broker only
    /// after a sync that began after this write (high-water mark included) returned, so a
    /// power cut in between loses only records nobody was told about, and no sequence
    /// number that left the store can come back. At worst it loses that commit's increment
    /// of the drop counter.
    fn write_batch(&self, batch: &[Pending]) -> Result<u64, StoreError> {
        let n = batch.len() as u64;
        let mut state = self.state();
        let first = state.last_seq + 1;
        let last = state.last_seq + n;
        state.last_seq = last;
        let incoming = batch.iter().map(|p| p.encoded.len() as u64).sum();
        let drops = self.plan_drops(&state, incoming)?;
        if drops.records > 0 {
            self.remove_through(&mut state, drops.last, usize::MAX)
                .map_err(sled_err(|| {
                    format!("dropping outbox records {}..={}", drops.first, drops.last)
                }))?;
            state.dropped += drops.records;
            warn!(
                dropped = drops.records,
                expired = drops.expired,
                first_seq = drops.first,
                last_seq = drops.last,
                bytes = drops.bytes,
                "store.outbox_dropped: the outbox is over its bounds, dropped the oldest records"
            );
        }
        let mut written = Ok(());
        let mut seq = first;
        for (count, value) in chunk::build(batch.iter().map(|p| p.encoded.as_slice())) {
            let bytes = value.len() as u64 - chunk::overhead(count);
            if let Err(e) = self.tree.insert(seq.to_be_bytes(), value) {
                written = Err(e);
                break;
            }
            state.len += count;
            state.bytes += bytes;
            seq += count;
        }
        let written = written
            .and_then(|()| self.meta.insert(LAST_SEQ_KEY, &last.to_be_bytes()[..]))
            .and_then(|_| {
                if drops.records > 0 {
                    self.meta
                        .insert(DROPPED_KEY, &state.dropped.to_be_bytes()[..])?;
                }
                Ok(())
            });
        drop(state);
        if let Err(source) = written {
            self.roll_back(first, last);
            return Err(StoreError::Sled {
                action: format!("writing outbox records {first}..={last}"),
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

    /// Which records to drop so the outbox, with `incoming` more bytes, stays within its
    /// bounds: oldest first, while over the byte bound or older than the age bound. Only
    /// durable records are candidates: a record whose appender still waits is never
    /// dropped (the bound may be exceeded by the records being synced meanwhile).
    fn plan_drops(&self, state: &State, incoming: u64) -> Result<Drops, StoreError> {
        let cutoff = self.max_age_ms.map(|age| now_ms().saturating_sub(age));
        let mut drops = Drops::default();
        let over = |freed: u64| state.bytes - freed + incoming > self.max_bytes;
        if cutoff.is_none() && !over(0) {
            return Ok(drops);
        }
        for item in self.chunks_from(state.head + 1, state.durable_seq) {
            let (first, value) = item?;
            for frame in chunk::frames(first, &value)? {
                let (seq, frame) = frame?;
                if seq <= state.head {
                    continue;
                }
                if seq > state.durable_seq {
                    return Ok(drops);
                }
                // A record whose frame does not decode has no age and goes first.
                let expired = cutoff.is_some_and(|cutoff| {
                    OutboxRecord::timestamp_of(frame).is_none_or(|ms| ms < cutoff)
                });
                // Expired records go at most a batch at a time, so a clock that jumps ahead
                // does not stall one commit with the whole outbox; later commits take the rest.
                if !over(drops.bytes) && (!expired || drops.records >= MAX_BATCH_RECORDS as u64) {
                    return Ok(drops);
                }
                if drops.records == 0 {
                    drops.first = seq;
                }
                drops.last = seq;
                drops.records += 1;
                drops.bytes += frame.len() as u64;
                drops.expired += u64::from(expired);
            }
        }
        Ok(drops)
    }

    /// The chunks holding records `from..=through` (and possibly records before `from` in
    /// the first one), oldest first, with their first sequence numbers.
    fn chunks_from(
        &self,
        from: u64,
        through: u64,
    ) -> impl Iterator<Item = Result<(u64, sled::IVec), StoreError>> + '_ {
        // The chunk `from` falls into starts at or before it.
        let start = match self.tree.range(..=from.to_be_bytes()).next_back() {
            Some(Ok((key, _))) => key.to_vec(),
            _ => from.to_be_bytes().to_vec(),
        };
        let range = if from > through {
            None
        } else {
            Some(self.tree.range(start..=through.to_be_bytes().to_vec()))
        };
        range.into_iter().flatten().map(|item| {
            let (key, value) = item.map_err(sled_err(|| "reading the outbox".into()))?;
            Ok((seq_of(&key)?, value))
        })
    }

    /// Moves the head to `through` (acknowledged or dropped): removes every chunk whose
    /// records all lie at or before it, at most `limit` chunks, and updates the counters.
    /// Returns the new head, which is `through` unless the limit stopped it earlier.
    fn remove_through(&self, state: &mut State, through: u64, limit: usize) -> sled::Result<u64> {
        let mut head = through;
        for (removed, item) in self.tree.iter().enumerate() {
            let (key, value) = item?;
            let Ok(first) = seq_of(&key) else { break };
            if first > through {
                break;
            }
            let Ok(count) = chunk::count(first, &value) else {
                break;
            };
            let last = first + count - 1;
            if removed == limit {
                head = head.min(first - 1);
                break;
            }
            let Ok((n, bytes)) = live_in_chunk(first, &value, state.head, through) else {
                break;
            };
            state.len -= n;
            state.bytes -= bytes;
            if last > through {
                break;
            }
            self.tree.remove(key)?;
        }
        let head = head.max(state.head);
        state.head = head;
        self.meta.insert(HEAD_KEY, &head.to_be_bytes()[..])?;
        Ok(head)
    }

    /// Takes the chunks of a batch whose write or sync failed out of the tree so they are
    /// never sent unacknowledged.
    fn roll_back(&self, first: u64, last: u64) {
        let mut state = self.state();
        let rolled_back = (|| -> Result<(), StoreError> {
            let keys: Vec<(sled::IVec, u64, u64)> = self
                .tree
                .range(first.to_be_bytes()..=last.to_be_bytes())
                .map(|item| {
                    let (key, value) = item.map_err(sled_err(|| "reading the outbox".into()))?;
                    let (n, bytes) = live_in_chunk(seq_of(&key)?, &value, state.head, u64::MAX)?;
                    Ok((key, n, bytes))
                })
                .collect::<Result<_, StoreError>>()?;
            for (key, n, bytes) in keys {
                self.tree.remove(key).map_err(sled_err(|| {
                    format!("removing outbox records {first}..={last}")
                }))?;
                state.len -= n;
                state.bytes -= bytes;
            }
            Ok(())
        })();
        if let Err(e) = rolled_back {
            error!(
                error = %e,
                first_seq = first,
                last_seq = last,
                "store.outbox_roll_back_failed: the records stay and may be sent"
            );
        }
    }

    pub(super) fn read(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, OutboxRecord)>, StoreError> {
        let (head, durable) = {
            let state = self.state();
            (state.head, state.durable_seq)
        };
        if limit == 0 || after >= durable {
            return Ok(Vec::new());
        }
        let from = after.max(head) + 1;
        let mut out = Vec::with_capacity(limit.min(4096));
        'chunks: for item in self.chunks_from(from, durable) {
            let (first, value) = item?;
            for frame in chunk::frames(first, &value)? {
                let (seq, frame) = frame?;
                if seq < from {
                    continue;
                }
                if seq > durable || out.len() >= limit {
                    break 'chunks;
                }
                out.push((seq, decode(seq, frame)?));
            }
        }
        Ok(out)
    }

    pub(super) fn recent(&self, limit: usize) -> Result<Vec<(u64, OutboxRecord)>, StoreError> {
        let (head, durable) = {
            let state = self.state();
            (state.head, state.durable_seq)
        };
        let mut out = Vec::new();
        for item in self.tree.range(..=durable.to_be_bytes()).rev() {
            if out.len() >= limit {
                break;
            }
            let (key, value) = item.map_err(sled_err(|| "reading the outbox".into()))?;
            let first = seq_of(&key)?;
            let mut records = chunk::frames(first, &value)?
                .filter(|f| {
                    f.as_ref()
                        .map_or(true, |(seq, _)| *seq > head && *seq <= durable)
                })
                .map(|f| f.and_then(|(seq, frame)| Ok((seq, decode(seq, frame)?))))
                .collect::<Result<Vec<_>, _>>()?;
            records.reverse();
            out.extend(records.into_iter().take(limit - out.len()));
        }
        out.reverse();
        Ok(out)
    }

    pub(super) fn ack(&self, through: u64) -> Result<u64, StoreError> {
        let mut removed = 0;
        loop {
            let mut state = self.state();
            // Records still being committed are nobody's to acknowledge yet.
            let through = through.min(state.durable_seq);
            if through <= state.head {
                break;
            }
            let len = state.len;
            let head = self
                .remove_through(&mut state, through, ACK_CHUNKS)
                .map_err(sled_err(|| {
                    format!("acknowledging outbox records to {through}")
                }))?;
            removed += len - state.len;
            if head >= through {
                break;
            }
        }
        debug!(through, removed, "store.outbox_ack");
        Ok(removed)
    }

    pub(super) fn stats(&self) -> Result<OutboxStats, StoreError> {
        // Under the lock so the counters and the first record agree.
        let state = self.state();
        let mut first = None;
        if state.len > 0 {
            'chunks: for item in self.chunks_from(state.head + 1, u64::MAX) {
                let (chunk_first, value) = item?;
                for frame in chunk::frames(chunk_first, &value)? {
                    let (seq, frame) = frame?;
                    if seq > state.head {
                        first = Some((seq, OutboxRecord::timestamp_of(frame)));
                        break 'chunks;
                    }
                }
            }
        }
        Ok(OutboxStats {
            len: state.len,
            bytes: state.bytes,
            first_seq: first.map(|(seq, _)| seq),
            last_seq: state.last_seq,
            oldest_ms: first.and_then(|(_, ms)| ms),
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

/// How many records of the chunk starting at `first` lie after `head` and at or before
/// `through`, and their encoded bytes; walks the records only when the chunk is cut.
fn live_in_chunk(
    first: u64,
    value: &[u8],
    head: u64,
    through: u64,
) -> Result<(u64, u64), StoreError> {
    let count = chunk::count(first, value)?;
    let last = first + count - 1;
    if first > head && last <= through {
        return Ok((count, value.len() as u64 - chunk::overhead(count)));
    }
    let (mut n, mut bytes) = (0, 0);
    for frame in chunk::frames(first, value)? {
        let (seq, frame) = frame?;
        if seq > head && seq <= through {
            n += 1;
            bytes += frame.len() as u64;
        }
    }
    Ok((n, bytes))
}

/// Moves the records of a store written with one record per key (`legacy`) into chunks,
/// makes them durable, and empties `legacy`. Rewriting the same records gives the same
/// chunks under the same keys, so a power cut part way only means it runs again. An agent
/// rolled back to that layout after this ignores the chunks and finds the records again
/// when it is updated once more.
fn migrate(legacy: &Tree, tree: &Tree, disk: &Disk) -> Result<(), StoreError> {
    let mut moved = 0u64;
    let mut run: Vec<(u64, sled::IVec)> = Vec::new();
    let flush_run = |run: &mut Vec<(u64, sled::IVec)>| -> Result<(), StoreError> {
        let Some(&(mut seq, _)) = run.first() else {
            return Ok(());
        };
        for (count, value) in chunk::build(run.iter().map(|(_, v)| v.as_ref())) {
            tree.insert(seq.to_be_bytes(), value)
                .map_err(sled_err(|| "moving outbox records into chunks".into()))?;
            seq += count;
        }
        run.clear();
        Ok(())
    };
    for item in legacy.iter() {
        let (key, value) = item.map_err(sled_err(|| "reading the old outbox".into()))?;
        let seq = seq_of(&key)?;
        if run.last().is_some_and(|(last, _)| *last + 1 != seq) || run.len() >= MAX_BATCH_RECORDS {
            flush_run(&mut run)?;
        }
        run.push((seq, value));
        moved += 1;
    }
    flush_run(&mut run)?;
    if moved == 0 {
        return Ok(());
    }
    disk.flush_and_sync()?;
    disk.db
        .drop_tree(OUTBOX_LEGACY)
        .map_err(sled_err(|| "removing the old outbox".into()))?;
    disk.flush_and_sync()?;
    info!(
        records = moved,
        "store.outbox_migrated: records moved into chunks"
    );
    Ok(())
}

fn seq_of(key: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(key)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt {
            what: "an outbox key".into(),
            detail: format!("it is {} bytes, not 8", key.len()),
        })
}

fn decode(seq: u64, frame: &[u8]) -> Result<OutboxRecord, StoreError> {
    OutboxRecord::decode(frame).ok_or_else(|| StoreError::Corrupt {
        what: format!("outbox record {seq}"),
        detail: "its frame does not decode".into(),
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
