"""tests/deploy/stack/ starts the whole process stack (minutes): only `make stack-test` runs it.

`make stack-test` sets COVID_STACK_TEST=1; `make test` leaves the folder out of collection.
"""

from __future__ import annotations

import os

collect_ignore = [] if os.environ.get("COVID_STACK_TEST") == "1" else ["stack"]
