"""The documentation: the site builds strictly, the README stays a front door, and every command the README and the
docs pages show names a module that exists and flags (and config fields) that module accepts."""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys

import docs_pages

REPO = docs_pages.REPO
README_MAX_LINES = 200
FENCE = re.compile(r"^ *```[^\n]*\n(.*?)^ *```[ \t]*$", re.S | re.M)  # a fenced code block; group 1: its text


# --- the site --------------------------------------------------------------------------------------------------

def test_site_builds_strictly(tmp_path):
    """mkdocs with `strict: true`: a broken link or anchor, a page missing from the nav or a nav entry without its
    page is a warning, and a warning fails the build."""
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                             "--config-file", str(REPO / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                            cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})  # material's notice about MkDocs 2
    output = result.stdout + result.stderr
    assert result.returncode == 0 and not re.search(r"^WARNING\b", output, re.M), output
    assert (tmp_path / "site" / "index.html").is_file()


def test_every_docs_page_is_in_the_nav():
    config = (REPO / "mkdocs.yml").read_text()
    assert re.search(r"^strict: true$", config, re.M)
    pages = {str(p.relative_to(docs_pages.DOCS)) for p in docs_pages.DOCS.rglob("*.md")}
    in_nav = set(re.findall(r":\s*(\S+\.md)\s*$", config, re.M))
    assert pages == in_nav, (pages - in_nav, in_nav - pages)


def test_readme_is_a_front_door():
    text = docs_pages.README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    assert "synthetic" in text.lower()
    for heading in ("## Two commands", "## Where things are"):
        assert heading in text, heading


def test_ci_runs_the_readme_test_command():
    """`.ci/run` runs the README's test command verbatim."""
    readme_blocks = FENCE.findall(docs_pages.README.read_text())
    test_command = [line for block in readme_blocks for line in block.splitlines() if "pytest" in line]
    assert len(test_command) == 1 and test_command[0] in (REPO / ".ci" / "run").read_text().splitlines()


# --- no machine's paths, nothing outside the repository --------------------------------------------------------

MACHINE_PATHS = re.compile(r"(?<![\w.~$])/(?:work|root|Users|mnt/[a-z])/|\.\./shared\b|shared/reference/"
                           r"|\b(?:real_formats|data_contract|datasets)\.md\b")
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def test_no_machine_paths_or_outside_references():
    found = [f"{path.relative_to(REPO)}:{n}: {line.strip()}"
             for path, text in docs_pages.pages().items()
             for n, line in enumerate(text.splitlines(), 1) if MACHINE_PATHS.search(line)]
    assert not found, "\n".join(found)


def test_the_machine_path_pattern_catches_what_it_is_for():
    for bad in ("see /work/main/README.md", "/root/.cache/x", "../shared/reference/style.md", "datasets.md"):
        assert MACHINE_PATHS.search(bad), bad
    for fine in ("--workdir=/tmp/metachex_demo", "/data/hospital/labels.csv", "~/.cache/metachex_jax/demo/",
                 "$HOME/work/x", "gs://MY_BUCKET/runs/metachex-v4", "docs/data.md"):
        assert not MACHINE_PATHS.search(fine), fine


def test_readme_links_stay_inside_the_repository():
    """The READMEs' relative links (the docs pages, the demo image) name files of the repository; mkdocs checks the
    links between docs pages."""
    bad = []
    for readme in (docs_pages.README, REPO / "launch" / "README.md"):
        for target in LINK.findall(readme.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a URL or an anchor of the README itself
            file, _, anchor = target.partition("#")
            path = (readme.parent / file).resolve()
            if REPO not in path.parents or not path.exists():
                bad.append(f"{readme.relative_to(REPO)}: {target}")
            elif anchor and anchor not in heading_anchors(path.read_text()):
                bad.append(f"{readme.relative_to(REPO)}: {target} (no such heading)")
    assert not bad, bad


def heading_anchors(markdown: str) -> set[str]:
    """The anchors of a page's headings, as GitHub and mkdocs' toc make them: lower case, punctuation dropped,
    spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", markdown), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).strip().replace(" ", "-") for heading in headings}


# --- the commands shown stay valid ----------------------------------------------------------------------------

INLINE = re.compile(r"`([^`]+)`")
COMMAND = re.compile(r"python -m (metachex_jax(?:\.\w+)+)")  # `metachex_jax.<name>` is a placeholder
COMMAND_END = re.compile(r"\s(?:#|&&|;|\|\s)|\spython -m ")
FLAG = re.compile(r"(?<![\w-])--([A-Za-z][\w-]*(?:\.[\w-]+)*)(?:=(\"[^\"]*\"|'[^']*'|\S*))?")
SUBCOMMAND = re.compile(r"[a-z][a-z0-9_]*")


@dataclasses.dataclass
class Command:
    where: str  # file:line
    text: str
    module: str
    subcommand: str  # the first word after the module when it looks like one ("" if none)
    flags: list[str]
    config: str | None  # the --config= spec, brackets of optional parts removed


def code_snippets(text: str) -> list[tuple[int, str]]:
    """(line, text) of every line of the fenced code blocks (backslash continuations joined) and every inline code
    span (which may run over a line break)."""
    snippets = []
    for block in FENCE.finditer(text):
        first = text.count("\n", 0, block.start(1)) + 1
        lines = block.group(1).split("\n")
        n = 0
        while n < len(lines):
            start, line = n, lines[n]
            while line.endswith("\\") and n + 1 < len(lines):
                n += 1
                line = line[:-1] + " " + lines[n].strip()
            snippets.append((first + start, line))
            n += 1
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for span in INLINE.finditer(prose):
        snippets.append((prose.count("\n", 0, span.start()) + 1, span.group(1).replace("\n", " ")))
    return snippets


def commands() -> list[Command]:
    found = []
    for path, text in docs_pages.pages().items():
        for line, snippet in code_snippets(text):
            for match in COMMAND.finditer(snippet):
                rest = snippet[match.end():]
                end = COMMAND_END.search(rest)
                rest = rest[:end.start()] if end else rest
                words = rest.split()
                subcommand = words[0] if words and SUBCOMMAND.fullmatch(words[0]) else ""
                flags, config = [], None
                for flag in FLAG.finditer(rest):
                    flags.append(flag.group(1))
                    if flag.group(1) == "config" and flag.group(2):
                        config = re.sub(r"[\[\]\"']", "", flag.group(2))
                found.append(Command(f"{path.relative_to(REPO)}:{line}", match.group(0) + rest, match.group(1),
                                     subcommand, flags, config))
    return found


def accepted(commands_by_module: dict[str, list[Command]]) -> dict[str, dict]:
    """What each module accepts, from tests/cli_flags.py: one process per module, all at once."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "JAX_PLATFORMS": "cpu"}
    running = {}
    for module, uses in commands_by_module.items():
        request = {"module": module,
                   "subcommands": sorted({c.subcommand for c in uses if c.subcommand}),
                   "configs": sorted({c.config for c in uses if c.config})}
        running[module] = subprocess.Popen([sys.executable, str(REPO / "tests" / "cli_flags.py"), json.dumps(request)],
                                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           text=True)
    results = {}
    for module, process in running.items():
        out, err = process.communicate()
        assert process.returncode == 0, f"{module}: {err[-3000:]}"
        results[module] = json.loads(out.strip().splitlines()[-1])
    return results


def test_commands_in_the_docs_name_existing_modules_flags_and_config_fields():
    shown = commands()
    assert len(shown) >= 40 and {c.module for c in shown} >= {"metachex_jax.main", "metachex_jax.predict"}
    missing = sorted({f"{c.where}: {c.module}" for c in shown if importlib.util.find_spec(c.module) is None})
    assert not missing, "commands naming modules that do not exist:\n" + "\n".join(missing)

    by_module = collections.defaultdict(list)
    for c in shown:
        by_module[c.module].append(c)
    results = accepted(by_module)

    problems = []
    for c in shown:
        result = results[c.module]
        known = result["flags"].get(c.subcommand) or result["flags"][""]
        if known is None and c.flags:
            problems.append(f"{c.where}: {c.module} defines no flags: {c.text}")
            continue
        fields = result["configs"].get(c.config) if c.config else None
        if isinstance(fields, dict):
            problems.append(f"{c.where}: --config={c.config} does not load: {fields['error']}")
            continue
        for flag in c.flags:
            if flag.startswith("config."):
                if fields is None:
                    problems.append(f"{c.where}: --{flag} without a --config= to check it against")
                elif flag.removeprefix("config.") not in fields:
                    problems.append(f"{c.where}: --{flag}: no such field in {c.config}")
            elif flag not in known:
                problems.append(f"{c.where}: --{flag} is not a flag of {' '.join([c.module, c.subcommand])}")
    assert not problems, "\n".join(problems)


def test_the_command_check_catches_a_wrong_flag_and_field():
    """The checker itself, on a bad command: the parser reached is the module's, not an empty one."""
    bad = [Command("x", "", "metachex_jax.prepare", "", ["dataset", "no_such_flag"], None),
           Command("x", "", "metachex_jax.main", "", ["config", "config.no_such_field"], "configs/pretrain.py:demo")]
    results = accepted({c.module: [c] for c in bad})
    assert "dataset" in results["metachex_jax.prepare"]["flags"][""]
    assert "no_such_flag" not in results["metachex_jax.prepare"]["flags"][""]
    fields = results["metachex_jax.main"]["configs"]["configs/pretrain.py:demo"]
    assert "data.data_dir" in fields and "no_such_field" not in fields
