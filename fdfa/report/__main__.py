"""python -m fdfa.report: see fdfa/report/__init__.py."""

import sys

from fdfa.report.cli import main

sys.exit(main())
