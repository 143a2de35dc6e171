"""Query a vlray index: ``python jobs/query.py --index OUT/index (--text T | --image P | --id I) [-k K] [--json]``."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlray.cli import query_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(query_main())
