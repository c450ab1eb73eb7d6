"""`python -m cnnlab.train [overrides]`: training, as the README, torchrun, srun and the docs call it.

The code is cnnlab.training.train (`cnnlab train` and the DVC `train` stage run it there); this
module only keeps the command working.
"""

import sys

from cnnlab.training.train import check_group_choices, main

if __name__ == "__main__":
    check_group_choices(sys.argv[1:])
    main()
