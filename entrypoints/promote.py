"""Ray Jobs entry point: `python entrypoints/promote.py ARGS...` runs `commlab promote ARGS...`.

`commlab submit promote ...` runs this on the cluster's head node in the shipped working dir (see
commlab.jobs); the job's MLFLOW_TRACKING_URI and RAY_ADDRESS come from its environment.
"""

import sys
from pathlib import Path

# The working dir holds the code; PYTHONPATH=platform covers Ray's workers, this the driver.
_PLATFORM = Path(__file__).resolve().parents[1] / "platform"
if (_PLATFORM / "commlab").is_dir() and str(_PLATFORM) not in sys.path:
    sys.path.insert(0, str(_PLATFORM))

from commlab.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["promote", *sys.argv[1:]])
