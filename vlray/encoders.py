"""One holder of a model's encoders for the query CLI, the service and the benchmarks.

:class:`Encoders` resolves the family on first use, loads each encoder once (on first use, or
all at once with ``preload``) and turns images into vectors through the one image-to-inputs
path, :func:`vlray.families.batch.preprocess_images` (``family.fit``: resize and, where the
family crops, the centre crop; then one ``preprocess`` per same-shape group), as the job does.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from vlray.families import Capability, Family, ImageEncoder, TextEncoder
from vlray.families.batch import preprocess_images
from vlray.ops.decode import decode_image

logger = logging.getLogger(__name__)

Probability = Callable[[torch.Tensor], torch.Tensor | None]
"""A text encoder's cosine -> match probability (None where the model defines none)."""


class Encoders:
    """A model family and its image and text encoders, each loaded once, on first use.

    Thread-safe: encoders are not assumed to be (fast tokenizers are not), so one lock per
    encoder serialises its loading and its forward passes.
    """

    def __init__(
        self,
        family_of: Callable[[], Family],
        on_load: Callable[[str, float], None] | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """``family_of`` resolves the family (and may raise, e.g. QueryError, each time it is
        asked until it succeeds); ``on_load(kind, seconds)`` hears of each encoder loaded."""
        self._family_of = family_of
        self._on_load = on_load or (lambda kind, seconds: None)
        self.device = device or torch.device("cpu")
        self.dtype = dtype
        self._family: Family | None = None
        self._image: ImageEncoder | None = None
        self._text: TextEncoder | None = None
        self._family_lock = threading.Lock()
        self._image_lock = threading.Lock()
        self._text_lock = threading.Lock()
        self.load_seconds: dict[str, float] = {}

    @property
    def family(self) -> Family:
        """The model family (resolved on first use)."""
        with self._family_lock:
            if self._family is None:
                self._family = self._family_of()
            return self._family

    def supports(self, capability: Capability) -> bool:
        """Whether the checkpoint has ``capability`` (e.g. text embeddings for text search)."""
        return self.family.supports(capability)

    def _loaded(self, kind: str, start: float) -> None:
        seconds = time.perf_counter() - start
        self.load_seconds[kind] = seconds
        self._on_load(kind, seconds)
        logger.info("loaded %s encoder in %.2fs", kind, seconds)

    def encode_text(self, text: str) -> tuple[np.ndarray, Probability]:
        """A text query's (dim,) float32 unit vector and the encoder's ``probability``.

        Raises:
            MissingCapability: the family or checkpoint has no text tower (the message says
                to query by image or id).
        """
        with self._text_lock:
            if self._text is None:
                start = time.perf_counter()
                self._text = self.family.load_text_encoder(self.device, self.dtype)
                self._loaded("text", start)
            return self._text.encode([text])[0].numpy(), self._text.probability

    def encode_pixels(self, images: Sequence[np.ndarray | Image.Image]) -> np.ndarray:
        """Decoded images -> (N, dim) float32 unit vectors, in order; the job's preprocessing.

        Args:
            images: (H, W, 3|4) uint8 arrays (channels 0-2 RGB, EXIF-oriented) or RGB PIL
                images.

        Raises:
            UnsupportedImage: the model rejects an image's shape.
            MissingCapability: the family produces no embeddings.
        """
        family = self.family
        groups = preprocess_images(family, images)
        out: np.ndarray | None = None
        with self._image_lock:
            if self._image is None:
                start = time.perf_counter()
                self._image = family.load_encoder(self.device, self.dtype)
                self._loaded("image", start)
            for indices, inputs in groups:
                vectors = self._image.encode(inputs).numpy()
                if out is None:
                    out = np.empty((len(images), vectors.shape[1]), np.float32)
                out[indices] = vectors
        return out if out is not None else np.empty((0, family.embedding_dim), np.float32)

    def encode_image(self, data: bytes, max_pixels: int) -> np.ndarray:
        """An encoded image file's (dim,) float32 unit vector (decoded as the job decodes).

        Raises:
            DecodeError: not an image, corrupt, or over ``max_pixels``.
            UnsupportedImage: the model rejects its shape.
        """
        return self.encode_pixels([decode_image(data, max_pixels=max_pixels)])[0]

    def preload(self) -> None:
        """Loads the image encoder now, and the text encoder where the checkpoint has one."""
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (128, 96, 64)).save(buf, format="PNG")
        self.encode_image(buf.getvalue(), 10_000_000)
        if self.supports(Capability.TEXT_EMBEDDINGS):
            self.encode_text("a photo")


__all__ = ["Encoders", "Probability"]
