"""Waiting on child processes by their progress, never by a wall-clock deadline.

`start` runs a command with its output going to log files; `wait` blocks until every process has exited, or until a
condition holds. A run is hung when, for STALL_SECONDS, none of its processes has written new output and together
(with their own child processes) they have used less than CPU_PROGRESS_SECONDS of CPU time: a slow machine only
makes a run take longer, while a run waiting forever (a collective whose peer never comes) fails. A hung run's
processes are asked for their Python stacks, then killed, and the failure names each process, its CPU time and the
end of its output, stacks included. `run` is `subprocess.run` with captured output, watched the same way.

Stacks: every child gets METACHEX_JAX_DUMP_STACKS_ON_SIGUSR1=1, with which `python -m metachex_jax.main` (and
tests/sharded_steps.py) print every thread's Python stack to stderr on SIGUSR1 (faulthandler, which works while a
thread sits in C++ code). A child that does not answer SIGUSR1 is simply ended by it.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence

import psutil

from metachex_jax.main import DUMP_STACKS_VAR

STALL_SECONDS = 120.0  # no new output and (almost) no CPU time for this long: hung
CPU_PROGRESS_SECONDS = 1.0  # CPU time that counts as progress within one stall window (idle threads use less)
SAMPLE_SECONDS = 1.0  # how often output sizes and CPU times are read
STACK_DUMP_SECONDS = 3.0  # time given to the children to print their stacks
TAIL_CHARS = 8000  # how much of each log a failure shows


@dataclasses.dataclass
class Child:
    """One started process: `name` for messages, its output in `logs` (stdout, then stderr if kept apart)."""
    name: str
    popen: subprocess.Popen
    logs: tuple[str, ...]

    def output(self, log: int = -1) -> str:
        return _read_bytes(self.logs[log]).decode(errors="replace")

    def describe(self) -> str:
        code = self.popen.poll()
        state = "running" if code is None else f"exited with {code}"
        return f"{self.name} (pid {self.popen.pid}, {state})"


def start(cmd: Sequence[str], log, *, stderr_log=None, name: str | None = None, env: dict | None = None,
          **popen_kwargs) -> Child:
    """Start `cmd` with stdout to `log` and stderr to `stderr_log` (default: to `log` as well)."""
    env = {**(os.environ if env is None else env), DUMP_STACKS_VAR: "1"}
    with open(log, "wb") as out:
        if stderr_log is None:
            popen = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, **popen_kwargs)
        else:
            with open(stderr_log, "wb") as err:
                popen = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, **popen_kwargs)
    logs = (str(log),) if stderr_log is None else (str(log), str(stderr_log))
    return Child(name or os.path.basename(str(log)), popen, logs)


def wait(children: Sequence[Child], until: Callable[[], bool] | None = None, *,
         stall_seconds: float = STALL_SECONDS, cpu_progress_seconds: float = CPU_PROGRESS_SECONDS,
         poll_seconds: float = 0.05) -> None:
    """Return once every child has exited or, given `until`, once `until()` holds; a child that exits while `until`
    is still pending fails the wait. A run without progress for `stall_seconds` (no new output, and under
    `cpu_progress_seconds` of CPU time) fails it too (see the module)."""
    __tracebackhide__ = True  # pytest: the failure's message says it all
    watch = _Progress(children, stall_seconds, cpu_progress_seconds)
    while True:
        if until is None and all(c.popen.poll() is not None for c in children):
            return
        if until is not None:
            if until():
                return
            for child in children:
                if child.popen.poll() is not None:
                    raise AssertionError(f"{child.describe()} before the run got where the test waits for:\n"
                                         f"{_tail(child)}")
        if watch.stalled():
            raise AssertionError(_hung(children, watch))
        time.sleep(poll_seconds)


def run(cmd: Sequence[str], *, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True)` that waits as `wait` does."""
    with tempfile.TemporaryDirectory() as folder:
        child = start(cmd, os.path.join(folder, "stdout"), stderr_log=os.path.join(folder, "stderr"),
                      name=os.path.basename(cmd[0]), env=env, cwd=cwd)
        try:
            wait([child])
        finally:
            _end(child)
        return subprocess.CompletedProcess(cmd, child.popen.returncode, child.output(0), child.output(1))


class _Progress:
    """What the children have done so far, sampled every SAMPLE_SECONDS: output sizes and exits (any change is
    progress) and CPU time per child (at least CPU_PROGRESS_SECONDS more, all children together, is progress)."""

    def __init__(self, children: Sequence[Child], stall_seconds: float,
                 cpu_progress_seconds: float = CPU_PROGRESS_SECONDS):
        self.children, self.stall_seconds, self.cpu_progress_seconds = children, stall_seconds, cpu_progress_seconds
        self.sampled_at = 0.0
        self.since, self.done, self.cpu = time.monotonic(), self._done(), self._cpu()

    def stalled(self) -> bool:
        now = time.monotonic()
        if now - self.sampled_at < SAMPLE_SECONDS:
            return False
        self.sampled_at = now
        done, cpu = self._done(), self._cpu()
        more_cpu = sum(max(0.0, new - old) for new, old in zip(cpu, self.cpu))  # an exited child reads 0
        if done != self.done or more_cpu >= self.cpu_progress_seconds:
            self.since, self.done, self.cpu = now, done, cpu
            return False
        return now - self.since >= self.stall_seconds

    def idle_seconds(self) -> float:
        return time.monotonic() - self.since

    def _done(self) -> list:
        return [child.popen.poll() for child in self.children] + [
            os.path.getsize(log) for child in self.children for log in child.logs]

    def _cpu(self) -> list[float]:
        return [cpu_seconds(child.popen.pid) for child in self.children]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live descendants (0 once it has exited)."""
    total = 0.0
    for process in _tree(pid):
        try:
            times = process.cpu_times()
        except psutil.Error:  # exited meanwhile
            continue
        total += times.user + times.system
    return total


def _hung(children: Sequence[Child], watch: _Progress) -> str:
    """Ask every running child for its stacks, end them all, and say where each one was."""
    states = [f"{child.describe()}, {cpu_seconds(child.popen.pid):.1f} s CPU" for child in children]
    asked_at = [[os.path.getsize(log) for log in child.logs] for child in children]
    for child in children:
        if child.popen.poll() is None:
            child.popen.send_signal(signal.SIGUSR1)
    time.sleep(STACK_DUMP_SECONDS)
    _end(*children)
    lines = [f"hung: no new output and under {watch.cpu_progress_seconds:g} s of CPU time in {watch.idle_seconds():.0f} s "
             f"(limit {watch.stall_seconds:g} s). Each process's output, then what it printed when asked for its "
             f"Python stacks (SIGUSR1):"]
    for child, state, sizes in zip(children, states, asked_at):
        outputs = [_read_bytes(log) for log in child.logs]
        lines.append(f"--- {state}, output in {', '.join(child.logs)}:")
        lines += [data[:size][-TAIL_CHARS // 4:].decode(errors="replace") for data, size in zip(outputs, sizes)]
        lines.append(f"--- {child.name}, stacks:")
        lines += [data[size:][:TAIL_CHARS].decode(errors="replace") for data, size in zip(outputs, sizes)]
    return "\n".join(lines)


def _tail(child: Child) -> str:
    return "\n".join(child.output(i)[-TAIL_CHARS:] for i in range(len(child.logs)))


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _tree(pid: int) -> list[psutil.Process]:
    """A process and its live descendants ([] once it has exited)."""
    try:
        process = psutil.Process(pid)
        return [process, *process.children(recursive=True)]
    except psutil.Error:
        return []


def _end(*children: Child) -> None:
    """Kill the children still running, with their own child processes, and reap them."""
    for child in children:
        if child.popen.poll() is None:
            for process in _tree(child.popen.pid):
                try:
                    process.kill()
                except psutil.Error:
                    pass
    for child in children:
        child.popen.wait()
