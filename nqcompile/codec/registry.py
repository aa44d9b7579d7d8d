"""The codecs a preset may name: one :class:`CodecEntry` per line of :data:`CODECS`.

An entry says how to build the code for a bit width and which widths nqcompile offers; everything else
(preset validation, byte accounting, the cache's code buffers) reads it from here. Adding a codec is one
line in :data:`CODECS`; ``tests/codec/test_registry.py`` then checks it against the
:class:`~nqcompile.codec.scalar.FixedRateCode` contract and in a cache.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

from .lattice import E8_BITS, E8LatticeCode
from .scalar import SCALAR_BITS, FixedRateCode, LloydMaxCode, UniformScalarCode

__all__ = ["CodecEntry", "CODECS", "code_for"]


@dataclass(frozen=True)
class CodecEntry:
    """One codec: a fixed-rate vector code family and the bit widths it is offered at.

    Args:
        name: the value of ``Preset.codec`` that selects it.
        code: factory called with the bits per element (an int of ``bits``), returning a
            :class:`~nqcompile.codec.scalar.FixedRateCode` with default settings (usually the code's class).
        bits: the bits per element a preset may ask for, ascending.
    """

    name: str
    code: Callable[[int], FixedRateCode]
    bits: tuple[int, ...]

    def bytes_per_vector(self, bits: int, dim: int) -> int:
        """Bytes of the packed code of one ``dim``-element vector at ``bits`` per element (scale excluded).

        Raises:
            ValueError: ``bits`` not in :attr:`bits`, or ``dim`` not a positive multiple of 8.
        """
        return code_for(self.name, bits).bytes_per_vector(dim)


#: Codec name -> entry. ``e8``: E8 nested-lattice code (Conway and Sloane 1983; the project's codec);
#: ``lloyd_max`` and ``uniform``: the scalar baselines (Lloyd 1957, Max 1960), kept for ablations.
CODECS: dict[str, CodecEntry] = {entry.name: entry for entry in (
    CodecEntry("e8", E8LatticeCode, bits=E8_BITS),
    CodecEntry("lloyd_max", LloydMaxCode, bits=SCALAR_BITS),
    CodecEntry("uniform", UniformScalarCode, bits=SCALAR_BITS),
)}


@functools.lru_cache(maxsize=None)
def code_for(kind: str, bits: int) -> FixedRateCode:
    """The code of codec ``kind`` at ``bits`` per element, with default settings.

    Args:
        kind: a name in :data:`CODECS`.
        bits: bits per element, one of ``CODECS[kind].bits``.

    Returns:
        A :class:`~nqcompile.codec.scalar.FixedRateCode` (cached: the same object for the same arguments;
        treat it as immutable).

    Raises:
        ValueError: unknown ``kind`` or ``bits`` it does not offer (the message lists the valid ones).
    """
    if kind not in CODECS:
        raise ValueError(f"code_for: kind must be one of {tuple(CODECS)}, got {kind!r}")
    entry = CODECS[kind]
    if bits not in entry.bits:
        raise ValueError(f"code_for: codec {kind!r} offers bits {entry.bits}, got {bits!r}")
    return entry.code(bits)
