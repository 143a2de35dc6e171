"""Pure PIL/numpy image operations (no Ray, no torch)."""
