"""Train a Mamba2-MoE language model: `python train.py --help` lists every flag."""

from jmamba.cli import main

if __name__ == "__main__":
    main()
