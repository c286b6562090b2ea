"""pymoo's CMA-ES, made resumable and reproducible for seed 0.

pymoo runs CMA-ES as a generator (``my_fmin``) and drops it when the algorithm is pickled, so
an unpickled CMAES could ask the generation it had drawn but ended the search at the next
tell: every resumed or extended ``algorithm=cmaes`` run stopped one generation after the
restart. Here the pickle keeps the CMA-ES object that lives inside the generator (its mean,
covariance, step size and counters). After unpickling, the first tell goes to that object
directly, and a new generator continues from it (``my_fmin`` accepts a CMA-ES object in place
of ``x0``): the same draws and the same updates as the run that was never interrupted (the
search loop restores numpy's global random state, which CMA-ES samples from).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pymoo.algorithms.soo.nonconvex.cmaes import CMAES
from pymoo.vendor.vendor_cmaes import my_fmin


# the cma package reads seed 0 (and None) as "seed numpy from the clock": a run with seed=0 was
# never reproducible. Seed 0 is passed as this value instead (every other seed unchanged).
SEED_FOR_ZERO = 2**32 - 1


class ResumableCMAES(CMAES):
    """``CMAES`` whose state survives pickling and whose seed 0 is reproducible (see above)."""

    def _setup(self, problem, **kwargs) -> None:
        super()._setup(problem, **kwargs)
        if self.options.get("seed") == 0:
            self.options["seed"] = SEED_FOR_ZERO

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # pymoo drops the generator ("es")
        generator = getattr(self, "es", None)
        frame = getattr(generator, "gi_frame", None)
        if frame is not None:  # a running generator: keep its CMA-ES object
            state["_cma"] = frame.f_locals.get("es")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.es = None

    def _advance(self, infills=None, **kwargs) -> None:
        if infills is not None and getattr(self, "es", None) is None and getattr(self, "_cma", None) is not None:
            self._continue_from_pickled(infills)
            return
        super()._advance(infills=infills, **kwargs)

    def _continue_from_pickled(self, infills) -> None:
        """Tell the pickled CMA-ES object the generation it had drawn, then continue in a new generator."""
        for ind in infills:  # as pymoo's _advance: CMA-ES treats an infeasible candidate as inf
            if not ind.feas:
                ind.F[:] = np.inf
        cma, self._cma = self._cma, None
        if not self.send_array_to_yield or self.restarts:
            # the pickle was taken at the final mean's evaluation (a single point, after CMA-ES
            # stopped): without restarts the search ends there, as the generator would have
            self.termination.force_termination = True
            return
        cma.tell(self.next_X, infills.get("f").tolist())
        self.es = my_fmin(
            cma, np.nan,  # sigma0 NaN: keep the object's step size
            options=self.options,
            parallel_objective=self.parallelize,
            restarts=self.restarts,
            restart_from_best=self.restart_from_best,
            incpopsize=self.incpopsize,
            eval_initial_x=self.eval_initial_x,
            noise_handler=self.noise_handler,
            noise_change_sigma_exponent=self.noise_change_sigma_exponent,
            noise_kappa_exponent=self.noise_kappa_exponent,
            bipop=self.bipop,
            random_state=self.random_state,
        )
        try:
            self.next_X = next(self.es)
        except StopIteration:
            self.next_X = None
        if self.next_X is None:
            self.termination.force_termination = True


def lost_state(algorithm: Any) -> str | None:
    """Why an unpickled pymoo algorithm cannot continue: a plain ``CMAES`` (a checkpoint written
    before 2026-12-08) lost its CMA-ES state unless its search had already ended."""
    if type(algorithm) is CMAES and not algorithm.termination.force_termination:
        return "it holds a CMA-ES written before 2026-12-08, whose state pymoo did not save"
    return None
