"""`python -m rto_fast.train --config FILE [key=value ...]`: the trainer's command line (`rto_fast.trainer.cli`)."""

import sys

from .trainer.cli import main

if __name__ == "__main__":
    sys.exit(main())
