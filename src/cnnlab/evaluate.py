"""`python -m cnnlab.evaluate ...`: evaluate a trained checkpoint, as users call it.

The code is cnnlab.analysis.evaluate (`cnnlab evaluate` and the DVC `evaluate` stage run it
there); this module only keeps the command working.
"""

import sys

from cnnlab.analysis.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
