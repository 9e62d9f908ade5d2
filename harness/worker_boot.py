"""Entry script of a worker process (run by path with an environment's python, or by torchrun).

It imports nothing from stepdiff before it has made `stepdiff.*` importable from the paths the harness passed in
STEPDIFF_PATHS: the worker's environment does not have stepdiff installed, and this works the same for wheel and
editable installs of the host.

It also starts the harness watchdog first thing (stepdiff.harness.procs.watch_harness): if the stepdiff process that
started this worker dies without stopping it (SIGKILL, a crash), the worker removes the harness's temporary run
directory and kills itself and its children, so no worker outlives its harness.
"""

import importlib.abc
import importlib.util
import json
import os
import sys

_PATHS = json.loads(os.environ["STEPDIFF_PATHS"])


class _StepdiffFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):  # type: ignore[no-untyped-def]
        directory = _PATHS.get(fullname)
        if directory is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, os.path.join(directory, "__init__.py"), submodule_search_locations=[directory])


sys.meta_path.insert(0, _StepdiffFinder())

if __name__ == "__main__":
    from stepdiff.harness.procs import CLEANUP_DIR, watch_harness

    watch_harness(cleanup=[os.environ.get(CLEANUP_DIR, "")])

    from stepdiff.harness.worker_main import main

    sys.exit(main(sys.argv[1:]))
