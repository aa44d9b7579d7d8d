"""``python -m nqcompile``: the ``nqcompile`` command line (``generate`` when no subcommand is given)."""

from nqcompile.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
