"""``python -m covid_tasks``: see :mod:`covid_tasks.cli`."""

import sys

from covid_tasks.cli import main

sys.exit(main())
