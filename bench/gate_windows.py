"""Does a gate read the request inside a jailbreak wrapper? See safesteer.bench.gate_windows."""

import sys

from safesteer.bench.gate_windows import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
