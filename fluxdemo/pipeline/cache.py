"""The results cache: images already made, keyed by everything that determines their pixels."""

from __future__ import annotations

import logging

from PIL import Image

from fluxdemo.errors import OptionsError
from fluxdemo.lru import LRU

logger = logging.getLogger(__name__)

DEFAULT_CACHE_IMAGES = 64  # a 1024x1024 PNG-sized image is 3 MB in RAM: 64 are about 200 MB


class ResultsCache(LRU):
    """Images keyed by model files, options and the stack (each LoRA's SHA-256 and strength, last in the key).
    Bounded, least recently used out; PIL images in RAM, nothing on a device. A LoRA whose bytes change on disk gets
    a new SHA-256, and the images its old bytes made are forgotten."""

    def __init__(self, max_images: int = DEFAULT_CACHE_IMAGES) -> None:
        if max_images < 0:
            raise OptionsError(f"The results cache size must be 0 or more images, but is {max_images}.")
        super().__init__(max_images)
        self._sha_of: dict[str, str] = {}  # LoRA name -> the SHA-256 last seen for it

    @property
    def max_images(self) -> int:
        return self.maxsize

    def put(self, key: tuple, image: Image.Image) -> None:
        if self.maxsize:
            super().put(key, image)

    def saw(self, name: str, sha256: str) -> None:
        """Note a LoRA's current bytes; if they changed, forget every image the old bytes made."""
        old = self._sha_of.get(name)
        self._sha_of[name] = sha256
        if old is not None and old != sha256:
            stale = [key for key in self.keys() if any(sha == old for sha, _ in key[-1])]
            for key in stale:
                self.pop(key)
            logger.info("LoRA %s changed on disk: %d cached images made with it forgotten", name, len(stale))
