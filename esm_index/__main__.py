"""``python -m esm_index``: the CLI, for environments where the console script is not on PATH."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="esm-index")
