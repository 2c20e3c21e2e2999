"""braindecode_fw: decoding what a person saw from fMRI and MEG recordings."""

__version__ = "0.1.0"


def _register_resolvers() -> None:
    """Config resolvers every composition needs, registered on import of the package (the CLI and
    tests compose the same config tree): ``${bdf_demo_weights:}`` = the demo models shipped inside
    the package (``paths.demo_models``, conf/paths/default.yaml)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("bdf_demo_weights"):
        OmegaConf.register_new_resolver("bdf_demo_weights", lambda: str(Path(__file__).resolve().parent / "demo" / "weights"))


_register_resolvers()
