use super::*;
use crate::profile::{Field, ProfileKey, ProfileUpdate, Scalar};

fn profiles(count: usize) -> Vec<Arc<Profile>> {
    (0..count)
        .map(|i| {
            let fields = vec![
                (Field::GbCustomerId, Some(Scalar::Int(i as i64))),
                (Field::TierName, Some(Scalar::Text("gold".into()))),
            ];
            profile(i, format!("customer-{i:05}"), fields)
        })
        .collect()
}

/// Customer `customer_id`'s profile with `fields` set, the `i`th change of the store.
fn profile(i: usize, customer_id: String, fields: Vec<(Field, Option<Scalar>)>) -> Arc<Profile> {
    let key = ProfileKey::new("2155", customer_id);
    let mut profile = Profile::empty(key.clone());
    profile.merge(&ProfileUpdate {
        key,
        at: chrono::DateTime::from_timestamp(1_700_000_000 + i as i64, 0).unwrap(),
        fields,
        extras: vec![],
        origin: crate::profile::Origin::Webhook,
    });
    profile.revision = i as u64 + 1;
    profile.create_revision = i as u64 + 1;
    profile.version = 1;
    Arc::new(profile)
}

/// Reads `path`, returning what the loader saw (chunk sizes, profiles) and the outcome.
fn read_all(path: &Path) -> (Vec<usize>, Vec<Profile>, Result<u64, JournalError>) {
    let mut sizes = Vec::new();
    let mut loaded = Vec::new();
    let outcome = read(path, |_, chunks| {
        for chunk in chunks {
            sizes.push(chunk.len());
            loaded.extend(chunk);
        }
    });
    (sizes, loaded, outcome)
}

/// The bytes of a snapshot file as of `revision` in `format` holding `batches` of records, a
/// frame each (what `write` writes, with records a test chooses), and where the first batch's
/// frame starts.
fn snapshot_file(
    format: FrameFormat,
    revision: u64,
    batches: Vec<Vec<ProfileRecord>>,
) -> (Vec<u8>, u64) {
    let mut file = codec::file_header(SNAPSHOT_MAGIC, format).to_vec();
    let header = SnapshotHeader {
        revision,
        profiles: batches.iter().map(Vec::len).sum::<usize>() as u64,
        stream_sequence: 0,
    };
    codec::encode_frame(&header, &mut file);
    let first_batch = file.len() as u64;
    for profiles in batches {
        codec::encode_frame(&ProfileBatch { profiles }, &mut file);
    }
    (file, first_batch)
}

/// The file, offset and reason of a damaged snapshot; any other outcome fails the test.
fn damage(outcome: Result<u64, JournalError>) -> (PathBuf, u64, String) {
    match outcome {
        Err(JournalError::DamagedSnapshot {
            path,
            offset,
            reason,
        }) => (path, offset, reason),
        other => panic!("expected DamagedSnapshot, got {other:?}"),
    }
}

#[test]
fn a_snapshot_reads_back_every_profile_chunk_by_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let written = profiles(2 * CHUNK + 10);
    let path = write(dir.path(), 2 * CHUNK as u64 + 10, &written).unwrap();
    let (sizes, loaded, outcome) = read_all(&path);
    assert_eq!(outcome.unwrap(), 2 * CHUNK as u64 + 10);
    assert_eq!(sizes, vec![CHUNK, CHUNK, 10]);
    assert_eq!(loaded.len(), written.len());
    for (loaded, written) in loaded.iter().zip(&written) {
        assert_eq!(loaded, &**written);
    }
}

/// Profiles of a megabyte each (a text field of 1 MiB, as a body under a raised
/// `--max-body-bytes` can set) fill a frame long before 1,024 of them do: the frame is closed
/// at `FRAME_SPLIT_BYTES`, so no frame approaches `MAX_FRAME`, which every reader refuses as
/// damage (1,024 profiles of 300 KB made a 307 MB frame: found by an adversarial run).
#[test]
fn large_profiles_are_split_into_frames_by_bytes_and_read_back_whole() {
    let dir = tempfile::tempdir().unwrap();
    let large = |i: usize| {
        let email = format!("{i:03}").repeat(350_000);
        let fields = vec![(Field::Email, Some(Scalar::Text(email.into())))];
        profile(i, format!("large-{i:03}"), fields)
    };
    let written: Vec<_> = (0..40).map(large).collect();
    let path = write(dir.path(), 40, &written).unwrap();

    let bytes = fs::read(&path).unwrap();
    let mut offset = codec::HEADER_LEN;
    let mut payloads = Vec::new();
    while let Frame::Valid { payload, next } = codec::read_frame(&bytes, offset, FrameFormat::V3) {
        payloads.push(payload.len());
        offset = next;
    }
    assert_eq!(offset, bytes.len(), "every frame valid");
    // The header's frame, then the profiles' frames: 32 of a megabyte fill one.
    assert_eq!(payloads.len(), 3, "{payloads:?}");
    assert!(
        payloads[1..]
            .iter()
            .all(|len| *len <= codec::FRAME_SPLIT_BYTES + 1_100_000),
        "{payloads:?}"
    );
    let (sizes, loaded, outcome) = read_all(&path);
    assert_eq!(outcome.unwrap(), 40);
    assert_eq!(sizes, [32, 8]);
    let written: Vec<Profile> = written.iter().map(|p| (**p).clone()).collect();
    assert!(
        loaded == written,
        "the profiles read back are those written"
    );
}

#[test]
fn snapshots_are_written_in_format_3_and_those_of_format_2_still_load() {
    let dir = tempfile::tempdir().unwrap();
    let written = profiles(CHUNK + 3);
    let path = write(dir.path(), CHUNK as u64 + 3, &written).unwrap();
    let bytes = fs::read(&path).unwrap();
    assert_eq!(
        codec::check_header(&bytes, SNAPSHOT_MAGIC),
        Ok(FrameFormat::V3)
    );
    // A format 2 snapshot of the same profiles, as earlier builds wrote it.
    let old = dir.path().join("format-2.snap");
    let batches = written.chunks(CHUNK).map(|chunk| {
        let records = chunk
            .iter()
            .map(|profile| ProfileRecord::with_field_records(profile));
        records.collect()
    });
    let (file, _) = snapshot_file(FrameFormat::V2, CHUNK as u64 + 3, batches.collect());
    fs::write(&old, &file).unwrap();
    // The packed registers take less room than a record per field.
    assert!(
        bytes.len() < file.len(),
        "{} vs {}",
        bytes.len(),
        file.len()
    );
    for path in [&path, &old] {
        let (_, loaded, outcome) = read_all(path);
        assert_eq!(outcome.unwrap(), CHUNK as u64 + 3);
        let written: Vec<Profile> = written.iter().map(|profile| (**profile).clone()).collect();
        assert_eq!(loaded, written, "{}", path.display());
    }
}

#[test]
fn many_frames_decoded_by_two_threads_load_in_file_order() {
    let dir = tempfile::tempdir().unwrap();
    let count = 20 * CHUNK + 7;
    let written = profiles(count);
    let path = write(dir.path(), count as u64, &written).unwrap();
    for _ in 0..5 {
        let (sizes, loaded, outcome) = read_all(&path);
        assert_eq!(outcome.unwrap(), count as u64);
        assert_eq!(sizes.len(), 21);
        assert_eq!(loaded.len(), count);
        for (loaded, written) in loaded.iter().zip(&written) {
            assert_eq!(loaded, &**written);
        }
    }
}

/// Where frame `n` of a snapshot just written starts (frame 0 is the header frame).
fn frame_start(bytes: &[u8], n: usize) -> usize {
    (0..n).fold(codec::HEADER_LEN, |offset, _| {
        match codec::read_frame(bytes, offset, FrameFormat::CURRENT) {
            Frame::Valid { next, .. } => next,
            _ => unreachable!("the frames of a snapshot just written are valid"),
        }
    })
}

#[test]
fn damage_early_in_a_long_snapshot_stops_both_decoders_and_loads_nothing_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), 30 * CHUNK as u64, &profiles(30 * CHUNK)).unwrap();
    let mut bytes = fs::read(&path).unwrap();
    // The header frame, then two profile frames: damage the third profile frame.
    let offset = frame_start(&bytes, 3);
    bytes[offset + FrameFormat::CURRENT.overhead() + 5] ^= 0x10;
    fs::write(&path, &bytes).unwrap();
    let (sizes, _, outcome) = read_all(&path);
    match outcome {
        Err(JournalError::DamagedSnapshot { offset: at, .. }) => assert_eq!(at, offset as u64),
        other => panic!("expected DamagedSnapshot, got {other:?}"),
    }
    assert_eq!(
        sizes,
        vec![CHUNK, CHUNK],
        "only the frames before the damage"
    );
}

#[test]
fn damage_in_a_later_frame_is_an_error_naming_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), 2 * CHUNK as u64, &profiles(2 * CHUNK)).unwrap();
    let mut bytes = fs::read(&path).unwrap();
    // Find the second profile frame by walking the frames, then damage its payload.
    let second = frame_start(&bytes, 2);
    bytes[second + FrameFormat::CURRENT.overhead() + 3] ^= 0x01;
    fs::write(&path, &bytes).unwrap();
    let (sizes, _, outcome) = read_all(&path);
    let (at, offset, reason) = damage(outcome);
    assert_eq!(at, path);
    assert_eq!(offset, second as u64);
    assert_eq!(reason, "checksum mismatch");
    // The loader saw only what came before the damage (the caller discards it).
    assert_eq!(sizes, vec![CHUNK]);
}

#[test]
fn a_snapshot_cut_short_is_an_error_not_a_smaller_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), 10, &profiles(10)).unwrap();
    let bytes = fs::read(&path).unwrap();
    let header_frame = frame_start(&bytes, 1);
    fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    let (sizes, _, outcome) = read_all(&path);
    match outcome {
        Err(JournalError::DamagedSnapshot { offset, reason, .. }) => {
            assert_eq!(offset, header_frame as u64);
            assert_eq!(reason, "frame cut off");
        }
        other => panic!("expected DamagedSnapshot, got {other:?}"),
    }
    assert!(sizes.is_empty());
}

#[test]
fn a_snapshot_that_fails_leaves_no_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    // The final name is taken by a directory, so the rename (the last step) fails.
    fs::create_dir(path(dir.path(), 10)).unwrap();
    let error = write(dir.path(), 10, &profiles(10)).unwrap_err();
    assert!(error.to_string().contains("rename"), "{error}");
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        ["snapshot-00000000000000000010.snap"],
        "only the directory"
    );
}

#[test]
fn a_file_that_is_not_a_snapshot_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snapshot-00000000000000000001.snap");
    fs::write(&path, b"not a snapshot at all, just some bytes").unwrap();
    let (sizes, _, outcome) = read_all(&path);
    assert!(
        matches!(&outcome, Err(JournalError::DamagedSnapshot { path: at, .. }) if *at == path),
        "got {outcome:?}"
    );
    assert!(sizes.is_empty());
}

#[test]
fn packed_registers_no_profile_packs_to_are_refused_naming_the_file_and_frame() {
    // Checksums protect against flipped bits, not against a writer's bug or a crafted file:
    // the registers' bytes are checked too, and a bad profile refuses the snapshot.
    let dir = tempfile::tempdir().unwrap();
    let written = profiles(3);
    let path = write(dir.path(), 3, &written).unwrap();
    let mut records: Vec<ProfileRecord> = written.iter().map(|p| ProfileRecord::new(p)).collect();
    // Two clocks alike: unpacking would work, but it is not what the packer writes.
    let packed = &mut records[1].packed_registers;
    let clock = packed[7..19].to_vec();
    packed[6] = 2;
    packed.splice(19..19, clock);
    let (file, frame_at) = snapshot_file(FrameFormat::SNAPSHOTS, 3, vec![records]);
    fs::write(&path, &file).unwrap();
    let (_, _, outcome) = read_all(&path);
    assert_eq!(
        damage(outcome),
        (
            path,
            frame_at,
            "malformed record: packed registers that no profile packs to".into()
        )
    );
}

/// Compaction reads the snapshot that becomes the base before removing what is older: a base
/// damaged on disk since it was written is an error, and the older snapshot (with the segments
/// after it) stays for recovery. (It used to be trusted unread; recovery then refused the
/// directory although the files removed could have recovered every update.)
#[test]
fn compaction_keeps_the_older_files_when_the_new_base_is_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let older = write(dir.path(), 10, &profiles(10)).unwrap();
    let base = write(dir.path(), 20, &profiles(20)).unwrap();
    let intact = fs::read(&base).unwrap();
    let mut damaged = intact.clone();
    let last = damaged.len() - 3;
    damaged[last] ^= 0x10;
    fs::write(&base, &damaged).unwrap();

    let (at, _, reason) = damage(compact(dir.path(), 100, 50).map(|_| 0));
    assert_eq!(at, base);
    assert_eq!(reason, "checksum mismatch");
    assert!(older.exists(), "the older snapshot stays");

    fs::write(&base, &intact).unwrap();
    assert_eq!(compact(dir.path(), 100, 50).unwrap(), vec![older.clone()]);
    assert!(!older.exists());
    assert!(
        compact(dir.path(), 100, 50).unwrap().is_empty(),
        "nothing left to remove"
    );

    // A whole snapshot under another revision's name is no base either.
    let renamed = path(dir.path(), 30);
    fs::write(&renamed, &intact).unwrap();
    let (at, _, reason) = damage(compact(dir.path(), 100, 50).map(|_| 0));
    assert_eq!(
        (at, reason),
        (renamed, "its header says revision 20".into())
    );
    assert!(base.exists());
}

/// A new base cut at the end of a frame, every frame present whole, is no base: its frames
/// hold fewer profiles than its header says, as recovery's read finds. Compaction trusted it
/// and removed the older snapshot recovery then needed (adversary round 12, F3).
#[test]
fn compaction_keeps_the_older_files_when_the_new_base_is_cut_at_a_frame() {
    let dir = tempfile::tempdir().unwrap();
    let older = write(dir.path(), 10, &profiles(10)).unwrap();
    let base = write(dir.path(), 3000, &profiles(3000)).unwrap();
    let intact = fs::read(&base).unwrap();
    // The header frame, then the first of three chunks of profiles.
    fs::write(&base, &intact[..frame_start(&intact, 2)]).unwrap();

    let (at, _, reason) = damage(compact(dir.path(), 5000, 50).map(|_| 0));
    assert_eq!(at, base);
    assert_eq!(reason, format!("{CHUNK} profiles, header says 3000"));
    assert!(older.exists(), "the older snapshot stays");
    let (_, _, read) = read_all(&base);
    assert!(read.is_err(), "recovery refuses it too");

    fs::write(&base, &intact).unwrap();
    assert_eq!(compact(dir.path(), 5000, 50).unwrap(), vec![older]);
}
