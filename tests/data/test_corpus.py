"""The built-in corpus (clip art, flags, icons, Twemoji) and the emoji set's extra CLDR captions."""

from __future__ import annotations

import re

import numpy as np
import pytest

from clipforge.data import corpus
from clipforge.data.base import DataError, ImageTextSource
from clipforge.data.corpus import (
    CORPUS_NAMES,
    CorpusSource,
    PackedStrings,
    load_corpus,
    load_corpus_images,
    read_info,
    split_of_concept,
)
from clipforge.data.emoji import EmojiSource, emoji_captions, load_emoji_set

# The documented counts (each source's README.md and info.json): images per split.
COUNTS = {
    "clipart": {"train": 3265, "val": 439, "test": 383},
    "flags": {"train": 199, "val": 21, "test": 25},
    "icons": {"train": 578, "val": 117, "test": 108},
    "twemoji": {"train": 3002, "val": 235, "test": 418},  # every emoji of the emoji set, in its split
}
TILE_SIZES = {"clipart": 96, "flags": 64, "icons": 64, "twemoji": 64}
# What the describe() line starts with after "corpus <name> <id> (from ": the package the picture comes from
ORIGINS = {
    "clipart": ("openclipart-png ",),
    "flags": ("iso-flags-png-320x240 ",),
    "icons": ("Adwaita ", "Tango "),
    "twemoji": ("emoji-datasource-twitter 16.0.0 img/twitter/64/",),
}
# Collection names and credits that the clip-art caption rules must have removed (seen in openclipart-svg)
JUNK_CAPTIONS = re.compile(
    r"gramastar|part of the flat icon collection|lemon svg theme|etiquette icons|aiga_symbol_signs|"
    r"clip\s*-?\s*art by|various cliparts|^part of |hash\(0x|https?://",
    re.IGNORECASE,
)


@pytest.fixture(scope="module", params=CORPUS_NAMES)
def name(request: pytest.FixtureRequest) -> str:
    return request.param


def test_each_source_has_the_documented_counts(name: str) -> None:
    counts = {split: len(CorpusSource(name, split)) for split in ("train", "val", "test")}
    assert counts == COUNTS[name]
    assert len(CorpusSource(name, "all")) == sum(counts.values()) == len(load_corpus(name))
    info = read_info(name)
    assert info["split_counts"] == counts and info["count"] == sum(counts.values())


def test_every_image_has_non_empty_captions_without_junk(name: str) -> None:
    source = CorpusSource(name, "all")
    junk = []
    for index in range(len(source)):
        captions = source.captions(index)
        assert captions and all(isinstance(c, str) and c.strip() == c and c for c in captions), source.describe(index)
        assert len({c.casefold() for c in captions}) == len(captions)  # no caption twice
        junk += [c for c in captions if JUNK_CAPTIONS.search(c)]
    assert junk == []


def test_no_clipart_first_caption_is_shared_by_a_whole_set() -> None:
    """A title on a whole collection ("gramastar" on 1,375 stars) is gone, and the per-concept cap (10) keeps
    any one first caption (the title when one was kept) from standing for a set."""
    source = CorpusSource("clipart", "all")
    first = [source.captions(i)[0] for i in range(len(source))]
    repeated = {caption: n for caption, n in _counts(first).items() if n > 10}
    assert repeated == {}


def _counts(values: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def test_splits_are_concept_disjoint_and_hashed(name: str) -> None:
    data = load_corpus(name)
    splits_of: dict[str, set[str]] = {}
    for concept, split in zip(data.concepts.tolist(), data.splits.tolist(), strict=True):
        splits_of.setdefault(concept, set()).add(split)
    assert [c for c, s in splits_of.items() if len(s) > 1] == []
    assert set(data.splits.tolist()) == {"train", "val", "test"}
    # every concept but the flags and Twemoji (which follow the emoji split) is split by the hash
    hashed = [] if name == "twemoji" else [c for c in splits_of if not c.startswith("flag: ")]
    assert [c for c in hashed if splits_of[c] != {split_of_concept(c)}] == []


def test_flags_follow_the_emoji_split() -> None:
    """A flag whose country has an emoji flag is in that emoji's split, in the flag set and in the clip art."""
    emoji = load_emoji_set()
    emoji_split = {}
    for codepoints, split in zip(emoji.codepoints.tolist(), emoji.splits.tolist(), strict=True):
        codes = [int(code, 16) for code in codepoints.split()]
        if len(codes) == 2 and all(0x1F1E6 <= code <= 0x1F1FF for code in codes):
            emoji_split["".join(chr(ord("a") + code - 0x1F1E6) for code in codes)] = split
    checked = 0
    for name in ("flags", "clipart"):
        data = load_corpus(name)
        for concept, split in zip(data.concepts.tolist(), data.splits.tolist(), strict=True):
            code = concept.removeprefix("flag: ")
            if concept.startswith("flag: ") and code in emoji_split:
                assert split == emoji_split[code], (name, concept)
                checked += 1
    assert checked > 300  # 230+ flags and 150+ clip-art flags


def test_twemoji_follow_the_emoji_set_split_concept_and_captions() -> None:
    """Every Twemoji picture is the emoji of the same codepoints in the emoji set: same split, same concept, same
    group, and the captions EmojiSource(captions="all") gives it, so training on Twemoji never sees a test emoji."""
    emoji = load_emoji_set()
    captioned = EmojiSource("all", captions="all")  # index i = row i of the emoji set
    row_of = {codepoints.replace(" ", "-"): row for row, codepoints in enumerate(emoji.codepoints.tolist())}
    twemoji = CorpusSource("twemoji", "all")
    data = twemoji._corpus
    seen = set()
    for index, corpus_row in enumerate(twemoji.indices.tolist()):
        item_id = data.ids[corpus_row]
        row = row_of[item_id]
        seen.add(row)
        assert data.concepts[corpus_row] == emoji.concepts[row], item_id
        assert data.splits[corpus_row] == emoji.splits[row], item_id
        assert twemoji.classnames[twemoji.labels[index]] == emoji.groups[row], item_id
        assert twemoji.captions(index) == captioned.captions(row), item_id
    assert len(seen) == len(twemoji) > 0.95 * len(emoji)  # each emoji once, nearly all of them
    emoji_test = set(emoji.concepts[emoji.splits == "test"].tolist())
    assert set(CorpusSource("twemoji", "test").concepts.tolist()) <= emoji_test
    assert not emoji_test & set(CorpusSource("twemoji", "train").concepts.tolist())


def test_images_are_rgb_squares_of_the_stored_size(name: str) -> None:
    source = CorpusSource(name, "test")
    size = TILE_SIZES[name]
    assert source.image_size == size == read_info(name)["tile_size"]
    for index in (0, len(source) // 2, len(source) - 1):
        image = source.load_image(index)
        assert image.mode == "RGB" and image.size == (size, size)
    images = load_corpus_images(name)
    assert images.shape == (len(load_corpus(name)), size, size, 3) and images.dtype == np.uint8
    assert not images.flags.writeable and load_corpus_images(name) is images  # decoded once, shared
    flat = images.reshape(len(images), -1)
    assert (flat.min(axis=1) < 245).all()  # no blank tile (some white document icons are very light)
    corners = images[:, [0, 0, -1, -1], [0, -1, 0, -1]].reshape(len(images), -1)
    assert np.mean(corners.min(axis=1) >= 240) > 0.5  # pictures sit on white


def test_describe_says_where_the_image_comes_from(name: str) -> None:
    source = CorpusSource(name, "val")
    line = source.describe(0)
    match = re.fullmatch(rf"corpus {name} (\S+) \(from (.+)\)", line)
    assert match, line
    assert match[2].startswith(ORIGINS[name])


def test_source_interface_and_labels(name: str) -> None:
    source = CorpusSource(name, "train")
    assert isinstance(source, ImageTextSource)
    assert source.classnames and source.labels is not None and source.labels.shape == (len(source),)
    assert source.labels.min() >= 0 and source.labels.max() < len(source.classnames)
    assert len(set(source.labels.tolist())) > 1


def test_known_items_have_their_captions() -> None:
    flags = CorpusSource("flags", "all")
    france = flags.captions(_index_of(flags, "fr"))
    assert france == ["flag of France", "the French Republic flag", "France"]
    icons = CorpusSource("icons", "all")
    assert icons.captions(_index_of(icons, "Adwaita/audio-volume-high"))[0] == "audio volume high"
    assert not [icons.describe(i) for i in range(len(icons)) if "symbolic" in icons.captions(i)[0]]
    assert flags.classnames == ["country or territory", "region", "organization or movement"]


def _index_of(source: CorpusSource, item_id: str) -> int:
    ids = [source._corpus.ids[int(row)] for row in source.indices]
    return ids.index(item_id)


def test_unknown_name_or_split_is_a_data_error() -> None:
    with pytest.raises(DataError, match=r"corpus source 'clip-art' does not exist; choose one of \['clipart'"):
        CorpusSource("clip-art")
    with pytest.raises(DataError, match=r"corpus split 'validation' does not exist; .*'train', 'val', 'test', 'all'"):
        CorpusSource("flags", "validation")


def test_missing_package_file_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpus, "METADATA_FILE", "no-such-metadata.jsonl")
    with pytest.raises(FileNotFoundError, match=r"corpus/flags/no-such-metadata.jsonl.*build_flag_set.py"):
        corpus.load_corpus.__wrapped__("flags")


def test_packed_strings_round_trip() -> None:
    strings = ["", "flag of Côte d'Ivoire", "日本", "a" * 300]
    packed = PackedStrings(strings)
    assert len(packed) == 4 and [packed[i] for i in range(4)] == strings


def test_split_of_concept_is_a_pure_function_with_the_documented_shares() -> None:
    assert split_of_concept("icon: audio volume") == split_of_concept("icon: audio volume")
    splits = [split_of_concept(f"concept {i}") for i in range(4000)]
    assert 0.08 < splits.count("test") / 4000 < 0.12 and 0.08 < splits.count("val") / 4000 < 0.12


# ----------------------------------------------------------------------------------------------
# Emoji: extra CLDR captions, only when asked
# ----------------------------------------------------------------------------------------------
def test_emoji_keywords_exist_for_a_known_emoji() -> None:
    emoji = load_emoji_set()
    row = emoji.names.tolist().index("grinning face")
    assert {"face", "grin"} <= set(emoji.keywords[row].split(" | "))
    assert emoji.tts[row] == "grinning face"
    source = EmojiSource("all", captions="all")
    assert source.captions(0) == ["grinning face", "face, grin"]  # the name, then the new keywords


def test_default_emoji_captions_are_the_unicode_names() -> None:
    default, named = EmojiSource("train"), EmojiSource("train", captions="name")
    assert [default.captions(i) for i in range(len(default))] == [[str(n)] for n in default.names]
    assert [named.captions(i) for i in range(len(named))] == [[str(n)] for n in named.names]
    extra = EmojiSource("train", captions="all")
    assert np.array_equal(extra.indices, default.indices)  # same split, same images
    assert all(extra.captions(i)[0] == default.captions(i)[0] for i in range(len(extra)))
    assert sum(len(extra.captions(i)) > 1 for i in range(len(extra))) > 0.95 * len(extra)


def test_emoji_captions_add_only_what_is_new() -> None:
    assert emoji_captions("grinning face", "grinning face", "face | grin | grinning face") == [
        "grinning face",
        "face, grin",
    ]
    assert emoji_captions("shaking face", "", "") == ["shaking face"]  # newer than CLDR 41
    assert emoji_captions("a", "b", "a | c") == ["a", "b", "c"]


def test_unknown_emoji_caption_choice_is_a_data_error() -> None:
    with pytest.raises(DataError, match=r"emoji captions='keywords' is not a choice: 'name' .* or 'all'"):
        EmojiSource("train", captions="keywords")


def test_data_kind_corpus_reads_a_built_in_source(tmp_path, capsys) -> None:
    from clipforge.cli import main
    from clipforge.config import data_config_from_dict
    from clipforge.data.sources import build_source

    source = build_source(data_config_from_dict({"kind": "corpus", "name": "flags", "split": "val"}))
    assert len(source) > 0 and all(source.captions(i) for i in range(len(source)))
    assert main(["data", "inspect", "kind=corpus", "name=clip-art"]) == 2
    err = capsys.readouterr().err
    assert "corpus source 'clip-art' does not exist; choose one of ['clipart', 'flags', 'icons', 'twemoji']" in err
    assert "Traceback" not in err


def test_emoji_captions_all_reach_the_source_from_the_config() -> None:
    from clipforge.config import data_config_from_dict
    from clipforge.data.sources import build_source

    source = build_source(data_config_from_dict({"kind": "emoji", "split": "train", "captions": "all"}))
    assert max(len(source.captions(i)) for i in range(len(source))) >= 2
