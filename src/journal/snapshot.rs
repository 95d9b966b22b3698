//! Snapshots: every profile as of one revision, written atomically, and the compaction they
//! allow.
//!
//! A snapshot is `snapshot-<revision, 20 digits>.snap`: a header frame, then the profiles in
//! chunks, each frame checksummed. It is written to a temp file, synced, renamed and the
//! directory synced, so a crash leaves either no snapshot or a whole one; a failed write
//! removes its temp file, and recovery removes one a crash left.
//!
//! Which files are kept: recovery replays the journal after a snapshot, and that replay is what
//! rebuilds the watch history. So the snapshot recovery starts from must be older than the
//! history window (`--history-events`): compaction keeps the newest snapshot below the window
//! (the "base"), every newer snapshot, and every segment after the base; older files go.

use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};

use prost::Message;

use super::codec::{
    self, Frame, FrameFormat, HeaderError, ProfileBatch, ProfileRecord, SNAPSHOT_MAGIC,
    SnapshotHeader,
};
use super::{JournalError, numbered_files, segments, wire};
use crate::data_dir::sync_dir;
use crate::profile::Profile;
use crate::store::{Compacted, Store};

pub(super) const PREFIX: &str = "snapshot-";

/// Whether `name` is a snapshot's file, or the temporary file of one being written.
pub fn is_snapshot_file(name: &std::ffi::OsStr) -> bool {
    name.to_str().is_some_and(|name| name.starts_with(PREFIX))
}
const SUFFIX: &str = ".snap";
/// Profiles per frame, at most: a frame also ends once its profiles pass
/// [`codec::FRAME_SPLIT_BYTES`].
const CHUNK: usize = 1024;

/// The revision a snapshot's file name says, if `name` is one.
pub fn number(name: &str) -> Option<u64> {
    name.strip_prefix(PREFIX)?
        .strip_suffix(SUFFIX)?
        .parse()
        .ok()
}

fn path(dir: &Path, revision: u64) -> PathBuf {
    dir.join(format!("{PREFIX}{revision:020}{SUFFIX}"))
}

/// The snapshots in `dir`, by revision.
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, JournalError> {
    numbered_files(dir, PREFIX, SUFFIX)
}

/// The snapshot recovery starts from, given the journal's `segments` (first revision, path):
/// none when the journal starts at revision 1 (replaying it all rebuilds the longest history),
/// else the oldest one the journal continues from, or the newest one when there is no journal.
/// With `at_least` above 0, only a snapshot of that revision or later will do (recovery
/// passing damage that such a snapshot covers: `recovery::start_past`).
pub fn choose(
    dir: &Path,
    segments: &[(u64, PathBuf)],
    at_least: u64,
) -> Result<Option<(u64, PathBuf)>, JournalError> {
    let mut snapshots = list(dir)?;
    snapshots.retain(|(revision, _)| *revision >= at_least);
    let Some((first_segment, segment)) = segments.first() else {
        return Ok(snapshots.into_iter().next_back());
    };
    let first = *first_segment;
    if first <= 1 && at_least == 0 {
        return Ok(None);
    }
    if let Some(usable) = snapshots.iter().find(|(revision, _)| revision + 1 >= first) {
        return Ok(Some(usable.clone()));
    }
    // Compaction keeps the snapshot the oldest segment continues from: one whose revision is
    // at least first - 1 and below the next segment's first revision.
    let newest = match segments.get(1) {
        Some((next_first, _)) => (next_first - 1).to_string(),
        None => "the last one in it".into(),
    };
    let found = match snapshots.last() {
        None => String::new(),
        Some((_, path)) => format!(" ({} is too old)", path.display()),
    };
    Err(JournalError::MissingSnapshot {
        segment: segment.clone(),
        first,
        oldest: first - 1,
        newest,
        found,
    })
}

/// Renames the snapshot `path`, which must not be started from, to `<name><suffix>`
/// (`.damaged`: it could not be loaded): out of every later start's way (it is no longer
/// listed), and kept for whoever looks into it. Returns the new path.
pub fn set_aside(path: &Path, suffix: &str) -> Result<PathBuf, JournalError> {
    let mut aside = path.as_os_str().to_owned();
    aside.push(suffix);
    let aside = PathBuf::from(aside);
    fs::rename(path, &aside).map_err(JournalError::io(path, "rename (setting it aside)"))?;
    Ok(aside)
}

/// Suffix of a snapshot being written; renamed to `.snap` once whole and synced.
pub(super) const TEMP_SUFFIX: &str = ".snap.tmp";

/// Writes a snapshot of `profiles`, all as of `revision`, atomically. On failure the temporary
/// file is removed (a full disk still lets a file be removed; start-up removes one a crash
/// left), so a failing snapshot never eats the space the journal needs.
pub fn write(
    dir: &Path,
    revision: u64,
    profiles: &[Arc<Profile>],
) -> Result<PathBuf, JournalError> {
    write_as_of(dir, revision, 0, profiles)
}

/// [`write`], for a replica: the state is also as of `stream_sequence`, the last stream
/// sequence applied in it (recorded in the header; 0 for a single node).
pub fn write_as_of(
    dir: &Path,
    revision: u64,
    stream_sequence: u64,
    profiles: &[Arc<Profile>],
) -> Result<PathBuf, JournalError> {
    write_in_place(dir, revision, stream_sequence, profiles, &|| Ok(()))
}

/// [`write_as_of`], asking `in_place` before the file is created and again just before it is
/// renamed into place (a rename replaces a file of that name: one of a store restored into a
/// directory moved aside meanwhile).
fn write_in_place(
    dir: &Path,
    revision: u64,
    stream_sequence: u64,
    profiles: &[Arc<Profile>],
    in_place: InPlace<'_>,
) -> Result<PathBuf, JournalError> {
    in_place()?;
    let final_path = path(dir, revision);
    let temp = dir.join(format!("{PREFIX}{revision:020}{TEMP_SUFFIX}"));
    let header = SnapshotHeader {
        revision,
        profiles: profiles.len() as u64,
        stream_sequence,
    };
    let written = write_then_rename(dir, (&temp, &final_path), &header, profiles, in_place);
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written.map(|()| final_path)
}

fn write_then_rename(
    dir: &Path,
    (temp, final_path): (&Path, &Path),
    header: &SnapshotHeader,
    profiles: &[Arc<Profile>],
    in_place: InPlace<'_>,
) -> Result<(), JournalError> {
    let io = |action| JournalError::io(temp, action);
    let file = File::create(temp).map_err(io("create"))?;
    let mut out = BufWriter::new(file);
    encode(header, profiles, |bytes| out.write_all(bytes)).map_err(io("write"))?;
    let file = out
        .into_inner()
        .map_err(|error| io("write")(error.into_error()))?;
    file.sync_all().map_err(io("sync"))?;
    in_place()?;
    fs::rename(temp, final_path).map_err(io("rename"))?;
    sync_dir(dir).map_err(JournalError::io(dir, "sync directory"))
}

/// The bytes of a snapshot file of `profiles`, all as of `header.revision`, handed to `out` a
/// frame at a time (the file header with the first): what [`write`] writes, and what an online
/// backup streams. Stops at `out`'s first error.
pub fn encode(
    header: &SnapshotHeader,
    profiles: &[Arc<Profile>],
    mut out: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut frame = codec::file_header(SNAPSHOT_MAGIC, FrameFormat::SNAPSHOTS).to_vec();
    codec::encode_frame(header, &mut frame);
    out(&frame)?;
    let mut batch = ProfileBatch {
        profiles: Vec::with_capacity(CHUNK.min(profiles.len())),
    };
    let mut batch_bytes = 0;
    for profile in profiles {
        let record = ProfileRecord::new(profile);
        batch_bytes += record.encoded_len();
        batch.profiles.push(record);
        if batch.profiles.len() == CHUNK || batch_bytes >= codec::FRAME_SPLIT_BYTES {
            write_profiles(&mut batch, &mut frame, &mut out)?;
            batch_bytes = 0;
        }
    }
    if !batch.profiles.is_empty() {
        write_profiles(&mut batch, &mut frame, &mut out)?;
    }
    Ok(())
}

/// Hands `batch` to `out` as one frame (built in `frame`) and empties it.
fn write_profiles(
    batch: &mut ProfileBatch,
    frame: &mut Vec<u8>,
    out: &mut impl FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    frame.clear();
    codec::encode_frame(&*batch, frame);
    batch.profiles.clear();
    out(frame)
}

/// Copies the snapshot file `source` (as of `revision`, e.g. an online backup) into `dir` as
/// its snapshot, atomically like [`write`]: restoring a backup. The copy is a new file, made as
/// every other (`fs::copy` gave it the backup's permission bits: a backup readable by all made
/// a snapshot of every customer readable by all; found by an adversarial run).
pub fn install(dir: &Path, revision: u64, source: &Path) -> Result<PathBuf, JournalError> {
    let final_path = path(dir, revision);
    let temp = dir.join(format!("{PREFIX}{revision:020}{TEMP_SUFFIX}"));
    let installed = (|| {
        let mut from = File::open(source).map_err(JournalError::io(source, "open"))?;
        let mut file = File::create(&temp).map_err(JournalError::io(&temp, "create"))?;
        std::io::copy(&mut from, &mut file).map_err(JournalError::io(&temp, "copy"))?;
        file.sync_all().map_err(JournalError::io(&temp, "sync"))?;
        fs::rename(&temp, &final_path).map_err(JournalError::io(&temp, "rename"))?;
        sync_dir(dir).map_err(JournalError::io(dir, "sync directory"))
    })();
    if installed.is_err() {
        let _ = fs::remove_file(&temp);
    }
    installed.map(|()| final_path)
}

/// The header of the snapshot `path` (its first frame), without reading the profiles: what a
/// replica checks to choose the snapshot it starts from.
pub fn read_header(path: &Path) -> Result<SnapshotHeader, JournalError> {
    let corrupt = |offset: u64, reason: String| JournalError::DamagedSnapshot {
        path: path.to_owned(),
        offset,
        reason,
    };
    let mut file = BufReader::new(File::open(path).map_err(JournalError::io(path, "open"))?);
    let mut buffer = Vec::new();
    let format = read_file_header(path, &mut file, &mut buffer)?;
    let offset = codec::HEADER_LEN as u64;
    read_frame(&mut file, &mut buffer, format).map_err(JournalError::io(path, "read"))?;
    match codec::read_frame(&buffer, 0, format) {
        Frame::Valid { payload, .. } => {
            SnapshotHeader::decode(payload).map_err(|error| corrupt(offset, error.to_string()))
        }
        Frame::End => Err(corrupt(offset, "no header frame".into())),
        Frame::Invalid(invalid) => Err(corrupt(offset, invalid.reason().into())),
    }
}

/// Reads the snapshot `path` of `revision` through, checking its header, every frame's
/// checksums and that the frames hold as many profiles as the header says, without decoding
/// the profiles: what damage on disk breaks, at the cost of a read (compaction does this for
/// each new base, with the defaults once per snapshot; decoding it all as recovery does would
/// cost that much CPU again). Without the count, a snapshot cut at a frame's end passed, and
/// compaction removed the older files recovery then needed (adversary round 12, F3).
fn check_frames(path: &Path, revision: u64) -> Result<(), JournalError> {
    let file = File::open(path).map_err(JournalError::io(path, "open"))?;
    let mut frames = Frames::open(path, BufReader::new(file))?;
    let header = frames.header()?;
    if header.revision != revision {
        let reason = format!("its header says revision {}", header.revision);
        return Err(frames.corrupt(codec::HEADER_LEN as u64, reason));
    }
    let (mut buffer, mut profiles, mut end) = (Vec::new(), 0u64, 0);
    while let Some((_, offset)) = frames.next(&mut buffer)? {
        end = offset;
        match codec::read_frame(&buffer, 0, frames.format) {
            Frame::Invalid(invalid) => return Err(frames.corrupt(offset, invalid.reason().into())),
            Frame::Valid { payload, .. } => {
                profiles += wire::batch_len(payload)
                    .map_err(|error| frames.corrupt(offset, error.to_string()))?;
            }
            Frame::End => break,
        }
    }
    if profiles != header.profiles {
        let reason = format!("{profiles} profiles, header says {}", header.profiles);
        return Err(frames.corrupt(end, reason));
    }
    Ok(())
}

/// Chunks of decoded profiles in flight between the decoding threads and the loader: enough to
/// keep them all busy, few enough that they hold little memory.
const CHUNKS_IN_FLIGHT: usize = 4;

/// The most profiles a snapshot's header may make the loader reserve room for up front.
const MAX_RESERVE: usize = 1 << 26;

/// Reads a whole snapshot and hands its profiles, chunk by chunk and in file order, to `load`;
/// any damage is an error (snapshots are never torn). `load` is also given how many profiles the
/// header says the snapshot holds (for sizing; the count is checked once all are decoded).
/// Returns the snapshot's revision.
///
/// Decoding runs on two threads while `load` runs on this one: recovery time is start-up
/// time, and a loader alone inserts faster than one thread decodes, so a second decoder uses
/// the core the loader leaves idle. The file is read one frame at a time (under a lock, in
/// order) into each decoder's reused buffer rather than whole: a snapshot of a million profiles
/// is hundreds of megabytes, and fresh pages for all of them cost more than reading them. When
/// the snapshot turns out damaged, `load` has seen chunks before the damage; the caller must
/// then discard what it loaded (recovery stops with the error).
pub fn read(
    path: &Path,
    load: impl FnOnce(usize, &mut dyn Iterator<Item = Vec<Profile>>),
) -> Result<u64, JournalError> {
    let file = File::open(path).map_err(JournalError::io(path, "open"))?;
    let mut frames = Frames::open(path, BufReader::new(file))?;
    let header = frames.header()?;
    let expected = usize::try_from(header.profiles).unwrap_or(usize::MAX);
    let frames = std::sync::Mutex::new(frames);
    let (chunks, received) = std::sync::mpsc::sync_channel(CHUNKS_IN_FLIGHT);
    let decoded = std::thread::scope(|scope| {
        let decoders: Vec<_> = (0..DECODERS)
            .map(|_| {
                let chunks = chunks.clone();
                scope.spawn(|| decode(&frames, chunks))
            })
            .collect();
        drop(chunks);
        // The header's count only sizes the store: a damaged one is refused below, once the
        // profiles are counted, and must not reserve unbounded memory first.
        load(expected.min(MAX_RESERVE), &mut InOrder::new(received));
        let mut count = 0u64;
        let mut first_error: Option<(u64, JournalError)> = None;
        for decoder in decoders {
            match decoder
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            {
                Ok(decoded) => count += decoded,
                // The damage nearest the start is the one to report.
                Err((offset, error)) => {
                    if first_error
                        .as_ref()
                        .is_none_or(|(first, _)| offset < *first)
                    {
                        first_error = Some((offset, error));
                    }
                }
            }
        }
        match first_error {
            Some((_, error)) => Err(error),
            None => Ok(count),
        }
    })?;
    if header.profiles != decoded {
        let offset = frames
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
            .offset;
        return Err(JournalError::DamagedSnapshot {
            path: path.to_owned(),
            offset,
            reason: format!("{decoded} profiles, header says {}", header.profiles),
        });
    }
    Ok(header.revision)
}

/// Threads decoding a snapshot's frames beside the loader.
const DECODERS: usize = 2;

/// A snapshot file read frame by frame, in order, by whichever decoder asks next.
struct Frames<'a, R> {
    path: &'a Path,
    file: R,
    format: FrameFormat,
    /// Where the next frame starts.
    offset: u64,
    /// How many profile frames were handed out: the next one's place in the file's order.
    handed_out: usize,
    /// Set by a decoder that found damage: the others stop at their next frame rather than
    /// read the rest of a damaged file.
    stopped: bool,
}

impl<'a, R: Read> Frames<'a, R> {
    /// Opens `file` (at `path`) after checking its file header.
    fn open(path: &'a Path, mut file: R) -> Result<Self, JournalError> {
        let mut buffer = Vec::new();
        let format = read_file_header(path, &mut file, &mut buffer)?;
        Ok(Frames {
            path,
            file,
            format,
            offset: codec::HEADER_LEN as u64,
            handed_out: 0,
            stopped: false,
        })
    }

    fn corrupt(&self, offset: u64, reason: String) -> JournalError {
        JournalError::DamagedSnapshot {
            path: self.path.to_owned(),
            offset,
            reason,
        }
    }

    /// The header frame (the first).
    fn header(&mut self) -> Result<SnapshotHeader, JournalError> {
        let mut buffer = Vec::new();
        let offset = self.offset;
        match self.next(&mut buffer)? {
            None => Err(self.corrupt(offset, "no header frame".into())),
            Some((_, offset)) => {
                let header = match codec::read_frame(&buffer, 0, self.format) {
                    Frame::Valid { payload, .. } => SnapshotHeader::decode(payload)
                        .map_err(|error| self.corrupt(offset, error.to_string())),
                    Frame::End => Err(self.corrupt(offset, "no header frame".into())),
                    Frame::Invalid(invalid) => Err(self.corrupt(offset, invalid.reason().into())),
                };
                // The header frame is not one of the profile frames counted by `handed_out`.
                self.handed_out = 0;
                header
            }
        }
    }

    /// Reads the next frame into `buffer`: its place among the frames and its offset; `None`
    /// at the end of the file. The frame is checked by whoever decodes it.
    fn next(&mut self, buffer: &mut Vec<u8>) -> Result<Option<(usize, u64)>, JournalError> {
        if self.stopped {
            return Ok(None);
        }
        read_frame(&mut self.file, buffer, self.format)
            .map_err(JournalError::io(self.path, "read"))?;
        if buffer.is_empty() {
            return Ok(None);
        }
        let (index, offset) = (self.handed_out, self.offset);
        self.handed_out += 1;
        self.offset += buffer.len() as u64;
        Ok(Some((index, offset)))
    }
}

/// One decoder: takes the next frame while there is one, decodes it and sends its profiles,
/// tagged with the frame's place. Returns how many profiles it decoded; on damage, the frame's
/// offset and the error. Stops early when the loader is gone.
fn decode<R: Read>(
    frames: &std::sync::Mutex<Frames<'_, R>>,
    chunks: std::sync::mpsc::SyncSender<(usize, Vec<Profile>)>,
) -> Result<u64, (u64, JournalError)> {
    let mut buffer = Vec::new();
    let mut count = 0u64;
    // The account of the last profile decoded: runs of one account share one `client_id`.
    let mut account = None;
    loop {
        let (path, format, next) = {
            let mut frames = frames.lock().unwrap_or_else(PoisonError::into_inner);
            let next = frames.next(&mut buffer);
            (frames.path, frames.format, next)
        };
        let corrupt = |offset: u64, reason: String| {
            frames
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .stopped = true;
            let error = JournalError::DamagedSnapshot {
                path: path.to_owned(),
                offset,
                reason,
            };
            (offset, error)
        };
        let Some((index, offset)) = next.map_err(|error| (u64::MAX, error))? else {
            return Ok(count);
        };
        match codec::read_frame(&buffer, 0, format) {
            Frame::End => return Ok(count),
            Frame::Invalid(invalid) => return Err(corrupt(offset, invalid.reason().into())),
            Frame::Valid { payload, .. } => {
                let mut profiles = Vec::with_capacity(CHUNK);
                wire::decode_batch(payload, &mut account, &mut profiles)
                    .map_err(|error| corrupt(offset, error.to_string()))?;
                count += profiles.len() as u64;
                if chunks.send((index, profiles)).is_err() {
                    // The loader stopped early; it reports its own reason.
                    return Err(corrupt(offset, "the loader stopped reading".into()));
                }
            }
        }
    }
}

/// The decoders' chunks back in file order: a chunk that arrives before its predecessors waits.
struct InOrder {
    received: std::sync::mpsc::Receiver<(usize, Vec<Profile>)>,
    waiting: std::collections::BTreeMap<usize, Vec<Profile>>,
    next: usize,
}

impl InOrder {
    fn new(received: std::sync::mpsc::Receiver<(usize, Vec<Profile>)>) -> Self {
        InOrder {
            received,
            waiting: std::collections::BTreeMap::new(),
            next: 0,
        }
    }
}

impl Iterator for InOrder {
    type Item = Vec<Profile>;

    fn next(&mut self) -> Option<Vec<Profile>> {
        loop {
            if let Some(chunk) = self.waiting.remove(&self.next) {
                self.next += 1;
                return Some(chunk);
            }
            // Every decoder gone with a chunk missing: a decoder stopped at damage, and the
            // error says so; what waits after the gap is not loaded.
            let (index, chunk) = self.received.recv().ok()?;
            self.waiting.insert(index, chunk);
        }
    }
}

/// Reads and checks the snapshot file header of `file` (at `path`); the frame format it names.
fn read_file_header(
    path: &Path,
    file: &mut impl Read,
    buffer: &mut Vec<u8>,
) -> Result<FrameFormat, JournalError> {
    read_up_to(file, buffer, codec::HEADER_LEN).map_err(JournalError::io(path, "read"))?;
    match codec::check_header(buffer, SNAPSHOT_MAGIC) {
        Ok(format) => Ok(format),
        Err(error @ HeaderError::UnknownVersion { .. }) => Err(JournalError::Format {
            path: path.to_owned(),
            reason: format!("not a snapshot this build reads: {error}"),
        }),
        Err(error) => Err(JournalError::DamagedSnapshot {
            path: path.to_owned(),
            offset: 0,
            reason: error.to_string(),
        }),
    }
}

/// Reads the next frame of `file` (header, payload) into `buffer`, for [`codec::read_frame`]
/// to check at offset 0: empty at the end of the file, shorter than the frame claims when the
/// file ends inside it, just the frame header when its length cannot be believed
/// ([`codec::believed_len`]); `read_frame` then rejects the frame.
fn read_frame(
    file: &mut impl Read,
    buffer: &mut Vec<u8>,
    format: FrameFormat,
) -> std::io::Result<()> {
    read_up_to(file, buffer, format.overhead())?;
    if buffer.len() < format.overhead() {
        return Ok(());
    }
    if let Some(len) = codec::believed_len(buffer, format) {
        file.by_ref().take(len as u64).read_to_end(buffer)?;
    }
    Ok(())
}

/// Replaces `buffer`'s content with the next `len` bytes of `file`, or fewer at its end.
fn read_up_to(file: &mut impl Read, buffer: &mut Vec<u8>, len: usize) -> std::io::Result<()> {
    buffer.clear();
    file.by_ref().take(len as u64).read_to_end(buffer)?;
    Ok(())
}

/// What a snapshot and compaction did.
#[derive(Debug)]
pub struct Taken {
    /// The snapshot's revision.
    pub revision: u64,
    /// How many profiles it holds.
    pub profiles: usize,
    /// The snapshot file.
    pub path: PathBuf,
    /// Files removed by compaction.
    pub removed: Vec<PathBuf>,
}

/// [`take_in_place`] of a directory nothing can take away: for tests only, so that no server
/// path takes a snapshot without asking.
#[cfg(test)]
pub(crate) fn take(dir: &Path, store: &Store, history_events: u64) -> Result<Taken, JournalError> {
    take_in_place(dir, store, history_events, &|| Ok(()))
}

/// Whether the directory is still the server's to write in (`crate::journal::in_place`).
pub type InPlace<'a> = &'a dyn Fn() -> Result<(), JournalError>;

/// Takes a snapshot of `store` as of its current revision while writes go on, then compacts;
/// runs on a blocking thread. Asks `in_place` before the file is created and again before it is renamed
/// into place, so before compaction too: the state is read first, which takes seconds at a
/// million profiles, and a directory moved aside meanwhile (for a restore into its path) got
/// the old store's snapshot, and its compaction, in the new one (adversary round 13).
pub fn take_in_place(
    dir: &Path,
    store: &Store,
    history_events: u64,
    in_place: InPlace<'_>,
) -> Result<Taken, JournalError> {
    let (revision, profiles) = consistent_state(store, None)?;
    let path = write_in_place(dir, revision, 0, &profiles, in_place)?;
    let removed = compact_or_keep(dir, revision, history_events);
    Ok(Taken {
        revision,
        profiles: profiles.len(),
        path,
        removed,
    })
}

/// [`compact`], for after a snapshot was written: the snapshot stands when compaction fails
/// (a damaged base, a file that cannot be removed), which is logged, and nothing more is
/// removed until a later compaction succeeds.
fn compact_or_keep(dir: &Path, current_revision: u64, history_events: u64) -> Vec<PathBuf> {
    compact(dir, current_revision, history_events).unwrap_or_else(|error| {
        tracing::error!(
            %error,
            "compaction removed nothing (recovery starts from an older snapshot, and the \
             journal grows until this is mended); the next snapshot tries again"
        );
        Vec::new()
    })
}

/// A replica's snapshot: `store` as of `revision`, the state its last applied stream sequence
/// `stream_sequence` left (a published revision, at most the current one), then compaction as
/// for a single node. Runs on a blocking thread while the replica keeps applying.
pub fn take_as_of(
    dir: &Path,
    store: &Store,
    (revision, stream_sequence): (u64, u64),
    history_events: u64,
    in_place: InPlace<'_>,
) -> Result<Taken, JournalError> {
    let (revision, profiles) = consistent_state(store, Some(revision))?;
    let path = write_in_place(dir, revision, stream_sequence, &profiles, in_place)?;
    let removed = compact_or_keep(dir, store.revision(), history_events);
    Ok(Taken {
        revision,
        profiles: profiles.len(),
        path,
        removed,
    })
}

/// Every profile as of one revision (`as_of`, else the current one), read while writes go on
/// (snapshots, online backups). Retries when the history moved on during the read.
pub fn consistent_state(
    store: &Store,
    as_of: Option<u64>,
) -> Result<(u64, Vec<Arc<Profile>>), JournalError> {
    for _ in 0..3 {
        let mut scan = match as_of {
            Some(revision) => store.scan_as_of_revision(None, revision),
            None => store.scan_as_of(None),
        };
        let mut profiles = Vec::with_capacity(store.len());
        loop {
            let chunk = scan.next_chunk(store, 4096, |_| true);
            if chunk.is_empty() {
                break;
            }
            profiles.extend(chunk);
        }
        match scan.resolve_newer(store) {
            Ok(newer) => {
                profiles.extend(newer);
                return Ok((scan.as_of, profiles));
            }
            Err(Compacted { .. }) => continue,
        }
    }
    Err(JournalError::Format {
        path: PathBuf::from("snapshot"),
        reason: "writes outpaced the history three times while reading the state; the next \
                 snapshot will try again"
            .into(),
    })
}

/// Removes snapshots and segments no recovery needs, given the current revision: keeps the
/// newest snapshot below the history window (the base), newer snapshots, and segments after
/// the base. Never removes the newest segment.
///
/// Before anything older than the base goes, the base is read through ([`check_frames`]: its
/// header's revision and every frame's checksum): recovery will start from it, and it may have been damaged on disk since it was written (recovery only reads the
/// oldest snapshot the journal continues from, so nothing else would notice). A damaged base
/// is an error and nothing is removed: the older base and its segments still recover every
/// acknowledged update.
pub fn compact(
    dir: &Path,
    current_revision: u64,
    history_events: u64,
) -> Result<Vec<PathBuf>, JournalError> {
    let window_start = current_revision.saturating_sub(history_events) + 1;
    let snapshots = list(dir)?;
    let Some(base) = snapshots
        .iter()
        .map(|(revision, _)| *revision)
        .filter(|revision| *revision < window_start)
        .max()
    else {
        return Ok(Vec::new());
    };
    let segments = segments(dir)?;
    // Segments first: a crash between the two steps leaves an extra old snapshot, which
    // recovery skips because the journal no longer continues from it.
    let old_segments = segments
        .windows(2)
        .filter(|pair| pair[1].0 <= base + 1)
        .map(|pair| pair[0].1.clone());
    let old_snapshots = snapshots
        .iter()
        .filter(|(revision, _)| *revision < base)
        .map(|(_, path)| path.clone());
    let doomed: Vec<PathBuf> = old_segments.chain(old_snapshots).collect();
    if doomed.is_empty() {
        return Ok(doomed);
    }
    check_frames(&path(dir, base), base)?;
    let mut removed = Vec::new();
    for path in doomed {
        fs::remove_file(&path).map_err(JournalError::io(&path, "remove"))?;
        removed.push(path);
    }
    if !removed.is_empty() {
        sync_dir(dir).map_err(JournalError::io(dir, "sync directory"))?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests;
