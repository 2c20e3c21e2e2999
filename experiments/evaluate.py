"""Re-run the test evaluation of a checkpoint: the same as `bdf-evaluate ckpt=<path>`."""

from braindecode_fw.cli import evaluate_main

if __name__ == "__main__":
    evaluate_main()
