"""Ray job entrypoint for one night: ``python jobs/nightly_attribution.py CONFIG.yaml [--date YYYY-MM-DD]``.

Runs ``msif nightly CONFIG``: only what is new since the last good night, under the run
directory's lock, then the night published under ``<run_dir>/nights/<date>/`` with
``nights/latest.json`` pointing to it (see msif_ray/ops/nightly.py). ``--date`` defaults to today
(UTC); jobs/submit.py --nightly and the CronJob's RayJob pass their night's date, so that a
retry after midnight still publishes the night it belongs to. Exit code 2 means bad input, 3 a
run directory locked by another run (message on stderr); either is recorded in the history.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msif_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["nightly", *sys.argv[1:]]))
