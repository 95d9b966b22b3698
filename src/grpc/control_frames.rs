//! HTTP/2 frames a client sends that ask the server for no answer (control frames: PING,
//! SETTINGS, WINDOW_UPDATE, RST_STREAM, PRIORITY, GOAWAY, and types HTTP/2 does not define),
//! counted off the frame headers as a connection's bytes are read, and held to what the
//! connection's requests and answers account for.
//!
//! h2 answers or drops each such frame: it limits floods of a few kinds (unacknowledged
//! PINGs and SETTINGS, empty DATA, CONTINUATION, resets) and not the rest. One connection
//! sending PRIORITY frames or undefined types kept a core busy, never cut on the gRPC port,
//! and on the webhook port held the thread every webhook is handled on (found by an
//! adversarial run); so did WINDOW_UPDATE, RST_STREAM of closed streams, and PINGs and
//! SETTINGS whose acknowledgements the client read (found by the next one). nginx and Envoy
//! limit such frames too, Envoy by what the connection sent. A client sends some with every
//! request (an RST_STREAM to cancel it, RFC 9218's PRIORITY_UPDATE) and for what it reads
//! (WINDOW_UPDATEs, grpc-go's bandwidth PINGs): a connection may send [`BURST`] at once, and
//! each second, each request (HEADERS) and each DATA frame the server sent it refill it
//! ([`PER_SECOND`], [`PER_REQUEST`], [`PER_DATA_SENT`]), up to [`BURST`].
//!
//! What this does not do: check frames (h2 does), see what the server sends (the caller
//! says, [`ControlFrames::sent_data`]), or cut the connection (the caller does, when
//! [`ControlFrames::read`] says the allowance is spent). It relies on seeing every byte the
//! client sends, in order, from the first: the client preface, then frames (TLS is below it).
//! A connection that does not start with the preface (HTTP/1.1, on the webhook listener) is
//! not HTTP/2, and nothing more of it is looked at.

use std::time::Instant;

/// The client's connection preface (RFC 9113, 3.4), before its first frame.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The length of an HTTP/2 frame header: 24-bit length, type, flags, 31-bit stream id.
const HEADER: usize = 9;
/// The frame types that carry requests: DATA, HEADERS, CONTINUATION. Every other type is a
/// control frame here.
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;

/// What the log says of a connection cut for them (a WARN, with its listener).
pub const CUT: &str = "cut an HTTP/2 connection whose client sent more control frames (PING, \
                       SETTINGS, WINDOW_UPDATE, RST_STREAM, PRIORITY, types HTTP/2 does not \
                       define) than its requests and what it read account for";

/// How many control frames a connection may send at once.
pub const BURST: u32 = 2_000;
/// How many more it may send each second.
pub const PER_SECOND: u32 = 200;
/// How many more each request it sends (a HEADERS frame) lets it send.
pub const PER_REQUEST: u32 = 8;
/// How many more each DATA frame the server sends it lets it send.
pub const PER_DATA_SENT: u32 = 2;

/// Where a connection's read bytes are in their frames, and what is left of its allowance.
#[derive(Debug)]
pub struct ControlFrames {
    /// How much of the preface has been read; `None` once the connection turned out not to
    /// start with it.
    preface_read: Option<usize>,
    header: [u8; HEADER],
    header_read: usize,
    payload_left: usize,
    /// The control frames it may still send, as of `refilled`.
    allowance: f64,
    refilled: Option<Instant>,
}

impl Default for ControlFrames {
    fn default() -> Self {
        ControlFrames {
            preface_read: Some(0),
            header: [0; HEADER],
            header_read: 0,
            payload_left: 0,
            allowance: f64::from(BURST),
            refilled: None,
        }
    }
}

/// What one read held: control frames, and requests (HEADERS frames).
#[derive(Debug, Default, PartialEq)]
struct Counted {
    control: u32,
    requests: u32,
}

impl ControlFrames {
    /// Takes the next bytes read from the client; `false` once its control frames are past
    /// its allowance (the connection should go).
    pub fn read(&mut self, read: &[u8]) -> bool {
        let counted = self.scan(read);
        self.add(counted.requests.saturating_mul(PER_REQUEST));
        if counted.control == 0 {
            return true;
        }
        self.spend(counted.control, Instant::now())
    }

    /// The server sent the client `frames` DATA frames: it may send more control frames
    /// for reading them.
    pub fn sent_data(&mut self, frames: usize) {
        let frames = u32::try_from(frames).unwrap_or(u32::MAX);
        self.add(frames.saturating_mul(PER_DATA_SENT));
    }

    fn add(&mut self, frames: u32) {
        if frames > 0 {
            self.allowance = (self.allowance + f64::from(frames)).min(f64::from(BURST));
        }
    }

    /// Spends `frames` of the allowance at `now`, refilled first for the time since the last.
    fn spend(&mut self, frames: u32, now: Instant) -> bool {
        let elapsed = self.refilled.map_or(0.0, |then| (now - then).as_secs_f64());
        self.refilled = Some(now);
        let refill = elapsed * f64::from(PER_SECOND);
        self.allowance = (self.allowance + refill).min(f64::from(BURST)) - f64::from(frames);
        self.allowance >= 0.0
    }

    /// The control frames and requests in `read`, counted as their headers complete.
    fn scan(&mut self, mut read: &[u8]) -> Counted {
        let mut counted = Counted::default();
        let Some(preface_read) = self.preface_read else {
            return counted;
        };
        if preface_read < PREFACE.len() {
            let expected = &PREFACE[preface_read..];
            let taken = expected.len().min(read.len());
            if read[..taken] != expected[..taken] {
                self.preface_read = None;
                return counted;
            }
            self.preface_read = Some(preface_read + taken);
            read = &read[taken..];
        }
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
                match kind {
                    HEADERS => counted.requests += 1,
                    DATA | CONTINUATION => {}
                    _ => counted.control += 1,
                }
            }
        }
        counted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const PRIORITY: u8 = 0x2;

    fn frame(kind: u8, payload: usize) -> Vec<u8> {
        let length = u32::try_from(payload).unwrap().to_be_bytes();
        let mut frame = vec![length[1], length[2], length[3], kind, 0x0, 0, 0, 0, 1];
        // Payload bytes that would read as frame headers of control frames, were they misread.
        frame.extend(std::iter::repeat_n(PRIORITY, payload));
        frame
    }

    /// The preface, then every kind of frame: DATA, HEADERS and CONTINUATION are not control
    /// frames, every other type is (undefined ones too), and HEADERS are requests, however the
    /// reads split the bytes.
    #[test]
    fn control_frames_and_requests_count_wherever_the_reads_split() {
        let frames = [
            PREFACE.to_vec(),
            frame(0x4, 18),
            frame(HEADERS, 40),
            frame(CONTINUATION, 10),
            frame(DATA, 100),
            frame(PRIORITY, 5),
            frame(0x3, 4),
            frame(0x6, 8),
            frame(0x7, 8),
            frame(0x8, 4),
            frame(0xfa, 3),
            frame(DATA, 70_000),
            frame(HEADERS, 10),
        ];
        let read: Vec<u8> = frames.concat();
        for split in [1, 2, 5, 9, 10, 17, 24, 100, 4096, read.len()] {
            let mut frames = ControlFrames::default();
            let (mut control, mut requests) = (0, 0);
            for part in read.chunks(split) {
                let counted = frames.scan(part);
                (control, requests) = (control + counted.control, requests + counted.requests);
            }
            assert_eq!((control, requests), (7, 2), "reads of {split} bytes");
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
            let mut frames = ControlFrames::default();
            let read = [&request[..], &body].concat();
            assert!(
                read.chunks(split).all(|r| frames.read(r)),
                "reads of {split}"
            );
            assert_eq!(frames.preface_read, None);
        }
        // Nor is one whose preface goes wrong at its last byte.
        let mut frames = ControlFrames::default();
        assert_eq!(frames.scan(&PREFACE[..23]), Counted::default());
        assert_eq!(frames.scan(b"x"), Counted::default());
        assert_eq!(frames.scan(&body), Counted::default());
    }

    /// The allowance: a burst at once, then the rate; past it, the connection should go.
    #[test]
    fn a_burst_at_once_then_the_rate() {
        let start = Instant::now();
        let mut frames = ControlFrames::default();
        assert!(frames.spend(BURST, start));
        assert!(!frames.spend(1, start), "past the burst");

        let mut frames = ControlFrames::default();
        assert!(frames.spend(BURST, start));
        let second = start + Duration::from_secs(1);
        assert!(
            frames.spend(PER_SECOND, second),
            "a second's worth after a second"
        );
        assert!(!frames.spend(1, second));

        // Idle time refills up to the burst, no more.
        let mut frames = ControlFrames::default();
        assert!(frames.spend(1, start));
        let later = start + Duration::from_secs(3600);
        assert!(frames.spend(BURST, later));
        assert!(!frames.spend(1, later));
    }

    /// Requests and DATA sent refill the allowance: a client cancelling every call (an
    /// RST_STREAM each) and acknowledging what it reads (WINDOW_UPDATEs) is never cut however
    /// fast it goes; the same frames without requests or DATA are.
    #[test]
    fn requests_and_what_the_server_sent_pay_for_their_control_frames() {
        let mut frames = ControlFrames::default();
        assert!(frames.read(PREFACE));
        let call = [frame(HEADERS, 20), frame(0x3, 4), frame(0x8, 4)].concat();
        let calls = call.repeat(1_000);
        assert!(
            (0..100).all(|_| frames.read(&calls)),
            "100,000 cancelled calls"
        );
        let updates = frame(0x8, 4).repeat(1_000);
        let read_all = (0..100).all(|_| {
            frames.sent_data(500);
            frames.read(&updates)
        });
        assert!(read_all, "100,000 WINDOW_UPDATEs for 50,000 DATA frames");

        let mut frames = ControlFrames::default();
        assert!(frames.read(PREFACE));
        let reads_allowed = (0..100).take_while(|_| frames.read(&updates)).count();
        assert_eq!(reads_allowed, 2, "{BURST} frames, in reads of 1,000");
    }
}
