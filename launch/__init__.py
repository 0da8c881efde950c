"""Entry points: each module parses arguments and calls the library (`dit_scale`).

Run them as files (`python launch/train.py ...`), as modules (`python -m launch.train ...`) or as the console
scripts setup.py installs (`dit-train ...`); all three are the same `main(argv)`.
"""
