"""`python -m meshca`: the same as the `meshca` command."""

import sys

from meshca.cli import main

sys.exit(main())
