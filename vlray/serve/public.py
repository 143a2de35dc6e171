"""What the service may show anyone: no absolute paths, only hub ids and folder basenames.

``/readyz``, ``/api/info`` and error messages are readable without a key (``/readyz`` always);
the index and model folders, the S3 prefix and the paths inside a library's error text are the
operator's business, so they are cut to their last component before they leave the process.
"""

from __future__ import annotations

import os
import re

# A URI (s3://bucket/key), an absolute POSIX or Windows path, or a ~ path: up to a space,
# quote or bracket.
_PATH = re.compile(
    r"""(?:\b[a-zA-Z][\w+.-]*://|(?<![\w.~/\\-])(?:~|[A-Za-z]:)?[/\\])[^\s'"<>|,;()\[\]{}]*"""
)
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
# faiss errors read "Error in <C++ signature> at <source file>:<line>: <reason>".
_FAISS = re.compile(r"Error in .*? at \S+:\d+: (.*)", re.DOTALL)


def basename(path: str) -> str:
    """The last component of a path or URI (the path itself when it has none)."""
    if "://" in path:
        path = path.split("://", 1)[1]
    stripped = path.rstrip("/\\")
    name = re.split(r"[/\\]", stripped)[-1] if stripped else ""
    return name or path


def redact(text: str) -> str:
    """``text`` with every absolute path or URI cut to its basename."""
    return _PATH.sub(lambda m: basename(m.group(0)), text)


def model_name(name: str | None) -> str | None:
    """A recorded model as shown publicly: the hub id, or the basename of a local folder."""
    if not name:
        return name
    local = "://" in name or name.startswith(("/", "~", ".", "\\")) or os.path.isabs(name)
    if local or not _HUB_ID.match(name) or os.path.exists(name):
        return basename(name)
    return name


def load_error(uri: str, exc: BaseException) -> str:
    """A clear, path-free reason why the index at ``uri`` cannot be served."""
    text = str(exc).strip() or type(exc).__name__
    faiss = _FAISS.match(text)
    if faiss is not None:
        text = f"the faiss index file is unreadable (corrupt or not a faiss index: {faiss[1]})"
    return redact(f"cannot load index {basename(uri)}: {text}")
