"""Training sampler cost: episodes/s at the index level, and batch assembly per episode with / without augmentation.

python bench/sampler.py [--domains 8 --images 100 --size 128 --ways 1 --shots 2 --queries 2]

Builds a synthetic-sized fixture (random arrays written with write_prepared into a temp dir), single thread.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from metaseg.data.augment import build_augment  # noqa: E402
from metaseg.data.prepared import DomainData, PreparedDataset, write_prepared  # noqa: E402
from metaseg.data.sampler import TrainSampler, episode_batch  # noqa: E402
from metaseg.models.backbones import normalization  # noqa: E402

NORM = normalization("mobilenet_v3_large")  # a lookup table either way: the backbone does not change the cost


def fixture(root: str, domains: int, images: int, size: int, classes: int = 3) -> None:
    rng = np.random.default_rng(0)
    out = []
    for d in range(domains):
        masks = np.zeros((images, size, size), dtype=np.uint8)
        for i in range(images):
            for c in range(1, classes + 1):
                if c == 1 + i % classes or rng.random() < 0.4:
                    r, s = rng.integers(0, size // 2, 2)
                    masks[i, r:r + size // 3, s:s + size // 3] = c
        out.append(DomainData(f"d{d}", [f"c{c}" for c in range(classes)],
                              rng.integers(0, 256, (images, size, size, 3), dtype=np.uint8), masks))
    write_prepared(root, out, source="bench", image_size=size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("domains", 8), ("images", 100), ("size", 128), ("ways", 1), ("shots", 2), ("queries", 2)):
        p.add_argument(f"--{name}", type=int, default=default)
    a = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        fixture(root, a.domains, a.images, a.size)
        ds = PreparedDataset(root)
        t0 = time.perf_counter()
        sampler = TrainSampler(ds, ds.domain_names, ways=a.ways, shots=a.shots, queries=a.queries, seed=0)
        build_s = time.perf_counter() - t0
        n = 20000
        t0 = time.perf_counter()
        for _ in range(n):
            sampler.sample_seeded()
        eps = n / (time.perf_counter() - t0)
        aug = build_augment(a.size)
        rows = []
        for label, augment in (("no augment", None), ("augment", aug)):
            draws = [sampler.sample_seeded() for _ in range(200)]
            for ep, s in draws[:10]:  # warm page cache / lazy imports
                episode_batch(ds.domain(ep.domain), ep, norm=NORM, augment=augment, seed=s)
            t0 = time.perf_counter()
            for ep, s in draws:
                episode_batch(ds.domain(ep.domain), ep, norm=NORM, augment=augment, seed=s)
            rows.append((label, (time.perf_counter() - t0) / len(draws) * 1e3))
    imgs = a.ways * a.shots + a.queries
    print(f"fixture: {a.domains} domains x {a.images} images x {a.size}px, {a.ways}-way {a.shots}-shot "
          f"{a.queries} queries ({imgs} images/episode), 1 thread")
    print(f"| measure | value |\n|---|---|\n| sampler index build | {build_s * 1e3:.0f} ms |")
    print(f"| episodes/s (index level) | {eps:,.0f} |")
    for label, ms in rows:
        print(f"| batch assembly, {label} | {ms:.2f} ms/episode |")


if __name__ == "__main__":
    main()
