"""Markdown tables of `napari-ruac evaluate` JSON files, the variants side by side (README).

    python scripts/results_table.py results/eval/dsb2018-micro.json results/eval/dsb2018-micro-det.json ...

One table per target (the file name's part before the first "-<model>"), one row per model and
prompt mode, plus the baselines the evaluation reports; automatic segmentation (if evaluated)
gets a table of its own (instances found, precision/recall/F1 at IoU > 0.5, best-match mIoU,
and how its uncertainty finds its errors).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

METRICS = ("miou", "jf", "pcc", "auroc", "pavpu", "ece")
AUTO_METRICS = ("precision", "recall", "f1", "miou", "pcc", "auroc")


def fmt(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def table(paths: list[Path]) -> str:
    lines = ["| model | prompt | objects | " + " | ".join(m if m != "jf" else "J&F" for m in METRICS) + " |",
             "|---" * (3 + len(METRICS)) + "|"]
    baselines = {}
    auto = ["| model | objects | found | " + " | ".join(AUTO_METRICS) + " |", "|---" * (3 + len(AUTO_METRICS)) + "|"]
    for path in paths:
        data = json.loads(path.read_text())
        for mode, res in data["results"].items():
            if mode == "automatic":
                row = [data["model"], str(res["n_objects"]), str(res["n_found"])] + [fmt(res.get(m)) for m in AUTO_METRICS]
                auto.append("| " + " | ".join(row) + " |")
                continue
            row = [data["model"], mode, str(res["n_objects"])] + [fmt(res.get(m)) for m in METRICS]
            lines.append("| " + " | ".join(row) + " |")
        for name, res in data.get("baselines", {}).items():
            baselines[name] = res
    for name, res in baselines.items():
        lines.append(f"| baseline: {name} | {res.get('prompt', '')} | {res.get('n_objects', '')} | "
                     f"{fmt(res.get('miou'))} | {fmt(res.get('jf'))} | | | | |")
    if len(lines) == 2:  # automatic segmentation only
        return "\n".join(auto)
    if len(auto) > 2:
        lines += ["", "Automatic segmentation (no prompts; matched to the truth at IoU > 0.5):", ""] + auto
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    print(table([Path(p) for p in argv]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
