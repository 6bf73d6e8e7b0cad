"""Helpers of the shard (tensor-parallel) op tests: cut a block of rows x columns out of an SWS / mean-field
weight with its ellipse/outlier entries re-indexed to the block, and the global element mapping of the block
(reference.element_map: elem_offset = r0 * IN + c0, row_stride = IN)."""
import torch

# (out, in) shapes and blocks [r0, r1) x [c0, c1): an odd shape (nothing aligned to 4) and an aligned one
SHARDS = [
    ((7, 10), (2, 6, 0, 10)),    # colwise rows, offset 20: not a multiple of 4
    ((7, 10), (0, 7, 3, 8)),     # rowwise columns, offset 3, stride 10
    ((7, 10), (1, 5, 2, 9)),     # a block
    ((8, 16), (4, 8, 0, 16)),    # colwise, aligned (offset 64, stride 16)
    ((8, 16), (0, 8, 8, 16)),    # rowwise, aligned (offset 8, stride 16, row length 8)
]


def shard_ids(case):
    (o, i), (r0, r1, c0, c1) = case
    return f"{o}x{i}-r{r0}:{r1}-c{c0}:{c1}"


def cut_positions(pos, IN, r0, r1, c0, c1):
    """(mask over entries, local flat positions) of the flat positions ``pos`` of an [*, IN] weight in the block."""
    r, c = pos // IN, pos % IN
    m = (r >= r0) & (r < r1) & (c >= c0) & (c < c1)
    return m, (r[m] - r0) * (c1 - c0) + (c[m] - c0)


def cut_sws(labels, ellipse, outliers, block):
    """labels block (contiguous), ellipse and outliers of the block (positions local), mapping kwargs."""
    r0, r1, c0, c1 = block
    IN = labels.shape[1]
    lab = labels[r0:r1, c0:c1].contiguous()
    e = o = None
    if ellipse is not None:
        m, p = cut_positions(ellipse[0], IN, r0, r1, c0, c1)
        e = (p, ellipse[1][m], ellipse[2][m], ellipse[3][m])
    if outliers is not None:
        m, p = cut_positions(outliers[0], IN, r0, r1, c0, c1)
        o = (p, outliers[1][m], outliers[2][m])
    return lab, e, o, dict(elem_offset=r0 * IN + c0, row_stride=IN)


def outlier_mask(outliers, IN, block):
    return None if outliers is None else cut_positions(outliers[0], IN, *block)[0]
