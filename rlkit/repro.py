"""`python -m rlkit.repro compare RUN_A RUN_B` (the documented command); the code is
`rlkit.run.compare`."""

import sys

from rlkit.run.compare import main

if __name__ == "__main__":
    sys.exit(main())
