"""Steps shared by the corpus build scripts (``scripts/build_{clipart,flag,icon}_set.py``).

Each script turns one Debian package's pictures and metadata into a folder of
``src/clipforge/data/corpus/<name>/`` (read by ``clipforge.data.corpus``): it makes the records (captions,
category, concept, origin), and this module renders the tiles, assigns the splits, writes the atlas and the
metadata atomically and prints the report (counts per split, what each cleaning rule dropped, sample captions).

Tiles are stored as the emoji atlas is: colour values rounded to multiples of ``QUANT_STEP`` (255 stays
255, so the white background stays pure white; the largest error is 4/255), then one lossless WebP atlas,
``ATLAS_COLUMNS`` tiles per row, in metadata order.
"""

from __future__ import annotations

import io
import json
import random
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from clipforge.data.corpus import IMAGES_FILE, INFO_FILE, METADATA_FILE, SPLITS, split_of_concept
from clipforge.data.emoji import atlas_to_tiles, load_emoji_set
from clipforge.io import atomic_write, atomic_write_json, atomic_write_text

CORPUS_ROOT = Path(__file__).resolve().parents[1] / "src" / "clipforge" / "data" / "corpus"
QUANT_STEP = 8
ATLAS_COLUMNS = 64
WEBP_MAX_SIDE = 16383  # the WebP format's limit on either side of the atlas
INK_THRESHOLD = 245  # a pixel is part of the drawing when a channel is below this on white
WORD_LIST = Path("/usr/share/dict/words")  # Debian wamerican: SCOWL American English
SVG_RENDERER = "rsvg-convert"  # Debian librsvg2-bin

RDF_NAMESPACES = {
    "dc": "http://purl.org/dc/elements/1.1/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "cc": "http://web.resource.org/cc/",
}
# Tango writes its Work under the newer Creative Commons namespace
_CC_NAMESPACES = ("http://web.resource.org/cc/", "http://creativecommons.org/ns#")


def require(paths_and_packages: Iterable[tuple[Path, str]]) -> None:
    """Exit with the apt-get line to run when a build input is missing."""
    for needed, package in paths_and_packages:
        if not needed.exists():
            sys.exit(f"{needed} is missing: apt-get install {package}")


def package_version(package: str) -> str:
    """The installed Debian version of ``package`` (from dpkg's status file), "?" when unknown."""
    status = Path("/var/lib/dpkg/status").read_text(encoding="utf-8", errors="replace")
    match = re.search(rf"^Package: {re.escape(package)}\n(?:.+\n)*?Version: (.+)$", status, re.MULTILINE)
    return match[1] if match else "?"


# ----------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------
class EnglishWords:
    """Is a phrase English? The share of its words found in an English word list.

    The word list's lowercase entries are common words; its capitalized ones are names ("Norway", "Al"),
    which count only when written capitalized, unless ``names_in_lowercase`` (file names and keywords are
    lowercase by habit, titles are not: "Toro al tramonto" must not pass on "Al").
    """

    def __init__(self, path: Path = WORD_LIST) -> None:
        words = path.read_text(encoding="utf-8", errors="replace").split()
        self.common = {word for word in words if word.islower()}
        self.names = {word.lower() for word in words if not word.islower()}

    def known(self, word: str, names_in_lowercase: bool = False) -> bool:
        lower = word.lower()
        if lower in self.common or (lower.endswith("s") and lower[:-1] in self.common):
            return True
        return lower in self.names and (names_in_lowercase or word[:1].isupper())

    def is_english(self, text: str, min_share: float = 0.75, names_in_lowercase: bool = False) -> bool:
        """ASCII only, at least one known word of 3+ letters, and at least ``min_share`` of the words known."""
        if not text.isascii():
            return False
        words = re.findall(r"[A-Za-z]+(?:'[a-z]+)?", text)
        known = [word for word in words if self.known(word, names_in_lowercase)]
        if not words or not any(len(word) >= 3 for word in known):
            return False
        return len(known) / len(words) >= min_share


def tidy(text: str) -> str:
    """One line, single spaces, no surrounding punctuation."""
    return re.sub(r"\s+", " ", text).strip(" \t-_.,;:")


def unique_captions(captions: Iterable[str]) -> list[str]:
    """Non-empty captions in order, each kept once (compared without case)."""
    seen: set[str] = set()
    kept = []
    for caption in captions:
        caption = tidy(caption)
        if caption and caption.casefold() not in seen:
            seen.add(caption.casefold())
            kept.append(caption)
    return kept


@dataclass
class RdfMetadata:
    """The Dublin Core fields an SVG's RDF block carries (empty when absent)."""

    title: str = ""
    description: str = ""
    keywords: list[str] = field(default_factory=list)
    creator: str = ""


def read_rdf(svg: Path) -> RdfMetadata:
    """``dc:title``, ``dc:description``, ``dc:subject`` keywords and ``dc:creator`` of an SVG's ``cc:Work``."""
    root = ET.parse(svg).getroot()
    work = next((w for ns in _CC_NAMESPACES for w in root.iter(f"{{{ns}}}Work")), None)
    if work is None:
        return RdfMetadata()
    dc = RDF_NAMESPACES["dc"]
    creator = work.find(f"{{{dc}}}creator")
    return RdfMetadata(
        title=tidy(work.findtext(f"{{{dc}}}title") or ""),
        description=tidy(work.findtext(f"{{{dc}}}description") or ""),
        keywords=[
            tidy(li.text) for li in work.iterfind(f".//{{{dc}}}subject//{{{RDF_NAMESPACES['rdf']}}}li") if li.text
        ],
        creator=tidy(" ".join(creator.itertext())) if creator is not None else "",
    )


# ----------------------------------------------------------------------------------------------
# Tiles
# ----------------------------------------------------------------------------------------------
def on_white(image: Image.Image) -> Image.Image:
    """Any mode -> RGB, transparency composited onto white."""
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def ink_box(image: Image.Image) -> tuple[int, int, int, int] | None:
    """The bounding box of the drawn pixels (any channel below INK_THRESHOLD on white); None when blank."""
    ink = (np.asarray(image) < INK_THRESHOLD).any(axis=-1)
    rows, columns = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if len(rows) == 0:
        return None
    return int(columns[0]), int(rows[0]), int(columns[-1]) + 1, int(rows[-1]) + 1


def square_tile(image: Image.Image, size: int, crop: bool) -> np.ndarray | None:
    """(size, size, 3) uint8 RGB on white: cropped to the drawing (``crop``), padded to a centred square on white,
    resized with Lanczos. None when nothing is drawn (a white drawing on transparency vanishes on white)."""
    picture = on_white(image)
    box = ink_box(picture)
    if box is None:
        return None
    if crop:
        picture = picture.crop(box)
    side = max(picture.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(picture, ((side - picture.width) // 2, (side - picture.height) // 2))
    # reducing_gap: shrink huge drawings by whole factors first (fast), then Lanczos the last step
    tile = square.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(tile, dtype=np.uint8)


def render_svg(svg: Path, size: int) -> Image.Image:
    """An SVG drawn at ``size`` x ``size`` pixels by librsvg (keeping its aspect ratio), as RGBA."""
    if shutil.which(SVG_RENDERER) is None:
        sys.exit(f"{SVG_RENDERER} is missing: apt-get install librsvg2-bin")
    command = [SVG_RENDERER, "--width", str(size), "--height", str(size), "--keep-aspect-ratio", "-f", "png", str(svg)]
    png = subprocess.run(command, check=True, capture_output=True).stdout
    with Image.open(io.BytesIO(png)) as image:
        return image.convert("RGBA")


def quantize(pixels: np.ndarray) -> np.ndarray:
    """Round uint8 values to multiples of QUANT_STEP; 255 maps to itself (the nearest multiple, 256, is clipped)."""
    return np.minimum(np.round(pixels / QUANT_STEP) * QUANT_STEP, 255).astype(np.uint8)


def make_atlas(tiles: np.ndarray, columns: int = ATLAS_COLUMNS) -> np.ndarray:
    """(N, S, S, 3) -> (rows * S, columns * S, 3), row-major, the last row padded with white."""
    count, size = len(tiles), tiles.shape[1]
    rows = -(-count // columns)
    if max(rows, columns) * size > WEBP_MAX_SIDE:
        raise ValueError(f"{count} tiles of {size} px make a {columns * size}x{rows * size} atlas, over WebP's limit")
    padded = np.full((rows * columns, size, size, 3), 255, dtype=np.uint8)
    padded[:count] = tiles
    return padded.reshape(rows, columns, size, size, 3).transpose(0, 2, 1, 3, 4).reshape(rows * size, columns * size, 3)


def encode_atlas(stored: np.ndarray, columns: int = ATLAS_COLUMNS) -> bytes:
    """The lossless WebP atlas of already-quantized tiles; refuses one that does not decode back exactly."""
    buffer = io.BytesIO()
    Image.fromarray(make_atlas(stored, columns)).save(
        buffer, format="WEBP", lossless=True, quality=100, method=6, exact=True
    )
    with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
        round_trip = atlas_to_tiles(np.asarray(decoded.convert("RGB")), len(stored), stored.shape[1])
    if not np.array_equal(round_trip, stored):
        sys.exit("the WebP atlas did not decode to the quantized pixels; refusing to write it")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------
def emoji_flag_splits() -> dict[str, str]:
    """The emoji set's split of each flag emoji, by ISO 3166-1 alpha-2 code ("FR") and by emoji name.

    A country flag emoji is two regional indicator letters (U+1F1E6 = "A"); the subdivision flags
    (Scotland, Wales, England) are tag sequences and are found by name ("flag: Scotland").
    """
    emoji = load_emoji_set()
    splits: dict[str, str] = {}
    for codepoints, name, group, split in zip(emoji.codepoints, emoji.names, emoji.groups, emoji.splits, strict=True):
        if group != "Flags":
            continue
        splits[str(name)] = str(split)
        codes = [int(code, 16) for code in str(codepoints).split()]
        if len(codes) == 2 and all(0x1F1E6 <= code <= 0x1F1FF for code in codes):
            splits["".join(chr(ord("A") + code - 0x1F1E6) for code in codes)] = str(split)
    return splits


def assign_splits(records: list[dict], fixed: dict[str, str] | None = None) -> None:
    """Set ``split`` on every record from its concept: ``fixed[concept]`` when given, else split_of_concept."""
    fixed = fixed or {}
    for record in records:
        record["split"] = fixed.get(record["concept"]) or split_of_concept(record["concept"])


# ----------------------------------------------------------------------------------------------
# Writing and reporting
# ----------------------------------------------------------------------------------------------
@dataclass
class BuiltSource:
    """What a build script hands to :func:`write_source`: records and tiles in the same order."""

    name: str
    title: str  # one line: what the source is
    records: list[dict]  # id, captions, category, concept, split, origin
    tiles: np.ndarray  # (N, S, S, 3) uint8, as rendered
    classnames: list[str]
    license_text: str
    readme_text: str  # may use {count}, {size}, {columns}, {split_counts}, {megabytes}
    drops: Counter = field(default_factory=Counter)  # cleaning rule -> items it dropped


def split_counts(records: list[dict]) -> dict[str, int]:
    counts = Counter(record["split"] for record in records)
    return {split: counts[split] for split in SPLITS}


def write_source(built: BuiltSource, output: Path) -> None:
    """Write images.webp, metadata.jsonl, info.json, the licence and the README to ``output``, each atomically."""
    if len(built.records) != len(built.tiles) or not built.records:
        raise ValueError(f"{built.name}: {len(built.records)} records but {len(built.tiles)} tiles")
    for record in built.records:
        if not record["captions"] or not all(caption.strip() for caption in record["captions"]):
            raise ValueError(f"{built.name}: {record['id']} has an empty caption list or an empty caption")
    stored = quantize(built.tiles)
    webp = encode_atlas(stored)
    output.mkdir(parents=True, exist_ok=True)
    atomic_write(output / IMAGES_FILE, lambda handle: handle.write(webp))
    keys = ("id", "captions", "category", "concept", "split", "origin")
    lines = "".join(json.dumps({key: r[key] for key in keys}, ensure_ascii=False) + "\n" for r in built.records)
    atomic_write_text(output / METADATA_FILE, lines)
    counts = split_counts(built.records)
    size = int(built.tiles.shape[1])
    info = {
        "name": built.name,
        "title": built.title,
        "tile_size": size,
        "columns": ATLAS_COLUMNS,
        "classnames": built.classnames,
        "count": len(built.records),
        "split_counts": counts,
    }
    atomic_write_json(output / INFO_FILE, info)
    atomic_write_text(output / f"LICENSE-{built.name}.txt", built.license_text)
    readme = built.readme_text.format(
        count=len(built.records),
        size=size,
        columns=ATLAS_COLUMNS,
        split_counts=", ".join(f"{split} {n}" for split, n in counts.items()),
        megabytes=f"{len(webp) / 1e6:.2f}",
    )
    atomic_write_text(output / "README.md", readme)
    largest_error = int(np.abs(stored.astype(np.int16) - built.tiles).max())
    print(f"{built.name}: {len(built.records)} images of {size} px -> {output}")
    print(f"{IMAGES_FILE}: {len(webp) / 1e6:.2f} MB, largest pixel error {largest_error}/255")


def print_report(built: BuiltSource, samples: int = 10, seed: int = 0) -> None:
    """Counts per split and per category, what each cleaning rule dropped, and ``samples`` random captions."""
    records = built.records
    concepts = {split: {r["concept"] for r in records if r["split"] == split} for split in SPLITS}
    for split, count in split_counts(records).items():
        print(f"{split:5s}: {count:5d} images ({count / len(records):.1%}), {len(concepts[split]):5d} concepts")
    print("categories:", dict(Counter(r["category"] for r in records).most_common()))
    print("captions per image:", dict(sorted(Counter(len(r["captions"]) for r in records).items())))
    for rule, count in built.drops.items():
        print(f"dropped by {rule}: {count}")
    for record in random.Random(seed).sample(records, min(samples, len(records))):
        print(f"  {record['id']} [{record['split']}]: {record['captions']}")
