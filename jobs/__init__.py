"""Command-line entry points. Each script is thin: arguments → validated config → one library call → summary.

Each runs as `python jobs/<name>.py` and imports `_cli` first (see there). The constants below sit here, not in
`_cli`, so that `_cli` and the modules it gathers (`_config`, `_output`, `_ray`) all import them without a cycle.
"""

import os

# The repo root (holds `pipeline`, `model`, `configs`); `_cli` puts it on sys.path.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Exit statuses of every job: done; could not run or complete; a bad configuration (130: interrupted).
EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
