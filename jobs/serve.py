"""Serve a vlray index over HTTP: ``python jobs/serve.py --index OUT/index [--port 8000]``."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlray.serve.cli import serve_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(serve_main())
