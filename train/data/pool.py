"""The built-in unlabelled image pool: natural photos, hard negatives and text on photos, generated offline.

Recovery distils a pruned detector from its unpruned teacher, and the teacher needs no labels, so the student can
be shown anything. Shown only our own synthetic text (one font family, plain backgrounds), a pruned student is
unconstrained everywhere else and fires on skin, fabric and foliage (README, "Generalization"). This pool is what it
sees besides: no download, deterministic, cached like the synthetic set.

- ``photo``: crops of the natural images that ship inside scikit-image (people, animals, food, stone, grass,
  microscopy, space), rescaled, flipped and colour-jittered;
- ``pattern``: procedural hard negatives: gratings, plaids, grids, checkers, fractal (1/f) foliage-like noise,
  woven fabric, dot lattices, scribbles, barcodes and rows of symbol-like marks, alone or blended into a photo;
- ``text``: text lines (matplotlib's DejaVu fonts and OpenCV's Hershey stroke fonts, 12-96 px) composited onto
  photo crops, patterns or plain backgrounds.

Photos and patterns are text-free, so most of the pool teaches the student where *not* to fire. Two splits:
``recovery`` (what recovery trains on) and ``guard`` (the generalization guard's held-out images), whose photos
come from source images the recovery split never uses.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from train.data.synthetic import (HERSHEY_PREFIX, SyntheticSpec, draw_lines, make_background, resolve_fonts,
                                  _encode_jpeg)
from train.errors import ConfigError
from train.locks import build_folder
from train.schema import GeneratorSpec

SCHEMA_VERSION = 1
# Part of the cache hash: bump it whenever a change here alters the generated pixels.
GENERATOR_VERSION = 2
POOL_SPLITS = ("recovery", "guard")
KINDS = ("photo", "pattern", "text")
MANIFEST = "pool.json"

# scikit-image's bundled sample images (its package data, no download). The guard's photos are held out.
RECOVERY_PHOTOS = ("astronaut.png", "camera.png", "chelsea.png", "coins.png", "grass.png", "gravel.png",
                   "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png", "retina.jpg", "cell.png",
                   "microaneurysms.png", "color.png", "clock_motion.png", "lfw_subset.npy")
GUARD_PHOTOS = ("coffee.png", "rocket.jpg", "brick.png", "horse.png")
TEXT_FONTS = ("DejaVuSans.ttf", "DejaVuSans-*.ttf", "DejaVuSerif*.ttf", "DejaVuSansMono*.ttf",
              *(f"{HERSHEY_PREFIX}{face}" for face in (0, 1, 2, 3, 4, 6, 7, 16, 18, 19)))


@dataclass(frozen=True)
class PoolSpec(GeneratorSpec):
    """Everything that determines the built-in pool; equal specs give byte-identical pools.

    ``shares``: fractions of (photo, pattern, text) images, normalised; photos and patterns are text-free.
    ``font_size_range``: em size in pixels of the text images' lines (log-uniform).
    """

    seed: int = 0
    n_recovery: int = 400
    n_guard: int = 240
    width_range: tuple[int, int] = (320, 640)
    height_range: tuple[int, int] = (320, 640)
    shares: tuple[float, float, float] = (0.35, 0.3, 0.35)
    font_size_range: tuple[int, int] = (12, 96)
    _schema_version = SCHEMA_VERSION
    _generator_version = GENERATOR_VERSION

    def __post_init__(self) -> None:
        if self.n_recovery < 1 or self.n_guard < 0:
            raise ConfigError(f"data.pool: n_recovery={self.n_recovery} must be >= 1 and n_guard={self.n_guard} "
                              ">= 0")
        for name in ("width_range", "height_range", "font_size_range"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise ConfigError(f"data.pool.{name}={[low, high]}: need 1 <= low <= high")
        if min(self.width_range[0], self.height_range[0]) < 2 * self.font_size_range[1]:
            raise ConfigError(f"data.pool.font_size_range={list(self.font_size_range)} too large for images of "
                              f"{self.width_range[0]}x{self.height_range[0]} px")
        if len(self.shares) != 3 or min(self.shares) < 0 or sum(self.shares) <= 0:
            raise ConfigError(f"data.pool.shares={list(self.shares)}: need 3 non-negative fractions "
                              "(photo, pattern, text), not all 0")

    def count(self, split: str) -> int:
        return self.n_recovery if split == "recovery" else self.n_guard


@dataclass(frozen=True)
class PoolImage:
    """One generated image: where it is (relative to the pool folder) and what kind it is."""

    path: str
    kind: str

    @property
    def text_free(self) -> bool:
        return self.kind != "text"


def ensure_pool(root: Path, spec: PoolSpec, progress: bool = True) -> Path:
    """Return ``root`` holding the pool of ``spec``, generating it (atomically, under a host lock) if missing."""
    return build_folder(root, lambda r: _is_complete(r, spec), lambda tmp: _generate(tmp, spec, progress))


def pool_images(root: Path, split: str) -> list[PoolImage]:
    """The images of one split of a generated pool, in order."""
    manifest = json.loads((Path(root) / MANIFEST).read_text())
    return [PoolImage(**entry) for entry in manifest["images"][split]]


def _is_complete(root: Path, spec: PoolSpec) -> bool:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        images = manifest["images"]
        return (manifest.get("hash") == spec.hash()
                and all(len(images[s]) == spec.count(s) for s in POOL_SPLITS)
                and all((root / e["path"]).is_file() for s in POOL_SPLITS for e in images[s]))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _generate(out: Path, spec: PoolSpec, progress: bool) -> None:
    fonts = resolve_fonts(TEXT_FONTS)
    images: dict[str, list[dict[str, str]]] = {}
    shares = np.asarray(spec.shares, dtype=np.float64) / sum(spec.shares)
    with tqdm(total=spec.n_recovery + spec.n_guard, desc=f"image pool {spec.hash()}", disable=not progress,
              unit="img") as bar:
        for split_id, split in enumerate(POOL_SPLITS):
            (out / split).mkdir(parents=True)
            photos = _photos(RECOVERY_PHOTOS if split == "recovery" else GUARD_PHOTOS)
            # Kinds in fixed proportions (not drawn per image), so even a small pool has every kind.
            counts = np.floor(shares * spec.count(split) + 0.5).astype(int)
            counts[-1] = spec.count(split) - counts[:-1].sum()
            kinds = [kind for kind, n in zip(KINDS, counts) for _ in range(max(n, 0))]
            entries = []
            for index, kind in enumerate(kinds):
                rng = np.random.default_rng(np.random.SeedSequence([spec.seed, split_id, index]))
                image = _make_image(rng, spec, kind, photos, fonts)
                rel = f"{split}/{index:05d}_{kind}.jpg"
                (out / rel).write_bytes(_encode_jpeg(image, int(rng.integers(70, 96))))
                entries.append({"path": rel, "kind": kind})
                bar.update()
            images[split] = entries
    manifest = {"schema_version": SCHEMA_VERSION, "hash": spec.hash(), "generator_version": GENERATOR_VERSION,
                "spec": spec.to_json(), "images": images}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def _make_image(rng: np.random.Generator, spec: PoolSpec, kind: str, photos: list[np.ndarray],
                fonts: tuple[str, ...]) -> np.ndarray:
    width = int(rng.integers(spec.width_range[0], spec.width_range[1], endpoint=True))
    height = int(rng.integers(spec.height_range[0], spec.height_range[1], endpoint=True))
    if kind == "photo":
        image = photo_crop(rng, photos, height, width)
    elif kind == "pattern":
        image = hard_negative(rng, height, width)
        if rng.random() < 0.3:  # a pattern on a photo: stripes on a shirt, a fence before a lawn
            alpha = rng.uniform(0.3, 0.7)
            image = alpha * image + (1 - alpha) * photo_crop(rng, photos, height, width)
    else:
        r = rng.random()
        image = (photo_crop(rng, photos, height, width) if r < 0.6 else hard_negative(rng, height, width)
                 if r < 0.8 else make_background(rng, str(rng.choice(["solid", "gradient", "noise"])), height,
                                                 width))
        text = SyntheticSpec(n_train=1, n_eval=0, width_range=(width, width), height_range=(height, height),
                             lines_range=(1, 6), font_size_range=spec.font_size_range, min_contrast=0.2,
                             max_rotation_deg=20.0, perspective=0.06)
        return draw_lines(rng, text, fonts, np.ascontiguousarray(image, dtype=np.float64))[0]
    return _camera(rng, image)


def _camera(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Blur and sensor noise as the text images get from ``draw_lines``; float 0..1 in, uint8 out."""
    if rng.random() < 0.4:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.3, 1.5))
    image = image + rng.normal(0, rng.uniform(0, 6) / 255, size=image.shape)
    return np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------- photos

def _photos(names: tuple[str, ...]) -> list[np.ndarray]:
    return [photo for name in names for photo in _load_photo(name)]


@lru_cache(maxsize=None)
def _load_photo(name: str) -> tuple[np.ndarray, ...]:
    """RGB float images of one bundled scikit-image sample (the face set becomes mosaics of faces)."""
    path = resources.files("skimage.data") / name
    if name.endswith(".npy"):
        faces = np.load(str(path)).astype(np.float64)  # (N, 25, 25) grey, 0..1
        faces = faces / max(float(faces.max()), 1e-9)
        rng = np.random.default_rng(0)
        mosaics = []
        for _ in range(4):
            tiles = faces[rng.permutation(len(faces))[:64]].reshape(8, 8, 25, 25)
            grey = tiles.transpose(0, 2, 1, 3).reshape(200, 200)
            tint = np.array([1.0, 0.8, 0.65])  # skin-like toning of the grey faces
            mosaics.append(np.clip(grey[..., None] * tint, 0, 1))
        return tuple(mosaics)
    # PIL, not OpenCV: libpng would print a warning on stderr for the ICC profiles of some of these files.
    try:
        with Image.open(io.BytesIO(path.read_bytes())) as decoded:
            image = np.asarray(decoded.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot decode scikit-image's bundled {name}: {exc}") from None
    return (image.astype(np.float64) / 255,)


def photo_crop(rng: np.random.Generator, photos: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """A random window of a random photo, resized to (height, width), flipped and colour-jittered."""
    photo = photos[int(rng.integers(len(photos)))]
    h, w = photo.shape[:2]
    side = rng.uniform(0.3, 1.0)
    ch, cw = max(8, int(h * side)), max(8, int(w * side))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = cv2.resize(photo[y:y + ch, x:x + cw], (width, height), interpolation=cv2.INTER_LINEAR)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    gains = rng.uniform(0.75, 1.25, 3) * rng.uniform(0.7, 1.2)
    gamma = rng.uniform(0.7, 1.4)
    return np.clip(np.clip(crop, 0, 1) ** gamma * gains, 0, 1)


# --------------------------------------------------------------------------------------------------- patterns

def _palette(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` RGB colours 0..1: mostly unrelated, sometimes a foliage-like green/brown family."""
    if rng.random() < 0.3:
        base = np.array([[0.2, 0.35, 0.1], [0.35, 0.5, 0.15], [0.4, 0.3, 0.15], [0.1, 0.2, 0.05]])
        return np.clip(base[rng.integers(len(base), size=n)] * rng.uniform(0.6, 1.6, (n, 1)), 0, 1)
    return rng.uniform(0, 1, (n, 3))


def _colourise(t: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Map a scalar field in 0..1 onto a ramp through ``colours``."""
    stops = np.linspace(0, 1, len(colours))
    return np.stack([np.interp(t, stops, colours[:, c]) for c in range(3)], axis=-1)


def _grating(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    period = float(np.exp(rng.uniform(np.log(3), np.log(40))))
    angle = rng.uniform(0, np.pi)
    t = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    if rng.random() < 0.5:
        t = (t > 0.5).astype(np.float64)  # hard stripes
    return t


def _fractal(rng: np.random.Generator, h: int, w: int, beta: float | None = None) -> np.ndarray:
    """1/f^beta noise: beta ~1 is grainy, ~2.5 cloudy; in between it looks like foliage or stone."""
    beta = rng.uniform(1.0, 2.6) if beta is None else beta
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    radius = np.sqrt(fx ** 2 + fy ** 2)
    radius[0, 0] = 1.0
    spectrum = (rng.normal(size=radius.shape) + 1j * rng.normal(size=radius.shape)) / radius ** (beta / 2)
    spectrum[0, 0] = 0
    field = np.fft.irfft2(spectrum, s=(h, w))
    field -= field.min()
    return field / max(field.max(), 1e-9)


def _scalar_pattern(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    kind = int(rng.integers(5))
    if kind == 0:
        return _grating(rng, h, w)
    if kind == 1:  # plaid / weave
        t = (_grating(rng, h, w) + _grating(rng, h, w)) / 2
        return t * (0.7 + 0.3 * _fractal(rng, h, w, 1.2))
    if kind == 2:  # grid or checkerboard
        cell = int(rng.integers(4, 41))
        yy, xx = np.mgrid[0:h, 0:w]
        if rng.random() < 0.5:
            return (((yy // cell) + (xx // cell)) % 2).astype(np.float64)
        thickness = int(rng.integers(1, 4))
        return ((yy % cell < thickness) | (xx % cell < thickness)).astype(np.float64)
    if kind == 3:
        return _fractal(rng, h, w)
    t = _fractal(rng, h, w, rng.uniform(1.5, 2.2))  # contour bands, like wood grain or a topographic map
    return 0.5 + 0.5 * np.sin(t * rng.uniform(10, 40))


def _draw_pattern(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Drawn hard negatives on a plain or patterned ground: dots, scribbles, barcodes, symbol-like marks."""
    colours = _palette(rng, 2)
    canvas = (np.broadcast_to(colours[0], (h, w, 3)).copy() if rng.random() < 0.6
              else _colourise(_fractal(rng, h, w), _palette(rng, 2)))
    ink = tuple(float(c) for c in colours[1])
    kind = int(rng.integers(4))
    if kind == 0:  # dot / ring lattice
        step = int(rng.integers(6, 40))
        radius = max(1, int(step * rng.uniform(0.15, 0.45)))
        filled = -1 if rng.random() < 0.6 else 1
        for y in range(step // 2, h, step):
            for x in range(step // 2 + (step // 2 if (y // step) % 2 and rng.random() < 0.5 else 0), w, step):
                cv2.circle(canvas, (x, y), radius, ink, filled, cv2.LINE_AA)
    elif kind == 1:  # scribbles: lines, arcs, circles
        for _ in range(int(rng.integers(5, 40))):
            p, q = rng.integers(0, [w, h], size=(2, 2))
            thickness = int(rng.integers(1, 6))
            if rng.random() < 0.5:
                cv2.line(canvas, tuple(map(int, p)), tuple(map(int, q)), ink, thickness, cv2.LINE_AA)
            else:
                axes = tuple(int(a) for a in rng.integers(3, max(4, min(h, w) // 3), size=2))
                cv2.ellipse(canvas, tuple(map(int, p)), axes, float(rng.uniform(0, 180)), 0,
                            float(rng.uniform(90, 360)), ink, thickness, cv2.LINE_AA)
    elif kind == 2:  # barcodes: bars of random widths, no digits under them
        for _ in range(int(rng.integers(1, 4))):
            bh, bw = int(rng.integers(h // 8, h // 2)), int(rng.integers(w // 6, w // 2))
            y, x = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
            pos = x
            while pos < x + bw:
                width = int(rng.integers(1, 5))
                if rng.random() < 0.5:
                    canvas[y:y + bh, pos:min(pos + width, x + bw)] = ink
                pos += width
    else:  # rows of symbol-like marks: random stroke glyphs that are not letters
        size = int(rng.integers(8, 40))
        thickness = max(1, size // 10)
        for row in range(int(rng.integers(1, 6))):
            y0 = int(rng.integers(0, max(1, h - size)))
            x = int(rng.integers(0, max(1, w // 3)))
            while x < w - size and rng.random() > 0.03:
                strokes = rng.integers(0, size, size=(int(rng.integers(2, 5)), 2, 2))
                for a, b in strokes:
                    cv2.line(canvas, (x + int(a[0]), y0 + int(a[1])), (x + int(b[0]), y0 + int(b[1])), ink,
                             thickness, cv2.LINE_AA)
                x += int(size * rng.uniform(0.9, 2.0))
    return canvas


def hard_negative(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A text-free RGB float image (0..1) of fine repeated or text-like structure."""
    if rng.random() < 0.55:
        return _colourise(_scalar_pattern(rng, height, width), _palette(rng, int(rng.integers(2, 4))))
    return _draw_pattern(rng, height, width)


