"""Engine-independent parts of Harli. Nothing under this package may import ``sglang``."""
