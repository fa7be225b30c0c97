"""Peak tensor memory of a piece of work, on any device, the CPU included.

``torch.cuda.max_memory_allocated`` exists only for CUDA, and a process's resident set size on the CPU mixes
the allocator's caching and the Python heap into the figure. :class:`TensorMemoryTracker` counts what the
training step itself holds: every tensor storage created inside the context is added when an operator
returns it and subtracted when it is freed (a weak reference on the storage), and the peak of that running
sum is kept. Views share their base's storage and are counted once; tensors that existed before the context
(weights, existing gradients, the input batch) are not counted, nor are views of them. Memory allocated outside PyTorch's operators (inside a
fused kernel's workspace, the allocator's rounding) is not seen: it is a count of tensor bytes, the same on
every machine, which is what comparing memory *layouts* (plain vs GradCache vs chunked) needs.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["TensorMemoryTracker"]


class TensorMemoryTracker(TorchDispatchMode):
    """``with TensorMemoryTracker() as tracker: step()`` -> ``tracker.peak`` bytes (``tracker.current`` now).

    The autograd engine carries the mode into the backward pass, so the backward's tensors are counted too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._tracked: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> bytes; no reference kept

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        # an output that shares an input's storage (a view, an in-place result) allocated nothing, and that
        # storage may predate the context (a slice of a weight or of the input batch): it is not counted
        inputs = {id(leaf.untyped_storage()) for leaf in tree_leaves((args, kwargs)) if _is_real(leaf)}
        for leaf in tree_leaves(output):
            if _is_real(leaf):
                storage = leaf.untyped_storage()
                if id(storage) not in inputs:
                    self._track(storage)
        return output

    def _track(self, storage: torch.UntypedStorage) -> None:
        if storage in self._tracked:
            return
        size = storage.nbytes()
        self._tracked[storage] = size
        weakref.finalize(storage, self._release, size)
        self.current += size
        self.peak = max(self.peak, self.current)

    def _release(self, size: int) -> None:
        self.current -= size


def _is_real(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type != "meta"
