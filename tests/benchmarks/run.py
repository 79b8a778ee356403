"""Run every benchmark module (``bench_*.py``) and print one table of results.

Each module exposes ``run(out_dir: Path) -> list[dict]``; every result holds at least ``name``,
``value``, ``unit``, ``reference``, ``reference_value`` and ``ratio`` and is also written to
``<out_dir>/<name>.json``. Select modules with ``--only loop,allocation``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
import traceback
from pathlib import Path

REQUIRED = ("name", "value", "unit", "reference", "reference_value", "ratio")


def write_result(out_dir: Path, result: dict) -> Path:
    """Validate a result's fields and write it as ``<name>.json``."""
    missing = [k for k in REQUIRED if k not in result]
    if missing:
        raise ValueError(f"benchmark result {result.get('name')!r} lacks fields {missing}")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{result['name']}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    return path


def print_table(results: list[dict]) -> None:
    """Print results as an aligned table."""
    header = f"{'benchmark':<34} {'value':>12} {'unit':<8} {'reference':<30} {'ref value':>12} {'ratio':>9}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['name']:<34} {r['value']:>12.4g} {r['unit']:<8} {str(r['reference'])[:30]:<30} "
            f"{r['reference_value']:>12.4g} {r['ratio']:>9.4g}"
        )


def main(argv: list[str] | None = None) -> int:
    """Discover and run the benchmarks."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench-results", type=Path)
    parser.add_argument("--only", default="", help="comma-separated module suffixes, e.g. loop,allocation")
    args = parser.parse_args(argv)
    here = Path(__file__).parent
    wanted = {w.strip() for w in args.only.split(",") if w.strip()}
    results: list[dict] = []
    failed = []
    for mod in sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_")):
        if wanted and mod.removeprefix("bench_") not in wanted:
            continue
        print(f"== {mod}", flush=True)
        started = time.perf_counter()
        try:
            module = importlib.import_module(f"tests.benchmarks.{mod}")
            for result in module.run(args.out):
                write_result(args.out, result)
                results.append(result)
        except Exception:  # a broken benchmark must not hide the others' numbers
            traceback.print_exc()
            failed.append(mod)
        print(f"   {mod} took {time.perf_counter() - started:.1f} s", flush=True)
    print()
    print_table(results)
    print(f"\nresults written to {args.out}/")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
