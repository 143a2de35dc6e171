"""Ray Data stages: thin adapters from Arrow / NumPy batches to the pure code in vlray.

Each stage turns per-row problems into ``error`` / ``stage`` values and passes them on, so a bad
image never raises across a stage boundary and every input row reaches the writer exactly once.
"""

from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from vlray.config import InputConfig, S3Config
from vlray.families import Checkpoint, UnsupportedImage, family_for
from vlray.ops.decode import DecodeError, decode_image, probe_image
from vlray.ops.resize import resize_uint8
from vlray.pipeline.sources import ReadTask, read_task_rows
from vlray.schema import ERRORS_SCHEMA, embeddings_schema
from vlray.storage import Location, fetch_bytes, scrub, write_parquet_atomic

logger = logging.getLogger(__name__)


def one_line(exc: BaseException) -> str:
    """An exception as one short line, without a stack."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


class ReadStage:
    """Read tasks (one Parquet row group or a chunk of files) -> rows in ``ROW_SCHEMA``."""

    def __init__(self, root: Location, config: InputConfig) -> None:
        self.root, self.config = root, config

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        for task in batch["task"]:
            yield from read_task_rows(
                task if isinstance(task, ReadTask) else ReadTask(**task), self.root, self.config
            )


class DecodeStage:
    """Fetch, probe, decode and uint8-resize each image to its family's target shape.

    Output rows are sorted by target shape so encoder batches split into few same-shape groups.
    """

    def __init__(self, checkpoint: Checkpoint, max_pixels: int, s3: S3Config) -> None:
        torch.set_num_threads(1)
        self.family = family_for(checkpoint)
        self.max_pixels = max_pixels
        self.s3 = s3
        self._pool: ThreadPoolExecutor | None = None

    def _fetch(self, uri: str) -> bytes | str:
        """The bytes at ``uri`` (transient errors retried), or a one-line reason (no secrets)."""
        try:
            return fetch_bytes(uri, self.s3)
        except FileNotFoundError:
            return f"missing file or object: {scrub(uri, self.s3)}"
        except PermissionError:
            return f"access denied: {scrub(uri, self.s3)}"
        except OSError as exc:
            return f"cannot read: {scrub(one_line(exc), self.s3)}"

    def _fetch_all(self, uris: list[str]) -> list[bytes | str]:
        """Fetches a batch's URIs concurrently, at most ``s3.fetch_concurrency`` in flight."""
        if len(uris) <= 1 or self.s3.fetch_concurrency <= 1:
            return [self._fetch(u) for u in uris]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.s3.fetch_concurrency, "vlray-fetch")
        return list(self._pool.map(self._fetch, uris))

    def _one(self, data: bytes | None, uri: str) -> tuple[int, int, int, int, bytes, str, str]:
        if data is None:
            fetched = self._fetch(uri)
            if isinstance(fetched, str):
                return 0, 0, 0, 0, b"", fetched, "read"
            data = fetched
        try:
            width, height = probe_image(data, self.max_pixels)
            pixels = decode_image(data, max_pixels=self.max_pixels)
        except DecodeError as exc:
            return 0, 0, 0, 0, b"", one_line(exc), "decode"
        try:
            th, tw = self.family.target_size(height, width)
            resized = resize_uint8(pixels, (th, tw), self.family.interpolation)
        except (UnsupportedImage, ValueError, RuntimeError) as exc:
            return width, height, 0, 0, b"", one_line(exc), "preprocess"
        return width, height, th, tw, resized.tobytes(), "", ""

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        n = batch.num_rows
        data = batch.column("data").to_pylist()
        uris = batch.column("uri").to_pylist()
        errors = batch.column("error").to_pylist()
        stages = batch.column("stage").to_pylist()
        todo = [i for i in range(n) if not errors[i] and data[i] is None]
        for i, fetched in zip(todo, self._fetch_all([uris[i] for i in todo]), strict=True):
            if isinstance(fetched, str):
                errors[i], stages[i] = fetched, "read"
            else:
                data[i] = fetched
        cols: dict[str, list] = {k: [] for k in ("width", "height", "th", "tw", "pixels")}
        for i in range(n):
            if errors[i]:
                result = (0, 0, 0, 0, b"", errors[i], stages[i])
            else:
                result = self._one(data[i], uris[i])
            for key, value in zip(
                ("width", "height", "th", "tw", "pixels"), result[:5], strict=True
            ):
                cols[key].append(value)
            errors[i], stages[i] = result[5], result[6]
        out = pa.table(
            {
                "id": batch.column("id"),
                "source": batch.column("source"),
                "width": pa.array(cols["width"], pa.int32()),
                "height": pa.array(cols["height"], pa.int32()),
                "th": pa.array(cols["th"], pa.int32()),
                "tw": pa.array(cols["tw"], pa.int32()),
                "pixels": pa.array(cols["pixels"], pa.binary()),
                "error": pa.array(errors, pa.string()),
                "stage": pa.array(stages, pa.string()),
                "decode_s": pa.array(np.full(n, (time.perf_counter() - start) / max(n, 1))),
            }
        )
        return out.sort_by([("th", "ascending"), ("tw", "ascending")])


class EncodeStage:
    """Group a batch by target shape; per group: batched preprocessing + one forward.

    Groups are capped at ``max_group_size`` rows. Each row carries the size of its group and of
    its batch, from which the summary derives groups per batch and mean group size.
    """

    def __init__(
        self, checkpoint: Checkpoint, device: str, dtype: str, max_group_size: int, threads: int
    ) -> None:
        if threads > 0:
            torch.set_num_threads(threads)
        self.family = family_for(checkpoint)
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.encoder = self.family.load_encoder(self.device, self.dtype)
        self.max_group_size = max_group_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        n = len(batch["id"])
        errors = batch["error"].astype(object)
        stages = batch["stage"].astype(object)
        embeddings = np.zeros((n, self.encoder.dim), dtype=np.float32)
        group_size = np.zeros(n, dtype=np.int32)
        ok = np.flatnonzero(errors == "")
        keys = batch["th"][ok].astype(np.int64) * 1_000_000 + batch["tw"][ok]
        for key in np.unique(keys):
            rows = ok[keys == key]
            th, tw = divmod(int(key), 1_000_000)
            for s in range(0, len(rows), self.max_group_size):
                group = rows[s : s + self.max_group_size]
                try:
                    pixels = np.stack(
                        [
                            np.frombuffer(batch["pixels"][i], np.uint8).reshape(th, tw, 3)
                            for i in group
                        ]
                    )
                    images = torch.from_numpy(pixels).permute(0, 3, 1, 2)
                    inputs = self.family.preprocess(images)
                except Exception as exc:  # a bad group must not lose the batch
                    errors[group], stages[group] = one_line(exc), "preprocess"
                    continue
                try:
                    embeddings[group] = self.encoder.encode(inputs).numpy()
                    group_size[group] = len(group)
                except torch.cuda.OutOfMemoryError:
                    raise
                except Exception as exc:
                    errors[group], stages[group] = one_line(exc), "encode"
        return {
            "id": batch["id"],
            "source": batch["source"],
            "width": batch["width"],
            "height": batch["height"],
            "embedding": embeddings,
            "error": errors.astype(str),
            "stage": stages.astype(str),
            "group_size": group_size,
            "batch_rows": np.full(n, n, dtype=np.int32),
            "decode_s": batch["decode_s"],
            "encode_s": np.full(n, (time.perf_counter() - start) / max(n, 1)),
        }


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on GPU and fp32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


class WriteStage:
    """Writes one embeddings file and one errors file per batch (atomically), returns counts."""

    def __init__(self, output: Location, dim: int, dtype: str) -> None:
        self.output, self.dim, self.dtype = output, dim, dtype
        self.schema = embeddings_schema(dim, dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        errors = batch["error"].astype(str)
        ok = errors == ""
        # Named by content: a write task that Ray retries rewrites the same file, never a twin.
        digest = hashlib.blake2b("\n".join(batch["id"].astype(str)).encode(), digest_size=12)
        name = f"part-{digest.hexdigest()}.parquet"
        n_ok = int(ok.sum())
        n_err = len(errors) - n_ok
        if n_ok:
            emb = np.asarray(
                batch["embedding"][ok], dtype=np.float16 if self.dtype == "float16" else np.float32
            )
            values = pa.array(emb.reshape(-1))
            table = pa.table(
                {
                    "id": pa.array(batch["id"][ok].astype(str), pa.string()),
                    "embedding": pa.FixedSizeListArray.from_arrays(values, self.dim),
                    "width": pa.array(batch["width"][ok], pa.int32()),
                    "height": pa.array(batch["height"][ok], pa.int32()),
                },
                schema=self.schema,
            )
            write_parquet_atomic(self.output.join("embeddings", name), table)
        if n_err:
            table = pa.table(
                {
                    "id": pa.array(batch["id"][~ok].astype(str)),
                    "stage": pa.array(batch["stage"][~ok].astype(str)),
                    "error": pa.array(errors[~ok]),
                    "source": pa.array(batch["source"][~ok].astype(str)),
                },
                schema=ERRORS_SCHEMA,
            )
            write_parquet_atomic(self.output.join("errors", name), table)
        gs = batch["group_size"][ok].astype(np.float64)
        stage_counts = {
            s: int((batch["stage"][~ok].astype(str) == s).sum())
            for s in ("read", "decode", "preprocess", "encode")
        }
        return {
            "rows": np.array([len(errors)]),
            "embedded": np.array([n_ok]),
            "errors": np.array([n_err]),
            "groups": np.array([float((1.0 / gs).sum()) if n_ok else 0.0]),
            "batches": np.array([float((1.0 / batch["batch_rows"].astype(np.float64)).sum())]),
            "decode_s": np.array([float(batch["decode_s"].sum())]),
            "encode_s": np.array([float(batch["encode_s"].sum())]),
            "write_s": np.array([time.perf_counter() - start]),
            "stage_counts": np.array([repr(stage_counts)]),
            "file": np.array([name]),
        }
