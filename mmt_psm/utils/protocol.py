"""The part every protocol tool (tools/acdc_protocol.py, tools/isbi_protocol.py) shares: run arm x seed jobs in
a thread pool, collect per-arm results, write results.json / results.md atomically."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Sequence, Tuple

from .atomic import write_json, write_text

__all__ = ["run_jobs", "write_results"]


def run_jobs(
    jobs: Sequence[Tuple[str, int]], run_one: Callable[[str, int], Dict[str, float]], workers: int
) -> Tuple[Dict[str, Dict[int, Dict[str, float]]], List[str]]:
    """``run_one(arm, seed)`` for every job, ``workers`` at a time; returns ({arm: {seed: metrics}}, failures).
    A job raising RuntimeError / FileNotFoundError is a failure (printed), the others go on."""
    results: Dict[str, Dict[int, Dict[str, float]]] = {}
    failures: List[str] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {(a, s): pool.submit(run_one, a, s) for a, s in jobs}
        for (a, s), fut in futures.items():
            try:
                results.setdefault(a, {})[s] = fut.result()
            except (RuntimeError, FileNotFoundError) as e:
                failures.append(str(e))
                print(f"[fail] {e}", flush=True)
    return results, failures


def write_results(out: str, seeds: Sequence[int], table: Dict, results: Dict, failures: List[str], text: str) -> None:
    """``<out>/results.json`` (seeds, table, runs, failures) and ``<out>/results.md``; prints the markdown."""
    write_json(os.path.join(out, "results.json"),
               {"seeds": list(seeds), "table": table, "runs": results, "failures": failures})
    write_text(os.path.join(out, "results.md"), text)
    print(text)
