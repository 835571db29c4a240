"""``python -m msif_ray ...`` is ``msif ...`` (works before the console script is on PATH)."""

import sys

from msif_ray.cli import main

sys.exit(main())
