"""`python -m replicate_generation`: the same CLI as the `replicate-generation` command."""

import sys

from replicate_generation.cli import main

sys.exit(main())
