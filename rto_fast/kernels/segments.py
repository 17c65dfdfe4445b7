"""Triton helpers shared by the segment-wise kernels (GAE, token rewards).

    from .segments import segment_bounds
    begin, end = segment_bounds(offsets_ptr, segment, row_length, PACKED)
"""

import triton
import triton.language as tl


@triton.jit
def segment_bounds(offsets_ptr, segment, row_length, PACKED: tl.constexpr):
    """[begin, end) of one segment: a cu_seqlens sequence of a packed stream, or a row of a padded batch."""
    if PACKED:
        begin = tl.load(offsets_ptr + segment).to(tl.int64)
        end = tl.load(offsets_ptr + segment + 1).to(tl.int64)
    else:
        begin = segment * row_length
        end = begin + row_length
    return begin, end
