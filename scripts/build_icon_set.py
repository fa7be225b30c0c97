"""Build the packaged icon set in ``src/clipforge/data/corpus/icons/``: freedesktop theme icons named as phrases.

Run once, from the repository root, on a machine with the Debian packages ``adwaita-icon-theme``,
``tango-icon-theme`` and ``librsvg2-bin`` (``rsvg-convert`` draws the SVGs) and ``wamerican`` (the English
word list that filters the Tango keywords); the output is committed::

    python scripts/build_icon_set.py

One picture per icon name per theme, 64x64 RGB on white, the icon's own canvas kept (icons are drawn to a
grid, so their size within the canvas means something; no crop):

- the rendering: the full-colour icon when the theme has one, else the symbolic (monochrome) one; the
  largest PNG of at least 64 px, else the scalable SVG drawn at 64 px, else the largest PNG.
- the name: file name without its extensions, "-symbolic" and the "-rtl"/"-ltr" mirror suffixes
  (``go-next-symbolic-rtl`` -> ``go-next``); sizes, mirrored variants and the symbolic twin of a colour icon
  are the same name, so they give one picture.
- captions: the name as a phrase ("audio-volume-high" -> "audio volume high", "application-x-executable" ->
  "application executable": the MIME "x-" prefix and vendor "vnd" go); for Tango also the SVG's RDF title
  ("New Appointment") and its English keywords, joined.
- category: the icon's context folder (actions, apps, devices, ...); Adwaita's "legacy" folder is no context,
  so its icons take the context the same name has in another folder or theme.

Cleaning: symbolic links (Tango's 1,800 legacy aliases such as ``gtk-directory`` -> ``folder``) are not new
icons; the "animations" context holds spinner frame strips, not icons.

Split: by concept = the first two words of the phrase ("audio volume" for the volume icons at every level,
"battery level" for every battery), the same in both themes, so near-identical icons and the same icon
in the two themes go whole to one split; MIME-type icons (a page with a glyph) and the families of one
picture turned or marked (go, folder, zoom, object, list, weather, emblem, user) by their first word.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from corpus_common import (
    CORPUS_ROOT,
    BuiltSource,
    EnglishWords,
    assign_splits,
    package_version,
    print_report,
    read_rdf,
    render_svg,
    require,
    square_tile,
    unique_captions,
    write_source,
)
from PIL import Image

ICONS = Path("/usr/share/icons")
THEMES = ("Adwaita", "Tango")
TILE_SIZE = 64
SKIPPED_CONTEXTS = {"animations": "spinner frame strips, not icons"}
NO_CONTEXT = "legacy"
_MIRROR = re.compile(r"(?:-symbolic)?-(?:rtl|ltr)$")  # mirrored for right-to-left (or left-to-right) text
_DROPPED_WORDS = {"symbolic", "x", "vnd"}  # "x-" MIME prefixes and vendor trees say nothing about the picture
# Tango keywords that name the theme or the file, not the picture
_META_KEYWORDS = {"tango", "icon", "icons", "theme", "action", "actions", "stock", "gnome", "gtk", "svg"}

LICENSE_TEXT = """\
The icon images in this folder (images.webp) are renderings of two freedesktop icon themes, resized to
64x64 pixels on white and their colour values rounded to multiples of 8:

- Adwaita (Debian package adwaita-icon-theme {adwaita}; https://gitlab.gnome.org/GNOME/adwaita-icon-theme),
  by the GNOME Project, licensed under the Creative Commons Attribution-Share Alike 3.0 United States License
  (https://creativecommons.org/licenses/by-sa/3.0/us/) or the GNU Lesser General Public License version 3
  (https://www.gnu.org/licenses/lgpl-3.0.html). The Adwaita renderings in this atlas are shared under the
  same terms (CC BY-SA 3.0: attribution "GNOME Project", https://www.gnome.org).
- Tango (Debian package tango-icon-theme {tango}; http://tango.freedesktop.org), released into the public
  domain by its authors.

The captions are the icons' freedesktop names written as phrases and, for Tango, the titles and keywords of
the icons' SVG metadata. The "concept", "split" and "category" fields are clipforge's own.

Made by `python scripts/build_icon_set.py` in the clipforge repository.
"""

README_TEXT = """\
# Icons

{count} icons of the Adwaita and Tango freedesktop themes ({size}x{size} RGB on white), one per icon name per
theme, captioned with their names as phrases, loaded by `clipforge.data.corpus.CorpusSource("icons", split)`;
splits: {split_counts}. Made by `python scripts/build_icon_set.py` (needs the Debian packages
adwaita-icon-theme, tango-icon-theme, librsvg2-bin and wamerican); see that script for how, and
LICENSE-icons.txt for the licences (Adwaita: CC BY-SA 3.0 or LGPL-3; Tango: public domain).

- `images.webp`: one lossless WebP atlas ({megabytes} MB), {columns} tiles per row, tile i = line i of the
  metadata; colour values rounded to multiples of 8 (largest error 4/255).
- `metadata.jsonl`: one JSON object per icon: id (theme/name), captions, category, concept, split, origin.
- `info.json`: tile size, atlas columns, categories, counts.
"""


@dataclass
class IconFiles:
    """Every file of one icon name in one theme: (size in px or 0 for scalable, symbolic?, path)."""

    theme: str
    name: str
    files: list[tuple[int, bool, Path]] = field(default_factory=list)
    contexts: set[str] = field(default_factory=set)

    def best(self) -> tuple[int, Path]:
        """The rendering to draw: colour over symbolic; a PNG of >= 64 px, else the SVG, else the largest PNG."""
        has_colour = any(not symbolic for _, symbolic, _ in self.files)
        chosen = [(size, path) for size, symbolic, path in self.files if symbolic != has_colour]
        large = sorted((item for item in chosen if item[0] >= TILE_SIZE), key=lambda item: item[0])
        scalable = [item for item in chosen if item[0] == 0]
        pngs = sorted((item for item in chosen if item[0] > 0), key=lambda item: item[0])
        return (large or scalable or pngs)[-1 if not large else 0]


def icon_name(path: Path) -> tuple[str, bool]:
    """(the name without extensions, -symbolic and mirror suffixes, whether the file is a symbolic icon)."""
    stem = path.name.split(".")[0]
    symbolic = "symbolic" in path.name
    # both orders occur: "go-next-symbolic-rtl" and "audio-speakers-rtl-symbolic"
    return _MIRROR.sub("", stem.removesuffix("-symbolic")).removesuffix("-symbolic"), symbolic


def size_of(folder: str) -> int:
    """ "48x48" -> 48; "scalable" (and "scalable-up-to-32") -> 0."""
    match = re.fullmatch(r"(\d+)x\d+", folder)
    return int(match[1]) if match else 0


def collect(theme: str, drops: Counter) -> dict[str, IconFiles]:
    """The icon names of a theme with all their real files (symbolic links and skipped contexts counted, not kept)."""
    icons: dict[str, IconFiles] = {}
    alias_names: set[str] = set()
    skipped: dict[str, set[str]] = {}
    for path in sorted((ICONS / theme).glob("*/*/*")):
        if path.suffix not in (".png", ".svg"):
            continue
        size_folder, context = path.parts[-3], path.parts[-2]
        name, symbolic = icon_name(path)
        if context in SKIPPED_CONTEXTS:
            skipped.setdefault(SKIPPED_CONTEXTS[context], set()).add(name)
            continue
        if path.is_symlink():
            alias_names.add(name)
            continue
        entry = icons.setdefault(name, IconFiles(theme, name))
        entry.files.append((size_of(size_folder), symbolic, path))
        if context != NO_CONTEXT:
            entry.contexts.add(context)
    drops[f"{theme}: alias names (symbolic links to another icon)"] += len(alias_names - icons.keys())
    for reason, names in skipped.items():
        drops[f"{theme}: {reason}"] += len(names)
    return icons


def phrase(name: str) -> str:
    """ "audio-volume-high" -> "audio volume high"; "application-x-executable" -> "application executable"."""
    words = [word for word in re.split(r"[-_]+", name) if word and word.lower() not in _DROPPED_WORDS]
    return " ".join(words)


# Families whose icons are one picture turned or marked ("go up" / "go down" is one arrow, "folder music" a
# folder with a note): their first word is the concept
_ONE_PICTURE_FAMILIES = {"go", "folder", "zoom", "object", "list", "weather", "emblem", "user"}


def concept_of(words: str, context: str) -> str:
    """The split unit: the first two words of the phrase; MIME-type icons and _ONE_PICTURE_FAMILIES by the first."""
    parts = words.split()
    first_only = context == "mimetypes" or parts[0].lower() in _ONE_PICTURE_FAMILIES
    return f"icon: {' '.join(parts[:1] if first_only else parts[:2]).lower()}"


def captions_of(icon: IconFiles, words: EnglishWords) -> list[str]:
    """The phrase, then for an SVG with RDF metadata its English title and its English keywords joined."""
    captions = [phrase(icon.name)]
    svgs = [path for size, _, path in icon.files if size == 0 and path.suffix == ".svg"]
    if svgs:
        rdf = read_rdf(svgs[0])
        if words.is_english(rdf.title):
            captions.append(rdf.title)
        keywords = [k for k in rdf.keywords if k.lower() not in _META_KEYWORDS and words.is_english(k, 1.0, True)]
        if keywords:
            captions.append(", ".join(dict.fromkeys(keyword.lower() for keyword in keywords)))
    return unique_captions(captions)


def draw(icon: IconFiles) -> tuple[np.ndarray | None, Path]:
    size, path = icon.best()
    if size == 0:
        return square_tile(render_svg(path, TILE_SIZE), TILE_SIZE, crop=False), path
    with Image.open(path) as image:
        return square_tile(image, TILE_SIZE, crop=False), path


def build(drops: Counter) -> BuiltSource:
    words = EnglishWords()
    themes = {theme: collect(theme, drops) for theme in THEMES}
    known_contexts: dict[str, set[str]] = {}
    for icons in themes.values():
        for icon in icons.values():
            known_contexts.setdefault(icon.name, set()).update(icon.contexts)
    records, tiles = [], []
    for theme, icons in themes.items():
        for name in sorted(icons):
            icon = icons[name]
            contexts = icon.contexts or known_contexts[name]
            context = sorted(contexts)[0] if contexts else "other"
            tile, path = draw(icon)
            if tile is None:
                drops[f"{theme}: blank picture"] += 1
                continue
            captions = captions_of(icon, words)
            records.append(
                {
                    "id": f"{theme}/{name}",
                    "captions": captions,
                    "category": context,
                    "concept": concept_of(captions[0], context),
                    "origin": f"{theme} icon theme {path.relative_to(ICONS / theme)}",
                }
            )
            tiles.append(tile)
    assign_splits(records)
    return BuiltSource(
        name="icons",
        title="Adwaita and Tango freedesktop icons named as phrases",
        records=records,
        tiles=np.stack(tiles),
        classnames=sorted({record["category"] for record in records}),
        license_text=LICENSE_TEXT.format(
            adwaita=package_version("adwaita-icon-theme"), tango=package_version("tango-icon-theme")
        ),
        readme_text=README_TEXT,
        drops=drops,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=CORPUS_ROOT / "icons", help="folder to write")
    args = parser.parse_args(argv)
    require([(ICONS / "Adwaita", "adwaita-icon-theme"), (ICONS / "Tango", "tango-icon-theme")])
    built = build(Counter())
    write_source(built, args.output)
    print_report(built)


if __name__ == "__main__":
    main()
