"""CMD on a Dask cluster (DESIGN "Scale-out"): ingest into a sharded trajectory store, and the fit's
and the report's streaming passes as one task per group of column tiles, with only the per-parameter
results and small sums gathered by the client, which alone writes the mode file.

Dask is an optional extra (``pip install cmd-modes[dask]``), imported only when ``Engine.start`` runs.
``engine`` (the client side), ``tasks`` (what runs on a worker), ``ingest`` (the sharded store of a folder).
Names are imported from their modules on first use.
"""

from .._lazy import lazy_package

__all__ = ["Engine", "engine_for", "prepare_sharded_store"]

lazy_package(__name__, {".engine": ("Engine", "engine_for"), ".ingest": ("prepare_sharded_store",)})
