"""Search over decoded features: index build, hybrid ranking. See README.md in this folder."""

from streamtune.search.index import SearchError, build_index, default_index_url
from streamtune.search.rank import Hit, Index, open_index

__all__ = ["Hit", "Index", "SearchError", "build_index", "default_index_url", "open_index"]
