"""The packaged emoji set: concept keys on real names, the concept-level split, loading, EmojiSource."""

from __future__ import annotations

import numpy as np
import pytest

from clipforge.data import emoji
from clipforge.data.base import ImageTextSource
from clipforge.data.emoji import GROUPS, EmojiSource, concept_key, load_emoji_set, split_of_concept

# Names copied from emoji-test.txt (Unicode 15.0); each tuple must collapse to its one key.
SAME_CONCEPT = [
    ("cook", ["cook", "man cook", "woman cook: medium skin tone", "cook: dark skin tone"]),
    (
        "person",
        ["person", "man", "woman", "man: red hair", "woman: blond hair", "person: curly hair", "man: beard"],
    ),
    ("person", ["woman: white hair", "person: light skin tone, bald", "man: medium-dark skin tone, curly hair"]),
    (
        "holding hands",
        [
            "people holding hands",
            "men holding hands",
            "women holding hands: dark skin tone, medium-dark skin tone",
            "woman and man holding hands: light skin tone",
        ],
    ),
    ("with bunny ears", ["people with bunny ears", "men with bunny ears", "women with bunny ears"]),
    ("kiss", ["kiss", "kiss: woman, man", "kiss: person, person, light skin tone, medium skin tone"]),
    ("couple with heart", ["couple with heart", "couple with heart: man, man, dark skin tone"]),
    ("family", ["family", "family: man, woman, boy", "family: woman, girl, girl"]),
    ("handshake", ["handshake", "handshake: light skin tone, dark skin tone"]),
    ("deaf person", ["deaf person", "deaf man", "deaf woman: medium skin tone"]),
    ("pregnant person", ["pregnant person", "pregnant man", "pregnant woman: light skin tone"]),
    ("older person", ["older person", "old man", "old woman: light skin tone"]),
    ("child", ["child", "boy", "girl: medium-dark skin tone"]),
    ("person with crown", ["person with crown", "prince", "princess: light skin tone"]),
    ("mx claus", ["mx claus", "Santa Claus", "Mrs. Claus: dark skin tone"]),
    ("merperson", ["merperson", "merman", "mermaid: medium skin tone"]),
    ("in manual wheelchair", ["person in manual wheelchair", "man in manual wheelchair: dark skin tone"]),
    ("thumbs up", ["thumbs up", "thumbs up: medium-light skin tone"]),
]
# Names whose key must be the name itself: no people or skin-tone part to remove.
UNCHANGED = [
    "grinning face",
    "flag: Paraguay",
    "flag: Isle of Man",
    "keycap: 1",
    "man’s shoe",
    "woman’s hat",
    "lady beetle",
    "horse racing",
]


@pytest.fixture(scope="module")
def emoji_set() -> emoji.EmojiSet:
    return load_emoji_set()


@pytest.mark.parametrize(("key", "names"), SAME_CONCEPT)
def test_variants_share_one_concept_key(key: str, names: list[str], emoji_set: emoji.EmojiSet) -> None:
    packaged = set(emoji_set.names.tolist())
    assert [name for name in names if name not in packaged] == []  # real names, not invented ones
    assert {name: concept_key(name) for name in names} == {name: key for name in names}


def test_concept_key_keeps_names_without_variation(emoji_set: emoji.EmojiSet) -> None:
    assert set(UNCHANGED) <= set(emoji_set.names.tolist())
    assert [concept_key(name) for name in UNCHANGED] == UNCHANGED


def test_different_things_get_different_keys() -> None:
    assert concept_key("flag: Paraguay") != concept_key("flag: Peru")
    assert concept_key("keycap: 1") != concept_key("keycap: 2")
    assert concept_key("man’s shoe") != concept_key("woman’s sandal")
    assert concept_key("man cook") != concept_key("man farmer")


def test_no_packaged_concept_key_keeps_a_skin_tone_or_gender_prefix(emoji_set: emoji.EmojiSet) -> None:
    concepts = set(emoji_set.concepts.tolist())
    assert not [c for c in concepts if "skin tone" in c or c.endswith(" hair") or c.endswith(" bald")]
    assert not [c for c in concepts if c.startswith(("man ", "woman ", "men ", "women ", "people "))]


def test_packaged_metadata_matches_the_code(emoji_set: emoji.EmojiSet) -> None:
    assert [concept_key(name) for name in emoji_set.names.tolist()] == emoji_set.concepts.tolist()
    assert [split_of_concept(c) for c in emoji_set.concepts.tolist()] == emoji_set.splits.tolist()


def test_split_is_concept_disjoint_and_sized(emoji_set: emoji.EmojiSet) -> None:
    splits_of: dict[str, set[str]] = {}
    for concept, split in zip(emoji_set.concepts.tolist(), emoji_set.splits.tolist(), strict=True):
        splits_of.setdefault(concept, set()).add(split)
    assert [c for c, s in splits_of.items() if len(s) > 1] == []
    assert set(emoji_set.splits.tolist()) == {"train", "val", "test"}
    test_share = float(np.mean(emoji_set.splits == "test"))
    assert 0.07 <= test_share <= 0.14
    concept_splits = [next(iter(s)) for s in splits_of.values()]
    assert 0.07 <= concept_splits.count("test") / len(concept_splits) <= 0.13
    assert 0.07 <= concept_splits.count("val") / len(concept_splits) <= 0.13
    assert set(emoji_set.groups[emoji_set.splits == "test"].tolist()) == set(GROUPS)


def test_split_of_concept_is_a_pure_function() -> None:
    assert split_of_concept("cook") == split_of_concept("cook")
    assert {split_of_concept(f"concept {i}") for i in range(200)} == {"train", "val", "test"}


def test_load_emoji_set_shapes_and_types(emoji_set: emoji.EmojiSet) -> None:
    count = len(emoji_set)
    assert count == 3655
    assert emoji_set.images.shape == (count, 64, 64, 3) and emoji_set.images.dtype == np.uint8
    for column in ("codepoints", "names", "groups", "subgroups", "concepts", "splits", "group_index"):
        array = getattr(emoji_set, column)
        assert isinstance(array, np.ndarray) and array.shape == (count,), column
    assert emoji_set.group_index.dtype == np.int64
    assert (np.array(GROUPS)[emoji_set.group_index] == emoji_set.groups).all()
    assert not emoji_set.images.flags.writeable  # shared by every caller through the cache
    assert load_emoji_set() is emoji_set


def test_groups_are_in_file_order_with_the_documented_sizes(emoji_set: emoji.EmojiSet) -> None:
    first_seen = list(dict.fromkeys(emoji_set.groups.tolist()))
    assert tuple(first_seen) == GROUPS
    counts = {group: int((emoji_set.groups == group).sum()) for group in GROUPS}
    assert counts["People & Body"] == 2148 and counts["Flags"] == 269 and counts["Activities"] == 85


def test_images_are_emoji_on_white(emoji_set: emoji.EmojiSet) -> None:
    grinning = emoji_set.images[emoji_set.names.tolist().index("grinning face")].astype(int)
    yellow = (grinning[..., 0] > 200) & (grinning[..., 1] > 150) & (grinning[..., 2] < 120)
    assert yellow.mean() > 0.3
    assert (grinning[0, 0] == 255).all()  # a corner outside the round face is the white padding
    flat = emoji_set.images.reshape(len(emoji_set), -1)
    assert (flat.min(axis=1) < 200).all()  # no blank tile
    assert len(np.unique(flat[:50], axis=0)) == 50


def test_missing_package_file_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(emoji, "IMAGES_FILE", "no-such-atlas.webp")
    with pytest.raises(FileNotFoundError, match="no-such-atlas.webp"):
        emoji.load_emoji_set.__wrapped__()


def test_emoji_source_splits_add_up(emoji_set: emoji.EmojiSet) -> None:
    sources = {split: EmojiSource(split) for split in ("train", "val", "test", "all")}
    assert len(sources["train"]) + len(sources["val"]) + len(sources["test"]) == len(sources["all"]) == 3655
    assert not set(sources["train"].concepts.tolist()) & set(sources["test"].concepts.tolist())
    test = sources["test"]
    assert isinstance(test, ImageTextSource)
    assert test.classnames == list(GROUPS)
    assert test.labels is not None and test.labels.shape == (len(test),)
    assert set(test.labels.tolist()) == set(range(len(GROUPS)))
    image = test.load_image(0)
    assert image.mode == "RGB" and image.size == (64, 64)
    assert np.array_equal(np.asarray(image), emoji_set.images[test.indices[0]])
    assert test.captions(0) == [str(test.names[0])]
    assert GROUPS[test.labels[0]] == test.groups[0]


def test_emoji_source_describe_and_errors() -> None:
    source = EmojiSource("all")
    assert source.describe(0) == "emoji U+1F600 (grinning face)"
    with pytest.raises(IndexError, match="out of range"):
        source.captions(len(source))
    with pytest.raises(ValueError, match="'validation'.*'train', 'val', 'test', 'all'"):
        EmojiSource("validation")
