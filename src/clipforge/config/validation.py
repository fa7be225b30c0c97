"""Cross-field checks that the type system cannot express, run before anything else does."""

from __future__ import annotations

import math
import re

from clipforge.config.choices import WEIGHTS_SPEC_HELP
from clipforge.config.data_kinds import DATA_KINDS
from clipforge.config.errors import ConfigError
from clipforge.config.finetune_checks import validate_finetuning
from clipforge.config.schema import (
    BUILTIN_VIT_IMAGE_SIZE,
    EVAL_METRICS,
    Config,
    EvalConfig,
    EvalTaskConfig,
    ImageTowerConfig,
    TextTowerConfig,
)

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
# the largest image side a tower may ask for: 4096 px is beyond every released model's input (SigLIP's 512,
# EVA's 560), and keeps one preprocessed image under 200 MB
MAX_IMAGE_SIZE = 4096


def check_device_name(name: str, field: str = "train.device") -> str:
    """``name`` when it is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; ConfigError naming ``field`` otherwise (other
    backends - mps, xla/tpu, xpu - are not supported: their kernels and collectives are untested here)."""
    kind, _, index = str(name).partition(":")
    if kind in ("auto", "cpu") and not index or kind == "cuda" and (not index or index.isdigit()):
        return name
    raise ConfigError(f"{field}={str(name)[:40]!r} is not a device clipforge runs on; use {DEVICE_CHOICES}")


def validate(config: Config) -> None:
    """Cross-field checks that the type system cannot express, section by section."""
    _validate_run(config)
    config.data.validate("data")
    _validate_model(config)
    validate_finetuning(config)
    if config.loss.chunk_size is not None and config.loss.chunk_size <= 0:
        raise ConfigError(f"loss.chunk_size={config.loss.chunk_size} must be positive (or null for no chunking)")
    _validate_eval(config.eval)


def _validate_run(config: Config) -> None:
    """The train, optim and logging numbers: each one that would crash or mislead later is refused now."""
    train = config.train
    if train.steps <= 0:
        raise ConfigError(f"train.steps={train.steps} must be positive")
    check_device_name(train.device)
    if train.batch_size < 2:
        raise ConfigError(f"train.batch_size={train.batch_size}: a contrastive batch needs at least 2 pairs")
    if train.accumulation_steps < 1 or train.batch_size % train.accumulation_steps:
        raise ConfigError(
            f"train.batch_size={train.batch_size} must split evenly into "
            f"train.accumulation_steps={train.accumulation_steps} micro-batches"
        )
    # not x > 0 / not x >= 0 also refuse NaN
    if train.checkpoint_every <= 0:
        raise ConfigError(
            f"train.checkpoint_every={train.checkpoint_every} must be positive: last.pt is written every that many "
            "steps (and after the last one)"
        )
    if config.logging.log_every <= 0:
        raise ConfigError(
            f"logging.log_every={config.logging.log_every} must be positive: a record is logged every that many steps"
        )
    if not config.optim.lr > 0:
        raise ConfigError(f"optim.lr={config.optim.lr} must be positive, e.g. 5e-4")
    if not config.optim.weight_decay >= 0:
        raise ConfigError(f"optim.weight_decay={config.optim.weight_decay} must be >= 0 (0 = no weight decay)")
    if not train.grad_clip >= 0:
        raise ConfigError(
            f"train.grad_clip={train.grad_clip} must be >= 0: the largest gradient norm (0 = no clipping)"
        )
    if train.text_buckets < 1:
        raise ConfigError(
            f"train.text_buckets={train.text_buckets} must be >= 1: the length buckets of a text batch (1 = one batch)"
        )
    if train.keep_checkpoints < 0:
        raise ConfigError(
            f"train.keep_checkpoints={train.keep_checkpoints} must be >= 0: how many step_<N>.pt to keep beside "
            "last.pt (0 = none)"
        )


def _check_ranges(config: Config) -> None:
    """Every size, count and rate is in the range where it means something: a zero width or a negative
    dropout would otherwise build a model that trains nothing, or fail deep inside PyTorch."""
    model, image, text = config.model, config.model.image, config.model.text
    positive = {
        "model.embed_dim": model.embed_dim,
        "model.image.patch_size": image.patch_size,
        "model.image.width": image.width,
        "model.image.depth": image.depth,
        "model.image.heads": image.heads,
        "model.image.mlp_ratio": image.mlp_ratio,
        "model.image.norm_eps": image.norm_eps,
        "model.text.width": text.width,
        "model.text.depth": text.depth,
        "model.text.heads": text.heads,
        "model.text.mlp_ratio": text.mlp_ratio,
        "model.text.norm_eps": text.norm_eps,
        "model.text.context_length": text.context_length,
        "model.text.tokenizer.vocab_size": text.tokenizer.vocab_size,
        "optim.eps": config.optim.eps,
        "eval.batch_size": config.eval.batch_size,
    }
    if text.vocab_size is not None:
        positive["model.text.vocab_size"] = text.vocab_size
    for key, value in positive.items():
        if not value > 0:  # also refuses NaN
            raise ConfigError(f"{key}={value} must be positive")
    fractions = {
        "model.image.head_dropout": image.head_dropout,
        "model.text.head_dropout": text.head_dropout,
        "optim.beta1": config.optim.beta1,
        "optim.beta2": config.optim.beta2,
    }
    for key, value in fractions.items():
        if not 0 <= value < 1:
            raise ConfigError(f"{key}={value} must lie in [0, 1)")
    if not 0 <= config.schedule.min_lr_ratio <= 1:
        raise ConfigError(f"schedule.min_lr_ratio={config.schedule.min_lr_ratio} must lie in [0, 1]")
    if config.schedule.warmup_steps < 0:
        raise ConfigError(f"schedule.warmup_steps={config.schedule.warmup_steps} must be >= 0")
    for key, value in {"optim.lr": config.optim.lr, "model.image.lr_scale": image.lr_scale}.items():
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value} must be a finite number")


def _validate_model(config: Config) -> None:
    """The towers' shapes, weights, layouts, locks and heads, and ``model.init``."""
    _check_ranges(config)
    image = config.model.image
    if image.kind in ("torchvision", "timm") and not image.name:
        raise ConfigError(f"model.image.kind={image.kind!r} needs model.image.name, e.g. resnet18")
    for where, tower in (("model.image", image), ("model.text", config.model.text)):
        if tower.kind == "open_clip" and not tower.open_clip:
            raise ConfigError(
                f"{where}.kind='open_clip' hosts an open_clip tower, built from {where}.open_clip (its JSON, which an "
                "import writes): import the model with clipforge import open_clip:NAME --out model.pt"
            )
    if image.image_size is not None and image.image_size < 1:
        raise ConfigError(f"model.image.image_size={image.image_size} must be positive (or null: the tower's own)")
    _validate_naflex(image)
    if image.kind in ("vit", "naflex"):
        if (image.image_size or BUILTIN_VIT_IMAGE_SIZE) % image.patch_size:
            raise ConfigError(
                f"model.image.image_size={image.image_size or BUILTIN_VIT_IMAGE_SIZE} must be a multiple of "
                f"model.image.patch_size={image.patch_size}"
            )
        if image.width % image.heads:
            raise ConfigError(f"model.image.width={image.width} must be divisible by model.image.heads={image.heads}")
    if bool(image.mean) != bool(image.std) or len(image.mean) not in (0, 3) or len(image.std) not in (0, 3):
        raise ConfigError("model.image.mean and model.image.std must both be empty or both hold 3 numbers")
    if image.image_size is not None and not 1 <= image.image_size <= MAX_IMAGE_SIZE:
        raise ConfigError(f"model.image.image_size={image.image_size} must lie in [1, {MAX_IMAGE_SIZE}]")
    if image.resize_size is not None:
        if image.resize_mode == "squash":
            raise ConfigError(
                "model.image.resize_size is the short side before a center crop; resize_mode='squash' resizes the "
                "whole image to image_size: remove resize_size, or use resize_mode='shortest'"
            )
        smallest = image.image_size or 1
        if not smallest <= image.resize_size <= MAX_IMAGE_SIZE:
            raise ConfigError(
                f"model.image.resize_size={image.resize_size} must lie in [{smallest}, {MAX_IMAGE_SIZE}]: the short "
                "side before the center crop, at least the crop (image_size)"
            )
    text = config.model.text
    _validate_text_weights(text)
    if text.kind == "transformer":
        if text.width % text.heads:
            raise ConfigError(f"model.text.width={text.width} must be divisible by model.text.heads={text.heads}")
        if text.tokenizer.kind == "hf" and not text.tokenizer.name:
            raise ConfigError(
                "model.text.tokenizer.kind='hf' with the built-in text tower needs model.text.tokenizer.name"
            )
    _validate_text_layout(text)
    for where, tower in (("model.image", image), ("model.text", text)):
        _validate_lock(tower, where)
        _validate_head(tower, where)
    _validate_init(config.model.init)


def _validate_naflex(image: ImageTowerConfig) -> None:
    """The NaFlex tower and its resize go together, with a patch budget."""
    if (image.kind == "naflex") != (image.resize_mode == "naflex"):
        raise ConfigError(
            f"model.image.kind={image.kind!r} with resize_mode={image.resize_mode!r}: the NaFlex resize (variable "
            "resolution, packed patches) is for the NaFlex tower only, and that tower needs it; set both to naflex "
            "or neither"
        )
    if image.kind == "naflex" and not (image.max_num_patches or 0) >= 1:
        raise ConfigError(
            f"model.image.max_num_patches={image.max_num_patches}: the NaFlex tower needs a positive patch budget "
            "(256 for SigLIP 2's NaFlex models)"
        )
    if image.kind == "naflex" and image.max_num_patches * image.patch_size**2 > MAX_IMAGE_SIZE**2:
        raise ConfigError(
            f"model.image.max_num_patches={image.max_num_patches} patches of {image.patch_size} px hold more pixels "
            f"than a {MAX_IMAGE_SIZE} x {MAX_IMAGE_SIZE} image; lower it"
        )


def _validate_text_weights(text: TextTowerConfig) -> None:
    """The text tower's ``name``/``pretrained`` pair, and a tokenizer whose ids its weights understand."""
    if text.kind == "hf" and not text.name:
        raise ConfigError("model.text.kind='hf' needs model.text.name: a Hugging Face model id or local folder")
    if text.kind == "transformer" and isinstance(text.pretrained, str):
        raise ConfigError(
            f"model.text.pretrained={text.pretrained!r}: the built-in text transformer has no pretrained weights; "
            "leave it unset (load trained weights through a clipforge checkpoint) or use model.text.kind=hf"
        )
    if text.kind == "hf" and text.tokenizer.kind == "bpe" and text.weights_location() is not None:
        raise ConfigError(
            f"model.text.kind='hf' loads the pretrained weights of {text.weights_location()!r}, whose embeddings "
            "know only their own tokenizer's ids, but model.text.tokenizer.kind='bpe' (the default) would train a "
            "new vocabulary whose ids mean nothing to them: set model.text.tokenizer.kind=hf (the tower's own "
            "tokenizer), or model.text.pretrained=false to train the tower from random weights"
        )


def _validate_text_layout(text: TextTowerConfig) -> None:
    """The built-in text tower's pooling, attention and embedding settings, which depend on each other."""
    if text.pooling == "eos" and text.eos_token_id is None:
        raise ConfigError(
            "model.text.pooling='eos' needs model.text.eos_token_id: the tokenizer's end-of-text id it pools at"
        )
    if text.kind == "transformer" and not text.causal and text.tokenizer.padding != "max_length":
        raise ConfigError(
            "model.text.causal=false attends over the padding too, so a caption must always get the same padding: "
            "set model.text.tokenizer.padding=max_length (every caption padded to model.text.context_length)"
        )
    if text.vocab_size is not None and text.vocab_size < 1:
        raise ConfigError(f"model.text.vocab_size={text.vocab_size} must be positive (or null: the tokenizer's size)")


def _validate_head(tower: ImageTowerConfig | TextTowerConfig, where: str) -> None:
    if tower.head_bias and tower.head != "linear":
        raise ConfigError(f"{where}.head_bias=true needs {where}.head='linear' (it is {tower.head!r})")
    if not tower.norm_eps > 0:
        raise ConfigError(f"{where}.norm_eps={tower.norm_eps} must be positive, e.g. 1e-5")


def _validate_init(init: str) -> None:
    """The form of ``model.init`` only: the files it names are read when training starts."""
    if init in ("hf:", "open_clip:") or init != init.strip():
        raise ConfigError(f"model.init={init!r} is not a weights spec; use {WEIGHTS_SPEC_HELP}")


LOCK_PATTERN = re.compile(r"all-but-last-(\d+)")


def _validate_lock(tower: ImageTowerConfig | TextTowerConfig, where: str) -> None:
    if isinstance(tower.lock, str) and not LOCK_PATTERN.fullmatch(tower.lock):
        raise ConfigError(
            f"{where}.lock={tower.lock!r} is not a lock; use true, false or 'all-but-last-N' (e.g. 'all-but-last-2')"
        )
    if tower.lr_scale <= 0:
        raise ConfigError(f"{where}.lr_scale={tower.lr_scale} must be positive; lock the tower to stop its training")
    if not 0 < tower.layer_decay <= 1:
        raise ConfigError(f"{where}.layer_decay={tower.layer_decay} must lie in (0, 1] (1 = no layer-wise decay)")


def _check_eval_data(task: EvalTaskConfig, where: str) -> None:
    """What the task asks of its data's kind: an index to visit every image once, and labels for zero-shot."""
    data = task.data
    if not data.capabilities.evaluable:
        # the kinds to suggest: those evaluation can index (a mix is refused above)
        indexed = [kind for kind, cls in DATA_KINDS.items() if cls.capabilities.evaluable and kind != "mix"]
        raise ConfigError(
            f"{where}.data.kind={data.kind!r} cannot be evaluated; evaluate on a source evaluation can index "
            f"({', '.join(indexed)})"
        )
    if task.task == "zeroshot" and not data.capabilities.labels:
        raise ConfigError(
            f"{where}.task='zeroshot' needs class labels, and {where}.data.kind={data.kind!r} has none; use a "
            "labelled source (a manifest with a label column, imagefolder, idx, cifar ...) or task retrieval"
        )


def _validate_eval(evaluation: EvalConfig) -> None:
    if evaluation.every < 0:
        raise ConfigError(f"eval.every={evaluation.every} must be >= 0 (0 = evaluate only at the end)")
    if evaluation.batch_size < 1:
        raise ConfigError(f"eval.batch_size={evaluation.batch_size} must be positive")
    tasks: dict[str, EvalTaskConfig] = {}
    for position, task in enumerate(evaluation.tasks):
        where = f"eval.tasks[{position}]"
        if not task.name or "/" in task.name:
            raise ConfigError(
                f"{where}.name={task.name!r}: give every evaluation a name without '/'; "
                "its metrics are logged as '<name>/<metric>'"
            )
        if task.name in tasks:
            raise ConfigError(f"{where}.name={task.name!r} is used by another task; task names must be unique")
        tasks[task.name] = task
        if task.data.kind == "mix":
            raise ConfigError(
                f"{where}.data.kind='mix': a mix samples sources for training; evaluate each source as its own task"
            )
        task.data.validate(f"{where}.data")
        _check_eval_data(task, where)
        if task.task == "retrieval" and task.classnames:
            raise ConfigError(f"{where}.classnames is only used by zero-shot tasks; this one is task=retrieval")
    if (evaluation.every or evaluation.best_metric) and not tasks:
        raise ConfigError("eval.every / eval.best_metric are set but eval.tasks is empty: list what to evaluate")
    if evaluation.best_metric:
        name, slash, metric = evaluation.best_metric.partition("/")
        if not slash:
            raise ConfigError(
                f"eval.best_metric={evaluation.best_metric!r} must look like '<task name>/<metric>', "
                f"e.g. {next(iter(tasks))}/{EVAL_METRICS[next(iter(tasks.values())).task][0]}"
            )
        if name not in tasks:
            raise ConfigError(
                f"eval.best_metric={evaluation.best_metric!r} names the task {name!r}, but eval.tasks has {list(tasks)}"
            )
        allowed = EVAL_METRICS[tasks[name].task]
        if metric not in allowed:
            raise ConfigError(
                f"eval.best_metric={evaluation.best_metric!r}: a {tasks[name].task} task reports {list(allowed)}"
            )
        if metric.endswith("_rank") and evaluation.best_mode == "max":
            raise ConfigError(
                f"eval.best_metric={evaluation.best_metric!r} is a rank (lower is better); set eval.best_mode=min"
            )
