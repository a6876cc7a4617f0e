"""Runs ``jiralake <args>`` in this process, unchanged, plus a thread that reports what only the
process itself can see: ``python -m bench.soak_probe receiver --port 8080``.

Every ``JIRALAKE_SOAK_PROBE_S`` seconds (default 5) the ``soak-probe`` thread appends one JSON line to
``$JIRALAKE_SOAK_PROBE_FILE``: the asyncio tasks of the service's event loop (count, and count per
task name with trailing digits folded, so ``Task-1234`` and ``Task-77`` count together), the objects
the garbage collector tracks, and the memory blocks the Python allocator holds
(``sys.getallocatedblocks()``: strings and numbers too, which gc does not track), both after a full
collection, so they count what is alive, not garbage waiting for the next collection.

The loop is the one ``asyncio.run`` creates (caught by wrapping ``asyncio.events.new_event_loop``).
The tasks are counted, and the collection made, on that loop through ``run_coroutine_threadsafe``:
nothing is read from another thread while the loop changes it, and finalizers run where they expect
to. bench/soak_services.py reads the last line at each sample. No product code is changed.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import sys
import threading
import time
from asyncio import events
from collections import Counter
from typing import Any

PROBE_FILE_ENV = "JIRALAKE_SOAK_PROBE_FILE"
PROBE_INTERVAL_ENV = "JIRALAKE_SOAK_PROBE_S"
_TRAILING_DIGITS = re.compile(r"\d+$")


async def _tasks() -> dict[str, Any]:
    me = asyncio.current_task()
    names: Counter[str] = Counter(
        _TRAILING_DIGITS.sub("N", task.get_name()) for task in asyncio.all_tasks() if task is not me
    )
    # On the loop's thread, like any collection the service makes itself: finalizers that touch the
    # loop run where they expect to. Counts live objects, not garbage a later collection would free.
    gc.collect()
    return {
        "tasks": sum(names.values()),
        "task_names": dict(names.most_common(12)),
        "gc_objects": len(gc.get_objects()),
        # Every block pymalloc holds, strings and numbers included (gc tracks only containers).
        "py_blocks": sys.getallocatedblocks(),
    }


def _report(loops: list[asyncio.AbstractEventLoop], path: str, interval_s: float) -> None:
    while True:
        time.sleep(interval_s)
        loop = loops[-1] if loops else None
        if loop is None or loop.is_closed() or not loop.is_running():
            continue
        try:
            snapshot = asyncio.run_coroutine_threadsafe(_tasks(), loop).result(timeout=interval_s)
        except Exception:  # the loop is closing, or too busy to answer in time: skip this sample
            continue
        snapshot["at"] = time.time()
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(snapshot) + "\n")


def main(argv: list[str]) -> int:
    path = os.environ[PROBE_FILE_ENV]
    interval_s = float(os.environ.get(PROBE_INTERVAL_ENV, "5"))
    loops: list[asyncio.AbstractEventLoop] = []
    create_loop = events.new_event_loop

    def remembered_loop() -> asyncio.AbstractEventLoop:
        loop = create_loop()
        loops.append(loop)
        return loop

    events.new_event_loop = remembered_loop  # asyncio.Runner calls events.new_event_loop()
    threading.Thread(target=_report, args=(loops, path, interval_s), name="soak-probe", daemon=True).start()
    from jiralake.cli import main as jiralake_main

    return jiralake_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
