"""Build the packaged emoji image-caption set in ``src/clipforge/data/emoji/``.

Run once, from the repository root, on a machine with the Debian packages ``fonts-noto-color-emoji``,
``unicode-data`` and ``unicode-cldr-core``; the output is committed, so clipforge never needs those packages at
run time::

    python scripts/build_emoji_set.py                  # writes images.webp, metadata.jsonl, LICENSE-emoji.txt
    python scripts/build_emoji_set.py --measure        # also prints what other storage formats would take
    python scripts/build_emoji_set.py --captions-only  # only (re)adds the CLDR captions to metadata.jsonl

Extra captions: each emoji's CLDR English keywords and text-to-speech name (``annotations/en.xml`` and
``annotationsDerived/en.xml`` of ``unicode-cldr-core``) go into the metadata as ``keywords`` (a list) and
``tts``. CLDR keys emoji by their characters; U+FE0F (the emoji presentation selector) is dropped from both
sides and both are NFC-normalized before matching, because CLDR writes most keys without it. Emoji newer than
the CLDR release get an empty list and an empty ``tts``. ``--captions-only`` adds them to the committed
metadata without rendering anything, so the images, names and split stay byte-identical.

Every fully-qualified emoji of ``emoji-test.txt`` is drawn with Noto Color Emoji (a CBDT bitmap font,
which only loads at size 109), cropped to its drawn pixels, composited onto white, padded to a centred
square and resized to 64x64 RGB with Lanczos.

Storage, near-lossless: every channel value is rounded to a multiple of ``QUANT_STEP`` (255 stays 255, so
the background stays pure white; the largest error is 4/255, PSNR ~43 dB), then all tiles go into one
lossless WebP atlas (``ATLAS_COLUMNS`` tiles per row, in metadata order). Measured on the 3,655 emoji:
raw 44.9 MB, compressed .npz 14.9 MB, PNG atlas 14.4 MB, lossless WebP atlas 12.1 MB, lossy WebP q90
4.1 MB but only 30 dB (4:2:0 chroma smears the small shapes), this 4.7 MB.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import unicodedata
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from clipforge.data.emoji import (
    ATLAS_COLUMNS,
    GROUPS,
    IMAGE_SIZE,
    IMAGES_FILE,
    METADATA_FILE,
    atlas_to_tiles,
    concept_key,
    split_of_concept,
)
from clipforge.io import atomic_write, atomic_write_text

EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
CLDR = Path("/usr/share/unicode/cldr/common")
CLDR_ANNOTATIONS = (CLDR / "annotations" / "en.xml", CLDR / "annotationsDerived" / "en.xml")
EMOJI_PRESENTATION = "\ufe0f"
FONT_SIZE = 109  # the only size the font's CBDT bitmaps are stored at; FreeType refuses any other
QUANT_STEP = 8  # 33 levels per channel: no visible banding at 64 px, and 2.6x smaller than lossless
GLYPH_WIDTH = 136  # pixels of one emoji bitmap at FONT_SIZE
OUTPUT = Path(__file__).resolve().parents[1] / "src" / "clipforge" / "data" / "emoji"
# "1F468 200D 1F373 ; fully-qualified # 👨‍🍳 E4.0 man cook"
LINE = re.compile(r"^(?P<codes>[0-9A-F ]+?)\s*;\s*fully-qualified\s*#\s*\S+\s+E\d+\.\d+\s+(?P<name>.+)$")

LICENSE_TEXT = """\
The emoji images in this folder (images.webp) are renderings of Noto Color Emoji
(https://github.com/googlefonts/noto-emoji), as shipped by the Debian package fonts-noto-color-emoji:
  - the emoji images are licensed under the Apache License, Version 2.0
    (https://www.apache.org/licenses/LICENSE-2.0);
  - the font file is licensed under the SIL Open Font License, Version 1.1 (https://openfontlicense.org).
They were drawn at the font's native size, cropped, padded onto white, resized to 64x64 pixels and
their colour values rounded to multiples of 8.

The emoji names, groups and subgroups in metadata.jsonl come from emoji-test.txt (Unicode Emoji {version}),
as shipped by the Debian package unicode-data:
  Copyright (c) 1991-2022 Unicode, Inc. Distributed under the Unicode License (Unicode Terms of Use,
  https://www.unicode.org/terms_of_use.html and https://www.unicode.org/license.txt).
The "keywords" and "tts" fields come from the CLDR English annotations (annotations/en.xml and
annotationsDerived/en.xml, CLDR {cldr_version}), as shipped by the Debian package unicode-cldr-core:
  Copyright (c) 1991-2022 Unicode, Inc. Distributed under the Unicode License (Unicode-DFS-2016,
  https://www.unicode.org/license.txt).
The "concept" and "split" fields are clipforge's own (see clipforge.data.emoji).

Made by `python scripts/build_emoji_set.py` in the clipforge repository.
"""


README_TEXT = """\
# The built-in emoji set

{count} Noto Color Emoji pictures (64x64 RGB on white) captioned with their Unicode {version} names, loaded by
`clipforge.data.emoji.load_emoji_set()`. Made by `python scripts/build_emoji_set.py` (needs the Debian packages
fonts-noto-color-emoji, unicode-data and unicode-cldr-core); see that script for how, and LICENSE-emoji.txt for
the licences.

- `images.webp`: one lossless WebP atlas, {columns} tiles of 64x64 per row, tile i = line i of the metadata;
  colour values rounded to multiples of 8 before encoding (largest error 4/255).
- `metadata.jsonl`: one JSON object per emoji: codepoints, name, group, subgroup, concept, split, and the
  CLDR {cldr_version} English `keywords` (a list) and text-to-speech name `tts` ({annotated} of {count} emoji
  have them; the newer ones have `[]` and `""`). `EmojiSource(split, captions="all")` adds them as captions.
"""


def read_emoji_test(path: Path) -> tuple[list[dict[str, str]], str]:
    """The fully-qualified emoji of ``emoji-test.txt`` in file order, and the file's emoji version."""
    records, group, subgroup, version = [], "", "", "?"
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# Version:"):
            version = line.split(":", 1)[1].strip()
        elif line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif match := LINE.match(line):
            codes = match["codes"].split()
            records.append(
                {
                    "codepoints": " ".join(codes),
                    "emoji": "".join(chr(int(code, 16)) for code in codes),
                    "name": match["name"].strip(),
                    "group": group,
                    "subgroup": subgroup,
                }
            )
    return records, version


def cldr_key(text: str) -> str:
    """The form both sides are matched in: without U+FE0F, NFC-normalized."""
    return unicodedata.normalize("NFC", text.replace(EMOJI_PRESENTATION, ""))


def read_cldr_annotations(paths: tuple[Path, ...] = CLDR_ANNOTATIONS) -> tuple[dict[str, dict], str]:
    """``{cldr_key(emoji): {"keywords": [...], "tts": "..."}}`` from CLDR annotation files, and the CLDR version.

    ``<annotation cp="😀">face | grin | grinning face</annotation>`` gives the keywords (in file order);
    ``<annotation cp="😀" type="tts">grinning face</annotation>`` the text-to-speech name. A later file
    (annotationsDerived: skin tones, sequences) adds to an earlier one.
    """
    annotations: dict[str, dict] = {}
    for path in paths:
        for element in ET.parse(path).getroot().iter("annotation"):
            entry = annotations.setdefault(cldr_key(element.get("cp", "")), {"keywords": [], "tts": ""})
            text = (element.text or "").strip()
            if element.get("type") == "tts":
                entry["tts"] = text
            else:
                entry["keywords"] = [word.strip() for word in text.split("|") if word.strip()]
    dtd = (paths[0].parents[1] / "dtd" / "ldml.dtd").read_text(encoding="utf-8")
    version = re.search(r'cldrVersion CDATA #FIXED "([^"]+)"', dtd)
    return annotations, version[1] if version else "?"


def add_cldr_captions(records: list[dict], annotations: dict[str, dict]) -> int:
    """Set ``keywords`` and ``tts`` on every record (empty when CLDR lacks the emoji); returns how many had them."""
    found = 0
    for record in records:
        emoji = "".join(chr(int(code, 16)) for code in record["codepoints"].split())
        entry = annotations.get(cldr_key(emoji))
        found += entry is not None
        record["keywords"] = list(entry["keywords"]) if entry else []
        record["tts"] = entry["tts"] if entry else ""
    return found


def render(font: ImageFont.FreeTypeFont, text: str) -> tuple[np.ndarray, bool]:
    """One emoji as (64, 64, 3) uint8 RGB on white, and whether it drew as a single glyph.

    A sequence the font lacks falls back to its parts side by side, which shows as a drawing far
    wider than one glyph; the caller counts these.
    """
    left, top, right, bottom = font.getbbox(text)
    canvas = Image.new("RGBA", (right - left + 32, bottom - top + 32), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((16 - left, 16 - top), text, font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        raise RuntimeError(f"{text!r} drew no pixels with {FONT}")
    drawn = canvas.crop(box)
    on_white = Image.alpha_composite(Image.new("RGBA", drawn.size, (255, 255, 255, 255)), drawn).convert("RGB")
    side = max(on_white.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(on_white, ((side - on_white.width) // 2, (side - on_white.height) // 2))
    tile = square.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    single_glyph = drawn.width <= 1.5 * GLYPH_WIDTH
    return np.asarray(tile, dtype=np.uint8), single_glyph


def make_atlas(images: np.ndarray) -> np.ndarray:
    """(N, 64, 64, 3) -> (rows * 64, ATLAS_COLUMNS * 64, 3), row-major, the last row padded with white."""
    rows = -(-len(images) // ATLAS_COLUMNS)
    padded = np.full((rows * ATLAS_COLUMNS, IMAGE_SIZE, IMAGE_SIZE, 3), 255, dtype=np.uint8)
    padded[: len(images)] = images
    return (
        padded.reshape(rows, ATLAS_COLUMNS, IMAGE_SIZE, IMAGE_SIZE, 3)
        .transpose(0, 2, 1, 3, 4)
        .reshape(rows * IMAGE_SIZE, ATLAS_COLUMNS * IMAGE_SIZE, 3)
    )


def quantize(pixels: np.ndarray) -> np.ndarray:
    """Round uint8 values to multiples of QUANT_STEP; 255 maps to itself (the nearest multiple, 256, is clipped)."""
    return np.minimum(np.round(pixels / QUANT_STEP) * QUANT_STEP, 255).astype(np.uint8)


def encode_webp(atlas: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(atlas).save(buffer, format="WEBP", lossless=True, quality=100, method=6, exact=True)
    return buffer.getvalue()


def measure_formats(images: np.ndarray, atlas: np.ndarray) -> dict[str, tuple[int, float]]:
    """(bytes, PSNR in dB against the rendered pixels) of each candidate format, to document the choice."""

    def psnr(decoded: np.ndarray) -> float:
        error = (atlas_to_tiles(decoded, len(images)).astype(np.float64) - images) ** 2
        return float("inf") if error.mean() == 0 else float(10 * np.log10(255**2 / error.mean()))

    def pillow(target: np.ndarray, **options) -> tuple[int, float]:
        buffer = io.BytesIO()
        Image.fromarray(target).save(buffer, **options)
        with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
            return len(buffer.getvalue()), psnr(np.asarray(decoded.convert("RGB")))

    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=images)
    return {
        "raw uint8": (images.nbytes, float("inf")),
        "npz (zlib)": (len(buffer.getvalue()), float("inf")),
        "png atlas": pillow(atlas, format="PNG", optimize=True),
        "webp atlas, lossless": pillow(atlas, format="WEBP", lossless=True, quality=100, method=6),
        "webp atlas, lossy q90": pillow(atlas, format="WEBP", quality=90, method=6),
        f"webp atlas, lossless, step {QUANT_STEP}": pillow(
            quantize(atlas), format="WEBP", lossless=True, quality=100, method=6
        ),
    }


def write_text_files(output: Path, records: list[dict], version: str, cldr_version: str, annotated: int) -> None:
    """metadata.jsonl (one record a line, in atlas order), LICENSE-emoji.txt and README.md, each atomically."""
    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    atomic_write_text(output / METADATA_FILE, lines)
    license_text = LICENSE_TEXT.format(version=version, cldr_version=cldr_version)
    atomic_write_text(output / "LICENSE-emoji.txt", license_text)
    readme = README_TEXT.format(
        count=len(records), version=version, columns=ATLAS_COLUMNS, cldr_version=cldr_version, annotated=annotated
    )
    atomic_write_text(output / "README.md", readme)


def add_captions_to_existing(output: Path, annotations: dict[str, dict], cldr_version: str) -> None:
    """``--captions-only``: rewrite the committed metadata with the CLDR fields, leaving every other field as it was.

    The emoji version comes from emoji-test.txt (the one the metadata was built from); the images are not read.
    """
    metadata = output / METADATA_FILE
    if not metadata.is_file():
        sys.exit(f"{metadata} is missing: run the full build first (without --captions-only)")
    records = [json.loads(line) for line in metadata.read_text(encoding="utf-8").splitlines() if line.strip()]
    annotated = add_cldr_captions(records, annotations)
    _, version = read_emoji_test(EMOJI_TEST)
    write_text_files(output, records, version, cldr_version, annotated)
    missing = [record["name"] for record in records if not record["keywords"]]
    print(f"CLDR {cldr_version} keywords and tts names for {annotated} of {len(records)} emoji -> {metadata}")
    print(f"not in CLDR {cldr_version}: {len(missing)} {missing[:6]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=OUTPUT, help="folder to write (default: the package's)")
    parser.add_argument("--measure", action="store_true", help="also print the size of other storage formats")
    parser.add_argument(
        "--captions-only",
        action="store_true",
        help="only add the CLDR keywords and tts names to the existing metadata.jsonl (no rendering)",
    )
    args = parser.parse_args(argv)
    needs = [(EMOJI_TEST, "unicode-data"), (CLDR_ANNOTATIONS[0], "unicode-cldr-core")]
    if not args.captions_only:
        needs.append((FONT, "fonts-noto-color-emoji"))
    for needed, package in needs:
        if not needed.is_file():
            sys.exit(f"{needed} is missing: apt-get install {package}")
    annotations, cldr_version = read_cldr_annotations()
    if args.captions_only:
        add_captions_to_existing(args.output, annotations, cldr_version)
        return

    records, version = read_emoji_test(EMOJI_TEST)
    font = ImageFont.truetype(str(FONT), FONT_SIZE)
    images = np.empty((len(records), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    fallbacks = []
    for i, record in enumerate(records):
        images[i], single_glyph = render(font, record.pop("emoji"))
        if not single_glyph:
            fallbacks.append(record["name"])
        record["concept"] = concept_key(record["name"])
        record["split"] = split_of_concept(record["concept"])
    annotated = add_cldr_captions(records, annotations)

    atlas = make_atlas(images)
    stored = quantize(images)
    webp = encode_webp(make_atlas(stored))
    with Image.open(io.BytesIO(webp)) as decoded:
        round_trip = atlas_to_tiles(np.asarray(decoded.convert("RGB")), len(images))
    if not np.array_equal(round_trip, stored):
        sys.exit("the WebP atlas did not decode to the quantized pixels; refusing to write it")
    largest_error = int(np.abs(round_trip.astype(np.int16) - images).max())

    args.output.mkdir(parents=True, exist_ok=True)
    atomic_write(args.output / IMAGES_FILE, lambda handle: handle.write(webp))
    write_text_files(args.output, records, version, cldr_version, annotated)

    print(f"{len(records)} emoji (Unicode Emoji {version}) -> {args.output}")
    print(f"CLDR {cldr_version} keywords and tts names for {annotated} of {len(records)} emoji")
    print(f"{IMAGES_FILE}: {len(webp) / 1e6:.2f} MB, largest pixel error {largest_error}/255")
    print(f"drawn as several glyphs (font lacks the sequence): {len(fallbacks)} {fallbacks[:5]}")
    for split in ("train", "val", "test"):
        chosen = [r for r in records if r["split"] == split]
        per_group = Counter(r["group"] for r in chosen)
        print(
            f"{split:5s}: {len(chosen):4d} emoji ({len(chosen) / len(records):.1%}), "
            f"{len({r['concept'] for r in chosen}):4d} concepts; " + ", ".join(f"{g}: {per_group[g]}" for g in GROUPS)
        )
    if args.measure:
        for label, (size, psnr) in measure_formats(images, atlas).items():
            print(f"  {label:34s} {size / 1e6:6.2f} MB  PSNR {psnr:.1f} dB")


if __name__ == "__main__":
    main()
