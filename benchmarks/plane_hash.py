"""What a click pays to find a plane's embeddings: ``Predictor.is_cached`` then ``set_image`` on a
plane already embedded (what the annotator does before every click), by plane size.

The predictor keys its embeddings by a hash of the plane's content. Side by side in one run:

* ``blake2b x2``: the hash the predictor used until 2026-12-07 (blake2b-128), taken twice per
  click (``is_cached`` and ``set_image`` each hashed the plane);
* ``xxh3 x2``: XXH3-128, still twice;
* ``now``: the predictor as it is (XXH3-128, and ``set_image`` reuses the hash of the
  ``is_cached`` call just before it on the same array).

    python benchmarks/plane_hash.py [--sizes 1024 4096 8192] [--repeats 5]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time

import numpy as np


def blake2b_key(arr: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(str(arr.dtype).encode())
    h.update(str(arr.shape).encode())
    h.update(np.ascontiguousarray(arr).view(np.uint8).data)
    return h.hexdigest()


def median_ms(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from napari_ruac.io.normalize import validate_plane
    from napari_ruac.model import Predictor, build_model, MODEL_SPECS
    from napari_ruac.model.predictor import content_key

    predictor = Predictor(build_model(MODEL_SPECS["micro"].config).eval())
    rows = []
    for n in args.sizes:
        for dtype in (np.uint16, np.float32):
            plane = (np.random.default_rng(0).random((n, n)) * 1000).astype(dtype)
            predictor.set_image(plane)  # planes this large are decoded in windows: nothing encoded

            def twice(key):
                return lambda: [key(validate_plane(plane)) for _ in range(2)]

            def now():
                predictor.is_cached(plane)
                predictor.set_image(plane)

            b, x, c = (median_ms(f, args.repeats) for f in (twice(blake2b_key), twice(content_key), now))
            rows.append((f"{n}x{n} {np.dtype(dtype).name}", n * n * np.dtype(dtype).itemsize / 2**20, b, x, c))
    print(f"\nis_cached + set_image on an embedded plane, median of {args.repeats} (ms)")
    print(f"{'plane':<22} {'MiB':>6} {'blake2b x2':>11} {'xxh3 x2':>8} {'now':>7} {'blake2b x2 / now':>17}")
    for name, mib, b, x, c in rows:
        print(f"{name:<22} {mib:>6.0f} {b:>11.1f} {x:>8.1f} {c:>7.1f} {b / c:>16.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
