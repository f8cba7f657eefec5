"""Speed benchmark of one warm-up + one DivideMix epoch against the official-style pipeline.

The same code as ``cdmix bench`` (``cdmix.bench``), runnable from a checkout:

    python benchmarks/speed.py --model preact_resnet18 --width 16 --images 5000
    python benchmarks/speed.py --source subset --images 5551 --markdown docs/RESULTS_speed.md

Prints the table to stdout; ``--markdown FILE`` appends it to a markdown file, ``--out FILE``
writes it (markdown, or JSON when FILE ends in .json). ``python benchmarks/speed.py --help`` lists
every flag.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import cdmix  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cdmix.bench import add_bench_arguments, format_table, options_from_args, run_bench, write_result  # noqa: E402
from cdmix.errors import UserError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="benchmarks/speed.py", description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser)
    parser.add_argument("--markdown", help="append the table to this markdown file")
    args = parser.parse_args(argv)
    try:
        opts = options_from_args(args, command="python benchmarks/speed.py " + " ".join(argv))
        result = run_bench(opts)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = format_table(result)
    print(text)
    if opts.out:
        write_result(result, text, opts.out)
    if args.markdown:
        path = Path(args.markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as fh:
            fh.write("\n" + text + "\n")
        print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
