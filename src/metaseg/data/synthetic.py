"""Procedural multi-domain segmentation data: shape-defined classes seen through very different domain "looks".

Every domain draws the same four shape families (``CLASS_NAMES``); what changes between domains is the appearance:
background texture family, colour palette, how objects are filled, lighting gradient, blur, pixel noise and how
much object outlines are deformed. An object's colour is drawn from the domain's palette independently of its class,
so inside a domain a class is defined by its shape only. Objects are drawn in order and later ones occlude earlier
ones in image and mask; the last object of image ``i`` has class ``i % 4`` (so every class occurs in every domain of
>= 4 images) and is never occluded (so every image has class pixels).

Deterministic: image ``i`` of a domain depends only on (seed, domain index, i, image size), through
``np.random.default_rng([seed, domain_index, i])``; it does not depend on how many images or domains are made.
Everything is vectorised numpy on whole images or object bounding boxes (no per-pixel Python loops).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from metaseg.data.prepared import DomainData, Item, sha256_bytes

DOMAIN_NAMES = ("meadow", "marble", "stripes", "desert", "night", "xray", "underwater", "neon",
                "rust", "snow", "circuit", "candy")
CLASS_NAMES = ("disc", "box", "triangle", "cross")

Colour = tuple[float, float, float]


@dataclass(frozen=True)
class Style:
    """One domain's look. Sizes are fractions of the image side; blur is in px at 128 px (scaled with the size)."""

    texture: str  # background texture family: smooth | marble | stripes | dunes | grain | caustics | grid | spots
    bg: tuple[Colour, Colour]  # background palette: the texture value 0..1 interpolates between these
    objects: tuple[Colour, ...]  # object colours (any class takes any of them)
    fill: str  # flat | textured | outline | translucent
    light: float  # strength of the linear lighting gradient (random direction per image)
    noise: float  # std of additive gaussian pixel noise
    blur: int  # box-blur radius in px at 128 px
    warp: float  # object outline deformation (sinusoidal coordinate warp amplitude)
    size: tuple[float, float] = (0.08, 0.2)  # object radius range
    gray: bool = False  # single-channel look


STYLES: dict[str, Style] = {
    "meadow": Style("smooth", ((0.15, 0.45, 0.1), (0.45, 0.75, 0.25)), ((0.9, 0.85, 0.2), (0.85, 0.3, 0.5),
                    (0.95, 0.95, 0.95), (0.5, 0.3, 0.15)), "flat", 0.3, 0.02, 0, 0.05),
    "marble": Style("marble", ((0.35, 0.33, 0.32), (0.92, 0.9, 0.88)), ((0.2, 0.25, 0.45), (0.55, 0.15, 0.12),
                    (0.15, 0.4, 0.3)), "textured", 0.2, 0.01, 0, 0.0),
    "stripes": Style("stripes", ((0.1, 0.1, 0.3), (0.95, 0.8, 0.2)), ((0.9, 0.1, 0.1), (0.1, 0.7, 0.9),
                     (0.2, 0.9, 0.3), (0.95, 0.95, 0.95)), "flat", 0.1, 0.03, 0, 0.1),
    "desert": Style("dunes", ((0.55, 0.35, 0.18), (0.95, 0.8, 0.55)), ((0.45, 0.3, 0.2), (0.8, 0.65, 0.45),
                    (0.3, 0.25, 0.22)), "textured", 0.5, 0.03, 1, 0.15, (0.07, 0.18)),
    "night": Style("smooth", ((0.02, 0.02, 0.06), (0.12, 0.12, 0.25)), ((0.35, 0.35, 0.5), (0.5, 0.45, 0.2),
                   (0.25, 0.4, 0.45)), "flat", 0.8, 0.08, 1, 0.1),
    "xray": Style("grain", ((0.0, 0.0, 0.0), (0.3, 0.3, 0.3)), ((0.45, 0.45, 0.45), (0.6, 0.6, 0.6)),
                  "translucent", 0.4, 0.05, 1, 0.2, (0.1, 0.22), gray=True),
    "underwater": Style("caustics", ((0.0, 0.2, 0.35), (0.3, 0.7, 0.75)), ((0.9, 0.5, 0.3), (0.95, 0.85, 0.4),
                        (0.6, 0.3, 0.6)), "textured", 0.6, 0.04, 2, 0.25),
    "neon": Style("grid", ((0.02, 0.0, 0.05), (0.15, 0.05, 0.25)), ((1.0, 0.1, 0.8), (0.1, 1.0, 0.9),
                  (1.0, 0.9, 0.1), (0.3, 1.0, 0.2)), "outline", 0.2, 0.02, 1, 0.05, (0.1, 0.22)),
    "rust": Style("grain", ((0.35, 0.12, 0.05), (0.75, 0.4, 0.15)), ((0.3, 0.35, 0.4), (0.15, 0.15, 0.15),
                  (0.6, 0.6, 0.55)), "textured", 0.4, 0.06, 0, 0.25),
    "snow": Style("smooth", ((0.8, 0.85, 0.92), (1.0, 1.0, 1.0)), ((0.6, 0.7, 0.85), (0.85, 0.85, 0.9),
                  (0.4, 0.45, 0.55)), "flat", 0.25, 0.02, 2, 0.1),
    "circuit": Style("grid", ((0.0, 0.25, 0.1), (0.7, 0.6, 0.2)), ((0.1, 0.1, 0.1), (0.75, 0.75, 0.7),
                     (0.55, 0.35, 0.1)), "flat", 0.15, 0.02, 0, 0.0, (0.06, 0.15)),
    "candy": Style("spots", ((1.0, 0.75, 0.85), (0.6, 0.9, 1.0)), ((0.9, 0.2, 0.4), (0.3, 0.2, 0.8),
                   (1.0, 0.6, 0.1), (0.2, 0.7, 0.3)), "flat", 0.1, 0.02, 0, 0.2),
}


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    """A uniform draw as a Python float (numpy float64 scalars would promote the float32 arrays to float64)."""
    return float(rng.uniform(lo, hi))


@functools.lru_cache(maxsize=64)
def _interp(size: int, cells: int) -> np.ndarray:
    """[size, cells + 1] smoothstep interpolation weights: A @ grid @ A.T upsamples a (cells+1)^2 grid."""
    pos = np.linspace(0, cells, size, dtype=np.float64)
    i = np.minimum(pos.astype(int), cells - 1)
    f = pos - i
    f = f * f * (3 - 2 * f)
    a = np.zeros((size, cells + 1), np.float32)
    a[np.arange(size), i] = 1 - f
    a[np.arange(size), i + 1] = f
    return a


def fbm(rng: np.random.Generator, size: int, octaves: tuple[int, ...] = (3, 6, 12)) -> np.ndarray:
    """Smooth value noise in [0, 1], float32 [size, size]: octaves of upsampled random grids (two matmuls each)."""
    out = np.zeros((size, size), np.float32)
    amp, total = 1.0, 0.0
    for cells in octaves:
        a = _interp(size, cells)
        out += amp * (a @ rng.random((cells + 1, cells + 1), dtype=np.float32) @ a.T)
        total += amp
        amp *= 0.5
    return out / total


def _texture(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Background texture value in [0, 1], float32 [size, size]."""
    y, x = np.ogrid[0:1:complex(0, size), 0:1:complex(0, size)]
    x, y = x.astype(np.float32), y.astype(np.float32)
    th = float(rng.uniform(0, np.pi))
    along = x * np.cos(th) + y * np.sin(th)
    if kind == "smooth":
        return fbm(rng, size)
    if kind == "marble":
        v = np.sin(along * _u(rng, 6, 12) + 7 * fbm(rng, size))
        return 1 - np.exp(-6 * np.abs(v))
    if kind == "stripes":
        return 0.5 + 0.5 * np.tanh(4 * np.sin(along * _u(rng, 25, 45) + _u(rng, 0, 6.3)))
    if kind == "dunes":
        s = y * _u(rng, 4, 7) + 2.5 * fbm(rng, size, (2, 4)) + 0.4 * np.sin(x * 9)
        s -= np.floor(s)
        return s * np.sqrt(s)
    if kind == "grain":
        return 0.6 * fbm(rng, size, (4, 16)) + 0.4 * rng.random((size, size), dtype=np.float32)
    if kind == "caustics":
        a = 14 * fbm(rng, size, (4, 8))
        c = np.sin(a)
        c *= c
        return c * c * 0.7 + 0.3 * y
    if kind == "grid":
        f = _u(rng, 6, 12)
        gx, gy = (x * f) % 1, (y * f) % 1
        return ((gx < 0.12) | (gy < 0.12)).astype(np.float32) * (0.5 + 0.5 * fbm(rng, size, (3,)))
    if kind == "spots":
        f = _u(rng, 20, 35)
        return (np.cos(x * f) * np.cos(y * f) > 0.3).astype(np.float32)
    raise ValueError(f"unknown texture family '{kind}'")


def _inside(cls: int, u: np.ndarray, v: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Membership of shape family ``cls`` in normalised object coordinates (radius ~1)."""
    u, v = u / scale, v / scale
    if cls == 0:  # disc
        return u * u + v * v <= 1
    if cls == 1:  # box
        return np.maximum(np.abs(u), np.abs(v)) <= 0.85
    if cls == 2:  # triangle (circumradius 1.35: about the area of the other shapes)
        u, v = u / 1.35, v / 1.35
        m = v <= 0.5
        for t in (np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
            m &= u * np.float32(np.cos(t)) + v * np.float32(np.sin(t)) <= 0.5
        return m
    au, av = np.abs(u), np.abs(v)  # cross
    return ((au <= 1) & (av <= 0.33)) | ((au <= 0.33) & (av <= 1))


def _box_blur(img: np.ndarray, r: int) -> np.ndarray:
    """Separable box blur of radius r on [H, W, C] (edge padding): a sum of 2r + 1 shifted slices per axis."""
    h, w = img.shape[:2]
    p = np.pad(img, ((r, r), (r, r), (0, 0)), mode="edge")
    rows = p[: h, :].copy()
    for k in range(1, 2 * r + 1):
        rows += p[k: k + h, :]
    out = rows[:, : w].copy()
    for k in range(1, 2 * r + 1):
        out += rows[:, k: k + w]
    out *= np.float32(1 / (2 * r + 1) ** 2)
    return out


def render(style: Style, rng: np.random.Generator, size: int, last_class: int) -> tuple[np.ndarray, np.ndarray]:
    """One image (uint8 [S, S, 3]) and mask (uint8 [S, S], 0 = background, 1..4 = CLASS_NAMES)."""
    lo, hi = np.asarray(style.bg[0], np.float32), np.asarray(style.bg[1], np.float32)
    jitter = rng.uniform(-0.06, 0.06, 3).astype(np.float32)
    img = (lo + jitter) + _texture(style.texture, rng, size)[..., None] * (hi - lo)
    mask = np.zeros((size, size), np.uint8)
    obj_tex = fbm(rng, size, (4, 8)) if style.fill == "textured" else None
    n_obj = int(rng.integers(3, 7))
    classes = rng.integers(0, len(CLASS_NAMES), n_obj)
    classes[-1] = last_class
    for cls in classes:
        r = float(rng.uniform(*style.size)) * size  # python floats keep the float32 arrays float32
        cy, cx = (float(t) for t in rng.uniform(0, size, 2))
        half = int(np.ceil(r * (1.8 + 2 * style.warp)))
        y0, y1 = max(int(cy) - half, 0), min(int(cy) + half + 1, size)
        x0, x1 = max(int(cx) - half, 0), min(int(cx) + half + 1, size)
        ys = np.arange(y0, y1, dtype=np.float32) - cy
        xs = np.arange(x0, x1, dtype=np.float32) - cx
        dy, dx = ys[:, None], xs[None, :]
        th, aspect = float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0.75, 1.3))
        c, s = np.cos(th), np.sin(th)
        if style.warp:  # wobble: x shifted by a wave along y and vice versa (1-D waves, broadcast: cheap)
            p, q = (float(t) for t in rng.uniform(0, 2 * np.pi, 2))
            dx = dx + (style.warp * r) * np.sin(ys * (3 / r) + p)[:, None]
            dy = dy + (style.warp * r) * np.sin(xs * (3 / r) + q)[None, :]
        u, v = (dx * c + dy * s) / (r * aspect), (dy * c - dx * s) * (aspect / r)
        m = _inside(int(cls), u, v)
        colour = np.asarray(style.objects[rng.integers(len(style.objects))], np.float32)
        colour = colour + rng.uniform(-0.08, 0.08, 3).astype(np.float32)
        crop = img[y0:y1, x0:x1]
        if style.fill == "flat":
            paint = colour * (0.85 - 0.12 * np.clip(v, -1, 1))[..., None]
        elif style.fill == "textured":
            paint = colour * (0.6 + 0.8 * obj_tex[y0:y1, x0:x1])[..., None]
        elif style.fill == "translucent":
            paint = np.minimum(crop * 0.5 + colour * 0.7, 1.2)
        else:  # outline: bright rim, dim interior
            rim = m & ~_inside(int(cls), u, v, 0.8)
            paint = np.where(rim[..., None], colour * 1.1, colour * 0.2 + crop * 0.4)
        np.copyto(crop, paint, where=m[..., None])
        np.copyto(mask[y0:y1, x0:x1], np.uint8(cls + 1), where=m)
    if style.light:
        y, x = np.ogrid[-0.5:0.5:complex(0, size), -0.5:0.5:complex(0, size)]
        th = _u(rng, 0, 2 * np.pi)
        ramp = (1 + style.light * (x * np.cos(th) + y * np.sin(th))).astype(np.float32)  # outer sum: cheap
        img *= ramp[..., None]
    if style.blur:
        img = _box_blur(img, max(1, round(style.blur * size / 128)))
    if style.gray:
        img = np.repeat(img.mean(axis=2, keepdims=True), 3, axis=2)
    if style.noise:  # uniform luminance noise with std = style.noise, one draw per pixel shared by the channels
        noise = rng.random((size, size, 1), dtype=np.float32)
        noise -= 0.5
        noise *= style.noise * 12 ** 0.5
        img += noise
    img *= 255
    img += 0.5
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8), mask


def generate_domain(name: str, n: int, size: int, seed: int) -> DomainData:
    """``n`` images of domain ``name`` (one of DOMAIN_NAMES) at ``size`` px, deterministic in (seed, name)."""
    if name not in DOMAIN_NAMES:
        raise ValueError(f"unknown synthetic domain '{name}' (known: {', '.join(DOMAIN_NAMES)})")
    index, style = DOMAIN_NAMES.index(name), STYLES[name]
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.empty((n, size, size), np.uint8)
    items = []
    for i in range(n):
        rng = np.random.default_rng([seed, index, i])
        images[i], masks[i] = render(style, rng, size, i % len(CLASS_NAMES))
        digest = sha256_bytes(images[i].tobytes() + masks[i].tobytes())
        items.append(Item(stem=f"{name}_{i:05d}", source=f"synthetic:{name}:{i}", sha256=digest))
    return DomainData(name=name, class_names=list(CLASS_NAMES), images=images, masks=masks, items=items)


def generate(num_domains: int, images_per_domain: int, size: int, seed: int) -> list[DomainData]:
    """The first ``num_domains`` of DOMAIN_NAMES, ``images_per_domain`` images each."""
    if not 1 <= num_domains <= len(DOMAIN_NAMES):
        raise ValueError(f"synthetic_domains must be 1..{len(DOMAIN_NAMES)}, got {num_domains}")
    return [generate_domain(d, images_per_domain, size, seed) for d in DOMAIN_NAMES[:num_domains]]
