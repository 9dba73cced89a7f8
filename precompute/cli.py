"""The `kandinsky-precompute` command (also `python -m precompute`): the encoding job, `prompts` or `report`.

    kandinsky-precompute --train_data_dir DATA --output_dir CACHE ...     encode a dataset (precompute/main.py)
    kandinsky-precompute prompts --output_dir CACHE --validation_prompts "a cat" ...
                                                                           add prompts to a cache (prompts.py)
    kandinsky-precompute report CACHE                                      list every input not encoded (report.py)
"""

from __future__ import annotations

import sys

from .launcher import lone_process_problem


def main(argv: list[str] | None = None) -> int:
    """Run the job named by `argv` (default: the command line); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["prompts"]:
        from .prompts import main as prompts_main

        return prompts_main(argv[1:])
    if argv[:1] == ["report"]:
        from .report import report_main

        return report_main(argv[1:])
    problem = None if {"-h", "--help"} & set(argv) else lone_process_problem()
    if problem:  # before anything is imported or loaded
        print(f"precompute: error: {problem}", file=sys.stderr)
        return 2
    from .main import main as job_main

    return job_main(argv)
