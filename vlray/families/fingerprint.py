"""What weights a checkpoint folder holds, cheaply: the fingerprint an index's manifest records.

An index is usually built on cluster nodes and queried elsewhere; the query side must load the
same weights or refuse. Hashing gigabytes of weights at every query start would take minutes, so
the fingerprint reads only what identifies them: each safetensors file's name and size, a hash
of its header (tensor names, dtypes, shapes, offsets, metadata) and a hash of a sample of its
data (the first and last ``SAMPLE_BYTES``: the header alone is the same for every fine-tune of
one architecture), plus the shard index ``model.safetensors.index.json``.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

SAMPLE_BYTES = 1 << 20
"""Bytes of tensor data hashed from each end of every safetensors file."""
_SHARD_INDEX = "model.safetensors.index.json"


def _file_entry(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        header_len = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
        header = f.read(min(header_len, max(size - 8, 0)))
        data_start = 8 + len(header)
        sample = hashlib.sha256()
        sample.update(f.read(min(SAMPLE_BYTES, size - data_start)))
        tail = max(data_start, size - SAMPLE_BYTES)
        f.seek(tail)
        sample.update(f.read())
    return {
        "name": path.name,
        "size": size,
        "header_sha256": hashlib.sha256(raw + header).hexdigest(),
        "sample_sha256": sample.hexdigest(),
    }


def weights_fingerprint(folder: str | Path) -> dict[str, Any] | None:
    """The fingerprint of the safetensors weights in ``folder``; None when it holds none.

    Returns:
        ``{"files": [{name, size, header_sha256, sample_sha256}, ...], "digest": sha256}``,
        files sorted by name; ``digest`` covers the files and the shard index.
    """
    root = Path(folder)
    files = [_file_entry(p) for p in sorted(root.glob("*.safetensors"))]
    if not files:
        return None
    body: dict[str, Any] = {"files": files}
    shard_index = root / _SHARD_INDEX
    if shard_index.is_file():
        body["index_sha256"] = hashlib.sha256(shard_index.read_bytes()).hexdigest()
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return {**body, "digest": digest}


def fingerprint_difference(recorded: dict[str, Any], actual: dict[str, Any] | None) -> str:
    """One line saying how ``actual`` differs from ``recorded`` (empty when they match)."""
    if actual is None:
        return "the folder has no .safetensors weights"
    if recorded.get("digest") == actual.get("digest"):
        return ""
    want = {f["name"]: f for f in recorded.get("files", [])}
    have = {f["name"]: f for f in actual.get("files", [])}
    if set(want) != set(have):
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        return f"{len(have)} weight files instead of {len(want)}: " + ", ".join(
            [f"{n} missing" for n in missing[:2]] + [f"{n} not recorded" for n in extra[:2]]
        )
    for name, entry in want.items():
        for key in ("size", "header_sha256", "sample_sha256"):
            if entry.get(key) != have[name].get(key):
                return f"{name} differs ({key.replace('_', ' ')})"
    return "the shard index differs"


def hub_revision(folder: str | Path) -> str | None:
    """The commit of a folder in a Hugging Face cache (``.../snapshots/<commit>``), else None."""
    path = Path(folder)
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.name
    return None
