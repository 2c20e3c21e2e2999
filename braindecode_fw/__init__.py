"""braindecode_fw: decoding what a person saw from fMRI and MEG recordings."""

from braindecode_fw.errors import ConfigError

__version__ = "0.1.0"


def run_dir_of_checkpoint(_root_) -> str:
    """``${bdf_run_dir:}``: the run directory of the config's top-level ``ckpt`` (a ``bdf-train``
    checkpoint ``<run dir>/checkpoints/<name>.ckpt`` -> ``<run dir>``), e.g. ``bdf-reconstruct
    ckpt=... 'generator.controlnet=${bdf_run_dir:}/controlnet'`` for the ControlNet that run exported."""
    from pathlib import Path

    ckpt = _root_.get("ckpt")
    if not ckpt:
        raise ConfigError("${bdf_run_dir:} names the run of the top-level `ckpt`, which this config does not set")
    path = Path(str(ckpt))
    if path.parent.name != "checkpoints":
        raise ConfigError(f"${{bdf_run_dir:}}: ckpt={ckpt} is not a bdf-train checkpoint (<run dir>/checkpoints/<name>.ckpt)")
    return str(path.parent.parent)


def _register_resolvers() -> None:
    """Config resolvers every composition needs, registered on import of the package (the CLI and
    tests compose the same config tree): ``${bdf_demo_weights:}`` = the demo models shipped inside
    the package (``paths.demo_models``, braindecode_fw/conf/paths/default.yaml); ``${bdf_run_dir:}`` =
    the run directory of the checkpoint ``ckpt`` (:func:`run_dir_of_checkpoint`)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("bdf_demo_weights"):
        OmegaConf.register_new_resolver("bdf_demo_weights", lambda: str(Path(__file__).resolve().parent / "demo" / "weights"))
    if not OmegaConf.has_resolver("bdf_run_dir"):
        OmegaConf.register_new_resolver("bdf_run_dir", run_dir_of_checkpoint)


_register_resolvers()
