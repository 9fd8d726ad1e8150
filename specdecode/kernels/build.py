"""Build the CPU kernels now (scripts/setup.sh runs this): `python -m specdecode.kernels.build`.

Prints where the library went, or why it was not built; never fails the install, since the
ATen path works without it.
"""

from __future__ import annotations

import sys

from specdecode import kernels


def main() -> int:
    if not kernels.cpu_supports_avx2():
        print("specdecode kernels: skipped (this CPU lacks AVX2, FMA or F16C; the ATen path will run)")
        return 0
    try:
        lib = kernels.build(verbose="-v" in sys.argv)
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        print(f"specdecode kernels: NOT built ({type(e).__name__}: {e}); the ATen path will run")
        return 0
    print(f"specdecode kernels: {lib}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
