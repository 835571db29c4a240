"""Ray job entrypoint for one night: ``python jobs/nightly_attribution.py CONFIG.yaml`` (jobs/submit.py --nightly).

Runs ``msif nightly CONFIG``: only what is new since the last good night, under the run directory's
lock. NOTE: the ``nightly`` subcommand is built separately (it needs the content-addressed index);
until it exists, this entrypoint exits 2 with argparse's "invalid choice: 'nightly'". Nothing here
needs to change once it does.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msif_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["nightly", *sys.argv[1:]]))
