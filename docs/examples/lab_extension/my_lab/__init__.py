"""A lab's own extension of braindecode_fw, kept outside the package (docs/extending.md)."""
