"""Outlines of every object of a label tile at once: marching squares at level 0.5, vectorised.

The outline of object *k* is the contour at level 0.5 of its binary mask (every other
label counts as background), objects 8-connected (``fully_connected="high"``): vertices
are the midpoints between 4-neighbouring pixels of which exactly one belongs to *k*;
a 2x2 square whose two *k* pixels touch only diagonally is crossed with its other two
corners cut. Of an object's rings (outer rings of its parts, rings of its holes) the
one of largest area is kept, oriented counter-clockwise in (x, y), collinear vertices
removed. This is the ring ``skimage.measure.find_contours`` gives on each object's
padded crop, found for all objects of a tile in a few array passes instead of a Python
loop over contour segments, starting at the vertex that function starts at (so the
rings are the same vertex for vertex, see ``tests/test_outlines.py``):

* rings are chains of directed segments (object on the left in x right, y down, i.e.
  positive shoelace area for outer rings), one per square and crossing;
* a ring starts where its last segment in raster order of squares ends (that is where
  ``find_contours`` closes it), then at the next corner vertex; ties between rings of
  equal area go to the ring whose first segment comes first in raster order.

Coordinates are in pixel-index units of the tile (pixel (i, j) has its centre at
x = j, y = i), half-integers, so every area below is exact in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

# Square corners (bit, row offset, column offset) and edges (row, column of the midpoint).
_CORNERS = ((1, 0, 0), (2, 0, 1), (4, 1, 0), (8, 1, 1))  # ul, ur, ll, lr
_EDGES = ((0.0, 0.5), (1.0, 0.5), (0.5, 0.0), (0.5, 1.0))  # top, bottom, left, right
_EDGE_PAIRS = ((0, 1), (2, 3), (0, 2), (1, 3))  # corners each edge lies between (top, bottom, left, right)


def _segments_of_case(case: int) -> list[tuple[int, int]]:
    """Directed segments (from edge, to edge) of one marching-squares case, object on the left."""
    inside = [bool(case & bit) for bit, _, _ in _CORNERS]
    crossing = [e for e, (a, b) in enumerate(_EDGE_PAIRS) if inside[a] != inside[b]]
    if not crossing:
        return []
    if len(crossing) == 4:  # diagonal pair: the object's corners are joined, the others cut
        cut = [q for q in range(4) if not inside[q]]
        pairs = [tuple(e for e in range(4) if q in _EDGE_PAIRS[e]) for q in cut]
    else:
        pairs = [(crossing[0], crossing[1])]
    corners = [(r, c) for (_, r, c), on in zip(_CORNERS, inside) if on]
    out = []
    for a, b in pairs:
        (ay, ax), (by, bx) = _EDGES[a], _EDGES[b]
        my, mx = (ay + by) / 2, (ax + bx) / 2
        oy, ox = min(corners, key=lambda p: (p[0] - my) ** 2 + (p[1] - mx) ** 2)
        # y grows downwards: "object on the left" is a positive cross product in (x, y).
        cross = (bx - ax) * (oy - ay) - (by - ay) * (ox - ax)
        out.append((a, b) if cross > 0 else (b, a))
    return out


def _case_table() -> NDArray[np.int8]:
    """(16, 2, 2): per case up to two segments (from edge, to edge); -1 where none."""
    table = np.full((16, 2, 2), -1, np.int8)
    for case in range(16):
        for slot, seg in enumerate(_segments_of_case(case)):
            table[case, slot] = seg
    return table


_TABLE = _case_table()
_TABLE.setflags(write=False)


@dataclass(frozen=True)
class Rings:
    """One closed ring per object 1..N: ``xy[offsets[k - 1]:offsets[k]]`` is object k's."""

    xy: NDArray[np.float64]
    offsets: NDArray[np.int64]

    def ring(self, k: int) -> NDArray[np.float64]:
        """Object ``k``'s ring (first vertex repeated at the end)."""
        return self.xy[self.offsets[k - 1] : self.offsets[k]]


def trace_rings(dense: NDArray[np.int32], n: int) -> Rings:
    """The outline of every object of ``dense`` (labels 1..n, each present; 0 = background)."""
    segs = _directed_segments(np.pad(np.asarray(dense, np.int32), 1))
    order = np.argsort(segs.start, kind="stable")
    succ = order[np.searchsorted(segs.start[order], segs.stop)]  # the segment each one leads to
    rep, pos, length = _cycle_positions(succ, int(np.bincount(segs.label).max()))
    chosen, begin, flip = _pick_rings(segs, rep, succ, pos, n)
    return _ordered_rings(segs, rep, pos, length, chosen, begin, flip, n)


@dataclass(frozen=True)
class _Segments:
    """Directed segments: object, start and stop node keys, raster rank, start vertex (row, col)."""

    label: NDArray[np.int64]
    start: NDArray[np.int64]
    stop: NDArray[np.int64]
    rank: NDArray[np.int64]  # square index * 2 + slot: the order find_contours meets them in
    y: NDArray[np.float64]  # start vertex, tile pixel-index units
    x: NDArray[np.float64]
    stop_y: NDArray[np.float64]
    stop_x: NDArray[np.float64]


def _square_labels(padded: NDArray[np.int32]) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """(object, square index, case) for every square crossed by an object's contour."""
    hp, wp = padded.shape
    top = padded[:-1, :-1] != padded[:-1, 1:]
    top |= padded[1:, :-1] != padded[1:, 1:]
    top |= padded[:-1, :-1] != padded[1:, :-1]
    mixed = np.flatnonzero(top)  # squares whose corners are not all one label
    row, col = np.divmod(mixed, wp - 1)
    flat = padded.ravel()
    ul = row * wp + col
    values = [flat[ul + dr * wp + dc] for _, dr, dc in _CORNERS]
    labels, squares, cases = [], [], []
    for q in range(4):
        k = values[q]
        fresh = k > 0
        for p in range(q):
            fresh &= values[p] != k
        kk = k[fresh]
        case = np.zeros(kk.size, np.int64)
        for p, (bit, _, _) in enumerate(_CORNERS):
            case += (values[p][fresh] == kk) * bit
        labels.append(kk.astype(np.int64))
        squares.append(mixed[fresh].astype(np.int64))
        cases.append(case)
    return np.concatenate(labels), np.concatenate(squares), np.concatenate(cases)


def _directed_segments(padded: NDArray[np.int32]) -> _Segments:
    hp, wp = padded.shape
    label, square, case = _square_labels(padded)
    srow, scol = np.divmod(square, wp - 1)
    edge_y = np.array([e[0] for e in _EDGES])
    edge_x = np.array([e[1] for e in _EDGES])
    parts = []
    for slot in (0, 1):
        seg = _TABLE[case, slot]
        has = seg[:, 0] >= 0
        a, b, r, c = seg[has, 0], seg[has, 1], srow[has], scol[has]
        base = label[has] * (2 * hp * wp)
        parts.append((label[has], base + _edge_key(a, r, c, hp, wp), base + _edge_key(b, r, c, hp, wp),
                      square[has] * 2 + slot, r + edge_y[a] - 1.0, c + edge_x[a] - 1.0,
                      r + edge_y[b] - 1.0, c + edge_x[b] - 1.0))  # fmt: skip
    return _Segments(*(np.concatenate([p[i] for p in parts]) for i in range(8)))


def _edge_key(edge: NDArray[np.int8], r: NDArray[np.int64], c: NDArray[np.int64], hp: int, wp: int) -> NDArray[np.int64]:
    """Node key of a square's edge midpoint: pairs of horizontal neighbours, then vertical ones."""
    horizontal = (r + (edge == 1)) * wp + c  # top (r, c + 0.5) or bottom (r + 1, c + 0.5)
    vertical = hp * wp + r * wp + c + (edge == 3)  # left (r + 0.5, c) or right (r + 0.5, c + 1)
    return np.asarray(np.where(edge <= 1, horizontal, vertical), dtype=np.int64)


def _cycle_positions(
    succ: NDArray[np.int64], longest: int
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """Per segment: its cycle's smallest member, its position after it, the cycle's length.

    ``longest`` bounds the length of any cycle (the most segments of one object).
    """
    size = succ.size
    rounds = int(np.ceil(np.log2(max(longest, 2)))) + 1
    rep, jump = np.arange(size), succ.copy()
    for _ in range(rounds):  # pointer jumping: min over 1, 2, 4, ... successors
        rep = np.minimum(rep, rep[jump])
        jump = jump[jump]
    last = succ == rep  # the cycle's member just before its smallest one
    nxt = np.where(last, np.arange(size), succ)
    dist = (~last).astype(np.int64)
    for _ in range(rounds):  # list ranking: steps to the cycle's last member
        dist = dist + dist[nxt]
        nxt = nxt[nxt]
    length = dist[rep] + 1
    return rep, length[np.arange(size)] - 1 - dist, length


def _pick_rings(
    segs: _Segments, rep: NDArray[np.int64], succ: NDArray[np.int64], pos: NDArray[np.int64], n: int
) -> tuple[NDArray[np.bool_], NDArray[np.int64], NDArray[np.bool_]]:
    """Per cycle: kept as its object's ring; the position its ring starts at; whether it is reversed."""
    cycles, ci = np.unique(rep, return_inverse=True)
    area2 = np.bincount(ci, weights=segs.x * segs.stop_y - segs.stop_x * segs.y, minlength=cycles.size)
    first = np.full(cycles.size, np.iinfo(np.int64).max)
    last = np.full(cycles.size, -1)
    np.minimum.at(first, ci, segs.rank)
    np.maximum.at(last, ci, segs.rank)
    cyc_label = np.zeros(cycles.size, np.int64)
    cyc_label[ci] = segs.label
    ranked = np.lexsort((first, -np.abs(area2), cyc_label))
    head = np.ones(ranked.size, bool)
    head[1:] = cyc_label[ranked][1:] != cyc_label[ranked][:-1]
    chosen = np.zeros(cycles.size, bool)
    chosen[ranked[head]] = True
    if int(chosen.sum()) != n:
        raise ValueError(f"{n} objects but {int(chosen.sum())} outlines")
    # find_contours closes a ring with its last segment in raster order, so the ring
    # starts where that segment ends: at the start of the segment it leads to.
    begin = np.zeros(cycles.size, np.int64)
    is_last = segs.rank == last[ci]
    begin[ci[is_last]] = pos[succ[is_last]]
    return chosen[ci], begin[ci], (area2 < 0)[ci]


def _ordered_rings(
    segs: _Segments, rep: NDArray[np.int64], pos: NDArray[np.int64], length: NDArray[np.int64],
    chosen: NDArray[np.bool_], begin: NDArray[np.int64], flip: NDArray[np.bool_], n: int,
) -> Rings:
    """The chosen rings, counter-clockwise from their start, corners only, closed."""
    idx = np.flatnonzero(chosen)
    size = length[idx]
    step = np.where(flip[idx], begin[idx] - pos[idx], pos[idx] - begin[idx]) % size
    idx = idx[np.lexsort((step, segs.label[idx]))]
    x, y = segs.x[idx], segs.y[idx]
    counts = np.bincount(segs.label[idx] - 1, minlength=n)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    ring_of = np.repeat(np.arange(n), counts)
    g = np.arange(idx.size)
    at = g - offsets[ring_of]
    nxt = np.where(at == counts[ring_of] - 1, offsets[ring_of], g + 1)
    prv = np.where(at == 0, offsets[ring_of + 1] - 1, g - 1)
    cross = (x - x[prv]) * (y[nxt] - y) - (y - y[prv]) * (x[nxt] - x)
    corner = cross != 0
    few = np.bincount(ring_of, weights=corner, minlength=n) < 3
    keep = np.flatnonzero(corner | few[ring_of])
    kept_ring = ring_of[keep]
    kept_counts = np.bincount(kept_ring, minlength=n)
    out_off = np.zeros(n + 1, np.int64)
    np.cumsum(kept_counts + 1, out=out_off[1:])
    xy = np.empty((int(out_off[-1]), 2), np.float64)
    kept_at = np.arange(keep.size) + kept_ring  # one closing vertex per earlier ring
    xy[kept_at, 0], xy[kept_at, 1] = x[keep], y[keep]
    first_kept = np.zeros(n, np.int64)
    first_kept[kept_ring[::-1]] = keep[::-1]
    xy[out_off[1:] - 1, 0], xy[out_off[1:] - 1, 1] = x[first_kept], y[first_kept]
    return Rings(xy, out_off)
