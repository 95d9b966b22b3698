//! How many bytes of answers a connection's socket took: the payload of the HTTP/2 DATA frames
//! in what the server writes, read off the frame headers as the bytes go by.
//!
//! The answer budgets judge whether a client reads its answers by this count. Every byte the
//! socket wrote counted once, and PING acknowledgements (17 bytes each, as many as a client
//! asks) passed for reading; then every chunk h2 let go of counted, and streams the client
//! reset passed for reading (both found by adversarial runs). Only DATA payload goes out
//! because the client's flow-control windows let it: that is the client reading.
//!
//! What this does not do: check the frames (h2 wrote them), or tell streams apart. It relies
//! on seeing every byte the server writes on the connection, in order, from the first (the
//! server's side of HTTP/2 starts with a frame, no preface); TLS is below it.

/// The length of an HTTP/2 frame header: 24-bit length, type, flags, 31-bit stream id.
const HEADER: usize = 9;

/// The DATA frame's type.
const DATA: u8 = 0x0;

/// Where a connection's written bytes are in their frames.
#[derive(Debug, Default)]
pub struct DataFrames {
    /// The frame header being read, and how much of it is.
    header: [u8; HEADER],
    header_read: usize,
    /// The payload bytes left of the current frame, and whether it is a DATA frame.
    payload_left: usize,
    in_data: bool,
    /// DATA frames whose header went out since [`DataFrames::take_data_frames`].
    data_frames: usize,
}

impl DataFrames {
    /// The DATA payload bytes in `written`, the next bytes the socket took.
    pub fn scan(&mut self, mut written: &[u8]) -> usize {
        let mut data = 0;
        while !written.is_empty() {
            if self.payload_left > 0 {
                let payload = self.payload_left.min(written.len());
                if self.in_data {
                    data += payload;
                }
                self.payload_left -= payload;
                written = &written[payload..];
                continue;
            }
            let header = (HEADER - self.header_read).min(written.len());
            self.header[self.header_read..][..header].copy_from_slice(&written[..header]);
            self.header_read += header;
            written = &written[header..];
            if self.header_read == HEADER {
                self.header_read = 0;
                let [a, b, c, kind, ..] = self.header;
                self.payload_left = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
                self.in_data = kind == DATA;
                self.data_frames += usize::from(self.in_data);
            }
        }
        data
    }

    /// How many DATA frames' headers the socket took since the last call.
    pub fn take_data_frames(&mut self) -> usize {
        std::mem::take(&mut self.data_frames)
    }

    /// [`DataFrames::scan`] of the first `written` bytes of `slices`, in order.
    pub fn scan_vectored(&mut self, slices: &[std::io::IoSlice<'_>], mut written: usize) -> usize {
        let mut data = 0;
        for slice in slices {
            if written == 0 {
                break;
            }
            let taken = slice.len().min(written);
            data += self.scan(&slice[..taken]);
            written -= taken;
        }
        data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, payload: usize) -> Vec<u8> {
        let length = u32::try_from(payload).unwrap().to_be_bytes();
        let mut frame = vec![length[1], length[2], length[3], kind, 0x1, 0, 0, 0, 3];
        frame.extend(std::iter::repeat_n(0xA5, payload));
        frame
    }

    /// SETTINGS, HEADERS, DATA, PING ack, an empty DATA, a large DATA, RST_STREAM: only the
    /// DATA payloads count, however the bytes are split between writes.
    #[test]
    fn only_data_payload_counts_wherever_the_writes_split() {
        let frames = [
            frame(0x4, 18),
            frame(0x1, 40),
            frame(DATA, 100),
            frame(0x6, 8),
            frame(DATA, 0),
            frame(DATA, 70_000),
            frame(0x3, 4),
        ];
        let written: Vec<u8> = frames.concat();
        for split in [1, 2, 5, 9, 10, 17, 100, 4096, written.len()] {
            let mut frames = DataFrames::default();
            let data: usize = written.chunks(split).map(|w| frames.scan(w)).sum();
            assert_eq!(data, 70_100, "writes of {split} bytes");
            assert_eq!(frames.take_data_frames(), 3, "writes of {split} bytes");
            assert_eq!(frames.take_data_frames(), 0);
            assert_eq!((frames.payload_left, frames.header_read), (0, 0));
        }
    }

    /// A vectored write counts only the bytes the socket took, across its slices.
    #[test]
    fn a_vectored_write_counts_only_what_was_written() {
        let (head, data) = (frame(0x1, 10), frame(DATA, 50));
        let slices = [std::io::IoSlice::new(&head), std::io::IoSlice::new(&data)];
        let mut frames = DataFrames::default();
        assert_eq!(frames.scan_vectored(&slices, head.len() + HEADER + 20), 20);
        assert_eq!(frames.scan(&data[HEADER + 20..]), 30);
    }
}
