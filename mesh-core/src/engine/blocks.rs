//! ggml's quantized block layouts as typed structs, the one place their field
//! offsets are written down. The engine's kernels (`q4_1`, `q8_0`) and the
//! private-mode kernels (`delegate::kernels`, `delegate::activations`) read
//! blocks through these types instead of repeating byte offsets.
//!
//! Every field is a byte array, so a block has alignment 1, no padding, and
//! any bytes are a valid block: [`blocks`] views a row of GGUF bytes (or a
//! ggml buffer) as blocks without copying. Scales are IEEE fp16 bits (or f32
//! for Q8_K), little-endian, as ggml stores them; [`half`] reads one.

use std::mem::{offset_of, size_of};

use bytemuck::{Pod, Zeroable};

use crate::gguf::GgmlType;

/// Values per block of the 32-value formats.
pub(crate) const QK: usize = 32;
/// Values per block of the K-quant formats.
pub(crate) const QK_K: usize = 256;

/// `block_q4_0`: scale `d`; value `j` is `d·(q_j - 8)`, `q_j` the low nibble
/// of byte `j` (`j < 16`) or the high nibble of byte `j - 16`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct BlockQ4_0 {
    pub d: [u8; 2],
    pub qs: [u8; QK / 2],
}

/// `block_q4_1`: scale `d` and minimum `m`; value `j` is `d·q_j + m`
/// (nibbles as in [`BlockQ4_0`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct BlockQ4_1 {
    pub d: [u8; 2],
    pub m: [u8; 2],
    pub qs: [u8; QK / 2],
}

/// `block_q8_0`: scale `d`; value `j` is `d·qs[j]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct BlockQ8_0 {
    pub d: [u8; 2],
    pub qs: [i8; QK],
}

/// `block_q8_1` in the pinned ggml: scale `d`, `s = d·Σ qs` rounded to fp16,
/// and the quants (the activation format ggml pairs with Q4_1 weights).
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct BlockQ8_1 {
    pub d: [u8; 2],
    pub s: [u8; 2],
    pub qs: [i8; QK],
}

/// `block_q4_K`: super-block scale `d` and `dmin`, eight 6-bit sub-block
/// scales and mins packed in `scales`, 256 nibbles in `qs`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct BlockQ4K {
    pub d: [u8; 2],
    pub dmin: [u8; 2],
    pub scales: [u8; 12],
    pub qs: [u8; QK_K / 2],
}

/// `block_q6_K`: low 4 bits `ql`, high 2 bits `qh`, sixteen int8 sub-block
/// scales, then the super-block scale `d`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: [u8; 2],
}

/// `block_q8_K`: an f32 scale `d`, the quants, and sums of 16 quants
/// (the activation format of K-quant weights).
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct BlockQ8K {
    pub d: [u8; 4],
    pub qs: [i8; QK_K],
    pub bsums: [u8; QK_K / 16 * 2],
}

/// A block type and the ggml type whose rows are made of it.
pub(crate) trait Block: Pod {
    /// The ggml type.
    const TYPE: GgmlType;
}

macro_rules! blocks {
    ($($block:ty => $ty:ident, $size:expr;)*) => {
        $(
            impl Block for $block {
                const TYPE: GgmlType = GgmlType::$ty;
            }
            // The layouts are ggml's: sizes are checked when mesh-core builds.
            const _: () = assert!(size_of::<$block>() == $size);
        )*
    };
}

blocks! {
    BlockQ4_0 => Q4_0, 18;
    BlockQ4_1 => Q4_1, 20;
    BlockQ8_0 => Q8_0, 34;
    BlockQ8_1 => Q8_1, 36;
    BlockQ4K => Q4_K, 144;
    BlockQ6K => Q6_K, 210;
    BlockQ8K => Q8_K, 292;
}

/// Byte offset of the quants in a Q4_1 block (after `d` and `m`).
pub(crate) const Q4_1_QS: usize = offset_of!(BlockQ4_1, qs);
/// Byte offset of the quants in a Q4_0 block.
pub(crate) const Q4_0_QS: usize = offset_of!(BlockQ4_0, qs);
/// Byte offset of the quants in a Q8_0 block.
pub(crate) const Q8_0_QS: usize = offset_of!(BlockQ8_0, qs);
/// Byte offset of the quants in a Q8_1 block (after `d` and `s`).
pub(crate) const Q8_1_QS: usize = offset_of!(BlockQ8_1, qs);

/// `bytes` as blocks of `B`, or `None` if it is not a whole number of them.
#[cfg(test)]
pub(crate) fn blocks<B: Block>(bytes: &[u8]) -> Option<&[B]> {
    bytemuck::try_cast_slice(bytes).ok()
}

/// `bytes` as one block of `B`, or `None` if it is not exactly one.
pub(crate) fn block<B: Block>(bytes: &[u8]) -> Option<&B> {
    bytemuck::try_from_bytes(bytes).ok()
}

/// `bytes` as mutable blocks of `B`, or `None` if it is not a whole number of them.
pub(crate) fn blocks_mut<B: Block>(bytes: &mut [u8]) -> Option<&mut [B]> {
    bytemuck::try_cast_slice_mut(bytes).ok()
}

/// The fp16 bits stored in `h`.
pub(crate) fn half(h: [u8; 2]) -> u16 {
    u16::from_le_bytes(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_block_sizes_are_ggmls() {
        fn check<B: Block>() {
            assert_eq!(size_of::<B>() as u64, B::TYPE.type_size(), "{}", B::TYPE);
            assert_eq!(std::mem::align_of::<B>(), 1, "{}", B::TYPE);
        }
        check::<BlockQ4_0>();
        check::<BlockQ4_1>();
        check::<BlockQ8_0>();
        check::<BlockQ8_1>();
        check::<BlockQ4K>();
        check::<BlockQ6K>();
        check::<BlockQ8K>();
        assert_eq!(
            (Q4_0_QS, Q4_1_QS, Q8_0_QS, Q8_1_QS),
            (2, 4, 2, 4),
            "quant offsets"
        );
    }

    #[test]
    fn rows_that_are_not_whole_blocks_are_refused() {
        assert_eq!(blocks::<BlockQ4_1>(&[0u8; 40]).map(<[_]>::len), Some(2));
        assert!(blocks::<BlockQ4_1>(&[0u8; 39]).is_none());
        assert_eq!(blocks::<BlockQ6K>(&[]).map(<[_]>::len), Some(0));
    }
}
