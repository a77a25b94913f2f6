"""Step-time benchmark of optimkit against torch.optim and prodigyopt.

    python benchmarks/step_time.py                      # full sets (minutes)
    python benchmarks/step_time.py --quick              # smoke run (seconds)
    python benchmarks/step_time.py --optimizers adam,prodigy --sets small --json out.json
    python benchmarks/step_time.py --contention         # defaults vs torch defaults, idle and
                                                        # with a 2-thread matmul process running

Same as ``optimkit bench``; exits 1 when a candidate failed. The method and the latest
numbers are in docs/performance.md.
"""

import sys

from optimkit.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
