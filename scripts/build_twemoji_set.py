"""Build the packaged Twemoji set in ``src/clipforge/data/corpus/twemoji/``: the emoji set's emoji in Twitter's art.

Run once, from the repository root, with the npm package ``emoji-datasource-twitter`` unpacked somewhere (the
pictures, CC BY 4.0, and ``emoji.json``, MIT); the output is committed::

    cd /tmp && npm pack emoji-datasource-twitter && tar xzf emoji-datasource-twitter-*.tgz   # -> /tmp/package
    python scripts/build_twemoji_set.py --package /tmp/package

Which emoji: every emoji of the built-in Noto set (``clipforge.data.emoji``, 3,655 fully-qualified emoji of
Unicode 15.0), in its order, that has a Twemoji picture. They are matched by codepoint sequence with U+FE0F
(the emoji presentation selector) dropped on both sides, because ``emoji.json`` writes some sequences with it
and some without; skin-tone variants are the ``skin_variations`` of their base emoji. Emoji without a
picture are left out and counted.

Pictures: ``img/twitter/64/<image>`` (64x64 RGBA, the emoji's own canvas kept, no crop, as Twemoji draws every
emoji to one grid) composited on white, RGB.

Captions: exactly those of ``EmojiSource("all", captions="all")`` for the same emoji (the Unicode name, then
the CLDR text-to-speech name and keywords where they add something), so the two art styles are described
alike. Category: the emoji group. Concept and split: copied from the Noto emoji, never hashed again, so a
concept in the emoji test split is in the Twemoji test split too, and training on Twemoji never sees the
picture of a test emoji in another style.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from corpus_common import CORPUS_ROOT, BuiltSource, print_report, square_tile, write_source
from PIL import Image

from clipforge.data.emoji import GROUPS, EmojiSource, load_emoji_set

TILE_SIZE = 64
IMAGE_FOLDER = Path("img") / "twitter" / "64"
PRESENTATION_SELECTOR = "FE0F"
NPM_PACKAGE = "emoji-datasource-twitter"

LICENSE_TEXT = """\
The emoji images in this folder (images.webp) are Twemoji graphics:

  Twemoji, Copyright 2019 Twitter, Inc and other contributors (now maintained as the fork
  https://github.com/jdecked/twemoji by jdecked and other contributors; this is its version {twemoji}).
  Graphics licensed under CC-BY 4.0: Creative Commons Attribution 4.0 International,
  https://creativecommons.org/licenses/by/4.0/ (legal code: https://creativecommons.org/licenses/by/4.0/legalcode).

They were taken as 64x64 PNG files from the npm package {package} {version}
(https://github.com/iamcal/emoji-data, whose code and emoji.json are under the MIT License,
Copyright (c) 2013 Cal Henderson). Changes made: the transparent background was composited onto white,
the colour values were rounded to multiples of 8, and the pictures were packed into one WebP atlas.
These modified images are shared under the same licence, CC BY 4.0, with the attribution above.

The captions, groups, "concept" and "split" fields are those of the built-in emoji set of clipforge
(clipforge/data/emoji/, see its LICENSE-emoji.txt): Unicode emoji names from emoji-test.txt and CLDR
English annotations, Copyright (c) 1991-2022 Unicode, Inc., distributed under the Unicode License
(https://www.unicode.org/license.txt).

Made by `python scripts/build_twemoji_set.py` in the clipforge repository.
"""

README_TEXT = """\
# Twemoji

{count} Twemoji pictures ({size}x{size} RGB on white; Twitter's emoji art, CC BY 4.0) of the emoji of the
built-in Noto emoji set, with that set's captions (`EmojiSource(split, captions="all")`: Unicode name, CLDR
keywords), groups, concepts and splits, loaded by `clipforge.data.corpus.CorpusSource("twemoji", split)`.
Splits: {split_counts}; an emoji is in the same split here as in the emoji set, so a model
trained on both art styles never sees a test emoji in either. Made by `python scripts/build_twemoji_set.py --package DIR`
(needs the npm package emoji-datasource-twitter unpacked in DIR); see that script for how, and
LICENSE-twemoji.txt for the licence and attribution.

- `images.webp`: one lossless WebP atlas ({megabytes} MB), {columns} tiles per row, tile i = line i of the
  metadata; colour values rounded to multiples of 8 (largest error 4/255).
- `metadata.jsonl`: one JSON object per emoji: id (its fully-qualified codepoints, as in the emoji set, joined
  by "-"), captions, category (the emoji group), concept, split, origin (the package file).
- `info.json`: tile size, atlas columns, categories, counts.
"""


def sequence_key(codepoints: str) -> tuple[str, ...]:
    """ "1F3CB-FE0F-200D-2642-FE0F" or "1f3cb 200d 2642" -> ("1F3CB", "200D", "2642"): upper case, no U+FE0F."""
    parts = codepoints.replace("-", " ").upper().split()
    return tuple(part for part in parts if part != PRESENTATION_SELECTOR)


def twemoji_images(package: Path) -> dict[tuple[str, ...], str]:
    """Every Twemoji picture of ``emoji.json``, base emoji and skin variations: sequence key -> image file name."""
    images: dict[tuple[str, ...], str] = {}
    for entry in json.loads((package / "emoji.json").read_text(encoding="utf-8")):
        variants = [entry, *entry.get("skin_variations", {}).values()]
        for variant in variants:
            if variant.get("has_img_twitter") and (package / IMAGE_FOLDER / variant["image"]).is_file():
                images.setdefault(sequence_key(variant["unified"]), variant["image"])
    return images


def build(package: Path, drops: Counter) -> BuiltSource:
    version = json.loads((package / "package.json").read_text(encoding="utf-8"))["version"]
    images = twemoji_images(package)
    emoji = load_emoji_set()
    captioned = EmojiSource("all", captions="all")  # row i of the emoji set is index i of the "all" split
    records, tiles = [], []
    for row, codepoints in enumerate(emoji.codepoints.tolist()):
        image_name = images.get(sequence_key(codepoints))
        if image_name is None:
            drops["no Twemoji picture"] += 1
            continue
        with Image.open(package / IMAGE_FOLDER / image_name) as picture:
            tile = square_tile(picture, TILE_SIZE, crop=False)
        if tile is None:
            drops["blank picture"] += 1
            continue
        records.append(
            {
                "id": codepoints.replace(" ", "-"),
                "captions": captioned.captions(row),
                "category": str(emoji.groups[row]),
                "concept": str(emoji.concepts[row]),
                "split": str(emoji.splits[row]),
                "origin": f"{NPM_PACKAGE} {version} {IMAGE_FOLDER.as_posix()}/{image_name}",
            }
        )
        tiles.append(tile)
    print(f"emoji with a Twemoji picture: {len(records)} of {len(emoji)}")
    twemoji_version = _twemoji_version(package)
    return BuiltSource(
        name="twemoji",
        title="Twemoji pictures of the built-in emoji set, with its captions and splits",
        records=records,
        tiles=np.stack(tiles),
        classnames=list(GROUPS),
        license_text=LICENSE_TEXT.format(twemoji=twemoji_version, package=NPM_PACKAGE, version=version),
        readme_text=README_TEXT,
        drops=drops,
    )


def _twemoji_version(package: Path) -> str:
    """The Twemoji release the package's README names ("v16.0.1"), "?" when it names none."""
    for line in (package / "README.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("| Twitter") and "twemoji" in line.lower():
            return line.split("|")[2].split(",")[-1].strip()
    return "?"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--package", type=Path, required=True, help=f"the unpacked npm package {NPM_PACKAGE} (its package/ folder)"
    )
    parser.add_argument("--output", type=Path, default=CORPUS_ROOT / "twemoji", help="folder to write")
    args = parser.parse_args(argv)
    for needed in (args.package / "emoji.json", args.package / IMAGE_FOLDER):
        if not needed.exists():
            sys.exit(
                f"{needed} is missing: npm pack {NPM_PACKAGE} && tar xzf {NPM_PACKAGE}-*.tgz, then --package package"
            )
    built = build(args.package, Counter())
    write_source(built, args.output)
    print_report(built)


if __name__ == "__main__":
    main()
