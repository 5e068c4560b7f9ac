"""Entry point of ``make bench``; the load harness arrives with `asynccas bench`."""

import sys


def main() -> int:
    print(
        "No benchmarks yet: the harness (`asynccas bench`) and the BuildGrid comparison"
        " are tracked as their own issue. See benchmarks/README.md."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
