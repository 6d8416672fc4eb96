"""`python -m zinspect`: the same as the `zinspect` command."""

import sys

from zinspect.cli import main

sys.exit(main())
