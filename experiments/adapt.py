"""Add a new subject to a trained decoder: the same as `bdf-adapt` (Hydra overrides).

    python experiments/adapt.py ckpt=<run>/checkpoints/last.ckpt subject=subj04 budget.sessions=1 adaptation=reset_tuning
"""

from braindecode_fw.cli import adapt_main

if __name__ == "__main__":
    adapt_main()
