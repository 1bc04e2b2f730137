"""HF vs vLLM engine parity on the behaviour test split (see safesteer.bench.engine_policy)."""

import sys

from safesteer.bench.engine_policy import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
