//! Payload compression with the negotiated algorithm, and decompression that is bounded while
//! it runs (PROTOCOL.md, "Compression").

use std::io::Read;

use bytes::Bytes;
use slic_proto::Compression;

/// Why a compressed payload was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum InflateError {
    /// It would inflate beyond the maximum message size.
    TooLarge,
    /// It is not valid for its algorithm.
    Corrupt,
}

/// Compresses `data`; `None` when that would not make it smaller (already compressed or
/// random data), so the message goes out as it is.
pub(crate) fn compress(alg: Compression, data: &[u8]) -> Option<Bytes> {
    let out = match alg {
        Compression::Lz4 => lz4_flex::block::compress_prepend_size(data),
        Compression::Zstd => zstd::bulk::compress(data, ZSTD_LEVEL).ok()?,
        _ => return None,
    };
    (out.len() < data.len()).then(|| Bytes::from(out))
}

/// zstd's fast end: most of the ratio at a fraction of the default level's CPU.
const ZSTD_LEVEL: i32 = 1;

/// Inflates `data`, never producing or allocating more than `max` bytes of output.
pub(crate) fn decompress(alg: Compression, data: &[u8], max: usize) -> Result<Bytes, InflateError> {
    match alg {
        Compression::Lz4 => {
            // The uncompressed size comes first: check it before allocating anything.
            let (size, body) = data.split_first_chunk::<4>().ok_or(InflateError::Corrupt)?;
            let size = u32::from_le_bytes(*size) as usize;
            if size > max {
                return Err(InflateError::TooLarge);
            }
            let mut out = vec![0u8; size];
            let n = lz4_flex::block::decompress_into(body, &mut out)
                .map_err(|_| InflateError::Corrupt)?;
            if n != size {
                return Err(InflateError::Corrupt);
            }
            Ok(Bytes::from(out))
        }
        Compression::Zstd => {
            let mut decoder = zstd::stream::read::Decoder::with_buffer(data)
                .map_err(|_| InflateError::Corrupt)?;
            // A frame may ask for a window of up to 2 GiB; allow no more than the output can
            // use, so a hostile header cannot make the decoder allocate it.
            let window_log = usize::BITS - max.max(1 << 10).leading_zeros();
            decoder
                .window_log_max(window_log.clamp(10, 27))
                .map_err(|_| InflateError::Corrupt)?;
            let mut out = Vec::new();
            // Read one byte past the cap: getting it proves the payload is too large, and
            // the decoder stops there instead of inflating the rest.
            decoder
                .take(max as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|_| InflateError::Corrupt)?;
            if out.len() > max {
                return Err(InflateError::TooLarge);
            }
            Ok(Bytes::from(out))
        }
        _ => Err(InflateError::Corrupt),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_algorithms_round_trip_compressible_data() {
        let data: Vec<u8> = b"slic ".iter().copied().cycle().take(100_000).collect();
        for alg in [Compression::Lz4, Compression::Zstd] {
            let c = compress(alg, &data).expect("compressible");
            assert!(c.len() < data.len() / 10, "{alg:?}: {}", c.len());
            assert_eq!(&decompress(alg, &c, data.len()).unwrap()[..], &data[..]);
        }
    }

    #[test]
    fn incompressible_data_is_sent_as_it_is() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let data: Vec<u8> = (0..10_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(compress(Compression::Lz4, &data).is_none());
        assert!(compress(Compression::Zstd, &data).is_none());
    }

    #[test]
    fn a_bomb_is_refused_at_the_cap_without_inflating_it() {
        // 64 MiB of zeros compress to a few KiB; a 1 MiB cap refuses them.
        let zeros = vec![0u8; 64 << 20];
        for alg in [Compression::Lz4, Compression::Zstd] {
            let bomb = compress(alg, &zeros).unwrap();
            assert!(bomb.len() < 1 << 20);
            assert_eq!(decompress(alg, &bomb, 1 << 20), Err(InflateError::TooLarge));
        }
    }

    #[test]
    fn garbage_is_corrupt_not_a_panic() {
        for alg in [Compression::Lz4, Compression::Zstd] {
            for junk in [
                &b""[..],
                b"\x01",
                b"\xff\xff\xff\x00abc",
                b"\x10\x00\x00\x00\xf0\xf0",
            ] {
                assert!(decompress(alg, junk, 1 << 20).is_err(), "{alg:?} {junk:?}");
            }
        }
    }
}
