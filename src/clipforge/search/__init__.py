"""Use a trained model: embed images and captions into a folder, search it, serve it as a web page.

``embed.py`` (resumable embedding, by one process or many), ``plan.py`` (a run's layout in parts, the same for any
number of processes), ``store.py`` and ``meta.py`` (the embedding folder, its meta.json and write lock), ``exact.py``
(exact top-k), ``index.py`` (the ``Index`` API), ``ann_build.py`` and ``ann.py`` (an optional FAISS index: built
part by part; checked and searched), ``app.py`` (the web page's API), ``page.py`` (what it answers), ``bounds.py``
(its parameters and limits), ``metrics.py`` (its /metrics), ``server.py`` (its HTTP side).
The commands are in ``clipforge.commands`` (``embed``, ``search``, ``index``, ``serve``).
"""

from clipforge.search.exact import exact_search
from clipforge.search.index import Index, SearchHit

__all__ = ["Index", "SearchHit", "exact_search"]
