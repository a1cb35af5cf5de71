"""A runner serving timing requests as the official runners do with `--serve` (`official_runner.serve`), for
tests/test_benchmark_harness.py: `sleep` takes about 5 ms; with `--crash` it fails before serving."""

from __future__ import annotations

import sys
import time

from research import official_runner


def main(argv: list[str]) -> None:
    print("a line of the official code's own, before the protocol starts")
    if "--crash" in argv:
        raise SystemExit("the official model could not be built")
    official_runner.serve({"sleep": lambda: time.sleep(0.005)})


if __name__ == "__main__":
    main(sys.argv[1:])
