"""open_clip interoperability: every family of open_clip's model registry imports, and exports back.

* :mod:`~clipforge.interop.open_clip.source`: the spec forms (``open_clip:NAME``, ``NAME:WEIGHTS``, ``NAME:TAG``,
  ``CONFIG.json:WEIGHTS``, ``local-dir:FOLDER``, ``hf-hub:ORG/REPO``) and where each finds its files;
* :mod:`~clipforge.interop.open_clip.architecture`: the model config -> clipforge's config, each tower converted into a
  built-in tower where one expresses it, else hosted (``clipforge.model.hosted_open_clip``), and the preprocessing;
* :mod:`~clipforge.interop.open_clip.keys`: the state-dict key map, both ways;
* :mod:`~clipforge.interop.open_clip.tokenizer`: open_clip's tokenizer kinds with the same ids;
* :mod:`~clipforge.interop.open_clip.importer`: the import (``interop.load.SOURCES`` calls it);
* :mod:`~clipforge.interop.open_clip.export`: a clipforge model as an open_clip model folder.
"""

from clipforge.interop.open_clip.importer import import_open_clip, import_open_clip_spec
from clipforge.interop.open_clip.source import SPEC_PREFIX

__all__ = ["SPEC_PREFIX", "import_open_clip", "import_open_clip_spec"]
