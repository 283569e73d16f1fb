//! Sealing and opening chunks on worker threads, output in order.
//!
//! Threads: the calling thread does all the I/O (the reader and writer are
//! not `Send`): it reads a batch of chunks into a buffer, hands the buffer to
//! the workers over a bounded channel, and writes finished batches strictly in
//! order. `workers` threads (default: one per core, at most 8) take batches
//! from the shared queue, seal or open every chunk in place, and send the
//! buffer back. A stream that fits in one batch is done on the calling thread
//! with no thread started at all.
//!
//! Buffers: a batch is `batch_chunks` (16) chunks, 16 × (64 KiB + 16) bytes,
//! allocated once and reused; no allocation per chunk or per batch. At most
//! `depth = min(2 × workers + 2, workers + 4)` buffers exist (about two per
//! worker so no worker waits for the reader, one being read, one held back to
//! learn whether it ends the stream), so memory is bounded by `depth` MiB at
//! any input size: 6 MiB with 2 workers, 12 MiB with the maximum of 8.
//! `KLUIS_STREAM_THREADS` sets the worker count (0: no threads).
//!
//! Layout, so that no byte is copied between the read and the write:
//! - seal: plaintext chunk `j` is read (one `readv` for the whole batch) to
//!   offset `j × (64 KiB + 16)`, sealed in place, and its tag written right
//!   after it, so the sealed batch is contiguous;
//! - open: the sealed batch is read contiguously and chunk `j` is opened with
//!   `open_within` so its plaintext lands at `j × 64 KiB`: the plaintext of
//!   the batch is contiguous too.
//!
//! The final chunk: a full batch may or may not end the stream, so it is held
//! back until the next read shows more data (then it is not final) or the end
//! of the input (then its last chunk is the final one).

use std::io::{self, IoSliceMut, Read, Write};
use std::sync::Mutex;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::thread;

use ring::aead::{Aad, LessSafeKey, Nonce};

use super::{CHUNK_SIZE, ENC_CHUNK_SIZE, PayloadKey, StreamError, TAG_SIZE};

/// Chunks per batch by default: 1 MiB of plaintext.
pub const BATCH_CHUNKS: usize = 16;
/// Upper bound of `batch_chunks` (the `readv` slice array is this long).
const MAX_BATCH_CHUNKS: usize = 64;
/// Upper bound of the default worker count.
const MAX_WORKERS: usize = 8;

/// How the pipeline runs; [`Tuning::default`] is what production uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// Worker threads; 0 does all the work on the calling thread.
    pub workers: usize,
    /// Chunks per batch, 1..=64 (clamped).
    pub batch_chunks: usize,
}

/// Environment variable that sets the worker threads (0: all on the calling
/// thread), e.g. to keep backups from taking every core of a busy host.
pub const THREADS_ENV: &str = "KLUIS_STREAM_THREADS";

impl Default for Tuning {
    /// One worker per core (at most 8), or `KLUIS_STREAM_THREADS` (0..=64) if set.
    fn default() -> Self {
        let cores = thread::available_parallelism().map_or(1, |n| n.get());
        let workers = workers_from(std::env::var(THREADS_ENV).ok().as_deref(), cores);
        Self { workers, batch_chunks: BATCH_CHUNKS }
    }
}

/// The worker count from `KLUIS_STREAM_THREADS` (0..=64), else one per core up to 8.
pub(crate) fn workers_from(setting: Option<&str>, cores: usize) -> usize {
    setting
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n <= 64)
        .unwrap_or_else(|| cores.clamp(1, MAX_WORKERS))
}

impl Tuning {
    /// Buffers in circulation at most (see the module documentation).
    pub fn depth(&self) -> usize {
        (2 * self.workers + 2).min(self.workers + 4)
    }

    /// Bytes of one batch buffer.
    pub fn batch_bytes(&self) -> usize {
        self.batch_chunks.clamp(1, MAX_BATCH_CHUNKS) * ENC_CHUNK_SIZE
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    Seal,
    Open,
}

/// Why a batch failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Damaged,
    Truncated,
    Internal,
}

/// One buffer of chunks, moved between the calling thread and a worker.
struct Batch {
    buf: Box<[u8]>,
    /// Position in the stream (0, 1, 2, ...): the order of writing.
    seq: u64,
    /// Index of its first chunk in the stream.
    first_chunk: u64,
    /// Input bytes read into `buf` (plaintext for seal, sealed bytes for open).
    len: usize,
    /// Whether its last chunk is the final chunk of the stream.
    last: bool,
    /// Output bytes at `buf[..out_len]` once processed (for a failed open:
    /// the authenticated plaintext before the bad chunk).
    out_len: usize,
    fault: Option<Fault>,
}

#[derive(Clone, Copy)]
struct Geometry {
    dir: Direction,
    chunks: usize,
    /// Input bytes of a full batch.
    full: usize,
}

impl Geometry {
    fn new(dir: Direction, tuning: &Tuning) -> Self {
        let chunks = tuning.batch_chunks.clamp(1, MAX_BATCH_CHUNKS);
        let per_chunk = match dir {
            Direction::Seal => CHUNK_SIZE,
            Direction::Open => ENC_CHUNK_SIZE,
        };
        Self { dir, chunks, full: chunks * per_chunk }
    }

    fn new_batch(&self) -> Batch {
        Batch {
            buf: vec![0u8; self.chunks * ENC_CHUNK_SIZE].into_boxed_slice(),
            seq: 0,
            first_chunk: 0,
            len: 0,
            last: false,
            out_len: 0,
            fault: None,
        }
    }
}

pub(crate) fn chunk_nonce(index: u64, last: bool) -> Nonce {
    // 11-byte big-endian counter, then the last-chunk flag.
    let mut n = [0u8; 12];
    n[3..11].copy_from_slice(&index.to_be_bytes());
    n[11] = u8::from(last);
    Nonce::assume_unique_for_key(n)
}

/// Reads one batch: until it is full or the input ends.
fn fill<R: Read>(geo: &Geometry, input: &mut R, b: &mut Batch) -> Result<(), StreamError> {
    b.len = 0;
    while b.len < geo.full {
        let r = match geo.dir {
            Direction::Open => input.read(&mut b.buf[b.len..geo.full]),
            Direction::Seal => {
                // Chunk j goes to offset j * ENC_CHUNK_SIZE, leaving room for its tag.
                let first = b.len / CHUNK_SIZE;
                let offset = b.len % CHUNK_SIZE;
                let mut slices: [IoSliceMut<'_>; MAX_BATCH_CHUNKS] = std::array::from_fn(|_| IoSliceMut::new(&mut []));
                let mut k = 0;
                for (i, chunk) in b.buf.chunks_mut(ENC_CHUNK_SIZE).enumerate().take(geo.chunks).skip(first) {
                    let start = if i == first { offset } else { 0 };
                    slices[k] = IoSliceMut::new(&mut chunk[start..CHUNK_SIZE]);
                    k += 1;
                }
                input.read_vectored(&mut slices[..k])
            }
        };
        match r {
            Ok(0) => break,
            Ok(n) => b.len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(StreamError::ReadInput(e)),
        }
    }
    Ok(())
}

fn process(dir: Direction, key: &LessSafeKey, b: &mut Batch) {
    b.out_len = 0;
    b.fault = match dir {
        Direction::Seal => seal_batch(key, b),
        Direction::Open => open_batch(key, b),
    }
    .err();
}

fn seal_batch(key: &LessSafeKey, b: &mut Batch) -> Result<(), Fault> {
    // Only the last batch may be short, and only it may be empty (empty input).
    let chunks = b.len.div_ceil(CHUNK_SIZE).max(1);
    for j in 0..chunks {
        let start = j * ENC_CHUNK_SIZE;
        let pt_len = (b.len - j * CHUNK_SIZE).min(CHUNK_SIZE);
        let nonce = chunk_nonce(b.first_chunk + j as u64, b.last && j + 1 == chunks);
        let (data, rest) = b.buf[start..].split_at_mut(pt_len);
        let tag = key.seal_in_place_separate_tag(nonce, Aad::empty(), data).map_err(|_| Fault::Internal)?;
        rest[..TAG_SIZE].copy_from_slice(tag.as_ref());
        b.out_len = start + pt_len + TAG_SIZE;
    }
    Ok(())
}

fn open_batch(key: &LessSafeKey, b: &mut Batch) -> Result<(), Fault> {
    if b.len == 0 {
        // Not a single chunk after the nonce.
        return Err(Fault::Truncated);
    }
    let chunks = b.len.div_ceil(ENC_CHUNK_SIZE);
    for j in 0..chunks {
        let start = j * ENC_CHUNK_SIZE;
        // All chunks but the one at the end of the input are full.
        let ct_len = (b.len - start).min(ENC_CHUNK_SIZE);
        let index = b.first_chunk + j as u64;
        let last = b.last && j + 1 == chunks;
        if ct_len < TAG_SIZE || (last && ct_len == TAG_SIZE && index > 0) {
            // Shorter than a tag; or an empty final chunk after others.
            return Err(Fault::Damaged);
        }
        // A full chunk at the end of the input that opens as a non-final chunk
        // means the stream was cut at a chunk boundary: keep a copy (once per
        // stream) to tell that apart from damage.
        let spare = (last && ct_len == ENC_CHUNK_SIZE).then(|| b.buf[start..start + ct_len].to_vec());
        let in_out = &mut b.buf[j * CHUNK_SIZE..start + ct_len];
        match key.open_within(chunk_nonce(index, last), Aad::empty(), in_out, j * TAG_SIZE..) {
            Ok(pt) => b.out_len = j * CHUNK_SIZE + pt.len(),
            Err(_) => {
                if let Some(mut spare) = spare
                    && let Ok(pt) = key.open_in_place(chunk_nonce(index, false), Aad::empty(), &mut spare)
                {
                    // Authenticated: release it like the chunks before it, then fail.
                    b.buf[j * CHUNK_SIZE..j * CHUNK_SIZE + pt.len()].copy_from_slice(pt);
                    b.out_len = j * CHUNK_SIZE + pt.len();
                    return Err(Fault::Truncated);
                }
                // Damaged, misplaced, or a final chunk with data after it. (Telling the
                // last apart would need a copy of every chunk: ring wipes a chunk that
                // fails; so the plaintext released stops one chunk earlier than age's.)
                return Err(Fault::Damaged);
            }
        }
    }
    Ok(())
}

enum Msg {
    Done(Batch),
    WorkerDied,
}

/// Tells the calling thread that a worker panicked, so it stops waiting.
struct DeathNotice(Sender<Msg>);

impl Drop for DeathNotice {
    fn drop(&mut self) {
        if thread::panicking() {
            let _ = self.0.send(Msg::WorkerDied);
        }
    }
}

fn worker(dir: Direction, key: &LessSafeKey, jobs: &Mutex<Receiver<Batch>>, done: Sender<Msg>) {
    let _notice = DeathNotice(done.clone());
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(mut b) = job else { return };
        process(dir, key, &mut b);
        if done.send(Msg::Done(b)).is_err() {
            return;
        }
    }
}

/// Seals or opens `input` into `output`. Returns the plaintext bytes.
pub(crate) fn run<R: Read, W: Write>(
    dir: Direction,
    key: &PayloadKey,
    tuning: Tuning,
    input: &mut R,
    output: &mut W,
) -> Result<u64, StreamError> {
    let geo = Geometry::new(dir, &tuning);
    let key = key.aead();
    let mut first = geo.new_batch();
    fill(&geo, input, &mut first)?;
    if first.len < geo.full || tuning.workers == 0 {
        // One batch only (or asked to): no threads.
        return Pipeline::new(geo, key, None, 2).drive(first, input, output);
    }
    let depth = tuning.depth();
    let (job_tx, job_rx) = mpsc::sync_channel::<Batch>(depth);
    let job_rx = Mutex::new(job_rx);
    let jobs = &job_rx;
    let (done_tx, done_rx) = mpsc::channel::<Msg>();
    thread::scope(move |s| {
        let mut started = 0;
        for i in 0..tuning.workers {
            let done = done_tx.clone();
            let spawned = thread::Builder::new()
                .name(format!("kluis-stream-{i}"))
                .spawn_scoped(s, move || worker(dir, key, jobs, done));
            if spawned.is_err() {
                break;
            }
            started += 1;
        }
        drop(done_tx);
        let channels = (started > 0).then_some(Channels { jobs: job_tx, done: done_rx });
        // Returning drops the job sender, so the workers finish and the scope joins them.
        Pipeline::new(geo, key, channels, depth).drive(first, input, output)
    })
}

struct Channels {
    jobs: SyncSender<Batch>,
    done: Receiver<Msg>,
}

struct Pipeline<'k> {
    geo: Geometry,
    key: &'k LessSafeKey,
    /// `None`: process on the calling thread.
    channels: Option<Channels>,
    depth: usize,
    /// Processed batches waiting for their turn, at `seq % depth`.
    slots: Vec<Option<Batch>>,
    /// Free buffers.
    pool: Vec<Batch>,
    allocated: usize,
    next_seq: u64,
    next_write: u64,
    in_flight: usize,
    next_chunk: u64,
}

impl<'k> Pipeline<'k> {
    fn new(geo: Geometry, key: &'k LessSafeKey, channels: Option<Channels>, depth: usize) -> Self {
        let depth = depth.max(2);
        Self {
            geo,
            key,
            channels,
            depth,
            slots: (0..depth).map(|_| None).collect(),
            pool: Vec::with_capacity(depth),
            allocated: 1,
            next_seq: 0,
            next_write: 0,
            in_flight: 0,
            next_chunk: 0,
        }
    }

    fn drive<R: Read, W: Write>(mut self, first: Batch, input: &mut R, output: &mut W) -> Result<u64, StreamError> {
        let mut held: Option<Batch> = None;
        let mut eof = false;
        self.accept(first, &mut held, &mut eof)?;
        let mut total = 0u64;
        loop {
            // Read ahead while a buffer is free.
            while !eof && self.in_flight + usize::from(held.is_some()) < self.depth {
                let mut b = match self.pool.pop() {
                    Some(b) => b,
                    None => {
                        self.allocated += 1;
                        debug_assert!(self.allocated <= self.depth);
                        self.geo.new_batch()
                    }
                };
                fill(&self.geo, input, &mut b)?;
                self.accept(b, &mut held, &mut eof)?;
            }
            if self.in_flight == 0 {
                break;
            }
            // Write the oldest batch once it is done.
            let b = self.next_done()?;
            if b.out_len > 0 {
                output.write_all(&b.buf[..b.out_len]).map_err(StreamError::WriteOutput)?;
            }
            if let Some(f) = b.fault {
                return Err(match f {
                    Fault::Damaged => StreamError::Damaged,
                    Fault::Truncated => StreamError::Truncated,
                    Fault::Internal => StreamError::Internal("a chunk could not be sealed"),
                });
            }
            total += match self.geo.dir {
                Direction::Seal => b.len,
                Direction::Open => b.out_len,
            } as u64;
            self.in_flight -= 1;
            self.next_write += 1;
            self.pool.push(b);
        }
        Ok(total)
    }

    /// Takes a batch just read: decides, with the one held back, which is final.
    fn accept(&mut self, mut b: Batch, held: &mut Option<Batch>, eof: &mut bool) -> Result<(), StreamError> {
        if b.len == 0 {
            *eof = true;
            match held.take() {
                Some(h) => {
                    self.pool.push(b);
                    self.dispatch(h, true)
                }
                None => {
                    // Nothing at all: for seal one empty final chunk, for open an error.
                    b.first_chunk = self.next_chunk;
                    self.dispatch(b, true)
                }
            }
        } else {
            if let Some(h) = held.take() {
                self.dispatch(h, false)?;
            }
            b.first_chunk = self.next_chunk;
            self.next_chunk += self.geo.chunks as u64;
            if b.len < self.geo.full {
                *eof = true;
                self.dispatch(b, true)
            } else {
                *held = Some(b);
                Ok(())
            }
        }
    }

    fn dispatch(&mut self, mut b: Batch, last: bool) -> Result<(), StreamError> {
        b.last = last;
        b.seq = self.next_seq;
        self.next_seq += 1;
        self.in_flight += 1;
        match &self.channels {
            // Never blocks: the channel holds `depth` and fewer are in flight.
            Some(ch) => ch.jobs.send(b).map_err(|_| StreamError::Internal("the worker threads stopped")),
            None => {
                process(self.geo.dir, self.key, &mut b);
                let i = self.slot(b.seq);
                self.slots[i] = Some(b);
                Ok(())
            }
        }
    }

    fn slot(&self, seq: u64) -> usize {
        (seq % self.depth as u64) as usize
    }

    fn next_done(&mut self) -> Result<Batch, StreamError> {
        let want = self.slot(self.next_write);
        loop {
            if let Some(b) = self.slots[want].take() {
                return Ok(b);
            }
            let Some(ch) = &self.channels else {
                return Err(StreamError::Internal("a batch went missing"));
            };
            match ch.done.recv() {
                Ok(Msg::Done(b)) => {
                    let i = self.slot(b.seq);
                    self.slots[i] = Some(b);
                }
                Ok(Msg::WorkerDied) | Err(_) => return Err(StreamError::Internal("a worker thread died")),
            }
        }
    }
}
