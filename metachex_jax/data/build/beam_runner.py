"""The Apache Beam runner (`prepare --runner=direct|dataflow|flink|spark`): the build's work (work.py) as a Beam
pipeline of our own, writing the same shards as the local runner. Needs the `beam` extra (apache-beam).

    plan tasks (files) -> Create(task names) -> ParDo(ProcessTask) -> (shard key, (index, record bytes))
                                                   \\-> tagged "tally"  -> CombineGlobally(MergeTallies) -> tally.json
    records -> GroupByKey(split, shard) -> ParDo(WriteShard) -> shard infos -> ToList -> shards.json

- The plan is written by the driver as task files (a few hundred records each) into the build folder's `_work/`,
  and the pipeline is created from their names: a plan inside the pipeline (beam.Create of every record) would
  make a job request too large for Dataflow (its limit is 20 MB; MIMIC-CXR's plan alone is ~26 MB).
- Every file is read and written by our own code through etils.epath (local, a shared mount, or gs://), never by
  Beam's IO, and the shards by shards.write_shard (a shard is complete or absent, and a retried task rewrites the
  same bytes).
- What the local build collects as it goes is a Beam aggregate: the tallies of the tasks (records and label
  counts per split, bit depths, orientations, every problem with its file) are combined by a CombineFn and written
  once as JSON; the driver reads it after the run (build.py decides: one error naming every bad file, or the skip
  report). Beam's Metrics are not used for this: Flink has no committed metrics, and a StringSet stops growing at
  1,000,000 characters.
- A file that fails is a problem in the tally (work.py), never a failed task. A decoder that crashes its worker
  process (a segfault, running out of memory) makes the runner retry the task and, after its retries (Dataflow:
  4), fail the job without naming the file: `prepare --verify` finds such a file first.

The DoFns take no builder objects: only the plan's records (data/raw dataclasses) and a `work.RecordSpec`, so a
worker imports the package's worker-side modules, never TFDS or jax.
"""

from __future__ import annotations

import functools
import json
import pickle
import shlex

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from etils import epath

from metachex_jax.core import files
from metachex_jax.data.build import shards, work

RUNNERS = {"direct": "DirectRunner", "dataflow": "DataflowRunner", "flink": "FlinkRunner", "spark": "SparkRunner"}
RECORDS_PER_TASK = 256
WORK_FOLDER = "_work"


def pipeline_options(runner: str, beam_options: str) -> PipelineOptions:
    """`--runner=NAME` of prepare and its `--beam_options="..."` (Beam's own flags) -> PipelineOptions."""
    flags = shlex.split(beam_options)
    names = {flag.split("=")[0] for flag in flags}
    if "--runner" in names:
        raise ValueError("give the runner as prepare's --runner, not inside --beam_options")
    if "--default_sdk_harness_log_level" not in names:  # the workers' INFO lines: only with this flag
        flags.append("--default_sdk_harness_log_level=WARNING")
    return PipelineOptions(flags, runner=RUNNERS[runner])


class ProcessTask(beam.DoFn):
    """One task file of the plan -> its records, keyed by shard, and the task's tally (tagged "tally")."""

    def __init__(self, work_dir: str, per_shard: int):
        self.work_dir, self.per_shard = work_dir, per_shard

    def process(self, task_name: str):
        chunks = pickle.loads(epath.Path(files.join(self.work_dir, task_name)).read_bytes())
        tally = work.Tally()
        for chunk in chunks:
            result = work.process_chunk(chunk)
            for index, data in result.records:
                yield (chunk.split, index // self.per_shard), (index, data)
            tally = tally.merge(result.tally)
        yield beam.pvalue.TaggedOutput("tally", tally)


class WriteShard(beam.DoFn):
    """(split, shard) and its records -> the shard file; emits its ShardInfo."""

    def __init__(self, folder: str, dataset: str, totals: dict[str, int]):
        self.folder, self.dataset, self.totals = folder, dataset, totals

    def process(self, element):
        (split, shard), records = element
        name = shards.shard_name(self.dataset, split, shard, self.totals[split])
        yield shards.write_shard(self.folder, name, split, shard, list(records))


class MergeTallies(beam.CombineFn):
    def create_accumulator(self) -> work.Tally:
        return work.Tally()

    def add_input(self, accumulator: work.Tally, tally: work.Tally) -> work.Tally:
        return accumulator.merge(tally)

    def merge_accumulators(self, accumulators) -> work.Tally:
        return functools.reduce(work.Tally.merge, accumulators, work.Tally())

    def extract_output(self, accumulator: work.Tally) -> work.Tally:
        return accumulator


def _write_json(value, path: str) -> None:
    files.write_atomic(path, json.dumps(value))


def write_tasks(plan: dict[str, list], spec: work.RecordSpec, work_dir: str) -> list[str]:
    """The plan as task files in `work_dir` (module docstring); returns their names."""
    names = []
    for split, records in plan.items():
        chunks = work.chunks(split, records, spec)
        per_task = max(1, RECORDS_PER_TASK // work.CHUNK_SIZE)
        for first in range(0, len(chunks), per_task):
            names.append(f"task-{split}-{first:07d}.pkl")
            files.write_atomic(files.join(work_dir, names[-1]), pickle.dumps(chunks[first:first + per_task]))
    return names


def run(plan: dict[str, list], spec: work.RecordSpec, folder: str, dataset: str, per_shard: int, *, runner: str,
        beam_options: str = "") -> tuple[list[shards.ShardInfo], work.Tally]:
    """Build every split of `plan` into `folder` on Beam's `runner`; returns the shards written and the tally."""
    options = pipeline_options(runner, beam_options)
    work_dir = files.join(folder, WORK_FOLDER)
    tasks = write_tasks(plan, spec, work_dir)
    totals = {split: shards.num_shards(len(records), per_shard) for split, records in plan.items()}
    with beam.Pipeline(options=options) as pipeline:
        made = (pipeline | "tasks" >> beam.Create(tasks)
                | "process" >> beam.ParDo(ProcessTask(work_dir, per_shard)).with_outputs("tally", main="records"))
        written = (made.records | "group by shard" >> beam.GroupByKey()
                   | "write shards" >> beam.ParDo(WriteShard(folder, dataset, totals)))
        (written | "shard infos" >> beam.Map(shards.ShardInfo.to_json) | "all shards" >> beam.combiners.ToList()
         | "write shards.json" >> beam.Map(_write_json, path=files.join(work_dir, "shards.json")))
        (made.tally | "merge tallies" >> beam.CombineGlobally(MergeTallies())
         | "tally as JSON" >> beam.Map(work.Tally.to_json)
         | "write tally.json" >> beam.Map(_write_json, path=files.join(work_dir, "tally.json")))
    # (leaving the `with` block ran the pipeline and waited for it; a failed job raised)
    infos = json.loads(files.read_text(files.join(work_dir, "shards.json")))
    tally = work.Tally.from_json(json.loads(files.read_text(files.join(work_dir, "tally.json"))))
    epath.Path(work_dir).rmtree()
    written_shards = sorted((shards.ShardInfo(**info) for info in infos), key=lambda s: (list(plan).index(s.split),
                                                                                       s.shard))
    return written_shards, tally
