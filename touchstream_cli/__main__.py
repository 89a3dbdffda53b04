"""`python -m touchstream_cli ...` runs the `touchstream` command."""

import sys

from touchstream_cli.cli import main

sys.exit(main())
