"""Interoperability: import released weights (Hugging Face CLIP/SigLIP, open_clip ViTs) and hand clipforge models
to other stacks (Hugging Face, ONNX), every tensor through an explicit key map (``keymaps``).

``from_pretrained(spec)`` and ``init_model(config)`` (``model.init``: the trainer's hook) live in ``load``.
"""

from clipforge.interop.load import InitialModel, from_pretrained, init_model

__all__ = ["InitialModel", "from_pretrained", "init_model"]
