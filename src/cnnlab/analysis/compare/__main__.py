"""`python -m cnnlab.analysis.compare`: the same as `cnnlab compare`."""

import sys

from cnnlab.analysis.compare import main

sys.exit(main())
