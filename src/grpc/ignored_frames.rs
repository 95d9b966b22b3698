//! HTTP/2 frames a client sends that the server reads and does nothing with, counted off the
//! frame headers as a gRPC connection's bytes are read, and held to a rate.
//!
//! PRIORITY frames (HTTP/2's priority scheme, which RFC 9113 deprecated and h2 ignores) and
//! frames of types HTTP/2 does not define (which a receiver must ignore) cost the server a
//! frame's parsing each and nothing more: one connection sending nothing else kept a core busy
//! (54-110 million frames in 10 s) and was never cut, where h2 limits floods of PING,
//! SETTINGS and empty DATA itself (found by an adversarial run). nginx and Envoy limit such
//! frames too. A client may send some: a few frame types extend HTTP/2 (RFC 9218's
//! PRIORITY_UPDATE, one per request), so a connection has a generous allowance, refilled with
//! time ([`BURST`], [`PER_SECOND`]).
//!
//! What this does not do: check frames (h2 does), or cut the connection (the caller does, when
//! [`IgnoredFrames::read`] says the allowance is spent). It relies on seeing every byte the
//! client sends, in order, from the first: the client preface, then frames (TLS is below it).
//! A connection that does not start with the preface (HTTP/1.1, on the webhook listener) is
//! not HTTP/2, and nothing more of it is looked at.

use std::time::Instant;

/// The client's connection preface (RFC 9113, 3.4), before its first frame.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The length of an HTTP/2 frame header: 24-bit length, type, flags, 31-bit stream id.
const HEADER: usize = 9;
/// PRIORITY's type; the types HTTP/2 defines are DATA (0x0) to CONTINUATION (0x9).
const PRIORITY: u8 = 0x2;
const LAST_DEFINED: u8 = 0x9;

/// What the log says of a connection cut for them (a WARN, with its listener).
pub const CUT: &str = "cut an HTTP/2 connection whose client sent more PRIORITY frames, or \
                       frames of types HTTP/2 does not define, than it may: the server reads \
                       and ignores them";

/// How many ignored frames a connection may send at once.
pub const BURST: u32 = 10_000;
/// How many more it may send each second.
pub const PER_SECOND: u32 = 1_000;

/// Where a connection's read bytes are in their frames, and what is left of its allowance.
#[derive(Debug)]
pub struct IgnoredFrames {
    /// How much of the preface has been read; `None` once the connection turned out not to
    /// start with it.
    preface_read: Option<usize>,
    header: [u8; HEADER],
    header_read: usize,
    payload_left: usize,
    /// The frames it may still send, as of `refilled`.
    allowance: f64,
    refilled: Option<Instant>,
}

impl Default for IgnoredFrames {
    fn default() -> Self {
        IgnoredFrames {
            preface_read: Some(0),
            header: [0; HEADER],
            header_read: 0,
            payload_left: 0,
            allowance: f64::from(BURST),
            refilled: None,
        }
    }
}

impl IgnoredFrames {
    /// Takes the next bytes read from the client; `false` once the frames it ignores are past
    /// its allowance (the connection should go).
    pub fn read(&mut self, read: &[u8]) -> bool {
        let ignored = self.scan(read);
        if ignored == 0 {
            return true;
        }
        self.spend(ignored, Instant::now())
    }

    /// Spends `frames` of the allowance at `now`, refilled first for the time since the last.
    fn spend(&mut self, frames: u32, now: Instant) -> bool {
        let elapsed = self.refilled.map_or(0.0, |then| (now - then).as_secs_f64());
        self.refilled = Some(now);
        let refill = elapsed * f64::from(PER_SECOND);
        self.allowance = (self.allowance + refill).min(f64::from(BURST)) - f64::from(frames);
        self.allowance >= 0.0
    }

    /// How many frames the client ignores in `read`, counted as their headers complete.
    fn scan(&mut self, mut read: &[u8]) -> u32 {
        let Some(preface_read) = self.preface_read else {
            return 0;
        };
        if preface_read < PREFACE.len() {
            let expected = &PREFACE[preface_read..];
            let taken = expected.len().min(read.len());
            if read[..taken] != expected[..taken] {
                self.preface_read = None;
                return 0;
            }
            self.preface_read = Some(preface_read + taken);
            read = &read[taken..];
        }
        let mut ignored = 0;
        while !read.is_empty() {
            if self.payload_left > 0 {
                let payload = self.payload_left.min(read.len());
                self.payload_left -= payload;
                read = &read[payload..];
                continue;
            }
            let header = (HEADER - self.header_read).min(read.len());
            self.header[self.header_read..][..header].copy_from_slice(&read[..header]);
            self.header_read += header;
            read = &read[header..];
            if self.header_read == HEADER {
                self.header_read = 0;
                let [a, b, c, kind, ..] = self.header;
                self.payload_left = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
                if kind == PRIORITY || kind > LAST_DEFINED {
                    ignored += 1;
                }
            }
        }
        ignored
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const PREFACE_BYTES: &[u8] = PREFACE;

    fn frame(kind: u8, payload: usize) -> Vec<u8> {
        let length = u32::try_from(payload).unwrap().to_be_bytes();
        let mut frame = vec![length[1], length[2], length[3], kind, 0x0, 0, 0, 0, 1];
        // Payload bytes that would read as frame headers of ignored types, were they misread.
        frame.extend(std::iter::repeat_n(PRIORITY, payload));
        frame
    }

    /// The preface, SETTINGS, HEADERS, DATA, PRIORITY, WINDOW_UPDATE, an unknown type, a large
    /// DATA, PING: PRIORITY and the unknown type count, however the reads split the bytes.
    #[test]
    fn priority_and_unknown_frames_count_wherever_the_reads_split() {
        let frames = [
            PREFACE_BYTES.to_vec(),
            frame(0x4, 18),
            frame(0x1, 40),
            frame(0x0, 100),
            frame(PRIORITY, 5),
            frame(0x8, 4),
            frame(0xfa, 3),
            frame(0x0, 70_000),
            frame(0x6, 8),
        ];
        let read: Vec<u8> = frames.concat();
        for split in [1, 2, 5, 9, 10, 17, 24, 100, 4096, read.len()] {
            let mut frames = IgnoredFrames::default();
            let ignored: u32 = read.chunks(split).map(|r| frames.scan(r)).sum();
            assert_eq!(ignored, 2, "reads of {split} bytes");
            assert_eq!((frames.payload_left, frames.header_read), (0, 0));
        }
    }

    /// A connection that does not start with the preface (HTTP/1.1) is not looked at: bytes
    /// that would read as PRIORITY frames in a request's body count for nothing.
    #[test]
    fn a_connection_without_the_preface_is_not_counted() {
        let request = b"POST /webhooks/gameball HTTP/1.1\r\nHost: x\r\n\r\n";
        let body: Vec<u8> = (0..20_000).flat_map(|_| frame(PRIORITY, 5)).collect();
        for split in [1, 3, 24, 4096] {
            let mut frames = IgnoredFrames::default();
            let read = [&request[..], &body].concat();
            assert!(
                read.chunks(split).all(|r| frames.read(r)),
                "reads of {split}"
            );
            assert_eq!(frames.preface_read, None);
        }
        // Nor is one whose preface goes wrong at its last byte.
        let mut frames = IgnoredFrames::default();
        assert_eq!(frames.scan(&PREFACE[..23]), 0);
        assert_eq!(frames.scan(b"x"), 0);
        assert_eq!(frames.scan(&body), 0);
    }

    /// The allowance: a burst at once, then the rate; past it, the connection should go.
    #[test]
    fn a_burst_at_once_then_the_rate() {
        let start = Instant::now();
        let mut frames = IgnoredFrames::default();
        assert!(frames.spend(BURST, start));
        assert!(!frames.spend(1, start), "past the burst");

        let mut frames = IgnoredFrames::default();
        assert!(frames.spend(BURST, start));
        let second = start + Duration::from_secs(1);
        assert!(
            frames.spend(PER_SECOND, second),
            "a second's worth after a second"
        );
        assert!(!frames.spend(1, second));

        // Idle time refills up to the burst, no more.
        let mut frames = IgnoredFrames::default();
        assert!(frames.spend(1, start));
        let later = start + Duration::from_secs(3600);
        assert!(frames.spend(BURST, later));
        assert!(!frames.spend(1, later));
    }

    /// A flood of PRIORITY frames read in large reads is found once past the burst.
    #[test]
    fn a_flood_is_found_within_its_burst() {
        let mut frames = IgnoredFrames::default();
        assert!(frames.read(PREFACE_BYTES));
        let flood: Vec<u8> = (0..1_000).flat_map(|_| frame(PRIORITY, 5)).collect();
        let reads_allowed = (0..20).take_while(|_| frames.read(&flood)).count();
        assert_eq!(reads_allowed, 10, "{BURST} frames, in reads of 1,000");
    }
}
