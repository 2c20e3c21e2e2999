"""Generate the synthetic fMRI world into the prepared store: the same as `bdf-prepare`.

    python data_prep/synthetic.py                                   # default world (seconds)
    python data_prep/synthetic.py dataset=synthetic_nsd_scale       # NSD shapes (minutes, ~7 GB)
    python data_prep/synthetic.py dataset.world.seed=3 dataset.store=/data/synthetic_seed3
"""

from braindecode_fw.cli import prepare_main

if __name__ == "__main__":
    prepare_main()
