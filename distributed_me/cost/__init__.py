"""Know the cost before the work: work as sizes (:mod:`.work`), priced by throughput measured on the device at hand
(:mod:`.rates`), corrected by what recorded runs took (:mod:`.history`), checked against a limit (:mod:`.guard`).
No Ray here: a sweep's plan over a cluster lives in ``sweep/plan.py``."""

from .work import CostJob, Net, Projection, Work, human

__all__ = ["CostJob", "Net", "Projection", "Work", "human"]
