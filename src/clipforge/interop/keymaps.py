"""Explicit key maps between clipforge's parameter names and Hugging Face's / open_clip's, both ways (the Hugging
Face model types' maps are in :mod:`clipforge.interop.hf_types`).

A map is a list of :class:`Rule` s, one per clipforge tensor: its name, the tensor name(s) it comes from in the
other layout, and how they join. The rules are written out from the clipforge model config (which tensors the
model has), so a map covers exactly the model: :func:`convert` refuses a file with a tensor no rule reads, and a
rule whose tensor the file lacks; :func:`load_converted` then refuses any shape that differs. Nothing is renamed
by pattern, and no legacy name is ever copied onto the model.

Joins (the maths of each, other layout -> clipforge):

* ``copy``: the same tensor.
* ``qkv``: separate q, k, v projections (Hugging Face) stacked on dim 0 into the fused ``qkv`` Linear, [q; k; v]
  (``nn.MultiheadAttention``'s ``in_proj`` is already that layout, so open_clip's is a ``copy``).
* ``transpose``: a projection used as ``x @ P`` (open_clip's ``proj`` / ``text_projection``, (in, out)) becomes a
  Linear weight W = P^T (out, in), so ``W x`` = ``x @ P``.
* ``scalar``: a 0-dim tensor (CLIP's logit scale); ``vector1``: a (1,) tensor read as 0-dim (SigLIP's scale and
  bias; open_clip's ``nonscalar_logit_scale``).

Both Hugging Face and open_clip store the learned temperature as log t under the name ``logit_scale``; clipforge's
parameter holding that same log t is ``log_logit_scale``, so the rules rename it and copy the value unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from clipforge.config import CheckpointError

JOINS = ("copy", "qkv", "transpose", "scalar", "vector1")


@dataclass(frozen=True)
class Rule:
    """One clipforge tensor ``target`` and the tensor(s) ``sources`` of the other layout it is made of."""

    target: str
    sources: tuple[str, ...]
    join: str = "copy"

    def forward(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The other layout's tensors -> the clipforge tensor."""
        if self.join == "qkv":
            return torch.cat(tensors, dim=0)
        (tensor,) = tensors
        if self.join == "transpose":
            return tensor.t().contiguous()
        if self.join in ("scalar", "vector1"):
            if tensor.numel() != 1:
                raise CheckpointError(f"{self.sources[0]} has shape {tuple(tensor.shape)}; expected one number")
            return tensor.reshape(())
        return tensor

    def backward(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """The clipforge tensor -> the other layout's tensors (the inverse of :meth:`forward`)."""
        if self.join == "qkv":
            return [part.contiguous() for part in tensor.chunk(3, dim=0)]
        if self.join == "transpose":
            return [tensor.t().contiguous()]
        if self.join == "vector1":
            return [tensor.reshape(1)]
        return [tensor]


def copy_rules(target: str, source: str, names: Iterable[str] = ("weight", "bias")) -> list[Rule]:
    """``target.<name> <- source.<name>`` for each name (a Linear or LayerNorm: weight and bias; or every tensor
    name of a hosted module's state dict, which keeps its library's own names)."""
    return [Rule(f"{target}.{name}", (f"{source}.{name}",)) for name in names]


# ----------------------------------------------------------------------------------------------
# Transformer blocks
# ----------------------------------------------------------------------------------------------
def open_clip_block_rules(target: str, source: str) -> list[Rule]:
    """One block: open_clip / OpenAI ``resblocks.N`` ``source`` -> clipforge block ``target``."""
    rules = copy_rules(f"{target}.ln1", f"{source}.ln_1")
    rules.append(Rule(f"{target}.attn.qkv.weight", (f"{source}.attn.in_proj_weight",)))
    rules.append(Rule(f"{target}.attn.qkv.bias", (f"{source}.attn.in_proj_bias",)))
    rules += copy_rules(f"{target}.attn.out_proj", f"{source}.attn.out_proj")
    rules += copy_rules(f"{target}.ln2", f"{source}.ln_2")
    rules += copy_rules(f"{target}.mlp.fc1", f"{source}.mlp.c_fc")
    rules += copy_rules(f"{target}.mlp.fc2", f"{source}.mlp.c_proj")
    return rules


# ----------------------------------------------------------------------------------------------
# Applying a map
# ----------------------------------------------------------------------------------------------
def _first(keys: list[str], limit: int = 5) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{keys[:limit]}{more}"


def convert(
    state: dict[str, torch.Tensor], rules: list[Rule], ignored: Iterable[str], where: str
) -> dict[str, torch.Tensor]:
    """The clipforge state dict the ``rules`` make of ``state``, strictly.

    Every tensor of ``state`` must be read by a rule, except those named in ``ignored`` (buffers the other
    layout saves that are no weights: position ids, a causal mask); every rule's sources must be there.
    Raises CheckpointError naming the first unmatched keys; ``where`` names the file in it.
    """
    missing = [source for rule in rules for source in rule.sources if source not in state]
    used = {source for rule in rules for source in rule.sources} | set(ignored)
    unused = [key for key in state if key not in used]
    if missing or unused:
        problems = []
        if missing:
            problems.append(f"the weights lack {_first(missing)}, which the config's architecture needs")
        if unused:
            problems.append(f"the weights hold {_first(unused)}, which the config's architecture has no place for")
        raise CheckpointError(f"{where}: the config and the weights do not match: {'; '.join(problems)}")
    return {rule.target: rule.forward([state[source] for source in rule.sources]) for rule in rules}


def invert(state: dict[str, torch.Tensor], rules: list[Rule]) -> dict[str, torch.Tensor]:
    """The other layout's state dict of a clipforge ``state`` (every rule's target must be there)."""
    converted: dict[str, torch.Tensor] = {}
    for rule in rules:
        for source, tensor in zip(rule.sources, rule.backward(state[rule.target]), strict=True):
            converted[source] = tensor
    return converted
