"""``optimkit compare``: race optimizers on real tasks and report the evidence.

Public API: :class:`Task` (the protocol for your own task), :func:`run_compare` (returns a
JSON-able dict), :func:`write_report` / :func:`print_report` (render it), the built-in task
builders and :func:`parse_optimizer_choice`.
"""

from .report import print_report, write_json, write_report
from .runner import OptimizerChoice, default_choices, parse_optimizer_choice, run_compare
from .summary import result_from_storage
from .tasks import BUILTIN_TASKS, DEFAULT_SUITE, OPTIONAL_TASKS, Task, TaskUnavailable, build_task, load_user_task

__all__ = [
    "Task",
    "TaskUnavailable",
    "BUILTIN_TASKS",
    "DEFAULT_SUITE",
    "OPTIONAL_TASKS",
    "build_task",
    "load_user_task",
    "OptimizerChoice",
    "parse_optimizer_choice",
    "default_choices",
    "run_compare",
    "result_from_storage",
    "print_report",
    "write_report",
    "write_json",
]
