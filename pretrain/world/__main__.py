"""``python -m glmwb.pretrain.world --out DIR``: see ``cli``."""

import sys

from glmwb.pretrain.world.cli import main

sys.exit(main())
