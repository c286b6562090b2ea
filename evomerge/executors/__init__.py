"""Where candidates are evaluated: in process (``executor=local``) or on Ray actors
(``executor=ray``). The search loop hands executors recipes and gets outcomes back; it
alone writes the run directory."""

from evomerge.executors.base import Executor, Job, Outcome, evaluate_outcome
from evomerge.executors.local import LocalExecutor, as_executor, local_executor

__all__ = ["Executor", "Job", "Outcome", "evaluate_outcome", "LocalExecutor", "as_executor", "local_executor"]
