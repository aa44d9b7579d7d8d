"""Fixed-rate E8 nested-lattice (Voronoi) codes at 2, 3 and 4 bits per dimension.

The code (J. H. Conway, N. J. A. Sloane, "A fast encoding method for lattice codes and quantizers",
IEEE Trans. Inf. Theory 29(6), 1983; used for LLM quantization by NestQuant, Savkin et al. 2025):

* coarse lattice ``q E8`` with ``q = 2**bits``; the codebook holds one representative of each coset of
  ``E8 / q E8``: ``q**8 = 2**(8 bits)`` points, i.e. exactly ``8 * bits`` bits per 8-dim block;
* label of a lattice point ``y``: its integer coordinates in the generator basis ``G`` below, reduced
  mod ``q`` (``k = (y G^-1) mod q``, eight ``bits``-bit integers, bit-packed little-endian by
  :mod:`nqcompile.codec.packing`, block after block);
* representative of label ``k``: ``c = k G - q * e8_nearest(k G / q)``, the point of the coset in
  the Voronoi region of ``q E8`` (on the region's boundary ``e8_nearest``'s tie rule decides, which
  makes the codebook lopsided: its centroid is about ``(0.47, -0.02, ..., -0.11)`` at 2 bits);
* reconstruction: ``gain * (c - centroid)``. The codebook is shifted by its centroid (exact at 2 and 3
  bits, a 2**26-sample estimate at 4 bits; ``docs/design.md``, "Codec requirements"), and ``gain`` (the lattice
  scaling) is tuned per rate to maximize the SNR of unit-RMS Gaussian inputs
  (``benchmarks/codec_distortion.py --tune-gain``).

Encoder (overload handling; ``docs/design.md``, "Codec requirements"). With ``u = x / gain + centroid`` (lattice
units), the nearest lattice point ``e8_nearest(u)`` is the optimal codeword whenever it lies in the
codebook. For the other ("overloaded") blocks a plain Voronoi encoder would wrap the point to a far-away
representative. Instead:

1. shrink: for ``a`` on a small fixed grid ``0.975 .. 0.4`` (:data:`DEFAULT_SHRINK_GRID`), take the
   representative of ``e8_nearest(a * u)`` and keep the one closest to the ORIGINAL ``u`` (a block
   stops shrinking once ``a * u`` decodes inside the codebook; this never changed the result measured);
2. local search (our addition): move to the best of the 240 E8 neighbours ``c + v`` (``|v|^2 = 2``)
   that is closer to ``u`` and still in the codebook, and repeat (at most ``search_steps`` times;
   :func:`_local_search`).

Measured (``benchmarks/README.md``; iid Gaussian 64-dim vectors, one-byte RMS scale): shrink + centroid
alone 9.83 / 15.53 / 20.95 dB at 2 / 3 / 4 bits; with the search 10.43 / 15.94 / 21.40 dB, within 0.01 dB
of an exhaustive nearest-codeword search at 2 bits (Lloyd-Max: 9.40 / 14.73 / 20.33 dB). Cost (encode, one
core of the shared 2-core machine, per million 64-dim vectors): about 7 s (2 bits) / 4 s (3 bits) / 3 s
(4 bits); decoding is a table look-up per block at 2 bits (about 0.1 s) and one nearest-point call per
block at 3 and 4 bits (about 0.6 s; on the CPU a kernel that Inductor generates from :func:`decode_blocks` does
it about 10-30x faster, bit for bit the same: :mod:`nqcompile.codec.cpu_kernel`).

Codebook membership is one nearest-point call: ``c`` is in the codebook iff ``e8_nearest(c / q) == 0``,
exact because :func:`nqcompile.codec.e8.e8_nearest` breaks ties translation-equivariantly, which makes
``{x : e8_nearest(x / q) = 0}`` a fundamental domain of ``q E8`` (a half-open Voronoi cell).

Everything is vectorized over blocks, in the coordinate-major layout ``[8, N]`` where it pays (see
:func:`nqcompile.codec.e8._e8_t`); the only Python loops run over the fixed shrink grid, the search
steps, chunks of 2**18 blocks that bound the working memory and cache-sized slices of them. The fast
paths are bit-identical to the original row-major code (tests/codec/test_codec_speedpath.py).
"""

from __future__ import annotations

import functools
import itertools
import math
import sys

import torch
from torch import Tensor

from nqcompile.codec.cpu_kernel import cpu_kernel, eager_on_cpu
from nqcompile.codec.e8 import _e8_t, _e8_t_is_zero, _rowsum, e8_nearest_columns
from nqcompile.codec.packing import pack_groups, unpack_groups
from nqcompile.codec.scalar import check_decode_input, check_dim, check_float_vectors
from nqcompile.codec.constants import on_device

__all__ = [
    "E8LatticeCode",
    "E8_BITS",
    "E8_GENERATOR",
    "voronoi_centroid",
    "DEFAULT_GAIN",
    "DEFAULT_SHRINK_GRID",
    "decode_blocks",
    "decode_words",
    "word_view",
]

#: Generator matrix of E8 (rows are basis vectors; Conway and Sloane, SPLAG ch. 4 eq. (98)).
#: Lower triangular with diagonal (2, 1, 1, 1, 1, 1, 1, 1/2), determinant 1.
E8_GENERATOR = torch.tensor(
    [
        [2.0, 0, 0, 0, 0, 0, 0, 0],
        [-1, 1, 0, 0, 0, 0, 0, 0],
        [0, -1, 1, 0, 0, 0, 0, 0],
        [0, 0, -1, 1, 0, 0, 0, 0],
        [0, 0, 0, -1, 1, 0, 0, 0],
        [0, 0, 0, 0, -1, 1, 0, 0],
        [0, 0, 0, 0, 0, -1, 1, 0],
        [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
    ]
)
_GINV = torch.linalg.inv(E8_GENERATOR.double()).float()  # entries in (1/2) Z: exact in float32

#: Bits per dimension the E8 code offers (the codebook E8 / 2**bits E8 has 2**(8 bits) points per block).
E8_BITS = (2, 3, 4)

#: Lattice scaling per rate: reconstruction = gain * (codeword - centroid), for unit-RMS inputs.
#: Tuned by ``python benchmarks/codec_distortion.py --tune-gain`` (iid Gaussian, 64-dim, one-byte
#: ceil scales, default encoder); the SNR changes by less than 0.02 dB within +-2 % of these values.
DEFAULT_GAIN = {2: 0.9464, 3: 0.5314, 4: 0.2906}

#: Shrink factors tried for overloaded blocks (a = 1 is the plain nearest point, tried on every block).
#: Six values do as well as thirteen once the local search runs (benchmarks/README.md).
DEFAULT_SHRINK_GRID = (0.975, 0.9, 0.8, 0.7, 0.55, 0.4)

_CHUNK = 1 << 18  # blocks per chunk (bounds the working memory to a few hundred MB)


@functools.lru_cache(maxsize=None)
def _minimal_vectors() -> Tensor:
    """The 240 minimal vectors of E8 (squared norm 2), float32 [240, 8]."""
    rows = []
    for i, j in itertools.combinations(range(8), 2):
        for si, sj in itertools.product((1.0, -1.0), repeat=2):
            v = [0.0] * 8
            v[i], v[j] = si, sj
            rows.append(v)
    for signs in itertools.product((0.5, -0.5), repeat=8):
        if sum(s < 0 for s in signs) % 2 == 0:
            rows.append(list(signs))
    return torch.tensor(rows, dtype=torch.float32)


def _labels(y: Tensor, q: int) -> Tensor:
    """Coset labels of E8 points y [..., 8] (lattice units): (y G^-1) mod q, int64 in [0, q)."""
    lead = y.shape[:-1]
    return _labels_t(y.reshape(-1, 8).T, q).T.to(torch.int64).reshape(*lead, 8)


def _labels_t(y: Tensor, q: int) -> Tensor:
    """:func:`_labels` in the coordinate-major layout: y float32 [8, N] -> int32 [8, N].

    Exact: y has half-integer coordinates and G^-1 entries in (1/2) Z, so every product and partial
    sum of the matrix product is exact in float32 whatever the summation order.
    """
    k = torch.round(on_device(_GINV, y.device).T @ y).to(torch.int32)
    return k.bitwise_and_(q - 1)  # = remainder(k, q) for q a power of 2 (two's complement)


def _representatives(k: Tensor, q: int) -> Tensor:
    """Codeword (Voronoi-region representative) of labels k [..., 8] in [0, q): float32, lattice units."""
    lead = k.shape[:-1]
    return _representatives_t(k.reshape(-1, 8).T, q).T.reshape(*lead, 8)


def _representatives_t(k: Tensor, q: int) -> Tensor:
    """:func:`_representatives` in the coordinate-major layout: k [8, N] (any integer dtype) -> float32.

    ``y = k G`` written out (exact small integers and halves, so equal to the matrix product):
    ``y_0 = 2 k_0 - k_1 + k_7 / 2``, ``y_j = k_j - k_{j+1} + k_7 / 2`` (j = 1..5),
    ``y_6 = k_6 + k_7 / 2``, ``y_7 = k_7 / 2``.
    """
    kf = k.to(torch.float32)
    y = torch.empty_like(kf)
    y[:6] = kf[:6] - kf[1:7]
    y[0] += kf[0]
    y[6] = kf[6]
    y[:7] += kf[7] * 0.5
    y[7] = kf[7] * 0.5
    return y - q * _e8_t(y / q)


def voronoi_centroid(bits: int, *, samples: int | None = None, seed: int = 0) -> Tensor:
    """Centroid (mean point) of the codebook of E8 / 2^bits E8, in lattice units.

    Exact enumeration of all ``2**(8 bits)`` labels when ``samples`` is None (a second at 2 bits, about a
    minute at 3 bits, infeasible at 4 bits), otherwise the mean of ``samples`` uniformly random labels drawn with a
    fixed seed (standard error about ``2**bits * 0.6 / sqrt(samples)`` per coordinate).

    Returns:
        float64 tensor ``[8]``.

    Raises:
        ValueError: if ``bits`` is not 2, 3 or 4.
    """
    _check_lattice_bits(bits, "voronoi_centroid")
    q = 1 << bits
    total = torch.zeros(8, dtype=torch.float64)
    if samples is None:
        low = torch.cartesian_prod(*[torch.arange(q)] * 4)  # [q^4, 4]
        for hi in low:
            k = torch.cat([low, hi.expand(low.shape[0], 4)], dim=1)
            total += _representatives(k, q).double().sum(dim=0)
        return total / float(q**8)
    g = torch.Generator().manual_seed(seed)
    done = 0
    while done < samples:
        n = min(_CHUNK * 4, samples - done)
        k = torch.randint(0, q, (n, 8), generator=g)
        total += _representatives(k, q).double().sum(dim=0)
        done += n
    return total / float(samples)


#: Codebook centroids (lattice units): exact enumeration at 2 and 3 bits, 2**26 random labels
#: (seed 0) at 4 bits. Reproduce with :func:`voronoi_centroid`; tests check them.
_CENTROIDS: dict[int, tuple[float, ...]] = {
    2: (0.4697570801, -0.0207824707, -0.0392150879, -0.0563659668,
        -0.0722351074, -0.0868225098, -0.1001281738, -0.1121520996),
    3: (0.5146868229, -0.007307291, -0.0144579411, -0.0214602947,
        -0.028314352, -0.035020113, -0.0415775776, -0.0479867458),
    4: (0.5283162445, -0.003036797, -0.0055365413, -0.009548381,
        -0.0117567182, -0.016131714, -0.0194892883, -0.0223165154),
}


def _check_lattice_bits(bits: int, owner: str) -> None:
    if isinstance(bits, bool) or bits not in E8_BITS:
        raise ValueError(
            f"{owner}: the E8 lattice code supports bits = {E8_BITS} per dimension, got {bits!r}; use "
            "code_for('lloyd_max', bits) or code_for('uniform', bits) for other rates"
        )


class E8LatticeCode:
    """Fixed-rate E8 Voronoi code E8 / 2^bits E8: exactly ``bits`` bytes per 8-dim block.

    See the module docstring for the construction (Conway and Sloane 1983; NestQuant 2025), the
    centroid shift and the shrink + local-search encoder.

    Args:
        bits: bits per dimension, one of :data:`E8_BITS` (2, 3 or 4).
        gain: lattice scaling (reconstruction = ``gain * (codeword - centroid)``); default
            :data:`DEFAULT_GAIN` ``[bits]``, tuned for unit-variance Gaussian coordinates.
        shrink_grid: shrink factors tried for overloaded blocks (default :data:`DEFAULT_SHRINK_GRID`).
        search_steps: local-search steps over E8 neighbours (0 disables the search; a block stops
            early when no neighbour improves).
        centroid_shift: shift the codebook by its centroid (True) or not.
        shrink_early_stop: stop shrinking a block once ``a * u`` decodes inside the codebook.

    Interface (:class:`nqcompile.codec.scalar.FixedRateCode`): ``bits``, ``encode``, ``decode``,
    ``bytes_per_vector``.

    Raises:
        ValueError: on unsupported ``bits`` or invalid options.
    """

    name = "e8"

    def __init__(
        self,
        bits: int,
        *,
        gain: float | None = None,
        shrink_grid: tuple[float, ...] | None = None,
        search_steps: int = 3,
        centroid_shift: bool = True,
        shrink_early_stop: bool = True,
    ) -> None:
        _check_lattice_bits(bits, "E8LatticeCode")
        self.bits = bits
        self.q = 1 << bits
        self.gain = float(DEFAULT_GAIN[bits] if gain is None else gain)
        if not (self.gain > 0 and math.isfinite(self.gain)):
            raise ValueError(f"E8LatticeCode: gain must be a positive finite float, got {gain!r}")
        grid = DEFAULT_SHRINK_GRID if shrink_grid is None else tuple(float(a) for a in shrink_grid)
        if any(not 0 < a <= 1 for a in grid):
            raise ValueError(f"E8LatticeCode: shrink factors must lie in (0, 1], got {grid}")
        self.shrink_grid = grid
        if not 0 <= search_steps <= 16:
            raise ValueError(f"E8LatticeCode: search_steps must be in 0..16, got {search_steps}")
        self.search_steps = int(search_steps)
        self.centroid_shift = bool(centroid_shift)
        self.shrink_early_stop = bool(shrink_early_stop)
        if centroid_shift:
            self.shift = torch.tensor(_CENTROIDS[bits], dtype=torch.float32)
        else:
            self.shift = torch.zeros(8, dtype=torch.float32)

    # -- interface ---------------------------------------------------------------------------------

    def bytes_per_vector(self, dim: int) -> int:
        """Bytes of one encoded ``dim``-dim vector: ``dim * bits // 8`` (dim a multiple of 8)."""
        check_dim(dim, "E8LatticeCode")
        return dim * self.bits // 8

    def encode(self, x: Tensor) -> Tensor:
        """Quantize unit-RMS vectors to packed E8 labels.

        Args:
            x: float tensor ``[..., D]`` (any float dtype, computed in float32), D a multiple of 8,
                already divided by its per-vector scale (RMS about 1 per coordinate).

        Returns:
            uint8 tensor ``[..., D * bits // 8]``: per 8-dim block, the eight ``bits``-bit labels
            ``k_0 .. k_7`` bit-packed little-endian (``nqcompile.codec.packing``).

        Raises:
            ValueError: on a non-float dtype, D not a multiple of 8, or inf/NaN values.
        """
        x = check_float_vectors(x, "E8LatticeCode.encode")
        lead, dim = x.shape[:-1], x.shape[-1]
        blocks = x.reshape(-1, 8)
        codes = torch.empty((blocks.shape[0], self.bits), dtype=torch.uint8, device=x.device)
        for start in range(0, blocks.shape[0], _CHUNK):
            sl = slice(start, start + _CHUNK)
            codes[sl] = pack_groups(self._encode_blocks(blocks[sl]), self.bits)
        return codes.reshape(*lead, dim * self.bits // 8)

    def decode(self, codes: Tensor, dim: int) -> Tensor:
        """Reconstruct unit-RMS vectors from packed labels.

        Args:
            codes: uint8 tensor ``[..., dim * bits // 8]`` from :meth:`encode`.
            dim: vector dimension D (a multiple of 8).

        Returns:
            float32 tensor ``[..., dim]``: ``gain * (codeword - centroid)`` per block.

        Raises:
            ValueError: on a non-uint8 dtype, a wrong last dimension or dim not a multiple of 8.
        """
        check_decode_input(codes, dim, self.bytes_per_vector(dim), "E8LatticeCode")
        lead = codes.shape[:-1]
        words = self._words_kernel(codes)
        if words is not None:
            # Inductor's kernel of decode_words, reading the codes in place as int32 words: the same values again.
            kernel, w = words
            return kernel(w.reshape(-1, w.shape[-1]).contiguous(), self.shift).reshape(*lead, dim)
        if self.bits == 2 and sys.byteorder == "little" and eager_on_cpu(codes):
            try:  # the blocks' 16-bit words read in place, looked up without a copy of the codes
                half = codes.view(torch.int16)
            except RuntimeError:  # last dim not contiguous or rows not 2-byte aligned
                half = None
            if half is not None:
                word = half.to(torch.int32) & 0xFFFF
                return torch.nn.functional.embedding(word, self._table(codes.device)).reshape(*lead, dim)
        groups = codes.reshape(-1, self.bits)  # one 8-dim block per row
        kernel = self._cpu_kernel(groups)
        if kernel is not None:
            # The CPU kernel Inductor generates from decode_blocks: the same values as the reference below, bit for bit.
            return kernel(groups.T.contiguous(), self.shift).reshape(*lead, dim)
        if self.bits == 2:
            # 2**16 codewords: a table of the decoded blocks (2 MB), indexed by the block's 16-bit word.
            word = groups[:, 0].to(torch.int32) | (groups[:, 1].to(torch.int32) << 8)
            out = self._table(codes.device).index_select(0, word)
            return out.reshape(*lead, dim)
        out = torch.empty((groups.shape[0], 8), dtype=torch.float32, device=codes.device)
        for start in range(0, groups.shape[0], _CHUNK):
            sl = slice(start, start + _CHUNK)
            out[sl] = self._decode_t(unpack_groups(groups[sl], self.bits)).T
        return out.reshape(*lead, dim)

    def codewords(self, codes: Tensor, dim: int) -> Tensor:
        """Unshifted, unscaled codebook points (lattice units) of packed labels: float32 ``[..., dim/8, 8]``."""
        check_decode_input(codes, dim, self.bytes_per_vector(dim), "E8LatticeCode")
        k = unpack_groups(codes.reshape(-1, self.bits), self.bits)
        c = _representatives_t(k, self.q).T
        return c.reshape(*codes.shape[:-1], dim // 8, 8)

    def _cpu_kernel(self, groups: Tensor):
        """The compiled :func:`decode_blocks` for packed blocks ``groups`` ``[N, bits]``, or None where the torch
        reference decodes them: on other devices, for fake tensors and inside a ``torch.compile`` trace (there is no
        data to run a kernel on), for fewer than 2 blocks (traced shapes start at 2), at 2 bits (a table look-up is
        as fast), or where Inductor cannot build the kernel."""
        if self.bits == 2 or groups.shape[0] < 2 or not eager_on_cpu(groups):
            return None
        bits, gain = self.bits, self.gain
        return cpu_kernel(f"e8_decode_blocks(bits={bits}, gain={gain!r})",
                          lambda packed, shift: decode_blocks(packed, shift, bits=bits, gain=gain),
                          groups[:2].T.contiguous(), self.shift)

    def _words_kernel(self, codes: Tensor):
        """``(kernel, words)``: the compiled :func:`decode_words` and the codes' int32 words (:func:`word_view`), or
        None where :meth:`_cpu_kernel`'s path (or the torch reference) decodes them: where the codes cannot be read
        as words, for fewer than 2 vectors, in the cases of :meth:`_cpu_kernel`."""
        words = word_view(codes, self.bits)
        if words is None or codes.numel() < 2 * codes.shape[-1] or not eager_on_cpu(codes):
            return None
        bits, gain, width = self.bits, self.gain, words.shape[-1]
        # one kernel per width (make_fx would give the rows and a width of 8 the symbol of the shift's 8 entries)
        rows = 3 if width == 2 else 2
        kernel = cpu_kernel(f"e8_decode_words(bits={bits}, gain={gain!r}, width={width})",
                            lambda w, shift: decode_words(w, shift, bits=bits, gain=gain),
                            torch.zeros(rows, width, dtype=torch.int32), self.shift)
        return None if kernel is None else (kernel, words)

    def _decode_t(self, k: Tensor) -> Tensor:
        """Decoded blocks, coordinate-major: labels k int32 [8, N] -> float32 [8, N]."""
        c = _representatives_t(k, self.q)
        return (c - on_device(self.shift, c.device).unsqueeze(-1)) * self.gain

    def _table(self, device: torch.device) -> Tensor:
        """The decoded blocks of all 2**16 labels at 2 bits, float32 [65536, 8] (built once per device)."""
        tables = self.__dict__.setdefault("_tables", {})
        if device not in tables:
            word = torch.arange(1 << 16, dtype=torch.int32, device=device)
            k = torch.stack([(word >> (2 * j)) & 3 for j in range(8)])
            tables[device] = self._decode_t(k).T.contiguous()
        return tables[device]

    def __repr__(self) -> str:
        return (
            f"E8LatticeCode(bits={self.bits}, gain={self.gain:.4f}, grid={len(self.shrink_grid)}, "
            f"search_steps={self.search_steps}, centroid_shift={self.centroid_shift})"
        )

    # -- encoder -----------------------------------------------------------------------------------

    def _encode_blocks(self, xb: Tensor) -> Tensor:
        """Labels int32 [8, N] (coordinate-major) of blocks xb float32 [N, 8] (unit-RMS units)."""
        q = self.q
        u = xb / self.gain + on_device(self.shift, xb.device)  # lattice units
        ut = u.T.contiguous()
        y = _e8_t(ut)
        z = _e8_t(y / q)
        over = (z != 0).any(dim=0).nonzero().squeeze(-1)  # y outside the codebook
        if over.numel():
            y[:, over] = self._overloaded(u[over], ut[:, over], y[:, over] - q * z[:, over])
        return _labels_t(y, q)

    def _overloaded(self, uo: Tensor, uot: Tensor, wrapped: Tensor) -> Tensor:
        """Codewords (lattice units, in the codebook) for overloaded blocks, coordinate-major [8, n].

        Args:
            uo: float32 [n, 8], the blocks in lattice units (``uot`` is the same, float32 [8, n]).
            wrapped: float32 [8, n], the plain Voronoi encoder's codeword (nearest point, wrapped).
        """
        q = self.q
        best_c = wrapped
        best_d = _rowsum((wrapped - uot).square_())  # as sum(dim=-1) of the row-major blocks
        # 1. shrunken copies a * u, keep the codeword closest to the original u. A block stops
        #    shrinking once a * u decodes inside the codebook (smaller a only moves away from u).
        open_ = torch.arange(uot.shape[1], device=uot.device)
        for a in self.shrink_grid:
            if open_.numel() == 0:
                break
            u_open = uot[:, open_]
            ya = _e8_t(a * u_open)
            za = _e8_t(ya / q)
            ca = ya - q * za  # its representative (wrapped if still outside)
            da = _rowsum((ca - u_open).square_())
            better = (da < best_d[open_]).nonzero().squeeze(-1)
            best_d[open_[better]] = da[better]
            best_c[:, open_[better]] = ca[:, better]
            if self.shrink_early_stop:
                open_ = open_[(za != 0).any(dim=0)]
        # 2. local search over the 240 E8 neighbours (see _local_search), on row-major blocks.
        best_rows = best_c.T.contiguous()
        _local_search(uo, best_rows, q, self.search_steps)
        return best_rows.T


def decode_blocks(packed: Tensor, shift: Tensor, *, bits: int, gain: float) -> Tensor:
    """Decoded blocks ``gain * (codeword - shift)`` of packed labels, in elementwise torch ops only.

    What :meth:`E8LatticeCode.decode` computes, written so that Inductor fuses it into one loop (the CPU kernel of
    :mod:`nqcompile.codec.cpu_kernel`): the labels are unpacked with float32 floors (every word is below ``2**24``:
    exact), ``y = k G`` and ``c = y - q * e8_nearest(y / q)`` (:func:`~nqcompile.codec.e8.e8_nearest_columns`) are
    sums and products of small integers and halves divided by powers of two, so every intermediate is exact and the
    result equals the reference decoder's bit for bit (the tests check it over random and boundary labels).

    Args:
        packed: uint8 ``[bits, N]``: byte ``t`` of block ``n`` (bit order of :mod:`nqcompile.codec.packing`) in
            ``packed[t, n]``.
        shift: float32 ``[8]``, the codebook centroid subtracted (:attr:`E8LatticeCode.shift`).
        bits: bits per dimension (2, 3 or 4). gain: the lattice scaling.

    Returns:
        float32 ``[N, 8]``.
    """
    q = float(1 << bits)
    byte = [packed[t].to(torch.float32) for t in range(bits)]
    k: list[Tensor] = []
    if bits == 4:  # two labels per byte, low nibble first
        for b in byte:
            high = torch.floor(b * 0.0625)
            k += [b - 16.0 * high, high]
    else:  # labels straddle bytes: one little-endian word of 8 * bits <= 24 bits
        word = byte[0]
        for t in range(1, bits):
            word = word + float(256**t) * byte[t]
        for _ in range(8):
            high = torch.floor(word * (1.0 / q))
            k.append(word - q * high)
            word = high
    return torch.stack(_label_coordinates(k, shift, bits=bits, gain=gain), -1)


def word_view(codes: Tensor, bits: int) -> Tensor | None:
    """Packed codes ``[..., bits * D / 8]`` (uint8, last dim contiguous) seen as little-endian int32 words
    ``[..., bits * D / 32]`` without a copy, for :func:`decode_words`; None where they cannot be: 2 bits, 3 bits with
    ``D`` not a multiple of 32 (four blocks share three words), a big-endian host, or codes whose rows are not
    4-byte aligned."""
    if (bits not in (3, 4) or codes.dtype != torch.uint8 or codes.shape[-1] % (4 if bits == 4 else 12)
            or sys.byteorder != "little"):
        return None
    try:
        return codes.view(torch.int32)
    except RuntimeError:  # last dim not contiguous or the storage offset not a multiple of 4
        return None


def decode_words(words: Tensor, shift: Tensor, *, bits: int, gain: float) -> Tensor:
    """:func:`decode_blocks` of codes read as int32 words (:func:`word_view`), in elementwise torch ops only: the
    labels are unpacked with integer shifts and masks, straight from the codes' own layout (no transposed copy),
    then decoded as :func:`decode_blocks` decodes them (bit for bit the same values).

    Args:
        words: int32 ``[..., W]``: at 4 bits one word per 8-dim block; at 3 bits three words per four blocks.
        shift, bits (3 or 4), gain: as for :func:`decode_blocks`.

    Returns:
        float32 ``[..., D]`` with ``D = 8 W`` (4 bits) or ``32 W / 3`` (3 bits).
    """
    if bits == 4:  # label j is bits 4j .. 4j + 3 of the block's word
        k = [((words >> (4 * j)) & 15).to(torch.float32) for j in range(8)]
    else:  # the four 24-bit blocks of three words w0, w1, w2
        w = words.unflatten(-1, (-1, 3))
        w0, w1, w2 = w[..., 0], w[..., 1], w[..., 2]
        blocks = [w0 & 0xFFFFFF, ((w0 >> 24) & 0xFF) | ((w1 & 0xFFFF) << 8),
                  ((w1 >> 16) & 0xFFFF) | ((w2 & 0xFF) << 16), (w2 >> 8) & 0xFFFFFF]
        k = [torch.stack([(b >> (3 * j)) & 7 for b in blocks], -1).flatten(-2).to(torch.float32) for j in range(8)]
    return torch.stack(_label_coordinates(k, shift, bits=bits, gain=gain), -1).flatten(-2)


def _label_coordinates(k: list[Tensor], shift: Tensor, *, bits: int, gain: float) -> list[Tensor]:
    """The 8 coordinates ``gain * (codeword - shift)`` of blocks whose labels ``k`` (8 float32 tensors of one shape)
    are given coordinate by coordinate."""
    q = float(1 << bits)
    # y = k G in the order of _representatives_t
    y = [k[j] - k[j + 1] for j in range(6)]
    y[0] = y[0] + k[0]
    y = [yj + k[7] * 0.5 for yj in y] + [k[6] + k[7] * 0.5, k[7] * 0.5]
    z = e8_nearest_columns([yj / q for yj in y])
    return [(yj - q * zj - shift[j]) * gain for j, (yj, zj) in enumerate(zip(y, z))]


def _local_search(u: Tensor, best_c: Tensor, q: int, steps: int) -> None:
    """Greedy descent over the 240 E8 neighbours, updating the codewords ``best_c`` [n, 8] in place.

    A move ``c -> c + v`` with ``|v|^2 = 2`` changes the squared distance to ``u`` [n, 8] by
    ``2 - 2 v.(u - c)``; each step takes the largest decrease among the neighbours that stay in the
    codebook (``e8_nearest((c + v) / q) == 0``, tested only for the improving ones; ties: the first
    neighbour in :func:`_minimal_vectors` order). A row leaves the search as soon as no improving
    neighbour is in the codebook (a local optimum).

    The products ``(u - c) @ vecs.T`` are taken over exactly the same rows as the original
    implementation (all rows still moving), as a float32 matrix product can round differently for
    different numbers of rows.
    """
    vecs = on_device(_minimal_vectors(), u.device)
    nv = vecs.shape[0]
    active = torch.arange(u.shape[0], device=u.device)
    for _ in range(steps):
        c = best_c[active]
        w = u[active] - c
        m = c.shape[0]
        best = torch.full((m,), -math.inf, device=u.device)
        j = torch.full((m,), nv, dtype=torch.int64, device=u.device)
        for r0, r1 in _row_pieces(m):
            dots = w[r0:r1] @ vecs.T  # [r1 - r0, 240]
            flat = (dots.view(-1) > 1.0).nonzero().squeeze(-1)  # improving moves only
            if flat.numel() == 0:
                continue
            ri = torch.div(flat, nv, rounding_mode="floor").add_(r0)
            vi = flat - (ri - r0) * nv
            p = (c.index_select(0, ri) + vecs.index_select(0, vi)).div_(q)
            member = _e8_t_is_zero(p.T).nonzero().squeeze(-1)
            mri, mvi = ri[member], vi[member]
            md = dots.view(-1)[flat[member]]
            best.scatter_reduce_(0, mri, md, "amax")
            top = (md == best[mri]).nonzero().squeeze(-1)
            j.scatter_reduce_(0, mri[top], mvi[top], "amin")  # the first best neighbour
        moved = (j < nv).nonzero().squeeze(-1)
        if moved.numel() == 0:
            return
        best_c[active[moved]] = c[moved] + vecs[j[moved]]
        active = active[moved]


_PIECE = 2048  # rows per matrix product in the local search (keeps [rows, 240] in the CPU caches)


def _row_pieces(m: int) -> list[tuple[int, int]]:
    """Row ranges for the local search's products: every piece has at least 8 rows unless m < 8.

    For 8 rows or more the float32 product ``[rows, 8] @ [8, 240]`` sums the 8 terms in sequential
    order whatever the row count (as the tests check), so pieces give the same dots as one product
    over all m rows; with fewer than 8 rows the summation order can differ, so m < 16 stays whole.
    """
    if m < 2 * _PIECE:
        return [(0, m)]
    bounds = list(range(0, m, _PIECE)) + [m]
    if bounds[-1] - bounds[-2] < 8:
        del bounds[-2]
    return list(zip(bounds[:-1], bounds[1:]))

