"""Markdown tables of `napari-ruac evaluate` JSON files, the variants side by side (README).

    python scripts/results_table.py results/eval/dsb2018-micro.json results/eval/dsb2018-micro-det.json ...

One table per target (the file name's part before the first "-<model>"), one row per model and
prompt mode, plus the baselines the evaluation reports.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

METRICS = ("miou", "jf", "pcc", "auroc", "pavpu", "ece")


def fmt(value) -> str:
    return "" if value is None else f"{value:.3f}"


def table(paths: list[Path]) -> str:
    lines = ["| model | prompt | objects | " + " | ".join(m if m != "jf" else "J&F" for m in METRICS) + " |",
             "|---" * (3 + len(METRICS)) + "|"]
    baselines = {}
    for path in paths:
        data = json.loads(path.read_text())
        for mode, res in data["results"].items():
            row = [data["model"], mode, str(res["n_objects"])] + [fmt(res.get(m)) for m in METRICS]
            lines.append("| " + " | ".join(row) + " |")
        for name, res in data.get("baselines", {}).items():
            baselines[name] = res
    for name, res in baselines.items():
        lines.append(f"| baseline: {name} | {res.get('prompt', '')} | {res.get('n_objects', '')} | "
                     f"{fmt(res.get('miou'))} | {fmt(res.get('jf'))} | | | | |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    print(table([Path(p) for p in argv]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
