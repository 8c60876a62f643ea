"""tests/deploy/stack/ starts the whole process stack (minutes): only `make stack-test` runs it.

`make stack-test` sets STACK_TEST=1 (not a COVID_* name: tests/conftest.py clears those, and
Config refuses unknown ones); `make test` leaves the folder out of collection.
"""

from __future__ import annotations

import os

collect_ignore = [] if os.environ.get("STACK_TEST") == "1" else ["stack"]
