"""`python -m rto_fast.diagnose --config FILE [key=value ...]`: reward diagnostics before RL
(`rto_fast.trainer.diagnose`)."""

import sys

from .trainer.diagnose import main

if __name__ == "__main__":
    sys.exit(main())
