"""The procedural generator: deterministic, diverse domains, shape classes present everywhere, always labelled."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from metaseg.data.synthetic import CLASS_NAMES, DOMAIN_NAMES, generate, generate_domain

SIZE, N = 64, 8


@pytest.fixture(scope="module")
def domains() -> dict:
    return {d.name: d for d in generate(len(DOMAIN_NAMES), N, SIZE, seed=0)}


def test_names_and_params_defaults() -> None:
    assert DOMAIN_NAMES[:8] == ("meadow", "marble", "stripes", "desert", "night", "xray", "underwater", "neon")
    assert len(DOMAIN_NAMES) == 12 and len(set(DOMAIN_NAMES)) == 12
    assert len(CLASS_NAMES) >= 4


def test_same_params_give_byte_identical_arrays() -> None:
    a, b = generate_domain("underwater", 5, SIZE, seed=3), generate_domain("underwater", 5, SIZE, seed=3)
    assert a.images.tobytes() == b.images.tobytes() and a.masks.tobytes() == b.masks.tobytes()
    assert a.items == b.items
    c = generate_domain("underwater", 5, SIZE, seed=4)
    assert not np.array_equal(a.images, c.images)


def test_image_i_does_not_depend_on_how_many_are_made() -> None:
    short, long = generate_domain("neon", 3, SIZE, seed=1), generate_domain("neon", 6, SIZE, seed=1)
    assert np.array_equal(short.images, long.images[:3]) and np.array_equal(short.masks, long.masks[:3])


def test_shapes_dtypes_and_values(domains: dict) -> None:
    for d in domains.values():
        assert d.images.shape == (N, SIZE, SIZE, 3) and d.images.dtype == np.uint8
        assert d.masks.shape == (N, SIZE, SIZE) and d.masks.dtype == np.uint8
        assert d.class_names == list(CLASS_NAMES)
        assert set(np.unique(d.masks)) <= set(range(len(CLASS_NAMES) + 1))
        assert len(d.items) == N and len({it.sha256 for it in d.items}) == N


def test_every_image_has_class_pixels_and_several_objects(domains: dict) -> None:
    for d in domains.values():
        per_image = [set(np.unique(m)) - {0} for m in d.masks]
        assert all(per_image), f"{d.name}: an image without class pixels"
        several = np.mean([len(c) >= 2 for c in per_image])
        assert several >= 0.5, f"{d.name}: only {several:.0%} of images show 2+ classes"


def test_every_class_appears_in_every_domain(domains: dict) -> None:
    for d in domains.values():
        present = set(np.unique(d.masks)) - {0}
        assert present == set(range(1, len(CLASS_NAMES) + 1)), f"{d.name}: classes {present}"


def test_domains_look_different(domains: dict) -> None:
    """Mean colour, contrast, texture (gradient energy) and saturation: every pair of domains differs clearly."""
    feats = {}
    for name, d in domains.items():
        x = d.images.astype(np.float32)
        lum = x.mean(-1)
        feats[name] = np.r_[x.mean((0, 1, 2)), lum.std(), 4 * np.abs(np.diff(lum, axis=2)).mean(),
                            (x.max(-1) - x.min(-1)).mean()]
    for a, b in itertools.combinations(feats, 2):
        assert np.linalg.norm(feats[a] - feats[b]) > 20, f"{a} and {b} look alike"


def test_class_is_shape_not_colour(domains: dict) -> None:
    """Within a domain the same class takes several colours (colour is drawn independently of the class)."""
    d = domains["meadow"]
    colours = {tuple((d.images[i][d.masks[i] == 1].mean(0) // 24).astype(int)) for i in range(N)
               if (d.masks[i] == 1).sum() > 20}
    assert len(colours) >= 2


def test_unknown_domain_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown synthetic domain"):
        generate_domain("mars", 2, SIZE, seed=0)
