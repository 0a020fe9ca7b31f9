"""Figure per validation target: image, prediction, uncertainty, error (README, issue 6).

Every ground-truth object is prompted with one point (fixed seed, as in the evaluation); the
per-object maps are combined by taking, at each pixel, the object whose probability is highest.
Looking at the uncertainty and error panels side by side should show that the bright
uncertainty pixels are the wrong ones.

    python scripts/make_figures.py --model micro --target dsb2018 [--plane Z] [--prompt point1|box] [--zoom auto]
        [--scales 3]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from napari_ruac import Predictor, load_model  # noqa: E402
from napari_ruac._cli_options import zoom_value  # noqa: E402
from napari_ruac.evaluate import random_point_inside, tight_box  # noqa: E402
from napari_ruac.io.imageio import read_image  # noqa: E402


def combined_maps(predictor, labels, prompt, seed=0):
    rng = np.random.default_rng(seed)
    best_p = np.zeros(labels.shape, np.float32)
    unc = np.zeros(labels.shape, np.float32)
    pred = np.zeros(labels.shape, bool)
    prompts = []
    for obj in [int(i) for i in np.unique(labels) if i]:
        gt = labels == obj
        if gt.sum() < 10:
            continue
        prompts.append({"box": tight_box(gt)} if prompt == "box" else {"points": [random_point_inside(gt, rng)]})
    for p in predictor.predict_batch(prompts):
        take = p.probability > best_p
        best_p[take] = p.probability[take]
        unc[take] = p.uncertainty[take]
        pred |= p.mask
    return pred, unc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="micro")
    parser.add_argument("--target", default="dsb2018")
    parser.add_argument("--targets-dir", type=Path, default=Path.home() / ".cache" / "napari-ruac" / "targets")
    parser.add_argument("--plane", type=int, default=None)
    parser.add_argument("--prompt", choices=["point1", "box"], default="point1")
    parser.add_argument("--zoom", type=zoom_value, default=1.0,
                        help="the predictor's zoom: a number or 'auto' (the plane's own)")
    parser.add_argument("--scales", type=int, default=1, help="test-time scales (1, 3 or 5)")
    parser.add_argument("-o", "--output", type=Path, default=Path("docs/images"))
    args = parser.parse_args()
    folder = args.targets_dir / args.target
    image = read_image(folder / "images" / f"{args.target}.tif")
    labels = read_image(folder / "masks" / f"{args.target}.tif")
    if labels.ndim == 3:
        z = args.plane if args.plane is not None else int(np.argmax((labels > 0).sum((1, 2))))
        image, labels = image[z], labels[z]
    zoom = args.zoom
    predictor = Predictor(load_model(args.model), zoom=zoom, scales=args.scales)
    predictor.set_image(image)
    pred, unc = combined_maps(predictor, labels, args.prompt)
    error = pred != (labels > 0)
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4))
    panels = [(image, "image", "gray"), (pred, "prediction", "gray"), (unc, "uncertainty (bits)", "magma"),
              (error, "error vs ground truth", "gray")]
    for ax, (data, title, cmap) in zip(axes, panels):
        im = ax.imshow(data, cmap=cmap, vmin=0 if title.startswith("uncert") else None,
                       vmax=1 if title.startswith("uncert") else None)
        ax.set_title(title)
        ax.axis("off")
        if title.startswith("uncert"):
            fig.colorbar(im, ax=ax, fraction=0.046)
    from napari_ruac.evaluate import auroc, pearson

    seen = f", zoom auto: {predictor.zoom:.2f}" if zoom == "auto" else ("" if zoom == 1 else f", zoom {zoom:g}")
    seen += f", {args.scales} scales" if args.scales > 1 else ""
    fig.suptitle(f"{args.model} on {args.target} ({args.prompt} prompts{seen}): pixel AUROC of uncertainty for error "
                 f"{auroc(unc, error):.2f}, Pearson r {pearson(unc, error):.2f}")
    fig.tight_layout()
    args.output.mkdir(parents=True, exist_ok=True)
    suffix = "" if zoom == 1 else "_zoomauto" if zoom == "auto" else f"_zoom{zoom:g}"
    suffix += f"_scales{args.scales}" if args.scales > 1 else ""
    out = args.output / f"{args.target}_{args.model}_{args.prompt}{suffix}.png"
    fig.savefig(out, dpi=80)
    print(out)


if __name__ == "__main__":
    main()
