"""`python -m metachex_jax.bench MODE [options]`: run one benchmark mode (see MODES in __init__.py)."""

from __future__ import annotations

import importlib
import sys

from metachex_jax.bench import MODES


def usage() -> str:
    width = max(map(len, MODES))
    lines = ["usage: python -m metachex_jax.bench MODE [options]   (MODE --help: the mode's options)", "", "modes:"]
    lines += [f"  {mode:<{width}}  {text}" for mode, text in MODES.items()]
    lines += ["", "The last line a mode prints is one JSON object with all its figures."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    mode, *options = argv
    if mode not in MODES:
        print(f"unknown benchmark mode {mode!r}\n\n{usage()}", file=sys.stderr)
        return 2
    importlib.import_module(f"metachex_jax.bench.{mode}").main(options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
