"""Convert THINGS-MEG (OpenNeuro ds004212) into the prepared store: the same as `bdf-prepare dataset=things_meg`.

    python data_prep/prepare_things_meg.py dataset.root=/data/ds004212 dataset.images_root=/data/THINGS/Images
    python data_prep/prepare_things_meg.py dataset.root=/data/ds004212 dataset.images_root=/data/THINGS/Images \\
        'dataset.subjects=[BIGMEG1]' dataset.sessions=2 dataset.clamp=5
    python data_prep/prepare_things_meg.py dataset.root=/data/ds004212 dataset.images_root=/data/THINGS/Images \\
        dataset.input=hebart_epochs            # Hebart's preprocessed epochs instead of the raw CTF runs

What to download, disk/memory/time and every option: docs/datasets/things_meg.md.
"""

import sys

from braindecode_fw.cli import prepare_main

if __name__ == "__main__":
    if not any(a.startswith("dataset=") for a in sys.argv[1:]):
        sys.argv.insert(1, "dataset=things_meg")
    prepare_main()
