"""Use a trained model: embed images and captions into a folder, search it, serve it as a web page.

``embed.py`` (resumable embedding), ``store.py`` (the embedding folder and its write lock), ``exact.py``
(exact top-k), ``index.py`` (the ``Index`` API), ``ann.py`` (optional FAISS index), ``app.py`` (the web page).
The commands are in ``clipforge.commands`` (``embed``, ``search``, ``index``, ``serve``).
"""

from clipforge.search.exact import exact_search
from clipforge.search.index import Index, SearchHit

__all__ = ["Index", "SearchHit", "exact_search"]
