"""Where a worker's CPU time goes: py-spy sampling from outside, summarised by component.

py-spy reads the worker's stacks from another process, so the worker runs its own code
unchanged (an in-process profiler would slow every call it measures). Only samples where a
thread was running are recorded, so the shares are shares of CPU time, not of waiting.
``summarize`` groups the leaf frame of each sample by the code it belongs to (the product,
arq, redis-py, aiohttp, logging, the event loop...) and lists the heaviest functions, self and
inclusive.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.infra import REPO_ROOT, BenchError

#: Samples per second. py-spy stops the worker for each sample to read whole stacks (without
#: stopping, over half the stacks came out truncated); at 100 Hz that costs the worker about 10 %
#: of its speed (``run`` in the JSON is the profiled round's own figures), at 250 Hz about half.
RATE_HZ = 100
_FRAME = re.compile(r"^(?P<function>.*) \((?P<path>[^():]*):(?P<line>\d+)\)$")
#: (component, path fragments that identify it), first match wins; the product last but one.
COMPONENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("arq", ("arq/",)),
    ("redis-py", ("redis/",)),
    ("hiredis", ("hiredis/",)),
    ("aiohttp", ("aiohttp/", "multidict/", "yarl/", "aiohappyeyeballs/", "propcache/")),
    # Our own logging modules too: lines written later (worker.core.logs) leave no structlog frame.
    ("logging (structlog + stdlib)", ("structlog/", "logging/", "worker/core/logs.py", "worker/core/redaction.py")),
    ("prometheus-client", ("prometheus_client/",)),
    ("event loop (asyncio / uvloop)", ("asyncio/", "uvloop/", "selectors.py")),
    ("product: producers", ("producers/",)),
    ("product: worker", ("worker/",)),
    ("bench", ("bench/",)),
)


#: Leaf frames that stand for native code below them. Under uvloop the loop itself (epoll, socket
#: reads, callback dispatch) is C with no Python frame, so its time lands on the frame that called
#: ``run_until_complete``; a transport's ``write``/``writelines`` is the send(2) system call.
LEAF_OVERRIDES: dict[tuple[str, str], str] = {
    ("Worker.run", "arq/worker.py"): "event loop (asyncio / uvloop)",
    ("StreamWriter.writelines", "asyncio/streams.py"): "socket writes (send syscalls)",
    ("StreamWriter._writelines", "aiohttp/http_writer.py"): "socket writes (send syscalls)",
    ("StreamWriter.write", "asyncio/streams.py"): "socket writes (send syscalls)",
}


#: Components whose inclusive share is worth a line (the product's own steps are listed by function).
_LIBRARIES = frozenset({"redis-py", "aiohttp", "logging (structlog + stdlib)", "prometheus-client", "hiredis"})


def find_py_spy() -> str | None:
    """py-spy from PATH or from this interpreter's environment (pip installs it next to python)."""
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


@dataclass
class PySpy:
    """A running ``py-spy record`` of one process; ``stop`` makes it write its raw stacks."""

    popen: subprocess.Popen[bytes]
    output: Path

    @classmethod
    def attach(cls, pid: int, output: Path) -> PySpy:
        binary = find_py_spy()
        if binary is None:
            raise BenchError("py-spy is not installed: .venv/bin/pip install py-spy (it is not a project dependency)")
        output.parent.mkdir(parents=True, exist_ok=True)
        with output.with_suffix(".log").open("wb") as log:
            popen = subprocess.Popen(  # noqa: S603 - py-spy with fixed arguments
                [
                    binary,
                    "record",
                    "--pid",
                    str(pid),
                    "--rate",
                    str(RATE_HZ),
                    "--format",
                    "raw",
                    "--output",
                    str(output),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return cls(popen, output)

    def stop(self) -> None:
        """SIGINT makes py-spy stop sampling and write the file."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def _frame(text: str) -> tuple[str, str]:
    """(function, path relative to the repository or site-packages) of one raw frame."""
    match = _FRAME.match(text.strip())
    if match is None:
        return text.strip(), ""
    path = match["path"]
    path = path.removeprefix(str(REPO_ROOT) + "/")
    if "site-packages/" in path:
        path = path.rpartition("site-packages/")[2]
    return match["function"], path


def component(path: str) -> str:
    for name, fragments in COMPONENTS:
        if any(path.startswith(f) or "/" + f in path for f in fragments):
            return name
    return "other (stdlib, orjson, ...)" if path else "unknown"


def _stacks(raw_lines: Iterable[str]) -> Iterable[tuple[list[tuple[str, str]], int]]:
    for line in raw_lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if stack and count.isdigit():
            yield [_frame(f) for f in stack.split(";")], int(count)


def summarize(raw: Path, *, top: int = 15) -> dict[str, Any]:
    """Shares of CPU samples: by component of the leaf frame, and the heaviest functions."""
    by_component: Counter[str] = Counter()
    component_inclusive: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    product_inclusive: Counter[str] = Counter()
    total = 0
    with raw.open() as lines:
        for frames, count in _stacks(lines):
            total += count
            function, path = frames[-1]
            by_component[LEAF_OVERRIDES.get((function, path)) or component(path)] += count
            self_time[f"{function} ({path})"] += count
            for name in {component(path) for _, path in frames}:
                component_inclusive[name] += count
            for name in {f"{function} ({path})" for function, path in frames}:
                inclusive[name] += count
                if name.endswith(".py)") and "(worker/" in name:
                    product_inclusive[name] += count
    if total == 0:
        raise BenchError(f"py-spy recorded no samples in {raw}")

    def shares(counter: Counter[str], limit: int | None = None) -> dict[str, float]:
        return {name: round(100 * n / total, 1) for name, n in counter.most_common(limit)}

    # Frames on (nearly) every stack (the event loop's run_forever, arq's main) say nothing.
    below_top = Counter({name: n for name, n in inclusive.items() if n < 0.9 * total})

    return {
        "samples": total,
        "by_component_pct": shares(by_component),
        # Libraries anywhere on the stack: e.g. all the time spent logging, whoever called it.
        "by_component_inclusive_pct": shares(
            Counter({name: n for name, n in component_inclusive.items() if name in _LIBRARIES})
        ),
        # The product's own functions, inclusive: its steps (claim, POST, finish, events, logs).
        "product_functions_pct": shares(Counter({n: c for n, c in product_inclusive.items() if c < 0.9 * total}), top),
        "top_self_pct": shares(self_time, top),
        "top_inclusive_pct": shares(below_top, top),
    }
