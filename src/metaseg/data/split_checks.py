"""Invariants of the split files, checked at the end of the `splits` stage and in tests.

``validate_splits`` raises ``SplitLeakError`` (a ValueError) whose one-line message gives the number of problems and
the first few; it returns the number of checked episodes when everything holds.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from metaseg.data.episodes import Episode
from metaseg.data.prepared import PreparedDataset

log = logging.getLogger(__name__)


class SplitLeakError(ValueError):
    """A split invariant is broken (an image leaks between roles or pools, a support lacks its class, ...)."""


def _check_episode(ep: Episode, name: str, k: int | None, ways: int | None, present: np.ndarray,
                   sup_pool: set[int], test_pool: set[int], deploy_shots: int = 1) -> list[str]:
    where = f"{name} K={k}" if k is not None else f"{name} deploy"
    bad: list[str] = []
    n, c_max = present.shape[0], present.shape[1] - 1
    if ep.domain != name:
        bad.append(f"{where}: episode names domain '{ep.domain}'")
    if len(set(ep.class_ids)) != len(ep.class_ids) or any(not 1 <= c <= c_max for c in ep.class_ids):
        bad.append(f"{where}: bad class_ids {list(ep.class_ids)}")
        return bad
    if any(not 0 <= i < n for i in (*ep.support, *ep.query)):
        bad.append(f"{where}: image index out of range 0..{n - 1}")
        return bad
    if ways is not None and len(ep.class_ids) != ways:
        bad.append(f"{where}: {len(ep.class_ids)} classes, ways={ways}")
    both = sorted(set(ep.support) & set(ep.query))
    if both:
        bad.append(f"{where}: images {both} are in both support and query")
    if not set(ep.support) <= sup_pool:
        bad.append(f"{where}: support images {sorted(set(ep.support) - sup_pool)} are not in the support pool")
    if not set(ep.query) <= test_pool:
        bad.append(f"{where}: query images {sorted(set(ep.query) - test_pool)} are not in the test pool")
    if k is not None:  # stored episode: K per class, grouped in class order
        if len(ep.support) != k * len(ep.class_ids) or len(set(ep.support)) != len(ep.support):
            bad.append(f"{where}: support {list(ep.support)} is not {k} distinct images per class")
        for j, c in enumerate(ep.class_ids):
            lacking = [i for i in ep.support[j * k:(j + 1) * k] if not present[i, c]]
            if lacking:
                bad.append(f"{where}: support images {lacking} of class {c} do not contain it")
        no_class = [i for i in ep.query if not present[i, list(ep.class_ids)].any()]
        if no_class:
            bad.append(f"{where}: query images {no_class} contain none of classes {list(ep.class_ids)}")
    else:  # deployment set: every class covered by >= deploy_shots images
        if list(ep.class_ids) != list(range(1, c_max + 1)):
            bad.append(f"{where}: class_ids {list(ep.class_ids)} are not all the domain's classes 1..{c_max}")
        short = [c for c in ep.class_ids if present[list(ep.support), c].sum() < deploy_shots]
        if short:
            bad.append(f"{where}: classes {short} have fewer than {deploy_shots} images in the support set")
    return bad


def validate_splits(dataset: PreparedDataset, splits: dict[str, Any], episodes: dict[str, dict[int, list[Episode]]],
                    deploy: dict[str, Episode], *, train_domains: Sequence[str] | None = None,
                    deploy_shots: int = 1) -> int:
    """Check roles, pools, stored episodes, deployment sets and (optionally) the training sampler's domains."""
    bad: list[str] = []
    roles = {r: list(splits[r]) for r in ("meta_train", "meta_val", "meta_test")}
    held_out = roles["meta_val"] + roles["meta_test"]
    all_named = roles["meta_train"] + held_out
    if len(set(all_named)) != len(all_named):
        bad.append(f"a domain has several roles: {all_named}")
    if not roles["meta_train"]:
        bad.append("meta_train is empty")
    if train_domains is not None and not set(train_domains) <= set(roles["meta_train"]):
        bad.append(f"training sampler reaches held-out domains {sorted(set(train_domains) - set(roles['meta_train']))}")
    if set(episodes) != set(held_out):
        bad.append(f"episodes cover {sorted(episodes)}, expected meta_val + meta_test {sorted(held_out)}")
    if set(deploy) != set(roles["meta_test"]):
        bad.append(f"deploy covers {sorted(deploy)}, expected meta_test {sorted(roles['meta_test'])}")
    checked = 0
    for name in held_out:
        if name not in splits["pools"]:
            bad.append(f"{name}: no pools")
            continue
        sup, test = set(splits["pools"][name]["support"]), set(splits["pools"][name]["test"])
        if sup & test:
            bad.append(f"{name}: images {sorted(sup & test)[:10]} are in both the support and the test pool")
        present = dataset.domain(name).class_presence()
        for k, eps in episodes.get(name, {}).items():
            for ep in eps:
                bad.extend(_check_episode(ep, name, int(k), splits.get("ways"), present, sup, test))
                checked += 1
        if name in deploy:
            bad.extend(_check_episode(deploy[name], name, None, None, present, sup, test, deploy_shots))
    if bad:
        raise SplitLeakError(f"{len(bad)} split problem(s): " + " | ".join(bad[:3]))
    log.info("split invariants hold (%d episodes, %d held-out domains)", checked, len(held_out))
    return checked
