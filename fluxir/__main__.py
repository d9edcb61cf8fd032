"""`python -m fluxir ...` runs the command line (as `ray job submit -- python -m fluxir run ...` does)."""
import sys

from fluxir.cli import main

sys.exit(main())
