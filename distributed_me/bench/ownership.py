"""``dme bench ownership``: does EWE's watermark survive extraction, and does ``dme verify`` stay silent on models
that never saw it? One run on one victim (default: the embedded digits victim):

- the watermarked version (``dme defense ewe``'s defaults) and the original;
- clones extracted from the watermarked version by random queries from an in-distribution pool at two budgets and
  from a natural-image pool (each a full ``attack_in_process``, so its fidelity is the attack's);
- five models trained from scratch on the victim's own data with its recipe (H0's models).

Per suspect: the triggers and controls it answers with the target, the two p-values and the verdict; the ratio is
the suspect's trigger rate over the largest from-scratch model's (the baseline: what H0 looks like).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import BENCHES, peak_rss_mb, print_table

CLONES = (("digits-unseen", 2000), ("digits-unseen", 4000), ("photos", 2000))
INDEPENDENT = 5


@BENCHES.register("ownership")
def bench_ownership(args: argparse.Namespace) -> dict:
    from ..defenses.ewe import EWEConfig, victim_recipe, watermark_victim
    from ..extraction import AttackSpec
    from ..ownership import ewe_evidence, verify_ewe
    from ..runner import attack_in_process
    from ..train import TrainConfig, predict_labels
    from ..victims import load_victim, train_victim

    original = load_victim(args.victim)
    work = Path(args.out) / "ownership"
    t0 = time.perf_counter()
    marked = watermark_victim(original, EWEConfig(), out=work / "ewe-victim", progress=True)
    ev = ewe_evidence(marked.path)
    m = marked.metrics
    print(f"watermarked: test accuracy {m['acc_before']:.4f} -> {m['acc_after']:.4f}, agreement {m['agreement']:.4f}, "
          f"KL_test {m['kl_test']:.3g}; target rate on {int(m['triggers'])} triggers {m['wm_victim']:.3f} "
          f"(original {m['wm_original']:.3f}), on fresh {EWEConfig().source_pool} images {m['source_victim']:.3f} "
          f"(original {m['source_original']:.3f})", flush=True)
    rows: list[dict] = []

    def judge(suspect: str, model, seconds: float, **extra) -> None:
        r = verify_ewe(lambda x: predict_labels(model, x).numpy(), ev)
        rows.append({"suspect": suspect, "triggers": f"{r.matches}/{r.samples}", "trigger_rate": r.agreement,
                     "controls": f"{r.control_matches}/{r.control_samples}", "p_p0": r.p_reference,
                     "p_controls": r.p_control, "p": r.p_value, "verdict": "EXTRACTED" if r.extracted else "not shown",
                     "seconds": seconds, **extra})
        print(f"{suspect}: {rows[-1]['triggers']} triggers, p = {r.p_value:.3g}", flush=True)

    judge("watermarked victim", marked.victim.model, time.perf_counter() - t0, fidelity=1.0)
    judge("original victim", original.model, 0.0)
    for pool, budget in CLONES:
        t = time.perf_counter()
        # AttackSpec's default strategy, random queries (EWE's code labels its training set: random, in distribution)
        res = attack_in_process(AttackSpec(budget=budget, arch=original.meta.arch, epochs=30),
                                victim=str(marked.path), pool=pool, log_mlflow=False)
        judge(f"clone {pool} {budget}", res.model, time.perf_counter() - t, fidelity=res.fidelity)
    for seed in range(INDEPENDENT):
        t = time.perf_counter()
        recipe = TrainConfig(**{**victim_recipe(original), "seed": 100 + seed})
        m, _ = train_victim(original.meta.dataset, original.meta.arch, work / f"independent{seed}", recipe,
                            img_size=original.meta.img_size, progress=False)
        judge(f"independent {seed}", m.model, time.perf_counter() - t, accuracy=m.meta.test_accuracy)
    h0 = max(r["trigger_rate"] for r in rows if r["suspect"].startswith("independent"))
    for r in rows:
        r["rate_vs_h0"] = r["trigger_rate"] / h0 if h0 > 0 else float("inf")
    print_table(rows, ["suspect", "triggers", "controls", "p_p0", "p_controls", "verdict", "rate_vs_h0", "fidelity",
                       "seconds"], f"EWE ownership on {original.meta.name} (p0 {ev.p0:.3g})")
    return {"victim": original.meta.name, "ewe": marked.metrics, "p0": ev.p0, "rows": rows,
            "peak_rss_mb": peak_rss_mb()}

