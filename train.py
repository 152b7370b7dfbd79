"""`uv run python train.py key=value ...`: the same as `uv run posttrain train key=value ...`."""

import sys

from posttrain.cli.main import train_main

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
