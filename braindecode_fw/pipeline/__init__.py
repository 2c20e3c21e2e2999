"""The shared assembly of the tasks: what ``bdf-train``, ``bdf-adapt``, ``bdf-reconstruct``,
``bdf-evaluate`` and ``bdf-bench`` (``braindecode_fw/tasks/``, entry points only) are built from.

- :mod:`.build`: datamodule and decoder from a config;
- :mod:`.checkpoint`: reading a ``bdf-train`` checkpoint;
- :mod:`.fitting`: a training run (run folder, Lightning trainer, test evaluation, ``result.json``);
- :mod:`.evaluation`: retrieval of a decoder's predictions, and the metric table of reconstructions;
- :mod:`.linear_baseline`: the ridge floor scored beside a decoder;
- :mod:`.generation`: decoder outputs -> generator inputs, low-level images, preview grids;
- :mod:`.image_grid`: the training callback that draws reconstructions every few epochs.

Nothing here imports a task (docs/architecture.md §3).
"""
