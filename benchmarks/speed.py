"""The former name of ``benchmarks/bench.py`` (same flags, same table), kept for the commands in
docs/RESULTS_speed.md:

    python benchmarks/speed.py --model preact_resnet18 --width 16 --images 5000
"""

import sys

from bench import main

if __name__ == "__main__":
    sys.exit(main(prog="python benchmarks/speed.py"))
