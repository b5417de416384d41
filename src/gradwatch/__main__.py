"""`python -m gradwatch ...` is the `gradwatch` command."""

import sys

from gradwatch.cli.main import main

sys.exit(main())
