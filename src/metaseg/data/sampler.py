"""Meta-training episodes: an online seeded sampler over meta-train domains, and episode -> tensor batches.

Sampler rules: a domain is drawn uniformly among the usable meta-train domains, then ``ways`` distinct classes
uniformly among its usable classes. A class is usable when at least ``shots + queries`` images contain one of its
pixels (``Domain.images_with_class``: an image whose only pixels are background / 255 never supports a class); a
domain is usable when it has >= ``ways`` usable classes. Support: ``shots`` distinct images per class, grouped in
class_ids order; query: ``queries`` other images containing at least one of the episode's classes (for ways > 1 a
draw that leaves too few is redrawn, up to 100 times, then the best draw is kept). Each episode also gets an
augmentation seed from the same stream, so ``state_dict`` / ``load_state_dict`` reproduce episodes *and* batches.
Settings no meta-train domain can serve are a ``ConfigError`` naming ``train.ways`` or ``train.shots`` and the most
the domains allow, raised when the sampler is built (before training starts).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from metaseg.config import ConfigError
from metaseg.data.augment import Augment
from metaseg.data.episodes import Episode
from metaseg.data.prepared import IGNORE, Domain, PreparedDataset

log = logging.getLogger(__name__)

_REDRAWS = 100


def too_large(dataset: PreparedDataset, domains: Sequence[str], *, ways: int, shots: int,
              queries: int) -> ConfigError:
    """The one-line error for an episode no meta-train domain can fill, naming the key to lower and the most the
    domains allow: ``train.ways`` when no domain has ``ways`` classes with 2 images (1 support + 1 query), else
    ``train.shots`` (shots + queries images of each of ``ways`` classes)."""
    if not domains:
        return ConfigError("'splits.meta_train': no meta-train domain to sample training episodes from")
    per_domain = {name: sorted((len(idx) for idx in dataset.domain(name).images_with_class().values()), reverse=True)
                  for name in domains}
    most_ways = max(domains, key=lambda name: sum(n >= 2 for n in per_domain[name]))
    n_ways = sum(n >= 2 for n in per_domain[most_ways])
    if n_ways < ways:
        return ConfigError(f"'train.ways': {ways}-way training episodes need {ways} classes with >= 2 images in one "
                           f"meta-train domain; the most is {n_ways} (domain '{most_ways}'): lower train.ways")
    allowed = {name: counts[ways - 1] if len(counts) >= ways else 0 for name, counts in per_domain.items()}
    best = max(domains, key=lambda name: allowed[name])
    return ConfigError(f"'train.shots': a {ways}-way episode needs shots + queries = {shots} + {queries} = "
                       f"{shots + queries} images of each class, but the meta-train domains allow at most "
                       f"{allowed[best]} (domain '{best}'): lower train.shots or train.queries so their sum is "
                       f"<= {allowed[best]}")


class TrainSampler:
    """Seeded online N-way K-shot episodes over the given (meta-train) domains only."""

    def __init__(self, dataset: PreparedDataset, domains: Sequence[str], *, ways: int, shots: int, queries: int,
                 seed: int):
        if ways < 1 or shots < 1 or queries < 1:
            raise ValueError(f"ways, shots and queries must be >= 1, got {ways}, {shots}, {queries}")
        self.ways, self.shots, self.queries, self.seed = ways, shots, queries, seed
        self.domains: tuple[str, ...] = tuple(domains)
        self._index: dict[str, tuple[np.ndarray, dict[int, np.ndarray]]] = {}
        self._present: dict[str, np.ndarray] = {}  # bool [N, C + 1] per usable domain (query candidates, ways > 1)
        skipped: list[str] = []
        for name in self.domains:
            d = dataset.domain(name)
            present = d.class_presence()  # one pass over the masks for both the index and the query candidates
            per_class = d.images_with_class(present)
            usable = np.array([c for c, idx in per_class.items() if len(idx) >= shots + queries], dtype=np.int64)
            if len(usable) >= ways:
                self._index[name] = (usable, {int(c): per_class[int(c)] for c in usable})
                self._present[name] = present
            else:
                skipped.append(f"{name} ({len(usable)} classes with >= {shots + queries} images)")
        if not self._index:
            raise too_large(dataset, self.domains, ways=ways, shots=shots, queries=queries)
        if skipped:
            log.warning("training sampler skips domains with fewer than ways=%d usable classes: %s", ways,
                        ", ".join(skipped))
        self.usable_domains: tuple[str, ...] = tuple(self._index)
        self._rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5A3]))
        self.count = 0  # episodes drawn so far

    def sample(self) -> Episode:
        """The next episode (also draws its augmentation seed; see ``sample_seeded``)."""
        return self.sample_seeded()[0]

    def sample_seeded(self) -> tuple[Episode, int]:
        """The next episode and its augmentation seed (pass it to ``episode_batch(..., seed=)``)."""
        rng = self._rng
        name = self.usable_domains[int(rng.integers(len(self.usable_domains)))]
        classes, index = self._index[name]
        if self.ways == 1:
            c = int(classes[rng.integers(len(classes))])
            picked = rng.choice(index[c], size=self.shots + self.queries, replace=False)
            ep = Episode(name, (c,), tuple(picked[:self.shots].tolist()), tuple(picked[self.shots:].tolist()))
        else:
            ep = self._sample_multi(name, classes, index)
        self.count += 1
        return ep, int(rng.integers(2**31))

    def _sample_multi(self, name: str, classes: np.ndarray, index: dict[int, np.ndarray]) -> Episode:
        rng, best = self._rng, None
        for _ in range(_REDRAWS):
            class_ids = [int(c) for c in rng.choice(classes, size=self.ways, replace=False)]
            support: list[int] = []
            for c in class_ids:  # a random ordered draw, minus images already used, stays uniform
                arr = index[c]
                cand = rng.choice(arr, size=min(len(arr), self.shots + len(support)), replace=False).tolist()
                support.extend([i for i in cand if i not in support][:self.shots])
            if len(support) != self.ways * self.shots:
                continue
            has_class = self._present[name][:, class_ids].any(axis=1)
            has_class[support] = False
            qcand = np.flatnonzero(has_class)
            query = rng.choice(qcand, size=min(self.queries, len(qcand)), replace=False).tolist()
            if query and (best is None or len(query) > len(best.query)):
                best = Episode(name, tuple(class_ids), tuple(support), tuple(query))
            if len(query) == self.queries:
                break
        if best is None:
            raise ValueError(f"domain '{name}': could not draw a {self.ways}-way {self.shots}-shot episode with a "
                             f"query in {_REDRAWS} tries; lower train.ways or train.shots")
        return best

    def state_dict(self) -> dict[str, Any]:
        """Exact RNG state + settings (plain ints and strings: JSON- and torch.save-able)."""
        return {"rng": self._rng.bit_generator.state, "count": self.count, "domains": list(self.domains),
                "ways": self.ways, "shots": self.shots, "queries": self.queries, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = {"domains": list(self.domains), "ways": self.ways, "shots": self.shots, "queries": self.queries}
        theirs = {k: (list(state[k]) if k == "domains" else state[k]) for k in mine}
        if mine != theirs:
            raise ValueError(f"sampler state was saved with {theirs}, this sampler has {mine}; resume with the same "
                             f"train settings or start a fresh run")
        self._rng.bit_generator.state = state["rng"]
        self.count = int(state["count"])


@dataclass(frozen=True)
class EpisodeBatch:
    """Tensors of one episode: x float32 [n,3,H,W] normalised for the backbone, y int64 [n,H,W] in episode labels."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    class_ids: tuple[int, ...] = ()  # the domain's class ids; label i + 1 = class_ids[i]
    domain: str = ""  # the episode's domain (l2o's contrastive term pairs tasks by it)

    def to(self, device: str | torch.device, non_blocking: bool = False) -> EpisodeBatch:
        return replace(self, **{k: getattr(self, k).to(device, non_blocking=non_blocking)
                                for k in ("support_x", "support_y", "query_x", "query_y")})


Norm = tuple[Sequence[float], Sequence[float]]  # (mean, std) per RGB channel, applied to images scaled to [0, 1]


def normalise(images: np.ndarray, norm: Norm) -> torch.Tensor:
    """uint8 [n,H,W,3] -> float32 [n,3,H,W], (x / 255 - mean) / std with the backbone's ``norm``."""
    mean, std = (np.asarray(v, dtype=np.float64) for v in norm)
    # value v of channel c -> (v / 255 - mean[c]) / std[c], as a [3, 256] lookup table (a gather beats float maths)
    lut = ((np.arange(256)[None, :] / 255.0 - mean[:, None]) / std[:, None]).astype(np.float32)
    out = np.empty((images.shape[0], 3, *images.shape[1:3]), dtype=np.float32)
    for c in range(3):
        np.take(lut[c], images[..., c], out=out[:, c])
    return torch.from_numpy(out)


def label_lut(class_ids: Sequence[int]) -> np.ndarray:
    """int64 [256]: class_ids[i] -> i + 1, 255 -> 255, anything else -> 0."""
    lut = np.zeros(256, dtype=np.int64)
    lut[IGNORE] = IGNORE
    lut[np.asarray(class_ids, dtype=np.int64)] = np.arange(1, len(class_ids) + 1)
    return lut


def episode_batch(domain: Domain, episode: Episode, *, norm: Norm, augment: Augment | None = None,
                  seed: int | None = None) -> EpisodeBatch:
    """Assemble an episode's tensors from the memory-mapped arrays (support first, then query), normalised with
    the backbone's ``norm`` (``metaseg.models.backbones.normalization``).

    With ``augment``, image j of the episode (support then query order) is augmented with a seed derived from
    (``seed``, j); ``seed=None`` then means fresh OS entropy (not reproducible).
    """
    if episode.domain != domain.name:
        raise ValueError(f"episode is from domain '{episode.domain}', got arrays of domain '{domain.name}'")
    idx = np.asarray(episode.support + episode.query, dtype=np.int64)
    images, masks = domain.images[idx], domain.masks[idx]
    if augment is not None and len(idx):
        seeds = np.random.SeedSequence(seed).generate_state(len(idx))
        pairs = [augment(images[j], masks[j], int(seeds[j])) for j in range(len(idx))]
        images, masks = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    x = normalise(images, norm)
    y = torch.from_numpy(np.take(label_lut(episode.class_ids), masks))
    s = len(episode.support)
    return EpisodeBatch(x[:s], y[:s], x[s:], y[s:], tuple(episode.class_ids), episode.domain)
