"""Random queries: Copycat CNN (Correia-Silva et al., IJCNN 2018) / KnockoffNets-random (Orekondy et al., CVPR 2019).

MEBench's basic attack (paper 004 §3.1): sample ``budget`` inputs uniformly without replacement from the attacker's
pool, query them all, and train the piracy model on the query-response pairs (soft labels when scores come back).
Threat model: black box, any response kind; the budget counts images sent to the API.
"""

from __future__ import annotations

import numpy as np

from ..data.base import Pool
from ..oracle import Oracle
from .base import Extraction, QueryStrategy, Workbench, register_attack


@register_attack
class RandomQueries(QueryStrategy):
    name = "random"

    def extract(self, oracle: Oracle, pool: Pool, budget: int, bench: Workbench) -> Extraction:
        self.check(oracle, pool, budget)
        with bench.timer.phase("selection"):
            idx = np.sort(np.random.default_rng(bench.seed).choice(len(pool), size=budget, replace=False))
            images = bench.load(pool, idx)
        answer = bench.query(oracle, images)
        model = bench.train(images, answer)
        return Extraction(model, idx, bench.history)
