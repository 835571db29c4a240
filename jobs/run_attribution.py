"""Ray job entrypoint for one run: ``python jobs/run_attribution.py CONFIG.yaml`` (see jobs/submit.py).

Inside a Ray job, ``ray.address: null`` joins the job's cluster (Ray sets RAY_ADDRESS), so the
same config runs on a laptop and on a cluster. The uploaded working dir's code is imported, not an
installed copy. Exit code 2 means bad input, 3 a run directory locked by another run (message on stderr).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msif_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
