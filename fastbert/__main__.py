"""`python -m fastbert ...` is the `fastbert` command (fastbert/cli.py)."""
import sys

from fastbert.cli import main

sys.exit(main())
