//! Decompression of compressed clusters, with pure-Rust decoders.
//!
//! The compressed data of a cluster is followed by whatever lies after it up to the end of
//! its last sector, so both decoders stop once a full cluster has come out and ignore the
//! rest, as QEMU does.

use std::io::Read;

use miniz_oxide::inflate::core::{decompress as inflate, inflate_flags, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;

use super::error::Qcow2Error;
use super::header::CompressionType;

/// The largest zstd window accepted: the decoder reserves the window a frame header asks
/// for, so a hostile frame must not choose it. QEMU's frames use at most the cluster size.
pub const MAX_ZSTD_WINDOW: u64 = 8 << 20;

/// The window size a zstd frame header asks for, if `input` starts with one.
fn zstd_window(input: &[u8]) -> Option<u64> {
    let magic = u32::from_le_bytes(input.get(..4)?.try_into().ok()?);
    if magic != 0xfd2f_b528 {
        return None;
    }
    let descriptor = *input.get(4)?;
    let single_segment = descriptor & 0x20 != 0;
    if !single_segment {
        // Window descriptor: exponent and mantissa (RFC 8878, 3.1.1.1.2).
        let wd = *input.get(5)?;
        let base = 1u64 << (10 + u32::from(wd >> 3));
        return Some(base + (base / 8) * u64::from(wd & 7));
    }
    // Single segment: the window is the frame content size, after the dictionary ID.
    let dict_len = [0usize, 1, 2, 4][usize::from(descriptor & 3)];
    let fcs_len = [1usize, 2, 4, 8][usize::from(descriptor >> 6)];
    let at = 5 + dict_len;
    let bytes = input.get(at..at + fcs_len)?;
    let value = bytes.iter().rev().fold(0u64, |v, &b| v << 8 | u64::from(b));
    Some(if fcs_len == 2 { value + 256 } else { value })
}

/// Decompresses `input` into `out`, which must come out exactly full (one cluster).
pub fn decompress(
    kind: CompressionType,
    input: &[u8],
    out: &mut [u8],
    host_offset: u64,
) -> Result<(), Qcow2Error> {
    let fail = |reason: String| Qcow2Error::Decompression {
        offset: host_offset,
        reason,
    };
    match kind {
        CompressionType::Zlib => {
            // Raw deflate (no zlib header): QEMU compresses with windowBits -12. The whole
            // output buffer is given at once, so no wrapping window is needed.
            let mut state = Box::<DecompressorOxide>::default();
            let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
            let (status, _read, written) = inflate(&mut state, input, out, 0, flags);
            match status {
                TINFLStatus::Done | TINFLStatus::HasMoreOutput if written == out.len() => Ok(()),
                TINFLStatus::Done | TINFLStatus::HasMoreOutput => Err(fail(format!(
                    "deflate data ends after {written} of {} bytes",
                    out.len()
                ))),
                other => Err(fail(format!("deflate error {other:?}"))),
            }
        }
        CompressionType::Zstd => {
            let mut source = input;
            let mut filled = 0;
            // QEMU writes one frame per cluster; accept several, as its decoder does.
            while filled < out.len() {
                if let Some(window) = zstd_window(source).filter(|&w| w > MAX_ZSTD_WINDOW) {
                    return Err(fail(format!(
                        "zstd frame asks for a {window}-byte window (at most {MAX_ZSTD_WINDOW})"
                    )));
                }
                let mut decoder = ruzstd::streaming_decoder::StreamingDecoder::new(&mut source)
                    .map_err(|e| fail(format!("zstd frame header: {e}")))?;
                let before = filled;
                while filled < out.len() {
                    let dst = out.get_mut(filled..).unwrap_or(&mut []);
                    match decoder.read(dst) {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) => return Err(fail(format!("zstd: {e}"))),
                    }
                }
                if filled == before {
                    return Err(fail(format!(
                        "zstd data ends after {filled} of {} bytes",
                        out.len()
                    )));
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deflate_round_trip_ignores_trailing_bytes() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 7) as u8).collect();
        let mut packed = miniz_oxide::deflate::compress_to_vec(&data, 6);
        packed.extend_from_slice(&[0xaa; 100]);
        let mut out = vec![0u8; 4096];
        decompress(CompressionType::Zlib, &packed, &mut out, 0).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn huge_zstd_windows_are_refused() {
        let mut out = vec![0u8; 4096];
        // Window descriptor 0xf8: a 2^41-byte window.
        let frame = [0x28, 0xb5, 0x2f, 0xfd, 0x00, 0xf8, 0, 0, 0, 0];
        let err = decompress(CompressionType::Zstd, &frame, &mut out, 0).unwrap_err();
        assert!(err.to_string().contains("window"), "{err}");
        // Single segment with an 8-byte content size of 2^40.
        let frame = [0x28, 0xb5, 0x2f, 0xfd, 0xe0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0];
        assert_eq!(zstd_window(&frame), Some(1 << 40));
        assert!(decompress(CompressionType::Zstd, &frame, &mut out, 0).is_err());
        // Small windows pass the check.
        assert_eq!(
            zstd_window(&[0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x00]),
            Some(1024)
        );
        assert_eq!(
            zstd_window(&[0x28, 0xb5, 0x2f, 0xfd, 0x60, 0x00, 0x01]),
            Some(512)
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut out = vec![0u8; 4096];
        for input in [
            &[][..],
            &[0xff; 64][..],
            &[0x28, 0xb5, 0x2f, 0xfd, 0xff, 0xff][..],
        ] {
            assert!(decompress(CompressionType::Zlib, input, &mut out, 0).is_err());
            assert!(decompress(CompressionType::Zstd, input, &mut out, 0).is_err());
        }
        // Too little output is an error too.
        let packed = miniz_oxide::deflate::compress_to_vec(&[1u8; 100], 6);
        assert!(decompress(CompressionType::Zlib, &packed, &mut out, 0).is_err());
    }
}
