"""Chart several `leapfrog bench --out` results of the same prompts side by side.

    python scripts/plot_bench.py docs/bench/a.json docs/bench/b.json --labels greedy "T=0.7" --out chart.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from runtime.bench.charts import speedup_chart


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="bench JSON files")
    p.add_argument("--labels", nargs="+", help="one legend label per file (default: file names)")
    p.add_argument("--title", default="")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args()
    labels = args.labels or [Path(r).stem for r in args.results]
    if len(labels) != len(args.results):
        p.error(f"{len(args.results)} files but {len(labels)} labels")
    results = []
    for path in args.results:
        try:
            results.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            p.error(f"cannot read {path}: {e}")
    print(f"wrote {speedup_chart(results, labels, args.out, args.title)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
