"""Deterministic synthetic text-detection dataset: the project's built-in default data.

Users without their own labelled images still need something to fine-tune and evaluate pruned detectors on, so
this module renders one: text lines in the real TTF fonts matplotlib ships, on varied backgrounds, with
line-level quadrilateral labels in PaddleOCR's det label format. It must be easy enough that the released
PP-OCRv4 mobile detector scores high on it (so pruning losses are measured against a good baseline) yet be a real
detection task (several lines, sizes, colours, rotation, perspective, blur, noise).

Everything is drawn from one seed per image (``SeedSequence([seed, split, index])``), so a spec always yields
byte-identical files on the same library versions (Pillow/FreeType rasterisation and the JPEG encoder are part
of "same versions").
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from shapely.geometry import Polygon
from tqdm import tqdm

from train.errors import ConfigError, DataError
from train.locks import build_folder
from train.schema import GeneratorSpec

SCHEMA_VERSION = 1
# Part of the cache hash: bump it whenever a change here alters the rendered pixels or labels, so datasets
# cached by an older version are regenerated instead of silently reused.
GENERATOR_VERSION = 2

SPLITS = ("train", "eval")
BACKGROUND_KINDS = ("solid", "gradient", "noise", "shapes", "texture", "blobs")
DEFAULT_FONTS = ("DejaVuSans.ttf", "DejaVuSans-*.ttf", "DejaVuSerif*.ttf", "DejaVuSansMono*.ttf")
DEFAULT_BACKGROUNDS = ("solid", "gradient", "noise", "shapes")
# A font family and background style never seen in training, for the generalisation check.
SHIFTED_FONTS = ("STIXGeneral*.ttf", "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmb10.ttf", "cmti10.ttf")
SHIFTED_BACKGROUNDS = ("texture", "blobs")
SPEC_FILE = "spec.json"

_WORDS = """
the of and to in is for on with as by at from that this are be was or an not have it which has will can
all new more one time year about other price total order date page number name address city street road
state county north south east west main park lake river hill market store office service center school
house home room floor door window table chair paper book letter note card report account bank money cash
credit invoice receipt payment amount balance tax rate fee cost value item product quantity unit weight
size color model serial code type class level group team member user customer client company business
data system network server email phone mobile call open close start stop enter exit left right up down
first last next previous back front top bottom high low fast slow big small long short light dark hot
cold warm fresh clean free sale offer special daily weekly monthly annual morning evening night today
summer winter spring autumn water coffee tea milk bread cheese apple orange lemon sugar salt rice pasta
garden flower tree forest stone metal glass wood gold silver green blue red yellow white black brown
music movie video photo camera screen display print copy scan file folder image text label title
section chapter figure line point area field form check box list menu help search result report status
ready done error warning notice please thank welcome hello world station airport hotel travel ticket
train plane ship bus car bike parking garage entrance ground library museum theater hospital pharmacy
doctor nurse health energy power battery charge signal volume limit speed distance height depth width
""".split()


@dataclass(frozen=True)
class SyntheticSpec(GeneratorSpec):
    """Everything that determines a synthetic dataset; equal specs give byte-identical datasets.

    Ranges are inclusive ``(low, high)`` pairs. Font entries are glob patterns, relative to matplotlib's
    bundled ``fonts/ttf`` folder unless absolute; fonts lacking proper glyphs for the generated text are skipped
    (matplotlib ships symbol fonts). ``font_size_range`` is the font size in pixels (the em size; the ink of a
    mixed-case line is about that tall), drawn log-uniformly. Other knobs:

    - ``min_contrast``: least luminance difference (0..1) between a line's colour and the background under it.
    - ``line_gap``: least distance between labelled boxes, as a fraction of the taller line's box height.
    - ``box_padding``: margin added around the tight ink box on every side, as a fraction of the font size.
      0.1 matches the box convention of the released PP-OCRv4 detector (its boxes are ~1.3x taller than the
      tight ink box; with 0.1 the mean IoU of its matched boxes rises from 0.72 to 0.84).
    - ``paragraph_prob``: chance that a new group of lines is a paragraph (2-5 lines, same font, stacked).
    - ``max_rotation_deg``, ``perspective`` (corner shift as a fraction of the side), ``max_blur_sigma``,
      ``max_noise_sigma`` (in 0..255 units) and ``jpeg_quality_range`` set the geometric and camera effects.
    """

    seed: int = 0
    n_train: int = 300
    n_eval: int = 60
    width_range: tuple[int, int] = (320, 640)
    height_range: tuple[int, int] = (320, 640)
    lines_range: tuple[int, int] = (2, 7)
    words_range: tuple[int, int] = (1, 5)
    font_size_range: tuple[int, int] = (12, 48)
    train_fonts: tuple[str, ...] = DEFAULT_FONTS
    eval_fonts: tuple[str, ...] = DEFAULT_FONTS
    train_backgrounds: tuple[str, ...] = DEFAULT_BACKGROUNDS
    eval_backgrounds: tuple[str, ...] = DEFAULT_BACKGROUNDS
    min_contrast: float = 0.15
    line_gap: float = 0.15
    box_padding: float = 0.1
    paragraph_prob: float = 0.4
    max_rotation_deg: float = 10.0
    perspective: float = 0.05
    max_blur_sigma: float = 1.5
    max_noise_sigma: float = 8.0
    jpeg_quality_range: tuple[int, int] = (75, 95)
    _schema_version = SCHEMA_VERSION
    _generator_version = GENERATOR_VERSION

    def __post_init__(self) -> None:
        for name in ("width_range", "height_range", "lines_range", "words_range", "font_size_range",
                     "jpeg_quality_range"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise ConfigError(f"SyntheticSpec.{name}={[low, high]}: need 1 <= low <= high")
        if self.n_train < 0 or self.n_eval < 0 or self.n_train + self.n_eval == 0:
            raise ConfigError(f"SyntheticSpec n_train={self.n_train}, n_eval={self.n_eval}: need >= 0, not both 0")
        if self.font_size_range[1] * 2 > min(self.width_range[0], self.height_range[0]):
            raise ConfigError(f"SyntheticSpec.font_size_range={list(self.font_size_range)} too large for images "
                              f"of {self.width_range[0]}x{self.height_range[0]} px")
        for name in ("train_backgrounds", "eval_backgrounds"):
            kinds = getattr(self, name)
            unknown = [k for k in kinds if k not in BACKGROUND_KINDS]
            if not kinds or unknown:
                raise ConfigError(f"SyntheticSpec.{name}={list(kinds)}: need a non-empty subset of "
                                  f"{list(BACKGROUND_KINDS)}")
        for name in ("train_fonts", "eval_fonts"):
            if not getattr(self, name):
                raise ConfigError(f"SyntheticSpec.{name} is empty")
        if not 0.0 <= self.min_contrast <= 0.8:
            raise ConfigError(f"SyntheticSpec.min_contrast={self.min_contrast}: need 0..0.8 (luminance difference)")
        if not 0 <= self.max_rotation_deg <= 45:
            # Beyond 45 degrees "top-left" stops naming the same corner of a line.
            raise ConfigError(f"SyntheticSpec.max_rotation_deg={self.max_rotation_deg}: need 0..45")
        if not 0 <= self.paragraph_prob <= 1:
            raise ConfigError(f"SyntheticSpec.paragraph_prob={self.paragraph_prob}: need 0..1")
        if self.line_gap < 0 or self.box_padding < 0 or self.perspective < 0 or self.max_blur_sigma < 0 \
                or self.max_noise_sigma < 0:
            raise ConfigError("SyntheticSpec line_gap, box_padding, perspective, max_blur_sigma and "
                              "max_noise_sigma must be >= 0")
        if self.jpeg_quality_range[1] > 100:
            raise ConfigError(f"SyntheticSpec.jpeg_quality_range={list(self.jpeg_quality_range)}: max 100")

    def count(self, split: str) -> int:
        return self.n_train if split == "train" else self.n_eval

    def fonts(self, split: str) -> tuple[str, ...]:
        return self.train_fonts if split == "train" else self.eval_fonts

    def backgrounds(self, split: str) -> tuple[str, ...]:
        return self.train_backgrounds if split == "train" else self.eval_backgrounds


def shifted_eval_spec(base: SyntheticSpec | None = None, n_eval: int | None = None) -> SyntheticSpec:
    """An eval-only spec whose fonts (STIX, Computer Modern) and backgrounds (texture, blobs) the train split of
    ``base`` never uses: scores on it show whether a pruned, fine-tuned model generalises beyond its training
    style. Its seed differs from ``base``'s so no text layout is shared either."""
    base = base or SyntheticSpec()
    return dataclasses.replace(base, seed=base.seed + 1_000_003, n_train=0,
                               n_eval=base.n_eval if n_eval is None else n_eval,
                               eval_fonts=SHIFTED_FONTS, eval_backgrounds=SHIFTED_BACKGROUNDS)


def label_path(root: Path, split: str) -> Path:
    return root / f"{split}_label.txt"


def ensure_synthetic_dataset(root: Path, spec: SyntheticSpec, progress: bool = True) -> Path:
    """Return ``root`` holding the dataset of ``spec``, generating it only if it is missing or stale.

    A dataset counts as present when ``root/spec.json`` carries ``spec``'s hash and every listed image exists.
    Otherwise the dataset is built in a sibling temp dir and swapped in by rename, so an interrupted run never
    leaves a partial dataset that looks complete. A non-empty ``root`` holding anything besides this module's
    files is refused rather than overwritten.
    """
    return build_folder(root, lambda r: _is_complete(r, spec), lambda tmp: _generate(tmp, spec, progress),
                        _check_replaceable)


def _is_complete(root: Path, spec: SyntheticSpec) -> bool:
    try:
        meta = json.loads((root / SPEC_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or meta.get("hash") != spec.hash():
        return False
    for split in SPLITS:
        try:
            lines = label_path(root, split).read_text(encoding="utf-8").splitlines()
        except OSError:
            return False
        if len(lines) != spec.count(split):
            return False
        if not all((root / line.split("\t", 1)[0]).is_file() for line in lines):
            return False
    return True


def _check_replaceable(root: Path) -> None:
    if not root.exists():
        return
    ours = {SPEC_FILE, "images", *(label_path(root, s).name for s in SPLITS)}
    foreign = sorted(p.name for p in root.iterdir() if p.name not in ours) if root.is_dir() else [root.name]
    if foreign:
        raise DataError(f"{root}: not a synthetic dataset folder (contains {foreign[:5]}); "
                        f"choose an empty or new folder for the synthetic data")


def _generate(out: Path, spec: SyntheticSpec, progress: bool) -> None:
    fonts = {split: resolve_fonts(spec.fonts(split)) for split in SPLITS if spec.count(split)}
    total = spec.n_train + spec.n_eval
    with tqdm(total=total, desc=f"synthetic dataset {spec.hash()}", disable=not progress, unit="img") as bar:
        for split_id, split in enumerate(SPLITS):
            (out / "images" / split).mkdir(parents=True)
            rows = []
            for index in range(spec.count(split)):
                rng = np.random.default_rng(np.random.SeedSequence([spec.seed, split_id, index]))
                image, lines = render_image(rng, spec, fonts[split], spec.backgrounds(split))
                rel = f"images/{split}/{index:05d}.jpg"
                (out / rel).write_bytes(_encode_jpeg(image, int(rng.integers(*spec.jpeg_quality_range,
                                                                             endpoint=True))))
                rows.append(rel + "\t" + json.dumps(
                    [{"transcription": t.text, "points": t.points()} for t in lines], ensure_ascii=False))
                bar.update()
            label_path(out, split).write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    # Written last: its presence with the right hash is what marks the dataset complete.
    meta = {"hash": spec.hash(), "generator_version": GENERATOR_VERSION, "spec": spec.to_json()}
    (out / SPEC_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------- fonts

# Expected glyph names (Adobe Glyph List) of every character the text generator emits. matplotlib ships
# TeX math fonts (cmmi, cmsy, cmex) whose cmap covers ASCII codes but maps them to symbols or old-style digits;
# checking glyph names, not just cmap coverage, keeps those out.
_DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_GLYPH_NAMES = {
    **{c: c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"},
    **{str(d): name for d, name in enumerate(_DIGIT_NAMES)},
    ".": "period", ":": "colon", "/": "slash", "%": "percent", "#": "numbersign", "-": "hyphen",
}


def resolve_fonts(patterns: tuple[str, ...]) -> tuple[str, ...]:
    """Font files matching ``patterns`` whose glyphs for the generated characters are the expected ones,
    sorted for determinism. ``hershey:<n>`` names OpenCV's built-in stroke font ``n`` (``cv2.FONT_HERSHEY_*``,
    optionally ``| cv2.FONT_ITALIC``): a font family that ships with OpenCV itself."""
    base = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    found: set[str] = set()
    for pattern in patterns:
        if pattern.startswith(HERSHEY_PREFIX):
            face = pattern[len(HERSHEY_PREFIX):]
            if not face.isdigit() or int(face) & ~cv2.FONT_ITALIC not in _HERSHEY_EM:
                raise ConfigError(f"font {pattern!r}: expected hershey:<n>, n one of {sorted(_HERSHEY_EM)} "
                                  f"(+ {cv2.FONT_ITALIC} for italic)")
            found.add(pattern)
            continue
        matches = glob.glob(pattern if os.path.isabs(pattern) else os.path.join(base, pattern))
        if not matches:
            raise ConfigError(f"font pattern {pattern!r} matches no file (looked in {base})")
        found.update(m for m in matches if _has_text_glyphs(m))
    if not found:
        raise ConfigError(f"font patterns {list(patterns)} match no font with Latin letters and digits")
    return tuple(sorted(found))


@lru_cache(maxsize=None)
def _has_text_glyphs(path: str) -> bool:
    from matplotlib.ft2font import FT2Font

    try:
        font = FT2Font(path)
    except (OSError, RuntimeError):
        return False
    charmap = font.get_charmap()
    return all(ord(c) in charmap and font.get_glyph_name(charmap[ord(c)]) == name
               for c, name in _GLYPH_NAMES.items())


HERSHEY_PREFIX = "hershey:"
# Pixel height of a capital at fontScale 1 per Hershey face, so a line's size means the same as a TTF's em.
_HERSHEY_EM = {face: cv2.getTextSize("H", face, 1.0, 1)[0][1] / 0.72 for face in range(8)}


@lru_cache(maxsize=256)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


KNOWN_WORDS = ("MODELS", "read 2026 text")


def known_words_image(lines: tuple[str, ...] = KNOWN_WORDS, font_size: int = 40) -> np.ndarray:
    """``lines`` in DejaVu Sans, black on white, 80 px apart, BGR (640 px wide): an image whose words an OCR
    client must read back, for round trips through deployment clients (tests, ``benchmarks/*_client.py``)."""
    image = Image.new("RGB", (640, 40 + 80 * len(lines)), "white")
    draw = ImageDraw.Draw(image)
    font = _font(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf"), font_size)
    for row, line in enumerate(lines):
        draw.text((30, 30 + 80 * row), line, fill="black", font=font)
    return cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR)


# --------------------------------------------------------------------------------------------------- text

def _random_token(rng: np.random.Generator) -> str:
    """A word (any case) or a number-like token, as seen on receipts, signs and forms."""
    if rng.random() < 0.75:
        word = str(rng.choice(_WORDS))
        case = rng.random()
        return word.upper() if case < 0.15 else word.capitalize() if case < 0.5 else word
    kind = int(rng.integers(6))
    n = int(rng.integers(0, 10_000))
    # No "$": TeX italic fonts draw a pound sign in its slot, which would make the transcription wrong.
    return [str(n), f"{n / 100:.2f}", f"#{n}", f"{n % 100}%",
            f"{1 + n % 28:02d}/{1 + n % 12:02d}/{2000 + n % 30}", f"{n % 24:02d}:{n % 60:02d}"][kind]


@dataclass(frozen=True)
class RenderedLine:
    """One placed line: its text and its labelled box (the ink box plus ``box_padding``) in image coordinates,
    clockwise from top-left."""

    text: str
    quad: np.ndarray  # (4, 2) float

    def points(self) -> list[list[float]]:
        return [[round(float(x), 1), round(float(y), 1)] for x, y in self.quad]


@dataclass(frozen=True)
class _LineMask:
    """A line rendered flat: anti-aliased coverage (0..255) and its tight ink box inside that array."""

    text: str
    mask: np.ndarray
    ink: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)


def _render_line(rng: np.random.Generator, spec: SyntheticSpec, font_path: str, size: int,
                 max_width: float) -> _LineMask | None:
    if font_path.startswith(HERSHEY_PREFIX):
        face, font = int(font_path[len(HERSHEY_PREFIX):]), None
        scale = size / _HERSHEY_EM[face & 15]
        thickness = max(1, int(round(size / 14 * rng.uniform(0.6, 1.6))))

        def length(text: str) -> float:
            return cv2.getTextSize(text, face, scale, thickness)[0][0]
    else:
        font = _font(font_path, size)
        length = font.getlength
    n_words = int(rng.integers(spec.words_range[0], spec.words_range[1], endpoint=True))
    text = ""
    for _ in range(n_words):
        candidate = (text + " " + _random_token(rng)).strip()
        if length(candidate) > max_width:
            break
        text = candidate
    if not text:
        return None
    pad = 2
    if font is None:
        (w, h), baseline = cv2.getTextSize(text, face, scale, thickness)
        canvas = np.zeros((h + baseline + 2 * pad + thickness, w + 2 * pad + thickness), np.uint8)
        cv2.putText(canvas, text, (pad, pad + h), face, scale, 255, thickness, cv2.LINE_AA)
        mask = canvas
    else:
        left, top, right, bottom = font.getbbox(text)
        image = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
        ImageDraw.Draw(image).text((pad - left, pad - top), text, font=font, fill=255)
        mask = np.asarray(image)
    # Faint anti-aliasing fringes are not ink a labeller would box.
    ys, xs = np.nonzero(mask >= 64)
    if len(xs) == 0:
        return None
    return _LineMask(text, mask, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))


# --------------------------------------------------------------------------------------------------- layout

def _rotation_about(center: tuple[float, float], angle_deg: float, dest: tuple[float, float]) -> np.ndarray:
    """3x3 matrix rotating about ``center`` and moving it to ``dest``."""
    a = np.deg2rad(angle_deg)
    c, s = np.cos(a), np.sin(a)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    to_origin = np.array([[1, 0, -center[0]], [0, 1, -center[1]], [0, 0, 1]])
    to_dest = np.array([[1, 0, dest[0]], [0, 1, dest[1]], [0, 0, 1]])
    return to_dest @ rot @ to_origin


def _random_perspective(rng: np.random.Generator, width: int, height: int, strength: float) -> np.ndarray:
    """A mild whole-image homography, as if the page were photographed slightly off-axis."""
    src = np.float32([[0, 0], [width, 0], [width, height], [0, height]])
    jitter = rng.uniform(-strength, strength, size=(4, 2)) * np.float32([width, height])
    return cv2.getPerspectiveTransform(src, (src + jitter).astype(np.float32)).astype(np.float64)


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    homog = np.concatenate([points, np.ones((len(points), 1))], axis=1) @ matrix.T
    return homog[:, :2] / homog[:, 2:3]


def _clockwise_from_top_left(quad: np.ndarray) -> np.ndarray:
    """Rotate the cyclic order so the point nearest the top-left comes first (order is already clockwise)."""
    start = int(np.argmin(quad[:, 0] + quad[:, 1]))
    return np.roll(quad, -start, axis=0)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def _text_colour(rng: np.random.Generator, bg_lum: np.ndarray, min_contrast: float) -> np.ndarray | None:
    """A colour at least ``min_contrast`` (luminance) away from all of the background under the line, or None."""
    low, high = np.percentile(bg_lum, [2, 98])
    options = []
    if low - min_contrast >= 0:
        options.append((0.0, low - min_contrast))
    if high + min_contrast <= 1:
        options.append((high + min_contrast, 1.0))
    if not options:
        return None
    # Dark-on-light is the common case in documents; keep it the majority.
    lo, hi = options[0] if len(options) == 1 or rng.random() < 0.7 else options[1]
    target = rng.uniform(lo, hi)
    tint = rng.normal(0, 0.15, size=3)
    colour = np.clip(target + tint - _luminance(tint), 0, 1)
    # Clipping can pull a tinted colour's luminance back toward the background: fall back to grey then.
    return colour if lo <= _luminance(colour) <= hi else np.full(3, target)


@dataclass(frozen=True)
class _PlacedLine:
    """A line already in the image, with what later placements check their distance against."""

    line: RenderedLine
    poly: Polygon
    height: float  # of the labelled box before warping, the scale for the gap to neighbours


def _layout_group(rng: np.random.Generator, spec: SyntheticSpec, font: str, size: int, n_lines: int,
                  max_width: float) -> list[tuple[_LineMask, np.ndarray]]:
    """Lines of one font and size stacked as a paragraph (left-aligned or centred), each with the matrix that
    maps its mask into the group's frame; a single line is a group of one."""
    lines = [m for m in (_render_line(rng, spec, font, size, max_width) for _ in range(n_lines)) if m is not None]
    margin = spec.box_padding * size
    widths = [m.ink[2] - m.ink[0] for m in lines]
    centred = rng.random() < 0.25
    group, top, prev_height = [], 0.0, 0.0
    for m, w in zip(lines, widths):
        box_height = m.ink[3] - m.ink[1] + 2 * margin
        if group:
            top += prev_height + rng.uniform(spec.line_gap, spec.line_gap + 0.5) * max(prev_height, box_height)
        x = (max(widths) - w) / 2 if centred else 0.0
        group.append((m, np.array([[1, 0, x - m.ink[0]], [0, 1, top - m.ink[1]], [0, 0, 1]], dtype=np.float64)))
        prev_height = box_height
    return group


def render_image(rng: np.random.Generator, spec: SyntheticSpec, fonts: tuple[str, ...],
                 backgrounds: tuple[str, ...]) -> tuple[np.ndarray, list[RenderedLine]]:
    """One RGB uint8 image and its lines. Lines come alone or in paragraph blocks; labelled boxes keep a gap of
    at least ``line_gap`` x the larger line height between each other."""
    width = int(rng.integers(spec.width_range[0], spec.width_range[1], endpoint=True))
    height = int(rng.integers(spec.height_range[0], spec.height_range[1], endpoint=True))
    image = make_background(rng, str(rng.choice(backgrounds)), height, width)
    return draw_lines(rng, spec, fonts, image)


def draw_lines(rng: np.random.Generator, spec: SyntheticSpec, fonts: tuple[str, ...],
               image: np.ndarray) -> tuple[np.ndarray, list[RenderedLine]]:
    """Place ``spec.lines_range`` lines (alone or in paragraphs) on the float RGB ``image`` (0..1, H x W x 3),
    then degrade it as a camera would; returns the uint8 image and its lines."""
    height, width = image.shape[:2]
    bg_lum = _luminance(image)
    page_to_image = _random_perspective(rng, width, height, spec.perspective)
    base_angle = float(np.clip(rng.normal(0, spec.max_rotation_deg / 2), -spec.max_rotation_deg,
                               spec.max_rotation_deg)) if rng.random() < 0.7 else 0.0
    n_lines = int(rng.integers(spec.lines_range[0], spec.lines_range[1], endpoint=True))
    placed: list[_PlacedLine] = []
    # Log-uniform sizes: every octave gets the same share, so small text (the hard, common case) is frequent.
    log_lo, log_hi = np.log(spec.font_size_range[0]), np.log(spec.font_size_range[1] + 1)
    for _ in range(25 * n_lines):
        room = n_lines - len(placed)
        if room == 0:
            break
        size = int(np.exp(rng.uniform(log_lo, log_hi)))
        block = room >= 2 and rng.random() < spec.paragraph_prob
        group = _layout_group(rng, spec, fonts[int(rng.integers(len(fonts)))], size,
                              int(rng.integers(2, min(room, 5), endpoint=True)) if block else 1, 0.9 * width)
        new = _place_group(rng, spec, group, size, page_to_image, base_angle, placed, (height, width))
        if not new:
            continue
        union = cv2.fillPoly(np.zeros((height, width), np.uint8),
                             [np.round(p.line.quad).astype(np.int32) for p, _ in new], 1)
        colour = _text_colour(rng, bg_lum[union.astype(bool)], spec.min_contrast)
        if colour is None:
            continue
        opacity = rng.uniform(0.85, 1.0)
        for p, warp in new:
            _composite(image, *warp, colour, opacity)
            placed.append(p)
    image = _degrade(rng, image, spec)
    return (np.clip(image * 255 + 0.5, 0, 255)).astype(np.uint8), [p.line for p in placed]


def _place_group(rng: np.random.Generator, spec: SyntheticSpec, group: list[tuple[_LineMask, np.ndarray]],
                 size: int, page_to_image: np.ndarray, base_angle: float, placed: list[_PlacedLine],
                 shape: tuple[int, int]) -> list[tuple[_PlacedLine, tuple[np.ndarray, np.ndarray]]]:
    """Rotate the group about its centre to a random spot; return its lines with (mask, mask->image matrix),
    or nothing if a box leaves the image or comes closer than ``line_gap`` to a line already placed."""
    if not group:
        return []
    height, width = shape
    margin = spec.box_padding * size
    boxes = []
    for m, to_group in group:
        x0, y0, x1, y1 = m.ink
        corners = np.array([[x0 - margin, y0 - margin], [x1 + margin, y0 - margin], [x1 + margin, y1 + margin],
                            [x0 - margin, y1 + margin]], dtype=np.float64)
        boxes.append(_apply(to_group, corners))
    low, high = np.min([b.min(axis=0) for b in boxes], axis=0), np.max([b.max(axis=0) for b in boxes], axis=0)
    dest = (rng.uniform(0, width), rng.uniform(0, height))
    group_to_image = page_to_image @ _rotation_about(tuple((low + high) / 2), base_angle + rng.uniform(-1.5, 1.5),
                                                     dest)
    new: list[tuple[_PlacedLine, tuple[np.ndarray, np.ndarray]]] = []
    for (m, to_group), box in zip(group, boxes):
        quad = _clockwise_from_top_left(_apply(group_to_image, box))
        if quad.min() < 1 or quad[:, 0].max() > width - 2 or quad[:, 1].max() > height - 2:
            return []
        line = _PlacedLine(RenderedLine(m.text, quad), Polygon(quad), float(box[2, 1] - box[0, 1]))
        if any(line.poly.distance(p.poly) < spec.line_gap * max(line.height, p.height) for p in placed):
            return []
        new.append((line, (m.mask, group_to_image @ to_group)))
    return new


def _composite(image: np.ndarray, mask: np.ndarray, mask_to_image: np.ndarray, colour: np.ndarray,
               opacity: float) -> None:
    """Blend ``colour`` into ``image`` through ``mask`` warped by ``mask_to_image``; only the line's
    bounding rectangle is warped, which keeps generation fast."""
    h, w = mask.shape
    corners = _apply(mask_to_image, np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64))
    x0, y0 = np.maximum(np.floor(corners.min(axis=0)).astype(int) - 1, 0)
    x1, y1 = np.minimum(np.ceil(corners.max(axis=0)).astype(int) + 1, [image.shape[1], image.shape[0]])
    shift = np.array([[1, 0, -x0], [0, 1, -y0], [0, 0, 1]], dtype=np.float64)
    alpha = cv2.warpPerspective(mask, shift @ mask_to_image, (int(x1 - x0), int(y1 - y0)),
                                flags=cv2.INTER_LINEAR, borderValue=0)
    alpha = (alpha.astype(np.float64) / 255 * opacity)[..., None]
    roi = image[y0:y1, x0:x1]
    roi[:] = roi * (1 - alpha) + colour * alpha


def _degrade(rng: np.random.Generator, image: np.ndarray, spec: SyntheticSpec) -> np.ndarray:
    """Camera/scan artefacts: optional Gaussian blur, then sensor noise (JPEG comes at encoding)."""
    if spec.max_blur_sigma > 0 and rng.random() < 0.5:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.3, max(spec.max_blur_sigma, 0.3)))
    if spec.max_noise_sigma > 0:
        image = image + rng.normal(0, rng.uniform(0, spec.max_noise_sigma) / 255, size=image.shape)
    return image


# --------------------------------------------------------------------------------------------------- backgrounds

def _random_colour(rng: np.random.Generator, lum: float | None = None) -> np.ndarray:
    """An RGB colour in 0..1 of luminance ``lum`` (random when None), with moderate saturation."""
    lum = rng.uniform(0, 1) if lum is None else lum
    tint = rng.normal(0, 0.2, size=3)
    return np.clip(lum + tint - _luminance(tint), 0, 1)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Value noise in 0..1 with about ``cells`` blobs across the longer side (cubic-upsampled random grid)."""
    scale = max(height, width) / cells
    grid = rng.random((max(2, int(height / scale) + 2), max(2, int(width / scale) + 2)))
    noise = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    noise -= noise.min()
    return noise / max(noise.max(), 1e-9)


def _base_lum(rng: np.random.Generator) -> float:
    """Background luminance: mostly light (paper), sometimes dark (screens, signs), rarely mid-grey."""
    r = rng.random()
    return rng.uniform(0.7, 1.0) if r < 0.65 else rng.uniform(0.0, 0.3) if r < 0.9 else rng.uniform(0.3, 0.7)


def make_background(rng: np.random.Generator, kind: str, height: int, width: int) -> np.ndarray:
    """A float RGB (H, W, 3) background in 0..1 of the given kind (see ``BACKGROUND_KINDS``)."""
    lum = _base_lum(rng)
    base = _random_colour(rng, lum)
    if kind == "solid":
        return np.broadcast_to(base, (height, width, 3)).copy()
    if kind == "gradient":
        other = _random_colour(rng, float(np.clip(lum + rng.uniform(-0.25, 0.25), 0, 1)))
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:height, 0:width]
        t = xx * np.cos(angle) + yy * np.sin(angle)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
        return base + t[..., None] * (other - base)
    if kind == "noise":
        other = _random_colour(rng, float(np.clip(lum + rng.uniform(-0.25, 0.25), 0, 1)))
        t = _smooth_noise(rng, height, width, int(rng.integers(2, 8)))
        return base + t[..., None] * (other - base)
    if kind == "shapes":
        image = make_background(rng, "solid" if rng.random() < 0.5 else "gradient", height, width)
        return _draw_shapes(rng, image, lum)
    if kind == "texture":
        # Paper/fabric-like grain: several octaves of noise, the finest only a few pixels across.
        octaves = sum(_smooth_noise(rng, height, width, c) * w for c, w in ((4, 0.5), (24, 0.3), (96, 0.2)))
        amplitude = rng.uniform(0.08, 0.2)
        return np.clip(base + (octaves[..., None] - 0.5) * amplitude * (1 + rng.normal(0, 0.3, 3)), 0, 1)
    if kind == "blobs":
        image = np.broadcast_to(base, (height, width, 3)).copy()
        yy, xx = np.mgrid[0:height, 0:width]
        for _ in range(int(rng.integers(3, 9))):
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            radius = rng.uniform(0.1, 0.4) * max(height, width)
            weight = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius ** 2))[..., None]
            colour = _random_colour(rng, float(np.clip(lum + rng.uniform(-0.2, 0.2), 0, 1)))
            image = image * (1 - 0.8 * weight) + colour * 0.8 * weight
        return image
    raise ConfigError(f"unknown background kind {kind!r}; known: {list(BACKGROUND_KINDS)}")


def _draw_shapes(rng: np.random.Generator, image: np.ndarray, lum: float) -> np.ndarray:
    """Non-text distractors (boxes, ellipses, polygons, bars) a detector must not fire on."""
    height, width = image.shape[:2]
    canvas = Image.fromarray((image * 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 7))):
        colour = tuple(int(v * 255) for v in _random_colour(rng, float(np.clip(lum + rng.uniform(-0.3, 0.3), 0,
                                                                                   1))))
        x0, x1 = sorted(rng.uniform(-0.1, 1.1, 2) * width)
        y0, y1 = sorted(rng.uniform(-0.1, 1.1, 2) * height)
        kind = int(rng.integers(4))
        if kind == 0:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif kind == 2:
            points = [(float(x), float(y)) for x, y in rng.uniform(0, 1, (int(rng.integers(3, 6)), 2))
                      * [width, height]]
            draw.polygon(points, fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), outline=colour, width=int(rng.integers(3, 9)))
    return np.asarray(canvas).astype(np.float64) / 255
