"""`python -m actors ...` runs the `fluxir` command line (as `ray job submit -- python -m actors run ...` does).

The command line lives in the Ray layer (actors/cli.py) because its training commands call actors/pipeline.py;
the library `fluxir/` never imports actors/, so there is no `python -m fluxir`."""
import sys

from actors.cli import main

sys.exit(main())
