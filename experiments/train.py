"""Train a decoder: the same as `bdf-train` (all arguments are Hydra overrides).

    python experiments/train.py experiment=synthetic_smoke
    python experiments/train.py -m loss=softclip,infonce optim.optimizer.lr=1e-4,3e-4
"""

from braindecode_fw.cli import train_main

if __name__ == "__main__":
    train_main()
