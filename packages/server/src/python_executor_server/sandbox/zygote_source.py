"""The zygote's program: the eval driver's source with ``_zygote_main.py`` appended.

Joined before the driver's closing ``main()`` call, so the zygote is the driver itself,
started as a pre-started program is (``--job-fd N``, N its control socket here): its
``main()`` finds ``_zygote_serve`` defined and hands N to it, which returns in each forked
run with that run's own ``--job-fd N``. A run forked from it goes on in exactly the code,
and under exactly the command line, of a pre-started or cold sandbox.
"""

from __future__ import annotations

import functools
from pathlib import Path

_MAIN_CALL = '\nif __name__ == "__main__":\n    main()\n'


@functools.cache
def zygote_source(driver_source: str) -> str:
    if not driver_source.endswith(_MAIN_CALL):
        raise ValueError("the driver's source does not end with its main() call")
    own = Path(__file__).with_name("_zygote_main.py").read_text(encoding="utf-8")
    return driver_source[: -len(_MAIN_CALL)] + "\n\n" + own + _MAIN_CALL
