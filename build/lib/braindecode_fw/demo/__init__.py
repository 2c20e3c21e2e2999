"""The embedded demo models (issue 10): a tiny CLIP and a tiny diffusion generator trained on the
synthetic world, shipped as package data under ``braindecode_fw/demo/weights/`` and referenced from
config as ``${bdf_demo:tiny_clip}`` / ``${bdf_demo:tiny_generator}``."""
