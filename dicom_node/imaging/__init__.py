"""Series to volume: the loader's geometry rules and pixel decoding (used by the workers)."""
