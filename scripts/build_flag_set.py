"""Build the packaged flag set in ``src/clipforge/data/corpus/flags/``: country and region flags with their names.

Run once, from the repository root, on a machine with the Debian packages ``iso-flags-png-320x240`` (the
pictures, public domain) and ``iso-codes`` (the names); the output is committed::

    python scripts/build_flag_set.py

Pictures: every ``<alpha-2>.png`` of iso-flags-png-320x240 (glossy 320x240 flags on transparency) and its
named extras (Scotland, Wales, Catalonia, ... ), cropped to the drawn flag and its shadow, padded to a square
on white, 64x64.

Captions, from ``iso_3166-1.json``: "flag of <short name>", "the <official name> flag" (when it differs),
and the short name alone; the short name is the ``common_name`` ("Bolivia") or else the ``name``, turned
from ISO's inverted form ("Virgin Islands, British") into the official name where ISO gives one. The extras
are named by hand below (their ISO 3166-2 names are not English: "Euskal Herria", "Catalunya [Cataluña]").

Cleaning: the blank ``_generic`` flag, the unknown ``zz`` and the Braille sign ``brl`` are not flags; of
flags whose pictures are identical (the package draws ten French territories with the tricolour and the
U.S. Virgin Islands with the British Virgin Islands flag), only the one the picture belongs to is kept.

Split: one concept per flag ("flag: fr"). A flag that has an emoji takes the emoji set's split of that
emoji, so a test flag is never the flag of a training emoji and the clip-art flags can follow the same
rule; the ten others (Catalonia, Esperanto, ...) are hashed (``split_of_concept``). Look-alike flags of two
countries (Indonesia and Monaco) are not joined: the emoji set, whose split this follows, keeps them apart.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
from corpus_common import (
    CORPUS_ROOT,
    BuiltSource,
    assign_splits,
    emoji_flag_splits,
    on_white,
    print_report,
    require,
    square_tile,
    unique_captions,
    write_source,
)
from PIL import Image

FLAGS = Path("/usr/share/iso-flags-png-320x240")
ISO_3166_1 = Path("/usr/share/iso-codes/json/iso_3166-1.json")
TILE_SIZE = 64
CATEGORIES = ["country or territory", "region", "organization or movement"]
NOT_FLAGS = {"_generic": "blank flag", "zz": "unknown flag", "brl": "Braille sign"}
# Of identical pictures, the one each belongs to: fr (its territories fly the tricolour), nl (Bonaire),
# us (the Minor Outlying Islands), sx (the picture of mf is the Sint Maarten flag), vg (vi is drawn wrong).
PICTURE_OWNERS = {"fr", "nl", "us", "sx", "vg"}
SAME_PICTURE = 1.0  # mean absolute difference of 32x24 thumbnails, in 0-255 levels
# The extras: (category, emoji name whose split they take or "", captions).
EXTRAS: dict[str, tuple[str, str, list[str]]] = {
    "_scotland": ("region", "flag: Scotland", ["flag of Scotland", "the Saltire", "Scotland"]),
    "_wales": ("region", "flag: Wales", ["flag of Wales", "the Welsh flag", "Wales"]),
    "_catalonia": ("region", "", ["flag of Catalonia", "the Catalan flag", "Catalonia"]),
    "_basque": ("region", "", ["flag of the Basque Country", "the Basque flag", "Basque Country"]),
    "_galicia": ("region", "", ["flag of Galicia", "the Galician flag", "Galicia"]),
    "eu": ("organization or movement", "flag: European Union", ["flag of the European Union", "European Union"]),
    "_united_nations": (
        "organization or movement",
        "flag: United Nations",
        ["flag of the United Nations", "the UN flag", "United Nations"],
    ),
    "_olympic": ("organization or movement", "", ["the Olympic flag", "the Olympic rings"]),
    "eo": ("organization or movement", "", ["flag of Esperanto", "the Esperanto flag", "Esperanto"]),
    "_earth_pernefeldt": ("organization or movement", "", ["the flag of planet Earth", "flag of Earth"]),
}

LICENSE_TEXT = """\
The flag images in this folder (images.webp) are renderings of the flags of the Debian package
iso-flags-png-320x240 (https://github.com/linuxmint/flags), dedicated to the public domain by their author
Brett Roper. They were cropped, padded onto white, resized to 64x64 pixels and their colour values rounded
to multiples of 8.

The country names in the captions come from iso_3166-1.json of the Debian package iso-codes
(https://salsa.debian.org/iso-codes-team/iso-codes), licensed under the GNU Lesser General Public License,
version 2.1 or later (https://www.gnu.org/licenses/old-licenses/lgpl-2.1.html). The names of the regional
and organization flags, and the "concept", "split" and "category" fields, are clipforge's own.

Made by `python scripts/build_flag_set.py` in the clipforge repository.
"""

README_TEXT = """\
# Flags

{count} country, region and organization flags ({size}x{size} RGB on white) with their names from iso-codes,
loaded by `clipforge.data.corpus.CorpusSource("flags", split)`; splits: {split_counts}. Made by
`python scripts/build_flag_set.py` (needs the Debian packages iso-flags-png-320x240 and iso-codes); see that
script for how, and LICENSE-flags.txt for the licences.

- `images.webp`: one lossless WebP atlas ({megabytes} MB), {columns} tiles per row, tile i = line i of the
  metadata; colour values rounded to multiples of 8 (largest error 4/255).
- `metadata.jsonl`: one JSON object per flag: id (the file name), captions, category, concept, split, origin.
- `info.json`: tile size, atlas columns, categories, counts.
"""


# Names said with "the": "flag of the Netherlands", "flag of the Solomon Islands"
_PLURAL_OR_TITLED = ("Islands", "Republic", "States", "Kingdom", "Emirates", "Territories", "Territory")
_TITLES = ("United ", "Isle of ", "Republic ", "Democratic ", "Federated ", "State of ")
_WITH_THE = {"Netherlands", "Philippines", "Bahamas", "Gambia", "Maldives", "Comoros", "Seychelles", "Holy See"}


def short_name(country: dict) -> str:
    """The name to say: ``common_name``, else ``name``; ISO's inverted names ("Korea, Republic of",
    "Virgin Islands, British") become the ``official_name`` or are turned round when they end in "of" / "of the";
    parentheses go ("Falkland Islands (Malvinas)" -> "Falkland Islands"), and so does a leading "The"."""
    name = country.get("common_name", country["name"])
    before, comma, after = name.partition(", ")
    official = country.get("official_name", "")
    if comma and official and ", " not in official:
        name = official
    elif comma and after.endswith((" of", " of the")):
        name = f"{after} {before}"  # "Congo, The Democratic Republic of the" -> "The Democratic Republic of the Congo"
    name = re.sub(r"\s*\([^)]*\)", "", name).strip()
    return name[4:] if name.startswith(("The ", "the ")) else name


def with_article(name: str) -> str:
    """ "the Netherlands", "the Solomon Islands", "the Isle of Man"; "France" as it is."""
    if name in _WITH_THE or name.endswith(_PLURAL_OR_TITLED) or name.startswith(_TITLES):
        return f"the {name}"
    return name


def country_captions(country: dict) -> list[str]:
    """["flag of France", "the French Republic flag", "France"]; the official name only when it is a clean name
    different from the short one (no inverted "Taiwan, Province of China", no parentheses)."""
    short = short_name(country)
    captions = [f"flag of {with_article(short)}"]
    official = country.get("official_name", "")
    if (
        official
        and official.casefold() not in (short.casefold(), country["name"].casefold())
        and not set(official) & set(",()")
    ):
        captions.append(f"{'' if official.startswith('the ') else 'the '}{official} flag")
    captions.append(short)
    return unique_captions(captions)


def read_candidates(drops: Counter) -> list[dict]:
    """One record per flag picture that is a flag: id, captions, category, emoji (its emoji's name or code)."""
    countries = {c["alpha_2"].lower(): c for c in json.loads(ISO_3166_1.read_text(encoding="utf-8"))["3166-1"]}
    records = []
    for path in sorted(FLAGS.glob("*.png")):
        stem = path.stem
        if stem in NOT_FLAGS:
            drops[f"not a flag ({NOT_FLAGS[stem]})"] += 1
        elif stem in EXTRAS:
            category, emoji_name, captions = EXTRAS[stem]
            records.append({"id": stem, "captions": captions, "category": category, "emoji": emoji_name})
        elif stem in countries:
            captions = country_captions(countries[stem])
            records.append({"id": stem, "captions": captions, "category": CATEGORIES[0], "emoji": stem.upper()})
        else:
            raise SystemExit(f"{path}: neither an ISO 3166-1 code nor a known extra; add it to EXTRAS or NOT_FLAGS")
    return records


def thumbnail_distances(records: list[dict]) -> np.ndarray:
    """(N, N) mean absolute difference of the flags' 32x24 thumbnails on white."""
    thumbnails = []
    for record in records:
        with Image.open(FLAGS / f"{record['id']}.png") as image:
            thumbnails.append(np.asarray(on_white(image).resize((32, 24), Image.Resampling.BOX), dtype=np.float32))
    flat = np.stack(thumbnails).reshape(len(records), -1)
    return np.abs(flat[:, None] - flat[None]).mean(axis=-1)


def drop_same_pictures(records: list[dict], distances: np.ndarray, drops: Counter) -> list[int]:
    """Indices to keep: of identical pictures only the one in PICTURE_OWNERS."""
    keep = []
    for i, record in enumerate(records):
        twins = [records[j]["id"] for j in np.flatnonzero(distances[i] < SAME_PICTURE) if j != i]
        if twins and record["id"] not in PICTURE_OWNERS:
            if not PICTURE_OWNERS & set(twins):
                raise SystemExit(f"{record['id']} has the picture of {twins}: name its owner in PICTURE_OWNERS")
            drops["same picture as another flag"] += 1
            continue
        keep.append(i)
    return keep


def build(drops: Counter) -> BuiltSource:
    candidates = read_candidates(drops)
    distances = thumbnail_distances(candidates)
    keep = drop_same_pictures(candidates, distances, drops)
    records = [candidates[i] for i in keep]
    emoji_splits = emoji_flag_splits()
    fixed: dict[str, str] = {}
    for record in records:
        record["concept"] = f"flag: {record['id'].lstrip('_')}"
        record["origin"] = f"iso-flags-png-320x240 {record['id']}.png"
        split = emoji_splits.get(record.pop("emoji"))
        if split:
            fixed[record["concept"]] = split
    assign_splits(records, fixed)
    print(f"flags with an emoji flag (and its split): {len(fixed)} of {len(records)}")
    tiles = []
    for record in records:
        with Image.open(FLAGS / f"{record['id']}.png") as image:
            tiles.append(square_tile(image, TILE_SIZE, crop=True))
    return BuiltSource(
        name="flags",
        title="country, region and organization flags named from iso-codes",
        records=records,
        tiles=np.stack(tiles),
        classnames=CATEGORIES,
        license_text=LICENSE_TEXT,
        readme_text=README_TEXT,
        drops=drops,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=CORPUS_ROOT / "flags", help="folder to write")
    args = parser.parse_args(argv)
    require([(FLAGS, "iso-flags-png-320x240"), (ISO_3166_1, "iso-codes")])
    built = build(Counter())
    write_source(built, args.output)
    print_report(built)


if __name__ == "__main__":
    main()
