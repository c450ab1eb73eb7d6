"""`python -m cnnlab.fetch`: fetch and verify the dataset named in params.yaml, as users call it.

The code is cnnlab.training.prepare (`cnnlab fetch` and the DVC `fetch` stage run it there); this
module only keeps the command working.
"""

import sys

from cnnlab.training.prepare import main

if __name__ == "__main__":
    sys.exit(main())
