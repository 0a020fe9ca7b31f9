"""Mean, spread and range of `napari-ruac evaluate` results over draws of the prompts (README).

    python scripts/seed_spread.py results/eval/dsb2018_seed*-micro.json ...

The evaluation draws each object's click from the ground truth with a fixed seed (``--seed``);
on one image of ~100 objects which pixel is clicked moves mIoU by ~0.01, so a target close to
a result is judged on several draws. One row per (model, test-time scales, prompt mode): the
mean and sample standard deviation of mIoU and AUROC over the files given, and mIoU's range.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def spread(paths: list[Path]) -> str:
    groups: dict[tuple[str, int, str], list[dict]] = {}
    for path in paths:
        data = json.loads(path.read_text())
        for mode, res in data["results"].items():
            if mode != "automatic":
                groups.setdefault((data["model"], data.get("scales", 1), mode), []).append(res)
    lines = ["| model | scales | prompt | draws | miou mean ± sd | miou range | auroc mean ± sd |", "|---" * 7 + "|"]
    for (model, scales, mode), runs in groups.items():
        miou = [r["miou"] for r in runs]
        auroc = [r["auroc"] for r in runs]
        sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
        lines.append(f"| {model} | {scales} | {mode} | {len(runs)} | {statistics.mean(miou):.3f} ± {sd(miou):.3f} "
                     f"| {min(miou):.3f}-{max(miou):.3f} | {statistics.mean(auroc):.3f} ± {sd(auroc):.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(spread([Path(p) for p in sys.argv[1:]]))
