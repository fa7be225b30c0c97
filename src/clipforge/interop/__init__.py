"""Interoperability: import released weights (Hugging Face model types: ``hf_types``; open_clip ViTs) and hand clipforge models
to other stacks (Hugging Face, ONNX), every tensor through an explicit key map (``keymaps``).

``load`` is the one place a weights spec resolves (``resolve``, ``from_pretrained``, ``init_model`` for
``model.init``).
"""
