"""Weight-space interpolation of two models of one architecture (WiSE-FT, Wortsman et al. 2022).

For a model A (say, the imported or zero-shot model) and its fine-tune B, the model at ``alpha`` has the weights

    theta(alpha) = (1 - alpha) * theta_A + alpha * theta_B

for every floating-point tensor (parameters and BatchNorm statistics; the temperature on its log); integer buffers
(BatchNorm's step counts, position ids) are B's, and a tensor equal at both ends (a locked tower) is kept as it is. ``alpha = 0`` gives A's tensors exactly, ``alpha = 1`` B's
(``1 * x + 0 * y = x`` in floating point). Fine-tuning moves far less than the distance between two independent
trainings, so the two ends lie in one basin and the path between them keeps A's zero-shot skill while it takes B's
gain on the target (the paper's finding; ``benchmarks/finetune_retention.py`` measures it here).

The models come from :func:`clipforge.interop.load.resolve` (any weights spec; a moving average with ``ema``; LoRA
adapters folded in), so a LoRA fine-tune merges with the plain model it adapted. Two models are compatible when
their architectures (the model section, leaving out how each trained: locks, learning-rate scales, adapters, where
the weights came from), their tensors' names and shapes, their image preprocessing and their tokenization agree;
anything else is refused with one message naming what differs.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch

from clipforge.checkpoint import Checkpoint, save_checkpoint
from clipforge.config import CheckpointError, ModelConfig, config_to_dict
from clipforge.interop.load import TRAINING_FIELDS, UNCHECKED_FIELDS
from clipforge.interop.resolved import Resolved
from clipforge.model.pretrained import state_dict_problems

# texts both tokenizers must split into the same ids (letters, digits, punctuation, a long word, an emoji name)
TOKENIZER_PROBES = (
    "a photo of a dog.",
    "an emoji of grinning face with big eyes",
    "flag: Paraguay, 1999 (v2)!",
    "T-shirt/top",
    "antidisestablishmentarianism",
)


def _architecture(model: ModelConfig) -> dict[str, Any]:
    """The model section as plain values, without the fields that say how a model trained (not what it is)."""
    values = config_to_dict(model)
    values.pop("init", None)
    for side in ("image", "text"):
        for name in (*TRAINING_FIELDS, *UNCHECKED_FIELDS):
            values[side].pop(name, None)
    return values


def _differences(first: Any, second: Any, where: str) -> list[str]:
    if isinstance(first, dict) and isinstance(second, dict):
        found = []
        for key in sorted(set(first) | set(second)):
            found += _differences(first.get(key), second.get(key), f"{where}.{key}")
        return found
    return [] if first == second else [f"{where}: {first!r} vs {second!r}"]


def incompatibilities(first: Resolved, second: Resolved) -> list[str]:
    """What keeps ``first`` and ``second`` from being interpolated (module docstring), as phrases; empty if none."""
    problems = _differences(_architecture(first.config.model), _architecture(second.config.model), "model")[:3]
    problems += state_dict_problems(first.weights, second.weights, names=("--from", "--to"))
    dtypes = [
        key
        for key, value in first.weights.items()
        if key in second.weights and value.dtype != second.weights[key].dtype
    ]
    problems += [f"tensor types differ at {dtypes[0]}"] if dtypes else []
    if first.processor.preprocess != second.processor.preprocess:
        problems.append(f"image preprocessing: {first.processor.preprocess} vs {second.processor.preprocess}")
    if first.processor.context_length != second.processor.context_length:
        problems.append(f"context length: {first.processor.context_length} vs {second.processor.context_length}")
    length = min(first.processor.context_length, second.processor.context_length)
    if (
        first.processor.tokenizer(list(TOKENIZER_PROBES), length)[0].tolist()
        != second.processor.tokenizer(list(TOKENIZER_PROBES), length)[0].tolist()
    ):
        problems.append("their tokenizers give different ids (another vocabulary)")
    return problems


def check_compatible(first: Resolved, second: Resolved) -> None:
    """CheckpointError naming what differs when ``first`` and ``second`` are not two weights of one model."""
    problems = incompatibilities(first, second)
    if problems:
        raise CheckpointError(
            f"--from {first.source} and --to {second.source} are not weights of one architecture, so they cannot be "
            f"interpolated ({'; '.join(problems)}); merge a model with a fine-tune of it (e.g. model.init's weights "
            "and the run's last.pt)"
        )


@torch.no_grad()
def interpolate(first: Resolved, second: Resolved, alpha: float) -> Resolved:
    """The model at ``alpha`` on the path from ``first`` (0) to ``second`` (1) (module docstring), with ``second``'s
    config, processor and Hugging Face text config; checked with :func:`check_compatible` first."""
    check_compatible(first, second)
    weights = {}
    for key, end in second.weights.items():
        start = first.weights[key]
        if not end.is_floating_point() or torch.equal(start, end):
            # integer buffers are the fine-tune's; a tensor equal at both ends (a locked tower) stays exactly itself,
            # which (1 - alpha) x + alpha x would not always be in floating point
            weights[key] = end.clone()
        else:
            weights[key] = (1 - alpha) * start + alpha * end
    return dataclasses.replace(
        second,
        config=copy.deepcopy(second.config),
        weights=weights,
        source=f"{second.source} at alpha={alpha:g} from {first.source}",
        imported_from=f"merge: (1 - {alpha:g}) * {first.source} + {alpha:g} * {second.source}",
    )


def save_merged(merged: Resolved, path: str | Path) -> Path:
    """Write ``merged`` as an ordinary checkpoint (no training state: a new run starts from it with ``model.init``);
    ``imported_from`` records the merge."""
    checkpoint = Checkpoint(
        merged.config,
        merged.processor,
        {key: value.detach().cpu().contiguous() for key, value in merged.weights.items()},
        step=merged.step,
        hf_text_config=merged.hf_text_config,
        imported_from=merged.imported_from,
    )
    return save_checkpoint(path, checkpoint)


def parse_alphas(spec: str) -> list[float]:
    """``"0.5"`` -> [0.5]; ``"START:STOP:STEP"`` -> START, START + STEP, ... up to STOP included (``"0:1:0.25"`` ->
    [0, 0.25, 0.5, 0.75, 1]); every value must lie in [0, 1]. ValueError saying what is wrong."""
    parts = spec.split(":")
    try:
        numbers = [float(part) for part in parts]
    except ValueError:
        raise ValueError(f"--alpha {spec!r}: give a number (0.5) or START:STOP:STEP (0:1:0.1)") from None
    if len(numbers) == 1:
        alphas = numbers
    elif len(numbers) == 3:
        start, stop, step = numbers
        if not step > 0 or stop < start:
            raise ValueError(f"--alpha {spec!r}: STEP must be positive and STOP >= START (e.g. 0:1:0.1)")
        count = int((stop - start) / step + 1e-9) + 1
        if count > 1001:
            raise ValueError(f"--alpha {spec!r} asks for {count} models; use a larger STEP (at most 1001 points)")
        alphas = [round(start + index * step, 10) for index in range(count)]
    else:
        raise ValueError(f"--alpha {spec!r}: give a number (0.5) or START:STOP:STEP (0:1:0.1)")
    outside = [alpha for alpha in alphas if not 0 <= alpha <= 1]
    if outside:
        raise ValueError(f"--alpha {spec!r}: {outside[0]:g} lies outside [0, 1] (0 = --from, 1 = --to)")
    return alphas
