"""`python -m llm2vec_fast ...` (and `torchrun ... -m llm2vec_fast ...`): the command line."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
