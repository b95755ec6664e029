"""Training sampler, episode batches and joint augmentation: labels, normalisation, alignment, determinism, resume."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from metaseg.config import ConfigError
from metaseg.data.augment import build_augment
from metaseg.data.episodes import Episode
from metaseg.data.prepared import DomainData, PreparedDataset, write_prepared
from metaseg.data.sampler import EpisodeBatch, TrainSampler, episode_batch
from metaseg.models.backbones import normalization

SIZE = 32
NORM = normalization("mobilenet_v3_large")


def blocks(n: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    """Masks: each image one or more class blocks; image i % 6 == 5 has background + 255 only."""
    masks = np.zeros((n, SIZE, SIZE), dtype=np.uint8)
    for i in range(n):
        masks[i, :, :2] = 255
        if i % 6 == 5:
            continue
        for c in range(1, classes + 1):
            if c == 1 + i % classes or rng.random() < 0.4:
                r, s = rng.integers(2, SIZE - 8, 2)
                masks[i, r:r + 8, s:s + 8] = c
    return masks


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    root = tmp_path_factory.mktemp("prepared")
    rng = np.random.default_rng(0)
    doms = [DomainData(name, [f"c{j}" for j in range(k)], rng.integers(0, 256, (18, SIZE, SIZE, 3), dtype=np.uint8),
                       blocks(18, k, rng)) for name, k in (("a", 3), ("b", 2), ("held", 2))]
    write_prepared(root, doms, source="test", image_size=SIZE)
    return PreparedDataset(root)


def test_labels_remapped_in_class_ids_order(dataset: PreparedDataset) -> None:
    d = dataset.domain("a")
    ep = Episode("a", (3, 1), (0, 2), (4,))
    b = episode_batch(d, ep, norm=NORM)
    raw = np.asarray(d.masks[[0, 2, 4]])
    y = torch.cat([b.support_y, b.query_y]).numpy()
    assert (y[raw == 3] == 1).all() and (y[raw == 1] == 2).all()
    assert (y[raw == 2] == 0).all() and (y[raw == 0] == 0).all() and (y[raw == 255] == 255).all()
    assert set(np.unique(y)) <= {0, 1, 2, 255} and b.class_ids == (3, 1)


@pytest.mark.parametrize("backbone", ["mobilenet_v3_large", "efficientnet_lite0"])
def test_shapes_dtypes_and_normalisation(dataset: PreparedDataset, backbone: str) -> None:
    d = dataset.domain("b")
    mean, std = normalization(backbone)
    b = episode_batch(d, Episode("b", (1,), (1, 3, 7), (0, 2)), norm=(mean, std))
    assert b.support_x.shape == (3, 3, SIZE, SIZE) and b.query_x.shape == (2, 3, SIZE, SIZE)
    assert b.support_y.shape == (3, SIZE, SIZE) and b.query_y.shape == (2, SIZE, SIZE)
    assert b.support_x.dtype == torch.float32 and b.support_y.dtype == torch.int64
    expect = (torch.from_numpy(np.asarray(d.images[[0, 2]])).permute(0, 3, 1, 2).float() / 255
              - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(b.query_x, expect, rtol=1e-5, atol=1e-5)
    moved = b.to("cpu")
    assert isinstance(moved, EpisodeBatch) and moved.query_x.device.type == "cpu"


def interior(m: np.ndarray, r: int = 2) -> np.ndarray:
    """Pixels whose (2r+1)^2 neighbourhood has a single label."""
    p = np.pad(m, r, mode="edge")
    same = np.ones(m.shape, dtype=bool)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            same &= p[dy:dy + m.shape[0], dx:dx + m.shape[1]] == m
    return same


def test_augment_keeps_image_and_mask_aligned() -> None:
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:40, :24], mask[40:, 10:], mask[5:15, 40:60] = 1, 2, 3  # asymmetric: a flip or crop moves everything
    image = np.repeat((mask.astype(np.uint8) * 60 + 20)[..., None], 3, axis=2)  # grey: jitter stays monotone
    augment = build_augment(64)
    changed = 0
    for seed in range(12):
        img, m = augment(image, mask, seed)
        assert img.shape == image.shape and img.dtype == np.uint8 and m.shape == mask.shape and m.dtype == np.uint8
        assert set(np.unique(m)) <= {0, 1, 2, 3}  # nearest: no blended labels
        levels = {c: np.median(img[..., 0][m == c]) for c in np.unique(m)}
        assert list(levels.values()) == sorted(levels.values())  # label order = brightness order
        nearest = np.array(list(levels))[np.abs(img[..., 0][..., None].astype(float)
                                               - np.array(list(levels.values()))).argmin(-1)]
        assert (nearest == m)[interior(m)].all()  # away from label edges (bilinear blur), image and mask agree
        assert (nearest == np.fliplr(m)).mean() < 0.9  # and a mask flipped on its own would not
        changed += not np.array_equal(m, mask)
    assert changed >= 10


def test_augmented_batch_deterministic_with_seed(dataset: PreparedDataset) -> None:
    d, ep = dataset.domain("a"), Episode("a", (2,), (1, 4), (7,))
    aug = build_augment(SIZE)
    b1, b2, b3 = (episode_batch(d, ep, norm=NORM, augment=aug, seed=s) for s in (11, 11, 12))
    assert torch.equal(b1.support_x, b2.support_x) and torch.equal(b1.query_y, b2.query_y)
    assert not torch.equal(b1.support_x, b3.support_x)


def test_sampler_supports_contain_class_and_skip_background_only(dataset: PreparedDataset) -> None:
    for ways in (1, 2):
        s = TrainSampler(dataset, ["a", "b"], ways=ways, shots=2, queries=2, seed=0)
        for _ in range(300):
            ep = s.sample()
            masks = dataset.domain(ep.domain).masks
            assert ep.domain in ("a", "b") and len(ep.support) == 2 * ways and len(set(ep.support)) == 2 * ways
            assert len(ep.query) == 2 and not set(ep.support) & set(ep.query)
            for j, c in enumerate(ep.class_ids):
                assert all((masks[i] == c).any() for i in ep.support[2 * j:2 * j + 2])
            assert all(np.isin(masks[i], ep.class_ids).any() for i in ep.query)
            assert not {i for i in ep.support + ep.query if i % 6 == 5}  # background/255-only images


def test_sampler_deterministic_and_resumes_exactly(dataset: PreparedDataset) -> None:
    def make(seed: int) -> TrainSampler:
        return TrainSampler(dataset, ["a", "b"], ways=1, shots=2, queries=1, seed=seed)

    a, b, c = make(3), make(3), make(4)
    seq = [a.sample_seeded() for _ in range(10)]
    assert seq == [b.sample_seeded() for _ in range(10)] and seq != [c.sample_seeded() for _ in range(10)]
    s = make(3)
    for _ in range(5):
        s.sample()
    state = json.loads(json.dumps(s.state_dict()))  # must survive JSON (and therefore torch.save)
    expected = [s.sample_seeded() for _ in range(20)]
    resumed = make(99)
    resumed.load_state_dict(state)
    assert [resumed.sample_seeded() for _ in range(20)] == expected and resumed.count == 25
    with pytest.raises(ValueError, match="resume with the same train settings"):
        TrainSampler(dataset, ["a"], ways=1, shots=2, queries=1, seed=3).load_state_dict(state)


def test_one_shot_episode_batch(dataset: PreparedDataset) -> None:
    s = TrainSampler(dataset, ["b"], ways=1, shots=1, queries=1, seed=0)
    ep, seed = s.sample_seeded()
    b = episode_batch(dataset.domain(ep.domain), ep, norm=NORM, augment=build_augment(SIZE), seed=seed)
    assert b.support_x.shape == (1, 3, SIZE, SIZE) and b.support_y.shape == (1, SIZE, SIZE)
    plain = episode_batch(dataset.domain(ep.domain), ep, norm=NORM)
    assert (plain.support_y == 1).any()  # the support shows its class


def test_an_episode_no_domain_can_fill_is_one_line_naming_the_key_and_the_limit(dataset: PreparedDataset) -> None:
    """train.shots / train.ways beyond what the meta-train domains hold: a ConfigError (exit 2, one line) when the
    sampler is built, naming the key and the most a domain allows, not a ValueError traceback."""
    most = max(len(idx) for name in ("a", "b") for idx in dataset.domain(name).images_with_class().values())
    TrainSampler(dataset, ["a", "b"], ways=1, shots=most - 2, queries=2, seed=0)  # the limit itself is fine
    with pytest.raises(ConfigError) as err:
        TrainSampler(dataset, ["a", "b"], ways=1, shots=most - 1, queries=2, seed=0)
    message = str(err.value)
    assert message.startswith("'train.shots': ") and f"at most {most} " in message and "\n" not in message
    with pytest.raises(ConfigError, match=r"^'train.ways': 4-way .*; the most is 3 \(domain 'a'\): lower train.ways$"):
        TrainSampler(dataset, ["a", "b"], ways=4, shots=1, queries=1, seed=0)
