"""Launch configurations of the Triton kernels: a committed table measured on a GPU, looked up by shapes only.

Issue 10, build item 5: configurations keyed by head_dim, bits and context length, and no autotuning inside a CUDA
graph capture. There is no autotuning at run time at all: ``launch_table.json`` next to this module holds the
configurations that ``benchmarks/tune_kernels.py --write-table`` measured (its ``meta`` names the card, the versions,
the date and the command), and the kernels read it through :func:`decode_config` and :func:`dequant_config`. Keys
not in the table get the documented defaults (:func:`default_decode_config`, :func:`default_dequant_config`).

The lookups read Python ints (shapes and static arguments) and a dict loaded once at import: no tensor is read, no
device is synchronized, so they run the same inside a CUDA graph capture and while ``torch.compile`` traces the
kernels' ops (a bucket boundary is a comparison of a shape: under dynamic shapes it becomes a guard).

* decode attention (:mod:`.decode_attention`): ``(block, warps, programs_per_sm)`` keyed by ``(head_dim, key_bits,
  value_bits, context bucket)``, the bucket of the code segment's slot capacity (:data:`CONTEXT_BUCKETS`);
* dequant (:mod:`.dequant_kv`): ``(block, warps)`` keyed by ``(head_dim, key_bits, value_bits)``.

This module imports neither Triton nor torch (the table can be read and checked anywhere).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

__all__ = ["DecodeConfig", "DequantConfig", "LaunchTable", "CONTEXT_BUCKETS", "TABLE_PATH", "SPILL_BUDGET",
           "context_bucket", "default_decode_config", "default_dequant_config", "decode_config", "dequant_config",
           "parse_table", "load_table", "table_json", "using", "current_table"]

#: The committed table the kernels read.
TABLE_PATH = Path(__file__).with_name("launch_table.json")
#: Context buckets ``(name, most slots)`` of the decode kernel's code segments, smallest first (None: unbounded).
CONTEXT_BUCKETS = (("<=8K", 8192), ("<=64K", 65536), (">64K", None))
#: Slots per block a table may name: powers of two from 16 (the smallest ``tl.dot`` dimension; ``tl.arange`` sizes
#: are powers of two).
BLOCKS = (16, 32, 64, 128)
#: Warps per program a table may name.
WARPS = (1, 2, 4, 8, 16)
#: Most programs per streaming multiprocessor a table may name.
MAX_PROGRAMS_PER_SM = 64
#: Spill stores (bytes per thread, in ptxas's log) a table entry may have beyond its default's: an entry spills at
#: most ``max(SPILL_BUDGET, the spills of the default configuration at its head_dim and bits)``; the tuning script
#: never chooses one above it and the tests compile every entry of the table for sm_90 against it. Not zero: with
#: Triton 3.8's ptxas the decode kernel's default at head_dim 128 (32 slots, 4 warps, the fastest of the H200
#: measurement in ``benchmarks/README.md``) uses all 255 registers and spills 100 bytes, at head_dim 256 (16 slots,
#: 8 warps) 92, the dequant kernel's default at head_dim 256 336; the configurations it refuses spill kilobytes
#: (head_dim 128: 32 slots on 2 warps 1,160 bytes, 64 on 2 warps 34 KB; head_dim 256: 16 slots on 4 warps 2,416).
SPILL_BUDGET = 128
_BITS = (2, 3, 4)


class DecodeConfig(NamedTuple):
    """A launch of the decode-attention kernel: ``block`` code slots per step of a program's loop, ``warps`` per
    program, and the split target: about ``programs_per_sm`` programs per streaming multiprocessor in all
    (:func:`nqcompile.kernels.decode_attention.split_tokens`)."""

    block: int
    warps: int
    programs_per_sm: int


class DequantConfig(NamedTuple):
    """A launch of the dequant kernel: ``block`` slots per program and ``warps`` per program."""

    block: int
    warps: int


class LaunchTable(NamedTuple):
    """A parsed table: ``meta`` (card, versions, date, command), ``decode`` keyed by ``(head_dim, key_bits,
    value_bits, bucket name)`` and ``dequant`` keyed by ``(head_dim, key_bits, value_bits)``."""

    meta: dict
    decode: dict
    dequant: dict


def default_decode_config(dim: int) -> DecodeConfig:
    """The decode kernel's configuration for keys not in the table: 32 slots, 4 warps for head_dim up to 128 (on an
    H200, K4V2, 128K tokens, CUDA graph replays: 2.80 ms against 3.64 ms for 8 warps, 3.03 ms for 16 slots and
    3.35 ms for 64; ``benchmarks/README.md``, "Decode attention kernel"), 16 slots and 8 warps above (not measured);
    2 programs per multiprocessor (8 instead of 2 did not help there)."""
    return DecodeConfig(32, 4, 2) if dim <= 128 else DecodeConfig(16, 8, 2)


def default_dequant_config(dim: int) -> DequantConfig:
    """The dequant kernel's configuration for keys not in the table: 32 slots and 4 warps for head_dim up to 128,
    16 slots and 8 warps above (the ``[D, D]`` Hadamard matrix and the codeword search share the registers); not
    chosen by measurement."""
    return DequantConfig(32, 4) if dim <= 128 else DequantConfig(16, 8)


def context_bucket(capacity: int) -> str:
    """The name of the :data:`CONTEXT_BUCKETS` bucket holding ``capacity`` slots (the smallest whose bound it does
    not exceed)."""
    for name, most in CONTEXT_BUCKETS:
        if most is None or capacity <= most:
            return name
    raise AssertionError("the last bucket is unbounded")


def _field(entry: dict, name: str, allowed, where: str) -> int:
    value = entry.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        raise ValueError(f"{where}: {name}={value!r}, expected one of {sorted(allowed)}")
    return value


def parse_table(data: dict) -> LaunchTable:
    """Check and index a table as :func:`table_json` writes it.

    Args:
        data: ``{"meta": {...}, "decode": [entry, ...], "dequant": [entry, ...]}``; a decode entry has ``head_dim``,
            ``key_bits``, ``value_bits``, ``context`` (a bucket name), ``block``, ``warps``, ``programs_per_sm``; a
            dequant entry the same without ``context`` and ``programs_per_sm``; any other field (what was measured)
            is kept in the file and ignored here.

    Returns:
        a :class:`LaunchTable`.

    Raises:
        ValueError: a missing or out-of-range field (:data:`BLOCKS`, :data:`WARPS`, bits 2 to 4, a head_dim that is
            a positive multiple of 8, a known bucket), or a key given twice.
    """
    buckets = [name for name, _ in CONTEXT_BUCKETS]
    decode, dequant = {}, {}
    for kind, entries in (("decode", data.get("decode", [])), ("dequant", data.get("dequant", []))):
        for i, entry in enumerate(entries):
            where = f"{kind} entry {i}"
            dim = entry.get("head_dim")
            if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0 or dim % 8:
                raise ValueError(f"{where}: head_dim={dim!r}, expected a positive multiple of 8")
            bits = (_field(entry, "key_bits", _BITS, where), _field(entry, "value_bits", _BITS, where))
            block, warps = _field(entry, "block", BLOCKS, where), _field(entry, "warps", WARPS, where)
            if kind == "decode":
                if entry.get("context") not in buckets:
                    raise ValueError(f"{where}: context={entry.get('context')!r}, expected one of {buckets}")
                key = (dim, *bits, entry["context"])
                config = DecodeConfig(block, warps, _field(entry, "programs_per_sm",
                                                           range(1, MAX_PROGRAMS_PER_SM + 1), where))
                table = decode
            else:
                key, config, table = (dim, *bits), DequantConfig(block, warps), dequant
            if key in table:
                raise ValueError(f"{where}: key {key} given twice")
            table[key] = config
    return LaunchTable(dict(data.get("meta", {})), decode, dequant)


def load_table(path: Path = TABLE_PATH) -> LaunchTable:
    """:func:`parse_table` of the JSON file ``path`` (``OSError``, ``json.JSONDecodeError`` or ``ValueError`` if it
    cannot be read or checked)."""
    return parse_table(json.loads(Path(path).read_text()))


def table_json(meta: dict, decode: list[dict], dequant: list[dict]) -> str:
    """The text of a table file: ``meta`` and the entries (as :func:`parse_table` reads them, checked by it)."""
    data = {"meta": meta, "decode": decode, "dequant": dequant}
    parse_table(data)
    return json.dumps(data, indent=1) + "\n"


_TABLE = [load_table()]


def current_table() -> LaunchTable:
    """The table the lookups read: the committed one, or the one :func:`using` put in place."""
    return _TABLE[-1]


@contextlib.contextmanager
def using(table: LaunchTable) -> Iterator[LaunchTable]:
    """Make the lookups read ``table`` inside the ``with`` block (the tuning script times each candidate this way;
    a kernel launched or captured inside keeps the configuration it got)."""
    _TABLE.append(table)
    try:
        yield table
    finally:
        _TABLE.pop()


def decode_config(dim: int, key_bits: int, value_bits: int, capacity: int,
                  table: Optional[LaunchTable] = None) -> DecodeConfig:
    """The decode kernel's configuration for a code segment of ``capacity`` slots at ``key_bits``/``value_bits``
    and head dimension ``dim``: the entry of ``table`` (default :func:`current_table`) for ``(dim, key_bits,
    value_bits, context_bucket(capacity))``, else :func:`default_decode_config`."""
    table = current_table() if table is None else table
    found = table.decode.get((dim, key_bits, value_bits, context_bucket(capacity)))
    return found if found is not None else default_decode_config(dim)


def dequant_config(dim: int, key_bits: int, value_bits: int, table: Optional[LaunchTable] = None) -> DequantConfig:
    """The dequant kernel's configuration: the entry of ``table`` (default :func:`current_table`) for ``(dim,
    key_bits, value_bits)``, else :func:`default_dequant_config`."""
    table = current_table() if table is None else table
    found = table.dequant.get((dim, key_bits, value_bits))
    return found if found is not None else default_dequant_config(dim)
