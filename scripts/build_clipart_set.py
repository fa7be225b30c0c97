"""Build the packaged clip-art set in ``src/clipforge/data/corpus/clipart/``: public-domain drawings and their words.

Run once, from the repository root, after ``scripts/build_flag_set.py`` (clip-art flags take the flag set's
concepts and splits), on a machine with the Debian packages ``openclipart-png`` (the pictures),
``openclipart-svg`` (their metadata), ``wamerican`` (an English word list) and ``iso-codes``; the output is
committed::

    python scripts/build_clipart_set.py

Pictures: every real PNG of openclipart-png (symbolic links are the same file filed in a second category),
composited onto white, cropped to the drawing (the SVG page margins go), padded to a centred square on
white, resized to ``TILE_SIZE`` px with Lanczos.

Captions, from the RDF block of the SVG twin (``dc:title``, ``dc:description``, ``dc:subject``) and the file
name, each kept only when it passes its rules:

- the title, unless it is empty, an author credit ("Clipart by Nicu Buculei - jigsaw_red_10": the part after
  the dash names another file of the set), a collection note ("Part of the Flat Icon Collection (...)"),
  shared by more than ``SET_WIDE`` files (a collection's name: "gramastar" on 1,375 stars, "Lemon SVG
  theme" on 411 icons), or not English (less than 75% of its words in the word list; names count only
  capitalized, so "Toro al tramonto" fails on "al");
- the description, by the same rules, and with no web address, no "HASH(0x...)" export debris, at most
  ``MAX_DESCRIPTION_WORDS`` words;
- the file name as a phrase: split at "_" and "-", trailing digits off ("arrow08" -> "arrow"), tokens with
  digits inside ("85pt22step") and the author's name fragments ("_architetto_franc_01") dropped, the last
  word of a name cut to 24 characters dropped ("two_and_a_half_star_rat_01"), then only its English words,
  kept when they are at least half of the words and one is a common word ("pizza_4_stagioni" -> "pizza",
  "map_of_denmark" -> "map of denmark", "casa_verde" -> nothing: "Verde" is only a name);
- the keywords, joined by ", ": English ones only, without the metadata of the collection ("hash",
  "magick", "theme", "icons", "unsorted", ...) and without the author's name.

Items left without a caption are dropped. A flag (keyword "flag", title or file name a country's name)
gets "flag of <country>" and the flag set's concept.

Cleaning of pictures: blank drawings (white on transparency vanishes on white) and byte-identical tiles go.

Split: by concept = the sorted words of the first caption without colour words, digits and small words
("jigsaw red" and "blue jigsaw" are one concept; every gramastar star is "star"), hashed with
``split_of_concept``. At most ``MAX_PER_CONCEPT`` items per concept are kept (chosen by hash of the file
name), so a set of 1,375 stars cannot fill a fifth of the corpus with one caption.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from corpus_common import (
    CORPUS_ROOT,
    BuiltSource,
    EnglishWords,
    RdfMetadata,
    assign_splits,
    emoji_flag_splits,
    package_version,
    print_report,
    read_rdf,
    require,
    square_tile,
    tidy,
    unique_captions,
    write_source,
)
from PIL import Image

from clipforge.data.corpus import METADATA_FILE

CLIPART = Path("/usr/share/openclipart")
ISO_3166_1 = Path("/usr/share/iso-codes/json/iso_3166-1.json")
TILE_SIZE = 96  # finer than the 64 px emoji: clip art has more detail, and 96 px still fits the size budget
SET_WIDE = 8  # a title or description on more files than this names a collection, not the picture
MAX_PER_CONCEPT = 10
MAX_DESCRIPTION_WORDS = 30
# openclipart cut long "<title>_<author>" file names to 24 characters (a few to 23) and added "_01":
# "two_and_a_half_star_rat_01" is a "rating"
TRUNCATED_NAME = 23
CREDIT = re.compile(r"^\s*clip\s*-?\s*art\s+by\b", re.IGNORECASE)
# "Part of the Flat Icon Collection (Wed Aug 25 23:29:46 2004)", "Part of Hotel Icons Collection"
COLLECTION_NOTE = re.compile(r"^\s*part of\b", re.IGNORECASE)
JUNK_TEXT = re.compile(r"https?://|www\.|\.com\b|HASH\(0x", re.IGNORECASE)
# Keywords that describe the collection or the file, not the picture
META_KEYWORDS = {
    "hash", "magick", "theme", "icons", "icon", "unsorted", "signs and symbols", "mapsym", "clip art", "clipart",
    "svg", "image", "images", "picture", "action", "application", "filesystem", "mimetypes", "stock", "menu",
    "lemon theme icon", "lemon", "simple", "media", "public domain", "drawing", "illustration", "openclipart",
    "geometry", "shapes", "shape", "special", "misc", "other", "various", "new", "remix",
    "mime-types", "mime types",
    "computer",  # on every icon of the icon-theme collections (1,561 files), whatever the icon shows
}  # fmt: skip
COLOUR_WORDS = {
    "red", "green", "blue", "yellow", "orange", "purple", "violet", "pink", "brown", "black", "white", "grey",
    "gray", "gold", "golden", "silver", "cyan", "magenta", "dark", "light", "colour", "color", "colored",
}  # fmt: skip
SMALL_WORDS = {"a", "an", "the", "of", "and", "with", "in", "on", "for", "to", "at", "by"}
FILE_NAME_JUNK = {"clipart", "clip", "art", "svg", "png", "img", "pic"}

LICENSE_TEXT = """\
The clip-art images in this folder (images.webp) are renderings of the Open Clip Art Library drawings
(https://openclipart.org) shipped by the Debian packages openclipart-png and openclipart-svg
(version {version}), dedicated to the public domain by their authors (Creative Commons Public Domain
Dedication, as stated in /usr/share/doc/openclipart-png/copyright). They were cropped to the drawing,
padded onto white, resized to {size}x{size} pixels and their colour values rounded to multiples of 8.

The captions come from the drawings' own metadata (RDF titles, descriptions and keywords of the SVG files)
and file names, cleaned and filtered with the SCOWL English word list of the Debian package wamerican
(Copyright 2000-2011 Kevin Atkinson and others; used at build time only, not shipped). The "concept",
"split" and "category" fields are clipforge's own.

Made by `python scripts/build_clipart_set.py` in the clipforge repository.
"""

README_TEXT = """\
# Clip art

{count} public-domain Open Clip Art Library drawings ({size}x{size} RGB on white) captioned from their metadata
(English titles, descriptions, keywords and file names), loaded by
`clipforge.data.corpus.CorpusSource("clipart", split)`; splits: {split_counts}. Made by
`python scripts/build_clipart_set.py` (needs the Debian packages openclipart-png, openclipart-svg, wamerican and
iso-codes, and the flag set built first); see that script for the cleaning rules, and LICENSE-clipart.txt.

- `images.webp`: one lossless WebP atlas ({megabytes} MB), {columns} tiles per row, tile i = line i of the
  metadata; colour values rounded to multiples of 8 (largest error 4/255).
- `metadata.jsonl`: one JSON object per drawing: id (category/.../file name), captions, category (the
  openclipart folder), concept, split, origin.
- `info.json`: tile size, atlas columns, categories, counts.
"""


@dataclass
class Clip:
    """One real PNG of the package and the metadata of its SVG twin."""

    png: Path
    id: str  # path under png/ without ".png"
    category: str  # the top folder, e.g. "animals"
    rdf: RdfMetadata


def read_clips(drops: Counter) -> list[Clip]:
    clips = []
    for png in sorted((CLIPART / "png").rglob("*.png")):
        if png.is_symlink():
            drops["symbolic link (the same file in another category)"] += 1
            continue
        relative = png.relative_to(CLIPART / "png").with_suffix("")
        svg = CLIPART / "svg" / relative.with_suffix(".svg")
        if not svg.is_file():
            drops["no SVG twin (no metadata)"] += 1
            continue
        clips.append(Clip(png, relative.as_posix(), relative.parts[0], read_rdf(svg)))
    return clips


def creator_words(rdf: RdfMetadata) -> list[str]:
    return [word for word in re.findall(r"[a-z]+", rdf.creator.lower()) if len(word) >= 3]


def is_author_fragment(token: str, authors: list[str]) -> bool:
    """ "franc" of "francesco", "architetto" itself: file names end in the author's name, cut short."""
    return len(token) >= 3 and any(author.startswith(token) or token.startswith(author) for author in authors)


def file_name_phrase(clip: Clip, words: EnglishWords) -> str:
    """The English words of the file name ("acquila_architetto_franc_01" -> "", "pizza_4_stagioni" -> "pizza")."""
    stem = clip.png.stem.lower()
    base = re.sub(r"_(?:\d\d)?$", "", stem)
    parts = re.split(r"[_\-\s.]+", re.sub(r"_s_", "'s_", base))  # "rubik_s_cube" -> "rubik's cube"
    if len(base) >= TRUNCATED_NAME and base != stem:
        parts = parts[:-1]  # the name was cut to 24 characters before "_01": its last word may be cut too
    authors = creator_words(clip.rdf)
    tokens = []
    for token in parts:
        token = re.sub(r"\d+$", "", token)  # "arrow08" -> "arrow"
        if not token or re.search(r"\d", token) or token in FILE_NAME_JUNK or is_author_fragment(token, authors):
            continue
        tokens.append(token)
    # names may be lowercase here ("map_of_denmark"), but one common word must carry the phrase, or
    # "casa_verde" would pass as "verde" (Cape Verde)
    known = [t for t in tokens if (len(t) > 1 or t == "a") and words.known(t, names_in_lowercase=True)]
    common = [token for token in known if len(token) >= 3 and token not in SMALL_WORDS and words.known(token)]
    if not common or len(known) < len(tokens) / 2:
        return ""
    while known[-1] in SMALL_WORDS:  # "dog_01_drawn_with_strai_01" -> "dog drawn", not "dog drawn with"
        known.pop()
    return " ".join(known)


def clean_keywords(clip: Clip, words: EnglishWords) -> list[str]:
    authors = {clip.rdf.creator.lower()}
    kept = []
    for keyword in clip.rdf.keywords:
        keyword = tidy(keyword.replace("_", " ").lower())
        if keyword in META_KEYWORDS or keyword in authors or re.search(r"\d", keyword):
            continue
        if words.is_english(keyword, min_share=1.0, names_in_lowercase=True):
            kept.append(keyword)
    return list(dict.fromkeys(kept))


class CaptionRules:
    """The caption rules of the module docstring, with the counts of what each rule removed."""

    def __init__(self, clips: list[Clip], words: EnglishWords, removed: Counter) -> None:
        self.words = words
        self.removed = removed
        self.title_files = Counter(clip.rdf.title.casefold() for clip in clips)
        self.description_files = Counter(clip.rdf.description.casefold() for clip in clips)

    def title(self, clip: Clip) -> str:
        # file counters go: "scissors 2" -> "scissors", "Dog 01 Drawn With Straight Lines" -> "Dog Drawn ..."
        title = re.sub(r"\s+\d+$|\s+0\d\b", "", clip.rdf.title.replace("_", " "))
        title = tidy(title)
        reason = self._reject(title, self.title_files[clip.rdf.title.casefold()])
        if reason:
            self.removed[f"title: {reason}"] += 1
        return "" if reason else title

    def description(self, clip: Clip) -> str:
        description = tidy(clip.rdf.description)
        reason = self._reject(description, self.description_files[clip.rdf.description.casefold()])
        if not reason and (JUNK_TEXT.search(description) or len(description.split()) > MAX_DESCRIPTION_WORDS):
            reason = "web address, export debris or too long"
        if reason:
            self.removed[f"description: {reason}"] += 1
        return "" if reason else description

    def _reject(self, text: str, files_sharing: int) -> str:
        if not text:
            return "empty"
        if CREDIT.match(text):
            return "author credit"
        if COLLECTION_NOTE.match(text):
            return "collection note"
        if files_sharing > SET_WIDE:
            return f"set-wide (on more than {SET_WIDE} files)"
        if JUNK_TEXT.search(text) and len(text.split()) <= 3:
            return "web address or export debris"
        if not self.words.is_english(text):
            return "not English"
        return ""


def name_key(text: str) -> str:
    """Country names compared without case, punctuation and hyphens: "Guinea-Bissau" = "guinea_bissau"."""
    return " ".join(re.findall(r"[a-z]+", text.lower().replace("'", "")))


def country_names() -> dict[str, str]:
    """name_key of every country name (name, common and official) -> ISO 3166-1 alpha-2, to find clip-art flags."""
    names = {}
    for country in json.loads(ISO_3166_1.read_text(encoding="utf-8"))["3166-1"]:
        for key in ("name", "common_name", "official_name"):
            if key in country:
                names[name_key(country[key])] = country["alpha_2"]
    return names


def flag_country(clip: Clip, countries: dict[str, str]) -> str:
    """The alpha-2 code when the clip is a flag (keyword "flag") whose title or file name is a country's name."""
    if "flag" not in {keyword.lower() for keyword in clip.rdf.keywords}:
        return ""
    for candidate in (clip.rdf.title, clip.png.stem):
        key = re.sub(r"\b(?:the )?flag(?: of)?\b", " ", name_key(candidate)).strip()
        if key in countries:
            return countries[key]
    return ""


def concept_of(caption: str) -> str:
    """Sorted words of the caption without colours, digits and small words; a plural "s" off ("stars" = "star")."""
    words = {word for word in re.findall(r"[a-z]+", caption.lower()) if word not in COLOUR_WORDS | SMALL_WORDS}
    words = {word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word for word in words}
    return " ".join(sorted(words)) or caption.lower()


def make_records(clips: list[Clip], drops: Counter, removed: Counter) -> list[tuple[Clip, dict]]:
    """The caption rules and the flag rule; clips left with no caption counted in ``drops``."""
    words = EnglishWords()
    rules = CaptionRules(clips, words, removed)
    countries = country_names()
    flags = flag_concepts()
    emoji_splits = emoji_flag_splits()
    made = []
    for clip in clips:
        title, description, phrase = rules.title(clip), rules.description(clip), file_name_phrase(clip, words)
        keywords = clean_keywords(clip, words)
        removed["file name: no English phrase"] += not phrase
        removed["keywords: none left"] += not keywords
        captions = unique_captions([title, description, phrase, ", ".join(keywords)])
        if not captions:
            drops["no caption left"] += 1
            continue
        record = {"id": clip.id, "captions": captions, "category": clip.category.replace("_", " ")}
        record["origin"] = f"openclipart-png {clip.id}.png"
        code = flag_country(clip, countries)
        if code and code.lower() in flags:  # the flag set's "flag of ..." caption, concept and split
            flag_caption, record["concept"], record["fixed_split"] = flags[code.lower()]
            record["captions"] = unique_captions([flag_caption, *captions])
        elif code:  # a territory the flag set dropped: its own concept, its emoji's split if any
            record["concept"], record["fixed_split"] = f"flag: {code.lower()}", emoji_splits.get(code, "")
        else:
            record["concept"] = concept_of(captions[0])
        made.append((clip, record))
    return made


def flag_concepts() -> dict[str, tuple[str, str, str]]:
    """The flag set's (first caption, concept, split) by file id ("fr"), read from its committed metadata."""
    path = CORPUS_ROOT / "flags" / METADATA_FILE
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `python scripts/build_flag_set.py` first")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {record["id"]: (record["captions"][0], record["concept"], record["split"]) for record in records}


def cap_concepts(made: list[tuple[Clip, dict]], drops: Counter) -> list[tuple[Clip, dict]]:
    """At most MAX_PER_CONCEPT items per concept: those whose id hashes lowest (a spread, not the first files)."""
    rank = sorted(made, key=lambda item: hashlib.sha1(item[1]["id"].encode()).hexdigest())
    seen: Counter = Counter()
    kept_ids = set()
    for _, record in rank:
        seen[record["concept"]] += 1
        if seen[record["concept"]] <= MAX_PER_CONCEPT:
            kept_ids.add(record["id"])
        else:
            drops[f"over {MAX_PER_CONCEPT} items of one concept"] += 1
    return [item for item in made if item[1]["id"] in kept_ids]


def draw(made: list[tuple[Clip, dict]], size: int, drops: Counter) -> tuple[list[dict], np.ndarray]:
    """Render every kept clip; blank drawings and byte-identical tiles dropped."""
    Image.MAX_IMAGE_PIXELS = None  # Debian's own files; a few posters are 170 megapixels and decode fine
    records, tiles, seen = [], [], set()
    for clip, record in made:
        with Image.open(clip.png) as image:
            tile = square_tile(image, size, crop=True)
        if tile is None:
            drops["blank drawing (white on transparency)"] += 1
            continue
        digest = hashlib.sha1(tile.tobytes()).hexdigest()
        if digest in seen:
            drops["same picture as another file"] += 1
            continue
        seen.add(digest)
        records.append(record)
        tiles.append(tile)
    return records, np.stack(tiles)


def build(size: int, drops: Counter, removed: Counter) -> BuiltSource:
    clips = read_clips(drops)
    made = cap_concepts(make_records(clips, drops, removed), drops)
    records, tiles = draw(made, size, drops)
    fixed = {record["concept"]: record.pop("fixed_split") for record in records if "fixed_split" in record}
    assign_splits(records, {concept: split for concept, split in fixed.items() if split})
    version = package_version("openclipart-png")
    return BuiltSource(
        name="clipart",
        title="public-domain Open Clip Art Library drawings captioned from their metadata",
        records=records,
        tiles=tiles,
        classnames=sorted({record["category"] for record in records}),
        license_text=LICENSE_TEXT.format(version=version, size=size),
        readme_text=README_TEXT,
        drops=drops,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=CORPUS_ROOT / "clipart", help="folder to write")
    parser.add_argument("--size", type=int, default=TILE_SIZE, help=f"tile size in px (default {TILE_SIZE})")
    args = parser.parse_args(argv)
    require(
        [
            (CLIPART / "png", "openclipart-png"),
            (CLIPART / "svg", "openclipart-svg"),
            (ISO_3166_1, "iso-codes"),
            (Path("/usr/share/dict/words"), "wamerican"),
        ]
    )
    drops: Counter = Counter()
    removed: Counter = Counter()
    built = build(args.size, drops, removed)
    write_source(built, args.output)
    print_report(built)
    for rule, count in sorted(removed.items()):
        print(f"caption removed, {rule}: {count}")


if __name__ == "__main__":
    main()
