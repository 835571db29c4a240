"""Ray job entrypoint: ``ray job submit --working-dir . -- python jobs/run_attribution.py CONFIG.yaml``.

Inside a Ray job, ``ray.address: null`` joins the job's cluster (Ray sets RAY_ADDRESS), so the
same config runs on a laptop and on a cluster. Exit code 2 means bad input (message on stderr).
"""

import sys

from msif_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
