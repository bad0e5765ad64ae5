"""What a `python -m metachex_jax.<module>` command line accepts, printed as one JSON line (for tests/test_docs.py).

    python tests/cli_flags.py '{"module": "metachex_jax.bench", "subcommands": ["train"],
                                "configs": ["configs/pretrain.py:demo"]}'

The module runs as `__main__`, as `python -m` runs it, with the command line `[*subcommand]`, and is stopped at the
moment it parses its flags: argparse's and absl's parsers are patched to hand over the parser instead of parsing.
So every way a module defines its flags (argparse with subcommands, absl's global or private FlagValues, flags added
in a loop) is read from the parser itself, nothing from the help text, and nothing runs past the parsing. Printed:
  flags:   {subcommand or "": sorted option names without the dashes; ["help"] for a module that builds no parser
           but answers --help; null when neither}
  configs: {config spec: every dotted field of the ConfigDict it loads, or {"error": message}}
Config specs are loaded as ml_collections' config flags load them: `PATH[:ARG]`, `get_config(ARG)` or
`get_config()`, with PATH relative to the working directory (the repository root).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import runpy
import sys

from absl import flags
from ml_collections import ConfigDict


class ParserReached(Exception):
    """Raised instead of parsing, carrying the parser the module built."""

    def __init__(self, parser):
        super().__init__()
        self.parser = parser


def stop_at_parsing(self, *args, **kwargs):
    raise ParserReached(self)


def argparse_options(parser: argparse.ArgumentParser, subcommand: str) -> set[str]:
    # argparse keeps its options and subparsers in private attributes; they are the only complete record.
    names = {option.lstrip("-") for option in parser._option_string_actions}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and subcommand in action.choices:
            names |= argparse_options(action.choices[subcommand], "")
    return names


def absl_options(flag_values: flags.FlagValues) -> set[str]:
    names = set(flag_values)
    names |= {f"no{name}" for name in flag_values if flag_values[name].boolean}  # --noflag for booleans
    return names


def run_as_main(module: str, argv: list[str]):
    """Runs the module as `python -m module *argv` would, its output discarded; the parser it reached, if any."""
    sys.argv = [module, *argv]
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except ParserReached as reached:
        return reached.parser
    except SystemExit as e:
        return e.code  # e.g. a dispatcher answering --help, or refusing an unknown subcommand, with no parser
    return None


def options(module: str, subcommand: str) -> list[str] | None:
    words = [subcommand] if subcommand else []
    parser = run_as_main(module, words)
    if isinstance(parser, flags.FlagValues):
        return sorted(absl_options(parser))
    if isinstance(parser, argparse.ArgumentParser):
        return sorted(argparse_options(parser, subcommand))
    if run_as_main(module, [*words, "--help"]) in (0, None):
        return ["help"]  # a module without a parser that still answers --help (the benchmark dispatcher)
    return None


def config_fields(spec: str) -> list[str] | dict:
    path, _, arg = spec.partition(":")
    try:
        module_spec = importlib.util.spec_from_file_location("docs_config", path)
        config_module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(config_module)
        config = config_module.get_config(arg) if arg else config_module.get_config()
    except Exception as e:  # noqa: BLE001 (any failure to load is what the test reports)
        return {"error": f"{type(e).__name__}: {e}"}
    fields = []

    def walk(node: ConfigDict, prefix: str):
        for key, value in node.items():
            fields.append(prefix + key)
            if isinstance(value, ConfigDict):
                walk(value, f"{prefix}{key}.")

    walk(config, "")
    return sorted(fields)


def main() -> None:
    request = json.loads(sys.argv[1])
    argparse.ArgumentParser.parse_known_args = stop_at_parsing
    argparse.ArgumentParser.parse_args = stop_at_parsing
    flags.FlagValues.__call__ = stop_at_parsing
    result = {
        "flags": {sub: options(request["module"], sub) for sub in ["", *request.get("subcommands", [])]},
        "configs": {spec: config_fields(spec) for spec in request.get("configs", [])},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
