"""Convert the raw Natural Scenes Dataset into the prepared store: the same as `bdf-prepare dataset=nsd`.

    python data_prep/prepare_nsd.py dataset.root=/data/nsd                           # subj01, all sessions found
    python data_prep/prepare_nsd.py dataset.root=/data/nsd 'dataset.subjects=[1,2,5,7]' dataset.sessions=37
    python data_prep/prepare_nsd.py dataset.root=/data/nsd dataset.beta_format=hdf5 dataset.ncsnr_threshold=0.15

What to download, disk/memory/time and every option: docs/datasets/nsd.md.
"""

import sys

from braindecode_fw.cli import prepare_main

if __name__ == "__main__":
    if not any(a.startswith("dataset=") for a in sys.argv[1:]):
        sys.argv.insert(1, "dataset=nsd")
    prepare_main()
