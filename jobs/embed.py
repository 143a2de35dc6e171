"""Embed images and build a FAISS index: ``python jobs/embed.py [--config configs/X.yaml] [flags]``.

With no flags it runs the offline demo. On a cluster:
``ray job submit --working-dir . -- python jobs/embed.py --config configs/siglip2-base-naflex.yaml ...``
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlray.cli import embed_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(embed_main())
