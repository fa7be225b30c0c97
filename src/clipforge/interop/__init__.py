"""Interoperability: hand clipforge models to other stacks (ONNX) and, in later modules, import theirs."""
