"""Shape buckets for jitted device calls: few distinct shapes, so few compiles.

Every batch dimension goes to a power of two (or, `fine`, also three quarters of one), at least
`MIN_ROWS`; every length to a multiple of its
granule, in steps that grow geometrically (granule x 1, 2, 3, 4, 6, 8, 12, 16, 24, ...), so padding stays
under a third of the length while a whole run (evaluation, rollouts, search, synthesis, scoring) compiles
a handful of sizes.
"""

from __future__ import annotations


def pow2_at_least(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, (int(n) - 1).bit_length()))


# For the demo's tiny models, device calls of fewer rows cost about what 8 rows cost (a decode step of a few
# rows is bound by reading the weights, on CPU by per-op overhead), while rows 1, 2 and 4 were three more
# compiles of every decode, resume, prefill, fork, compaction and scoring program (~20 s of a 64-problem
# search eval on 2 cores). A large model's prefill is compute-bound, so padding it costs real work:
# `row_bucket(..., min_rows=1)` (`Sampler(min_rows=1)`) turns the padding off.
MIN_ROWS = 8


def row_bucket(n: int, multiple_of: int = 1, min_rows: int = MIN_ROWS, fine: bool = False) -> int:
    """Rows of a device call holding `n`: a power of two, at least `min_rows` and `multiple_of` (the
    mesh's data-parallel size).

    `fine` also allows three quarters of a power of two when that is still a multiple of `multiple_of` and
    at least `min_rows` (..., 32, 48, 64, 96, 128, 192, 256, ...): at most a third of a call is padding
    instead of a half, for one more compiled shape per octave. Worth it where a call's cost grows with its
    rows (on CPU, decoding and scoring the demo's models: 160 rows cost what 256 do under powers of two);
    an accelerator's decode step, bound by reading the weights, pays little for padded rows.
    """
    base = max(min_rows, multiple_of)
    rows = pow2_at_least(n, base)
    three_quarters = 3 * rows // 4
    if fine and three_quarters >= max(n, base) and three_quarters % multiple_of == 0:
        return three_quarters
    return rows


def round_up(n: int, granule: int) -> int:
    """`n` rounded up to a multiple of `granule`."""
    return -(-int(n) // granule) * granule


def bucket_length(n: int, granule: int = 16, linear_units: int = 4) -> int:
    """`n` rounded up to granule x {1, 2, ..., linear_units, then 1.5x and 2x steps: 6, 8, 12, 16, 24, ...}
    (the default; `linear_units=8`: 1..8, 12, 16, 24, ...)."""
    units = max(1, -(-int(n) // granule))
    if units > linear_units:
        p = pow2_at_least(units)
        units = 3 * p // 4 if 3 * p // 4 >= units else p
    return units * granule
