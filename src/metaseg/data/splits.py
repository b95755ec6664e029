"""The `splits` stage's library: domain roles, support/test pools, stored evaluation episodes, deployment sets.

Choices (documented here because they shape every evaluation figure):

- **Pools** (per meta-val / meta-test domain): each image is assigned to the stratum of its rarest class (the class
  present in it that is present in the fewest images of the domain; background-only images form stratum 0). Each
  stratum is shuffled and ``round(fraction * n)`` of it goes to the support pool (at least 1 and at most n - 1 when
  the stratum has >= 2 images), the rest to the test pool. So the pool fraction is approximate and every class with
  >= 2 images has support candidates.
- **Episodes**: for each K in ``shots`` a class is *eligible* when it has >= K support-pool images and >= 1 test-pool
  image. Episodes draw ``ways`` distinct eligible classes; ineligible classes are skipped with a log line giving
  their counts; fewer eligible classes than ``ways`` is an error naming every class and its count. Support: K
  images per class (grouped by class, in class_ids order) that contain the class, all distinct (a draw that cannot
  be made distinct is redrawn). Query: up to ``queries`` test-pool images that contain *at least one* of the
  episode's classes (fewer only when the test pool holds fewer).
- **Deployment** (per meta-test domain): every class needs ``deploy_shots`` support-pool images (else an error);
  images are picked greedily, each time the one covering the most still-needed classes, ties broken by a seeded
  order. An image counts for every class it contains.
- Every random stream is derived from (seed, crc32(domain), purpose[, K]), so adding a domain or a K leaves the
  other domains' pools and episodes unchanged.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metaseg.config import ConfigError, SplitsConfig
from metaseg.data.episodes import Episode
from metaseg.data.prepared import Domain, PreparedDataset
from metaseg.data.split_checks import SplitLeakError, validate_splits
from metaseg.io import read_json, write_json

log = logging.getLogger(__name__)

_POOLS, _EPISODES, _DEPLOY = 0, 1, 2
_MAX_REDRAWS = 1000


@dataclass(frozen=True)
class Splits:
    """Everything the stage writes: splits.json, episodes.json and deploy.json contents."""

    splits: dict[str, Any]
    episodes: dict[str, dict[int, list[Episode]]]
    deploy: dict[str, Episode]  # query is empty; support covers every class (see module doc)


def rng_for(seed: int, domain: str, *stream: int) -> np.random.Generator:
    """A numpy Generator that depends only on (seed, domain name, stream ids)."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(domain.encode("utf-8")), *stream]))


def resolve_roles(cfg: SplitsConfig, available: list[str]) -> dict[str, list[str]]:
    """meta_train / meta_val / meta_test domain lists; ``meta_train: []`` = every other prepared domain."""
    for key in ("meta_train", "meta_val", "meta_test"):
        for name in getattr(cfg, key):
            if name not in available:
                raise ConfigError(f"'splits.{key}': domain '{name}' is not in the prepared dataset "
                                  f"(available: {', '.join(available)})")
    held_out = set(cfg.meta_val) | set(cfg.meta_test)
    train = list(cfg.meta_train) or [d for d in available if d not in held_out]
    if not train:
        raise ConfigError(f"'splits.meta_train': no domain left for meta-training (available: {', '.join(available)};"
                          f" held out: {', '.join(sorted(held_out))}); prepare more domains or hold out fewer")
    return {"meta_train": train, "meta_val": list(cfg.meta_val), "meta_test": list(cfg.meta_test)}


def split_pools(present: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (by rarest class) support / test pools, sorted image indices."""
    counts = present[:, 1:].sum(axis=0)
    rank = np.where(present[:, 1:], counts[None, :], np.iinfo(np.int64).max)
    stratum = np.where(present[:, 1:].any(axis=1), rank.argmin(axis=1) + 1, 0)
    support: list[np.ndarray] = []
    for s in np.unique(stratum):
        members = rng.permutation(np.flatnonzero(stratum == s))
        n = len(members)
        q = int(round(fraction * n))
        if n >= 2:
            q = min(max(q, 1), n - 1)
        support.append(members[:q])
    sup = np.sort(np.concatenate(support)) if support else np.zeros(0, dtype=np.int64)
    test = np.setdiff1d(np.arange(len(present)), sup)
    return sup, test


def _class_label(domain: Domain, c: int) -> str:
    return f"class '{domain.class_names[c - 1]}' (id {c})"


def sample_episodes(domain: Domain, present: np.ndarray, support_pool: np.ndarray, test_pool: np.ndarray, *,
                    ways: int, shots: int, queries: int, episodes: int,
                    rng: np.random.Generator) -> list[Episode]:
    """``episodes`` stored N-way K-shot episodes of one domain (see the module doc for the rules)."""
    if domain.num_classes < ways:
        raise ConfigError(f"'splits.ways': domain '{domain.name}' has {domain.num_classes} classes, fewer than "
                          f"ways={ways}; lower splits.ways or move the domain to meta_train")
    in_sup = {c: support_pool[present[support_pool, c]] for c in range(1, domain.num_classes + 1)}
    in_test = {c: test_pool[present[test_pool, c]] for c in range(1, domain.num_classes + 1)}
    eligible = [c for c in in_sup if len(in_sup[c]) >= shots and len(in_test[c]) >= 1]
    excluded = [f"{_class_label(domain, c)}: {len(in_sup[c])} support / {len(in_test[c])} test"
                for c in in_sup if c not in eligible]
    if len(eligible) < ways:
        raise ConfigError(f"'splits.shots': domain '{domain.name}' K={shots}: needs ways={ways} classes with >= {shots} "
                          f"support-pool and >= 1 test-pool images, found {len(eligible)}; short: "
                          + "; ".join(excluded) + "; lower splits.shots or raise splits.support_pool")
    if excluded:
        log.info("domain %s K=%d: classes excluded from episodes: %s", domain.name, shots, "; ".join(excluded))
    out: list[Episode] = []
    eligible_arr = np.asarray(eligible)
    for _ in range(episodes):
        for _attempt in range(_MAX_REDRAWS):
            class_ids = [int(c) for c in rng.choice(eligible_arr, size=ways, replace=False)]
            support: list[int] = []
            for c in class_ids:
                cand = np.setdiff1d(in_sup[c], support)
                if len(cand) < shots:
                    break
                support.extend(int(i) for i in rng.choice(cand, size=shots, replace=False))
            else:
                break
        else:
            raise ConfigError(f"'splits.shots': domain '{domain.name}' K={shots}: could not draw {ways} classes with "
                              f"distinct support images; lower splits.shots or splits.ways")
        qcand = np.unique(np.concatenate([in_test[c] for c in class_ids]))
        query = rng.choice(qcand, size=min(queries, len(qcand)), replace=False)
        out.append(Episode(domain.name, tuple(class_ids), tuple(support), tuple(int(i) for i in query)))
    return out


def deploy_set(domain: Domain, present: np.ndarray, support_pool: np.ndarray, *, shots: int,
               rng: np.random.Generator) -> Episode:
    """Greedy deterministic deployment support set: >= ``shots`` images per class, all classes covered."""
    for c in range(1, domain.num_classes + 1):
        n = int(present[support_pool, c].sum())
        if n < shots:
            raise ConfigError(f"'splits.deploy_shots': domain '{domain.name}' {_class_label(domain, c)} has {n} "
                              f"support-pool images, {shots} needed; lower splits.deploy_shots or raise "
                              f"splits.support_pool")
    order = rng.permutation(support_pool)  # seeded tie-break
    has = present[order, 1:].astype(np.int64)
    need = np.full(domain.num_classes, shots, dtype=np.int64)
    taken = np.zeros(len(order), dtype=bool)
    chosen: list[int] = []
    while need.any():
        gain = np.where(taken, -1, has @ (need > 0))
        j = int(gain.argmax())  # first maximum in the seeded order
        taken[j] = True
        chosen.append(int(order[j]))
        need = np.maximum(need - has[j], 0)
    return Episode(domain.name, tuple(range(1, domain.num_classes + 1)), tuple(sorted(chosen)), ())


def make_splits(dataset: PreparedDataset, cfg: SplitsConfig, *, seed: int) -> Splits:
    """Resolve roles, draw pools, stored episodes and deployment sets. Raises ConfigError (one line) on a misfit."""
    roles = resolve_roles(cfg, dataset.domain_names)
    pools: dict[str, dict[str, list[int]]] = {}
    episodes: dict[str, dict[int, list[Episode]]] = {}
    deploy: dict[str, Episode] = {}
    for name in roles["meta_val"] + roles["meta_test"]:
        domain = dataset.domain(name)
        present = domain.class_presence()
        sup, test = split_pools(present, cfg.support_pool, rng_for(seed, name, _POOLS))
        if len(sup) == 0 or len(test) == 0:
            raise ConfigError(f"'splits.support_pool': domain '{name}' ({len(domain)} images) gives an empty "
                              f"{'support' if len(sup) == 0 else 'test'} pool; it needs more images")
        pools[name] = {"support": [int(i) for i in sup], "test": [int(i) for i in test]}
        episodes[name] = {k: sample_episodes(domain, present, sup, test, ways=cfg.ways, shots=k, queries=cfg.queries,
                                             episodes=cfg.episodes, rng=rng_for(seed, name, _EPISODES, k))
                          for k in sorted(set(cfg.shots))}
        if name in roles["meta_test"]:
            deploy[name] = deploy_set(domain, present, sup, shots=cfg.deploy_shots, rng=rng_for(seed, name, _DEPLOY))
    splits = {**roles, "ways": cfg.ways, "shots": sorted(set(cfg.shots)), "pools": pools}
    return Splits(splits=splits, episodes=episodes, deploy=deploy)


def write_splits(out_dir: str | Path, result: Splits) -> None:
    """splits.json, episodes.json, deploy.json into ``out_dir`` (deterministic bytes; the caller swaps the folder)."""
    out_dir = Path(out_dir)
    write_json(out_dir / "splits.json", result.splits)
    write_json(out_dir / "episodes.json", {d: {str(k): [e.to_dict() for e in eps] for k, eps in per_k.items()}
                                           for d, per_k in result.episodes.items()})
    write_json(out_dir / "deploy.json", {d: {"class_ids": list(e.class_ids), "support": list(e.support)}
                                         for d, e in result.deploy.items()})


def load_splits(path: str | Path) -> dict[str, Any]:
    """splits.json as a dict (meta_train, meta_val, meta_test, ways, shots, pools)."""
    return read_json(path)


def load_episodes(path: str | Path) -> dict[str, dict[int, list[Episode]]]:
    """episodes.json as {domain: {K: [Episode, ...]}}."""
    return {d: {int(k): [Episode.from_dict(e) for e in eps] for k, eps in per_k.items()}
            for d, per_k in read_json(path).items()}


def load_deploy(path: str | Path) -> dict[str, Episode]:
    """deploy.json as {domain: Episode(domain, class_ids=(1..C), support=..., query=())}."""
    return {d: Episode(d, tuple(e["class_ids"]), tuple(e["support"]), ()) for d, e in read_json(path).items()}

__all__ = ["Splits", "make_splits", "write_splits", "load_splits", "load_episodes", "load_deploy",
           "validate_splits", "SplitLeakError", "resolve_roles", "split_pools", "sample_episodes", "deploy_set", "rng_for"]
