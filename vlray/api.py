"""The Python API: ``vlray.embed`` on a Ray Dataset, ``vlray.open_index`` for queries.

``embed`` runs the job's own stages (decode actors, batched preprocessing, encoder, the same
resource plan) on a dataset the caller built, and returns a lazy ``ray.data.Dataset`` of rows
instead of writing files: compose it further, ``write_parquet`` it, or iterate it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vlray.config import JobConfig, S3Config, build_config
from vlray.query import QueryError, Searcher

OUTPUT_COLUMNS = ("id", "embedding", "width", "height", "error")
"""Columns of ``embed``'s rows, before the kept ones."""


def _settings(model: str, settings: dict[str, Any]) -> JobConfig:
    """A job config from ``embed``'s arguments: ``section={...}`` or ``"section.key"=value``."""
    tree: dict[str, Any] = {"model": {"name": model}, "input": {"uri": "<ray dataset>"}}
    for key, value in settings.items():
        section, _, name = key.partition(".")
        if name:
            tree.setdefault(section, {})[name] = value
        elif isinstance(value, dict):
            tree.setdefault(section, {}).update(value)
        else:
            tree.setdefault("input", {})[key] = value  # image_column=..., id_column=...
    return build_config(None, tree)


def embed(ds: Any, model: str, **settings: Any) -> Any:
    """Embeds the images of a Ray Dataset with the job's stages; nothing is written.

    Args:
        ds: a ``ray.data.Dataset`` with an id column (strings or integers) and an image column:
            encoded bytes, a ``{bytes, path}`` struct (Hugging Face ``datasets``), or paths /
            URIs (local, ``s3://``).
        model: a hub id or a local ``save_pretrained`` folder (any family with embeddings).
        **settings: job settings, by section (``compute={"encode_batch_size": 64}``) or dotted
            (``**{"model.dtype": "bfloat16"}``); input keys directly: ``image_column``,
            ``id_column``, ``keep_columns`` (columns copied to the output, typed as in ``ds``),
            ``max_pixels``, ``decode``.

    Returns:
        A lazy ``ray.data.Dataset``, one row per input row: ``id`` (string), ``embedding``
        (fixed_size_list<float32>[D], unit norm; null on error rows), ``width`` and ``height``
        (int32, the original image's after EXIF orientation), ``error`` ('' when embedded, else
        one line), then the kept columns. Rows come in no particular order.

    Raises:
        vlray.config.ConfigError: bad settings, all listed.
        vlray.families.CheckpointError: the model cannot be loaded, or makes no embeddings.
        vlray.pipeline.sources.InputError: ``ds`` lacks the id or image column.
    """
    import ray

    from vlray.families import CheckpointError, family_for
    from vlray.pipeline.files import DatasetRowsStage, output_rows
    from vlray.pipeline.job import build_dataset, resolve_model
    from vlray.pipeline.resources import plan_resources, task_stage
    from vlray.pipeline.sources import InputError

    config = _settings(model, settings)
    checkpoint = resolve_model(config)
    family = family_for(checkpoint)
    if not family.produces_embeddings:
        raise CheckpointError(f"{model}: a {family.name} model makes masks, not embeddings")
    kept = tuple(config.input.keep_columns or ())
    schema = ds.schema()
    names = list(schema.names) if schema is not None else []
    missing = [
        c for c in (config.input.id_column, config.input.image_column, *kept) if c not in names
    ]
    if schema is not None and missing:
        raise InputError(
            f"no column {missing[0]!r} in the dataset (columns: {', '.join(names)}); pass "
            "id_column=, image_column= or keep_columns= naming its columns"
        )
    if not ray.is_initialized():
        ray.init()
    stages = plan_resources(
        config.compute, _cluster_for_stages(), 1, checkpoint.vision_bytes(), fusable=True
    )
    rows = ds.map_batches(
        DatasetRowsStage(config.input, kept),
        batch_size=config.input.rows_per_block,
        batch_format="pyarrow",
        **task_stage(stages.io_cpus),
    )
    encoded = build_dataset(config, None, checkpoint, None, stages, family.embedding_dim, rows=rows)
    return encoded.map_batches(
        output_rows,
        fn_kwargs={"dim": family.embedding_dim},
        batch_format="numpy",
        **task_stage(stages.io_cpus),
    )


USER_CPUS = 8
"""``embed`` leaves one CPU in this many (at least one) to the stages of the caller's dataset."""


def _cluster_for_stages() -> dict[str, float]:
    """The cluster's resources less the CPUs left to the caller's own read stages: Ray Data
    read tasks reserve a whole CPU each, and actor pools holding every CPU starve them (the
    pipeline hangs with idle CPUs, FIELD-NOTES)."""
    import ray

    cluster = dict(ray.cluster_resources())
    cpus = float(cluster.get("CPU", 1.0))
    cluster["CPU"] = max(1.0, cpus - max(1.0, cpus // USER_CPUS))
    return cluster


class Index:
    """A vlray index opened for queries; every method returns hits, best first: dicts with
    ``id``, ``score`` (cosine), ``probability`` (SigLIP text queries) and ``metadata`` (the
    kept columns, when the job kept some)."""

    def __init__(self, searcher: Searcher) -> None:
        self.searcher = searcher

    @property
    def manifest(self) -> dict[str, Any]:
        """The index manifest (model, family, dim, count, factory, weights, ...)."""
        return self.searcher.manifest

    def text(self, query: str, k: int = 10) -> list[dict[str, Any]]:
        """Neighbours of a text (families with a text tower)."""
        return self.searcher.by_text(query, k)

    def image(self, uri: str, k: int = 10) -> list[dict[str, Any]]:
        """Neighbours of an image file or URI, preprocessed as the job does."""
        return self.searcher.by_image(uri, k)

    def id(self, item_id: str, k: int = 10) -> list[dict[str, Any]]:
        """Neighbours of an indexed item, by its stored vector (itself first)."""
        return self.searcher.by_id(item_id, k)

    def vector(self, vector: Any, k: int = 10) -> list[dict[str, Any]]:
        """Neighbours of a raw vector of the index's dimension (normalized here)."""
        v = np.asarray(vector, dtype=np.float32).reshape(-1)
        dim = int(self.manifest.get("dim", v.size))
        if v.size != dim or not np.isfinite(v).all() or not np.linalg.norm(v):
            raise QueryError(f"a query vector needs {dim} finite values, not all zero")
        hits = self.searcher.index.search((v / np.linalg.norm(v)).reshape(1, -1), k)[0]
        out = [{"id": hit_id, "score": float(score)} for hit_id, score in hits]
        return self.searcher.metadata.attach(out) if self.searcher.metadata else out


def open_index(uri: str, model: str | None = None, s3: S3Config | None = None) -> Index:
    """Opens the index at ``uri`` (``OUT/index``, local or ``s3://``).

    Args:
        uri: the index folder a job wrote.
        model: where to load the weights from instead of the recorded place (same weights).
        s3: S3 settings (default: the AWS environment).

    Raises:
        vlray.query.QueryError: not an index, or unreadable.
    """
    return Index(Searcher.open(uri, s3, model))
