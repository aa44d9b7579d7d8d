"""Plot decode ms/token against context length from ``e2e_decode.py`` JSON files: one line per cache and mode.

Every row of every file given that measured a decode time becomes a point; rows of one cache, mode, backend and
compile mode (and decoder layers, when the files mix models) form one line, so several runs (one per context
length, as the device's time limit asks) draw one figure. Failed rows are listed on stderr and left out. The x axis
is logarithmic (tokens), the y axis logarithmic (ms/token); the title names the device, the layers and the
versions found in the files. For example::

    python benchmarks/plot_decode.py benchmarks/results/e2e_h200/e2e_32k_kernel.json --out decode_ms.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("results", nargs="+", type=Path, help="JSON files written by e2e_decode.py --out")
    p.add_argument("--out", type=Path, default=Path("decode_ms_per_token.png"), help="PNG file to write")
    return p.parse_args(argv)


def series(files: list[Path]) -> tuple[dict[str, list[tuple[int, float]]], dict[str, set]]:
    """``{label: [(T, ms/token), ...] sorted by T}`` over the rows of ``files`` that measured a decode time, and the
    metadata values seen (``device``, ``torch``, ``transformers``, ``layers``), each a set.

    Raises:
        ValueError: a file that is not ``e2e_decode.py`` output (no ``meta`` or ``rows``).
    """
    lines: dict[str, list[tuple[int, float]]] = {}
    meta: dict[str, set] = {"device": set(), "torch": set(), "transformers": set(), "layers": set()}
    for path in files:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or "meta" not in data or "rows" not in data:
            raise ValueError(f"{path}: not an e2e_decode.py result (expected the keys 'meta' and 'rows')")
        layers = data["meta"].get("args", {}).get("layers")
        for key in ("device", "torch", "transformers"):
            meta[key].add(data["meta"].get(key))
        meta["layers"].add(layers)
        for row in data["rows"]:
            if row.get("decode_ms_per_token") is None:
                print(f"{path}: left out {row['cache']} {row['mode']} at T={row['T']}: {row.get('error', 'no time')}",
                      file=sys.stderr)
                continue
            mode = f"{row['mode']}, {row['backend']}, {row['compile_mode']}" if "backend" in row else row["mode"]
            label = f"{row['cache']} ({mode})"
            lines.setdefault(label, []).append((row["T"], row["decode_ms_per_token"], layers))
    layered = len(meta["layers"]) > 1
    out = {}
    for label, points in lines.items():
        for T, ms, layers in sorted(points, key=lambda p: (p[2] or 0, p[0])):
            out.setdefault(f"{label}, {layers} layers" if layered else label, []).append((T, ms))
    return out, meta


def plot(lines: dict[str, list[tuple[int, float]]], meta: dict[str, set], out: Path) -> None:
    """Write the figure of :func:`series` to ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, points in sorted(lines.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode ms/token")
    joined = lambda key: ", ".join(sorted(str(v) for v in meta[key] if v is not None))  # noqa: E731
    ax.set_title(f"{joined('device')}, {joined('layers')} layers; torch {joined('torch')}, "
                 f"transformers {joined('transformers')}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Read the files, print one line per series, write the PNG."""
    args = parse_args(argv)
    lines, meta = series(args.results)
    if not lines:
        print("no row with a decode time in the files given", file=sys.stderr)
        return 1
    for label, points in sorted(lines.items()):
        print(f"{label}: " + ", ".join(f"{T:,} tokens {ms:.1f} ms" for T, ms in points))
    plot(lines, meta, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
