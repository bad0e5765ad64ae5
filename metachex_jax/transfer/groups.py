"""Starting weights as named groups: several pretraining runs (e.g. seeds 0, 1, 2 of one config) as one start.

    specs = group_specs(config)                 # [GroupSpec]: init_from's group, then one per compare_with entry
    groups = load_groups(specs, model_config, seed, step, contract=...)
    for replicate in replicates(groups): ...    # the k-th run of every group
    summary = summarise(cells, paired_by_protocol, groups)

A group is one start of the comparison. `config.init_from` is ONE group: a run, a comma list of runs, glob patterns
(`/runs/seed*`) or any mix, every match of them together, named `config.init_name` ("" = the weights' own name:
metachexnet for a MetaChexNet run, chexnet for the CheXNet baseline, ...). Each `compare_with` entry is a group of
its own: "random", "random_bn", a path, or a glob pattern (every match). A group of one run is a start as before,
named by the group; the runs of a group of n > 1 are `<group>@0` .. `<group>@<n-1>`, in the sorted order of their
paths (each run's path is in the report's `starts`).

Replicates: the comparison is made once per replicate. Replicate k takes the k-th run of every group; a group of
one run (random, random_bn, one path) takes part in every replicate. So each replicate is the comparison a run of
one seed alone would have made: the same cells and the same family of pairs for Holm (paired.py). Groups of
several runs must have the same number of runs.

Across runs (`summarise`, for groups of several runs):
- per group, method and protocol: every run's AUROC, their mean and standard deviation (ddof 1);
- two groups' cells are compared run by run, replicate k with replicate k, and the comparison is decided only when
  the paired AUROC difference has the same sign in every replicate AND one side wins (paired.winner: the Holm-
  adjusted paired test and the paired bootstrap CI agree) in a majority of the replicates; otherwise neither.
- deployment (`deploy_run`): a group of several runs deploys the run whose pretraining reached the best validation
  mean AUROC (what its trainer recorded with its best checkpoint), never a transfer test result; the report and
  the model card say which run and why.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from metachex_jax.core import files
from metachex_jax.evaluation import reports
from metachex_jax.transfer import weights

RUN_SEPARATOR = "@"  # <group>@<k>: the k-th run of a group of several


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    name: str  # "" = the weights' own name
    entries: tuple[str, ...]  # "random", "random_bn", paths, glob patterns


@dataclasses.dataclass
class StartGroup:
    name: str
    starts: list[weights.Start]  # its runs, in order

    @property
    def several(self) -> bool:
        return len(self.starts) > 1


def _entries(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def group_specs(config) -> list[GroupSpec]:
    """init_from's group, then the compare_with baselines, one group each. Without init_from a run would silently
    compare baselines only, so that needs config.baselines_only=True."""
    init_from = _entries(config.init_from)
    if not init_from and not config.baselines_only:
        raise ValueError("config.init_from is empty: set it to the weights under study (a pretraining workdir, a "
                         "convert_torchvision or a convert_torchxrayvision output, or several runs: a comma list or a "
                         "glob pattern), or set config.baselines_only=True to compare only "
                         f"config.compare_with ({config.compare_with!r})")
    if init_from and config.baselines_only:
        raise ValueError(f"config.baselines_only=True but config.init_from={config.init_from!r} is set; drop one of "
                         "them")
    specs = [GroupSpec(config.get("init_name", "").strip(), tuple(init_from))] if init_from else []
    specs += [GroupSpec("", (entry,)) for entry in _entries(config.compare_with)]
    if not specs:
        raise ValueError("no starting weights: config.baselines_only=True needs config.compare_with")
    return specs


def expand(entries) -> tuple[list[str], list[str]]:
    """(the paths and random starts the entries name, problems): a glob pattern stands for its matches, in sorted
    order; a pattern without a match is a problem."""
    out, problems = [], []
    for entry in entries:
        if entry in weights.RANDOM_KINDS or not files.has_glob(entry):
            out.append(entry)
            continue
        matches = files.glob(entry)
        if not matches:
            problems.append(f"starting weights {entry!r}: the pattern matches nothing")
        out += matches
    return list(dict.fromkeys(out)), problems


def load_groups(specs: list[GroupSpec], model_config, seed: int, step: str = "best", *, contract) -> list[StartGroup]:
    """Every group's starts (weights.load_start; every problem collected and raised together), named as the module
    docstring says; groups with the same name get a numeric suffix."""
    groups, problems = [], []
    for spec in specs:
        entries, found = expand(spec.entries)
        problems += found
        starts = []
        for entry in entries:
            try:
                starts.append(weights.load_start(entry, model_config, seed, step, contract=contract))
            except weights.StartingWeightsError as e:
                problems.append(str(e))
        if not starts or len(starts) < len(entries):
            continue
        kinds = sorted({s.name for s in starts})
        if not spec.name and len(kinds) > 1:
            problems.append(f"starting weights {', '.join(spec.entries)}: one start holds weights of different kinds "
                            f"({', '.join(kinds)}); name the group (config.init_name) or split it")
            continue
        groups.append(StartGroup(spec.name or starts[0].name, starts))
    if problems:
        raise weights.StartingWeightsError("\n".join(problems))
    seen: dict[str, int] = {}
    for group in groups:
        seen[group.name] = seen.get(group.name, 0) + 1
        if seen[group.name] > 1:
            group.name = f"{group.name}{seen[group.name]}"
        for k, start in enumerate(group.starts):
            start.group = group.name
            start.name = f"{group.name}{RUN_SEPARATOR}{k}" if group.several else group.name
    sizes = sorted({len(g.starts) for g in groups if g.several})
    if len(sizes) > 1:
        raise weights.StartingWeightsError(
            "starts with several runs must have the same number of runs (replicate k compares the k-th run of "
            "each): " + ", ".join(f"{g.name} has {len(g.starts)}" for g in groups if g.several))
    return groups


def replicates(groups: list[StartGroup]) -> list[list[weights.Start]]:
    """[[the start of every group in replicate k] for k]: the k-th run of each group of several, every group of
    one in each."""
    count = max(len(g.starts) for g in groups)
    return [[g.starts[k] if g.several else g.starts[0] for g in groups] for k in range(count)]


def group_of_cell(key: str) -> tuple[str, str]:
    """"metachexnet@1/probe" -> ("metachexnet", "probe")."""
    start, method = key.split("/")
    return start.split(RUN_SEPARATOR)[0], method


def decide(runs: list[dict]) -> dict:
    """The decision across replicates of one comparison of two groups' cells: `runs` are the replicates'
    comparisons (paired.paired_comparisons entries, a before b). A side wins only when the difference has the same
    sign in every replicate and that side wins in a majority of them."""
    values = [r["difference"]["value"] if r["difference"] else np.nan for r in runs]
    signs = {int(np.sign(v)) for v in values}
    same_sign = len(signs) == 1 and 0 not in signs and not np.isnan(values).any()
    wins = {side: sum(r["wins"] == r[side] for r in runs) for side in ("a", "b")}
    winner = next((side for side in ("a", "b") if same_sign and wins[side] > len(runs) / 2
                   and signs == {1 if side == "a" else -1}), None)
    return {"same_sign": same_sign, "wins_a": wins["a"], "wins_b": wins["b"], "side": winner}


def summarise(cells: dict, paired: dict[str, list[dict]], groups: list[StartGroup]) -> dict | None:
    """The across-run summary of the module docstring (None when no group has several runs): {"cells": {group/method:
    {protocol: {"runs", "auroc", "mean", "std"}}}, "paired": {protocol: [{"a", "b", "runs", "same_sign", "wins_a",
    "wins_b", "wins"}]}}. `paired` holds every replicate's comparisons, each with its "replicate"."""
    if not any(g.several for g in groups):
        return None
    by_group: dict[str, dict[str, dict]] = {}
    for key, per_protocol in cells.items():
        group, method = group_of_cell(key)
        for protocol, cell in per_protocol.items():
            entry = by_group.setdefault(f"{group}/{method}", {}).setdefault(protocol, {"runs": [], "auroc": []})
            entry["runs"].append(key.split("/")[0])
            entry["auroc"].append(cell["auroc"]["value"])
    for per_protocol in by_group.values():
        for entry in per_protocol.values():
            values = np.asarray(entry["auroc"])
            entry["mean"] = float(values.mean())
            entry["std"] = float(values.std(ddof=1)) if len(values) > 1 else None
    decisions: dict[str, list[dict]] = {}
    for protocol, comparisons in paired.items():
        pairs: dict[tuple[str, str], list[dict]] = {}
        for c in comparisons:
            a, b = ("/".join(group_of_cell(c[side])) for side in ("a", "b"))
            pairs.setdefault((a, b), []).append(c)
        for (a, b), runs in pairs.items():
            decision = decide(runs)
            decisions.setdefault(protocol, []).append(
                {"a": a, "b": b, "runs": [{k: r[k] for k in ("replicate", "a", "b", "difference", "p_holm", "wins")}
                                          for r in runs],
                 "same_sign": decision["same_sign"], "wins_a": decision["wins_a"], "wins_b": decision["wins_b"],
                 "wins": {"a": a, "b": b, None: None}[decision["side"]]})
    return {"cells": by_group, "paired": decisions}


def resolve_deploy(config, groups: list[StartGroup]):
    """(the config deploy.deploy_spec reads, why that run): `deploy.start` naming a start of several runs ("" =
    init_from's) becomes the run `deploy_run` picks; anything else is left to deploy_spec to check."""
    wanted = config.deploy.start or (groups[0].name if config.init_from.strip() else "")
    group = next((g for g in groups if g.name == wanted and g.several), None)
    if group is None:
        return config, ""
    start, why = deploy_run(group)
    resolved = config.copy_and_resolve_references()
    resolved.deploy.start = start.name
    return resolved, why


def deploy_run(group: StartGroup) -> tuple[weights.Start, str]:
    """The run of `group` to deploy and why (module docstring)."""
    if not group.several:
        return group.starts[0], f"{group.name} is a single run"
    scores = [s.info.get("val_mean_auroc") for s in group.starts]
    if any(v is None for v in scores):
        return group.starts[0], (f"{group.starts[0].name}: the first of {group.name}'s runs (not every run "
                                 "recorded a validation result)")
    best = int(np.argmax(scores))
    listed = ", ".join(f"{s.name} {v:.4f}" for s, v in zip(group.starts, scores))
    return group.starts[best], (f"{group.starts[best].name}: the best validation mean AUROC of its pretraining "
                                f"among {group.name}'s runs ({listed})")


def markdown_lines(summary: dict) -> list[str]:
    """The across-runs section of comparison.md."""
    f = reports.format_number
    protocols = list(dict.fromkeys(p for per_protocol in summary["cells"].values() for p in per_protocol))
    rows = []
    for key, per_protocol in summary["cells"].items():
        row = [key]
        for protocol in protocols:
            e = per_protocol.get(protocol)
            row.append("-" if e is None else f"{f(e['mean'], 3)} +- {f(e['std'], 3)} (n={len(e['runs'])})"
                       if e["std"] is not None else f"{f(e['mean'], 3)} (one run)")
        rows.append(row)
    lines = ["## Several runs per start", "",
             "AUROC mean +- standard deviation across each start's runs (the per-run cells are in the tables "
             "above). A comparison of two starts is decided only when the paired AUROC difference has the same sign "
             "in every replicate (replicate k: the k-th run of each start) AND one side wins by the rule (Holm-"
             "adjusted paired test and paired CI agreeing, within that replicate's comparison) in a majority of "
             "them; otherwise neither.", "", reports.markdown_table(["start / method"] + protocols, rows)]
    for protocol, decisions in summary["paired"].items():
        rows = [[d["a"], d["b"], "; ".join(f"{r['difference']['value']:+.3f} ({r['wins'] or 'neither'})"
                                           if r["difference"] else "undefined" for r in d["runs"]),
                 "yes" if d["same_sign"] else "no", f"{d['wins_a']} / {d['wins_b']}", d["wins"] or "neither"]
                for d in decisions]
        lines += [f"### {protocol} across runs", "",
                  reports.markdown_table(["A", "B", "A - B per replicate (its call)", "same sign",
                                          "wins A / B", "decided"], rows)]
    return lines
