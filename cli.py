"""Launcher: ``python cli.py fit --config configs/fashion_mnist_demo.yaml`` (see meansparse_pl/cli.py)."""

from meansparse_pl.cli import main

if __name__ == "__main__":
    main()
