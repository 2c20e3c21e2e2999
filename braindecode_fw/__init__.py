"""braindecode_fw: decoding what a person saw from fMRI and MEG recordings."""

__version__ = "0.1.0"
