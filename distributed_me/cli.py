"""The ``dme`` command. Thin: parses arguments, calls the library, prints tables. Library code logs; only this prints.

Every user mistake surfaces as one ``error:`` line and exit status 2, never a traceback (set ``DME_DEBUG=1`` for one).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .cli_help import HelpFormatter, names, preparing_strategies, serve_epilog, sweep_epilog
from .errors import DmeError, explain_validation_error
from .plugins import load_plugins


def _table(rows: list[tuple[str, str]], title: str = "") -> str:
    width = max(len(k) for k, _ in rows)
    lines = [title] if title else []
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def result_table(result: dict) -> str:
    """An extraction's metrics (the result schema, flat names) as a short table."""
    from .attacks import PHASES

    rows = [
        ("victim accuracy", f"{result['victim_accuracy']:.4f}"),
        *([("victim utility", f"{result['victim_utility']:.4f}  (accuracy of the API's answers)")]
          if "victim_utility" in result else []),
        ("piracy accuracy", f"{result['accuracy']:.4f}"),
        ("fidelity", f"{result['fidelity']:.4f}"),
        ("adversarial fidelity", f"{result['adversarial_fidelity']:.4f}"),
        ("queries used", f"{int(result['queries_used'])} / {result['budget']}"),
        ("time (s)", " | ".join(f"{p} {result[f'seconds_{p}']:.1f}" for p in (*PHASES, "total"))),
    ]
    return _table(rows, "extraction result")


def _options(items: list[str] | None) -> dict:
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise DmeError(f"--strategy-option takes KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _check_victim_training(ds: Any, arch: str, cfg: Any, args: argparse.Namespace) -> None:
    """Price a victim's training before it starts (printed when over a minute, refused over the limit)."""
    from .cost import work
    from .cost.guard import ANNOUNCE_S, check_limit, limit_seconds
    from .cost.plan import describe, project
    from .cost.rates import Device, Rates
    from .cost.work import Net

    h, _, c = ds.image_shape
    net = Net(arch, args.img_size or h, c, ds.num_classes)
    device = Device.here()
    p = project([work.train(net, len(ds.train), cfg.epochs, cfg.batch_size, phase="train", what="the victim"),
                 work.infer(net, len(ds.test), phase="eval", what="its test split")], Rates(device))
    if p.total > ANNOUNCE_S and not args.quiet:
        print(describe(p, f"training victim {arch} on {ds.name}, on {device.label}"), flush=True)
    if not args.no_cost_limit:
        check_limit(f"training victim {arch} on {ds.name}", p.total, device.label, limit_seconds(args.max_hours),
                    lambda: "fewer --epochs, or --arch cnn32" if arch != "cnn32" else "fewer --epochs")


def cmd_train_victim(args: argparse.Namespace) -> int:
    from .data import load_dataset
    from .train import TrainConfig
    from .victims import register_victim, train_victim
    from .victims.embedded import EMBEDDED_DATASET, EMBEDDED_TRAIN, embedded_victim
    from .victims.store import cache_dir

    if args.dataset is None and args.arch is None and args.epochs is None:
        victim, path = embedded_victim(progress=not args.quiet)
    else:
        dataset = args.dataset or EMBEDDED_DATASET
        arch = args.arch or "cnn32"
        cfg = TrainConfig(epochs=args.epochs or EMBEDDED_TRAIN.epochs, batch_size=args.batch_size,
                          optimizer=args.optimizer, lr=args.lr, augment=not args.no_augment, seed=args.seed,
                          hflip=args.hflip)
        name = args.name or f"{Path(dataset).stem}-{arch}"
        out = Path(args.out) if args.out else cache_dir() / "victims" / f"{name}-seed{args.seed}"
        ds = load_dataset(dataset, root=args.data_root, download=args.download, seed=cfg.seed)
        _check_victim_training(ds, arch, cfg, args)
        victim, path = train_victim(ds, arch, out, cfg, img_size=args.img_size, name=name, progress=not args.quiet)
    uri = None if args.no_mlflow else register_victim(path, args.name or victim.meta.name)
    print(_table([("dataset", victim.meta.dataset), ("arch", victim.meta.arch),
                  ("input", "x".join(map(str, victim.input_shape))),
                  ("test accuracy", f"{victim.meta.test_accuracy:.4f}"), ("bundle", str(path)),
                  ("mlflow model", uri or "(not logged)")], "victim"))
    return 0


def cmd_defense_train(args: argparse.Namespace) -> int:
    from .defenses import KITS, POLICIES, train_kit
    from .runner import evaluator_for
    from .victims import load_victim

    KITS.get(args.defense)
    victim = load_victim(args.victim, progress=not args.quiet)
    kit = train_kit(victim, args.defense, source=args.victim, seed=args.seed, epochs=args.epochs,
                    progress=not args.quiet, track=not args.no_mlflow)
    rows = [("victim", f"{victim.meta.name} ({args.victim})"), ("kit", str(kit.path)),
            *((k, f"{v:.4f}") for k, v in kit.meta.get("metrics", {}).items()),
            ("built in", f"{kit.meta['build_seconds']:.1f}s")]
    users = [n for n in POLICIES.names() if POLICIES.get(n).needs_kit == args.defense]
    evaluator = evaluator_for(victim, args.data_root, args.download)
    probe = _probe_images(args.probe_pool, args.probe_images, victim.input_shape, args.seed) if args.probe_pool \
        else None
    for policy in users:  # what each output policy on this kit costs the defender, with its default parameters
        cost = evaluator.defense_cost(policy)
        assert cost is not None
        rows.append((f"{policy}: utility / agreement", f"{cost.utility:.4f} / {cost.agreement:.4f}  (victim "
                                                       f"accuracy {evaluator.victim_accuracy:.4f})"))
        rows.append((f"{policy}: KL_test / KL_train", f"{cost.kl_test:.4f} / {cost.kl_train:.4f} nats"))
        if probe is not None:
            bent = evaluator.bent_answers(policy, probe)
            assert bent is not None
            rows.append((f"{policy} on {args.probe_pool}: top-1 kept / KL", f"{bent['agreement']:.4f} / "
                                                                            f"{bent['kl']:.4f} nats ({len(probe)} "
                                                                            "pool images)"))
    print(_table(rows, f"defense {args.defense}"))
    return 0


def _probe_images(pool: str, n: int, input_shape: tuple[int, int, int], seed: int) -> Any:
    """``n`` images of ``pool`` (a random sample, seeded) at the victim's input shape."""
    import numpy as np

    from .data import load_pool, to_tensor

    p = load_pool(pool)
    c, h, _ = input_shape
    idx = np.sort(np.random.default_rng(seed).choice(len(p), size=min(n, len(p)), replace=False))
    return to_tensor(p.get(idx, size=h, channels=c))


def _register_version(args: argparse.Namespace, victim: Any, path: Path, defense: str, params: dict[str, Any],
                      metrics: dict[str, float], history: dict[str, list[float]]) -> str | None:
    """Register a model-side defense's bundle as the next version of the victim's registered model (or of its bundle
    name), tagged with its parent and parameters; ``None`` with ``--no-mlflow``."""
    from .defenses.kits import _registered_version
    from .victims import register_victim

    if args.no_mlflow:
        return None
    parent = _registered_version(args.victim)
    name = args.name or (parent[0] if parent else victim.meta.name)
    lineage = f"models:/{parent[0]}/{parent[1]}" if parent else f"sha256:{victim.meta.weights_sha256}"
    tags = {"dme.defense": defense, "dme.parent": lineage, **{f"dme.{defense}.{k}": str(v) for k, v in params.items()}}
    uri = register_victim(path, name, version_tags=tags, metrics=metrics, run_name=f"{defense} {name}",
                          history=history)
    if args.alias:
        from mlflow import MlflowClient

        from .tracking import tracking_uri

        version = uri.rsplit("/", 1)[-1]
        MlflowClient(tracking_uri()).set_registered_model_alias(name, args.alias, version)
        uri = f"{uri} (alias models:/{name}@{args.alias})"
    return uri


def cmd_defense_advft(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .defenses.advft import AdvFTConfig, protect_victim
    from .victims import load_victim

    try:  # unset flags are None and fall back to AdvFTConfig's defaults (the paper's)
        cfg = AdvFTConfig.from_given(margin=args.margin, epochs=args.epochs, gen_steps=args.gen_steps,
                                     model_steps=args.model_steps, batch_size=args.batch_size, seed=args.seed)
    except ValidationError as e:
        raise explain_validation_error(e, "AdvFT") from None
    victim = load_victim(args.victim, progress=not args.quiet)
    prot = protect_victim(victim, cfg, out=args.out, progress=not args.quiet)
    h = prot.history
    uri = _register_version(args, victim, prot.path, "advft", cfg.model_dump(), prot.metrics,
                            {"advft.l_g": h.l_g, "advft.l_f1": h.l_f1, "advft.l_f2": h.l_f2})
    m = prot.metrics
    print(_table([("parent", f"{victim.meta.name} ({args.victim})"), ("protected bundle", str(prot.path)),
                  ("mlflow model", uri or "(not logged)"),
                  ("Acc_MR / Acc_MF", f"{m['acc_mr']:.4f} / {m['acc_mf']:.4f}  (test accuracy before / after)"),
                  ("agreement", f"{m['agreement']:.4f}  (top-1, protected vs original, test split)"),
                  ("KL_test / KL_train", f"{m['kl_test']:.3g} / {m['kl_train']:.3g} nats"),
                  ("last epoch", f"L_G {prot.history.l_g[-1]:.4g}, L_F1 {prot.history.l_f1[-1]:.4g}, "
                                 f"L_F2 {prot.history.l_f2[-1]:.4g}")], "AdvFT"))
    return 0


def cmd_defense_ewe(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .defenses.ewe import EWEConfig, watermark_victim
    from .victims import load_victim

    try:  # unset flags are None and fall back to EWEConfig's defaults (the authors' MNIST values)
        cfg = EWEConfig.from_given(w_epochs=args.w_epochs, batch_size=args.batch_size, ratio=args.ratio,
                                   target=args.target, source_pool=args.source_pool, source_class=args.source_class,
                                   references=args.references, seed=args.seed)
    except ValidationError as e:
        raise explain_validation_error(e, "EWE") from None
    victim = load_victim(args.victim, progress=not args.quiet)
    wm = watermark_victim(victim, cfg, out=args.out, progress=not args.quiet)
    uri = _register_version(args, victim, wm.path, "ewe", cfg.model_dump(), wm.metrics,
                            {"ewe.ce": wm.history.ce, "ewe.snnl": wm.history.snnl})
    m = wm.metrics
    print(_table([("parent", f"{victim.meta.name} ({args.victim or 'embedded'})"),
                  ("watermarked bundle", str(wm.path)), ("mlflow model", uri or "(not logged)"),
                  ("test accuracy", f"{m['acc_before']:.4f} -> {m['acc_after']:.4f}  (agreement "
                                    f"{m['agreement']:.4f})"),
                  ("KL_test / KL_train", f"{m['kl_test']:.3g} / {m['kl_train']:.3g} nats"),
                  ("watermark success", f"{m['wm_victim']:.3f} on {int(m['triggers'])} triggers (original "
                                        f"{m['wm_original']:.3f}, from-scratch max {m['wm_reference_max']:.3f})"),
                  ("source domain", f"{m['source_victim']:.3f} of fresh {cfg.source_pool} images answered with the "
                                    f"target (original {m['source_original']:.3f})"),
                  ("p0 (H0 of dme verify)", f"{m['p0']:.3g}")], "EWE"))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .defenses.ewe import EVIDENCE_FILE
    from .ownership import VERIFY_ALPHA, dawn_evidence, ewe_evidence, load_suspect, verify_dawn, verify_ewe
    from .victims import load_victim, victim_bundle_path

    victim = load_victim(args.victim, progress=not args.quiet)
    alpha = VERIFY_ALPHA if args.alpha is None else args.alpha
    evidence = args.evidence
    if evidence is None:  # an EWE-watermarked version carries its own evidence
        bundle = victim_bundle_path(args.victim)
        if not (bundle / EVIDENCE_FILE).is_file():
            raise DmeError(f"victim {args.victim or 'embedded'} carries no EWE watermark ({EVIDENCE_FILE} in its "
                           "bundle): pass --evidence (DAWN: the deployment's <query_log>/watermarks/<victim name>)")
        evidence = str(bundle)
    path = Path(evidence)
    if path.is_file() or (path / EVIDENCE_FILE).is_file():
        ev = ewe_evidence(path)
        r = verify_ewe(load_suspect(args.suspect), ev, alpha)
        print(_table([("triggers", f"{r.matches}/{r.samples} answered with class {ev.target} ({r.agreement:.1%}), "
                                   f"p = {r.p_value:.3g}: " + ("EXTRACTED" if r.extracted else "not shown")),
                      ("vs p0", f"p = {r.p_reference:.3g}: H0 answers each trigger with class {ev.target} with "
                                f"probability at most p0 = {ev.p0:.3g} (the threshold, the original model, "
                                f"{len(ev.info.get('reference_rates', []))} from-scratch models)"),
                      ("vs controls", f"p = {r.p_control:.3g}: {r.control_matches}/{r.control_samples} control "
                                      "images (test images of the other classes) answered with it")],
                     f"EWE evidence for {args.suspect} vs {victim.meta.name} (alpha {alpha:g})"))
        return 0
    sets = dawn_evidence(evidence)
    rows = verify_dawn(load_suspect(args.suspect), sets, victim.meta.num_classes, alpha)
    print(_table([(f"client {r.stream[:16]}" if r.stream != "all" else "all clients",
                   f"{r.matches}/{r.samples} watermark labels matched ({r.agreement:.1%}), p = {r.p_value:.3g}: "
                   + ("EXTRACTED" if r.extracted else "not shown")) for r in rows],
                 f"DAWN evidence for {args.suspect} vs {victim.meta.name} (alpha {alpha:g}; H0 matches at most "
                 f"1/{victim.meta.num_classes - 1} each)"))
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .extraction import AttackSpec
    from .runner import attack_in_process

    try:  # unset flags are None and fall back to AttackSpec's defaults
        spec = AttackSpec.from_given(strategy=args.strategy, strategy_options=_options(args.strategy_option),
                                     budget=args.budget, arch=args.arch, pretrained=args.pretrained,
                                     optimizer=args.optimizer, lr=args.lr, epochs=args.epochs,
                                     batch_size=args.batch_size, augment=False if args.no_augment else None,
                                     targets=args.targets, seed=args.seed, adv_eval_samples=args.adv_samples)
    except ValidationError as e:
        raise explain_validation_error(e, "attack") from None
    result = attack_in_process(spec, victim=args.victim, pool=args.pool, output_policy=args.output_policy,
                               data_root=args.data_root, download=args.download, progress=not args.quiet and not
                               args.json, log_mlflow=not args.no_mlflow, experiment=args.experiment,
                               victim_url=args.victim_url, api_key=args.api_key, max_hours=args.max_hours,
                               cost_limit=not args.no_cost_limit,
                               announce=None if args.quiet or args.json else lambda text: print(text, flush=True))
    if args.json:
        print(json.dumps({k: v for k, v in result.to_dict().items() if k != "history"}))
    else:
        print(result_table(result.to_dict()))
    return 0


def _cost_args(p: argparse.ArgumentParser) -> None:
    from .cost.guard import DEFAULT_LIMIT_HOURS, GO_ANYWAY, LIMIT_ENV

    p.add_argument("--max-hours", type=float, help=f"refuse work projected over this many hours of wall time "
                                                   f"(default ${LIMIT_ENV}, else {DEFAULT_LIMIT_HOURS:g})")
    p.add_argument(GO_ANYWAY, action="store_true", help="start even work projected over the limit")


def cmd_serve(args: argparse.Namespace) -> int:
    from .serving.runtime import deploy, flush_query_log, init_ray, shutdown
    from .serving.spec import load_serve_config

    spec, http = load_serve_config(args.config)  # validated before Ray starts
    host = args.host or http.get("host", "127.0.0.1")
    port = args.port or int(http.get("port", 8000))
    init_ray(args.address, num_cpus=args.num_cpus)
    # SIGTERM (a process manager, `kill PID`) stops the service like Ctrl-C: the query log is flushed and the private
    # cluster shut down. Without this, Ray's own handler aborts the process with a stack dump and skips both
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        deploy(spec.model_dump(), host=host, port=port, app_name=args.app_name)
        base = f"http://{host}:{port}"
        rows = [(v.name, f"{base}/v1/victims/{v.name}  (policy {v.output_policy})") for v in spec.victims]
        rows += [("API docs", f"{base}/docs"), ("query log", str(spec.query_log_path()))]
        rows += [(f"key {c.key[:4]}…", f"budget {c.budget if c.budget is not None else 'unlimited'} per victim, "
                                      f"victims {', '.join(c.victims)}") for c in spec.clients]
        print(_table(rows, f"serving application {args.app_name!r}"), flush=True)
        if args.detach:
            return 0
        print("Ctrl-C stops the service.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        if not args.detach:
            flush_query_log(args.app_name)
            shutdown()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def trial_table(rows: list[dict], columns: list[str]) -> str:
    """Rows of numbers and names as an aligned text table (floats to 4 places)."""
    def fmt(v) -> str:
        if isinstance(v, float) and v.is_integer() and abs(v) >= 1:  # counts (queries) come back from Tune as floats
            return str(int(v))
        return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


#: the final table of `dme sweep`: the factors that name a trial (the pool one too, now a grid axis), then results
SWEEP_COLUMNS = ["victim", "policy", "pool", "strategy", "budget", "arch", "optimizer", "lr", "seed", "victim_utility",
                 "victim_kl", "accuracy", "fidelity", "adversarial_fidelity", "queries_used", "seconds_total"]
_SWEEP_FACTOR_COLUMNS = SWEEP_COLUMNS[:SWEEP_COLUMNS.index("victim_utility")]


class Console:
    """Progress lines, plus (on a terminal) one status line kept under them and rewritten in place."""

    def __init__(self, live: bool):
        self.live, self._shown = live, False

    def line(self, text: str) -> None:
        if self._shown:
            sys.stdout.write("\r\033[K")
            self._shown = False
        if text:
            print(text, flush=True)

    def status(self, text: str) -> None:
        width = shutil.get_terminal_size((120, 20)).columns - 1
        sys.stdout.write("\r\033[K" + text[:width])
        sys.stdout.flush()
        self._shown = True


def _sort_key(v: object) -> tuple[int, float, str]:
    """Numbers in numeric order (budget 300 before 1000), before strings; ``None`` last."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, float(v), "")
    return (1, 0.0, str(v)) if v is not None else (2, 0.0, "")


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep.spec import load_sweep, parse_overrides

    if args.resume and (args.spec or args.set):
        raise DmeError("give a sweep file (with --set overrides) or --resume NAME, not both")
    spec = None if args.resume else load_sweep(args.spec or "sweeps/quickstart.yaml", args.preset,
                                               parse_overrides(args.set))
    if args.dry_run:
        assert spec is not None
        from .cost.guard import limit_seconds
        from .sweep.plan import format_plan, plan_sweep, sweep_resources

        plan = plan_sweep(spec, sweep_resources(args.address, args.num_cpus, args.gpu, args.gpus, args.cpus))
        print(f"sweep {spec.name!r}: valid")
        print(format_plan(plan, args.preset, limit_seconds(args.max_hours)))
        return 0
    from .sweep.runner import run_sweep

    console = Console(live=sys.stdout.isatty())
    out = run_sweep(spec, preset=args.preset, resume=args.resume, address=args.address, num_cpus=args.num_cpus,
                    on_progress=None if args.quiet else console.line, fresh=args.fresh,
                    max_hours=args.max_hours, cost_limit=not args.no_cost_limit,
                    on_status=console.status if console.live and not args.quiet else None)
    console.line("")  # ends the status line
    rows = sorted(out.rows, key=lambda r: tuple(_sort_key(r.get(c)) for c in _SWEEP_FACTOR_COLUMNS))
    if out.interrupted:
        rows = [r for r in rows if r.get("completed")]
        print(f"\nsweep {out.name!r} interrupted: {len(rows)} trials finished, {len(out.errors)} failed, the rest "
              f"saved (MLflow parent run {out.parent_run_id}, KILLED); continue with `dme sweep --resume "
              f"{out.name}`")
    else:
        print(f"\nsweep {out.name!r}: {len(out.rows)} trials done, {len(out.errors)} failed "
              f"(MLflow parent run {out.parent_run_id})")
    print(trial_table(rows, SWEEP_COLUMNS))
    if out.interrupted:
        return 130  # the shell's code for a command ended by SIGINT
    for e in out.errors:
        print(f"failed: {e}", file=sys.stderr)
    print(f"\nBrowse: dme ui    Report: dme report {out.name}    Across sweeps: dme leaderboard")
    return 1 if out.errors else 0


def cmd_services(args: argparse.Namespace) -> int:
    from .serving.runtime import init_ray
    from .sweep import service

    try:
        init_ray(args.address)
    except ConnectionError as e:
        raise DmeError(f"no Ray cluster to read victim services from at {args.address!r} ({e}): services outlive "
                       "sweeps only on a cluster that outlives them (`ray start --head`, then `dme sweep ... "
                       "--address auto --set resources.keep_victims=true`)") from None
    for name in ([s["name"] for s in service.services()] if args.stop_all else args.stop or []):
        service.stop_service(name)
        print(f"stopped victim service {name}")
    rows = service.services()
    if not rows:
        print("no victim services running on this cluster")
        return 0
    print(trial_table([{**r, "victims": ", ".join(r["victims"])} for r in rows],
                      ["name", "status", "victims", "query_log"]))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    import subprocess

    from .tracking import tracking_uri

    uri = tracking_uri()
    if "://" in uri and not uri.startswith(("sqlite:", "file:")):
        print(f"the tracking store is a server already: open {uri}")
        return 0
    url = f"http://127.0.0.1:{args.port}"
    query = f"/#/experiments?searchFilter=tags.%60dme.sweep%60%20%3D%20%27{args.sweep}%27" if args.sweep else ""
    print(f"MLflow UI for {uri} at {url}{query}  (Ctrl-C stops it)", flush=True)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port",
           str(args.port), "--workers", "1"]
    # the server and its uvicorn worker in a process group of their own: stopping `dme ui` by Ctrl-C or by its PID
    # (SIGTERM) stops them all, instead of leaving them holding the port
    child = subprocess.Popen(cmd, env=env, start_new_session=True)
    asked: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        asked.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
        return 0 if asked else code  # stopped on request: a clean exit
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop_group(child)


def _stop_group(child: subprocess.Popen) -> None:
    """Whatever is left of ``child``'s process group: SIGTERM, then SIGKILL if it is still there after 10 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return  # the whole group is gone
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(0.1)  # reaps the leader; the others are reparented and reaped by init
            try:
                os.killpg(child.pid, 0)
            except ProcessLookupError:
                return


def cmd_pool_build(args: argparse.Namespace) -> int:
    from .data import load_pool, write_pool_shards

    pool = load_pool(args.source, root=args.data_root, download=args.download)
    m = write_pool_shards(pool, args.out, rows_per_shard=args.rows_per_shard, row_group_size=args.row_group_size,
                          encoding=args.encoding, overwrite=args.overwrite, progress=not args.quiet)
    print(_table([("images", str(m["num_images"])), ("shards", str(len(m["shards"]))), ("encoding", m["encoding"]),
                  ("shape", "x".join(map(str, m["shape"]))), ("labels", str(m["has_labels"])),
                  ("content key", m["content_key"])], f"pool {m['name']} -> {args.out}"))
    return 0


def cmd_pool_features(args: argparse.Namespace) -> int:
    """A strategy's once-per-sweep preparation, on its own: whatever the strategy's ``prepare`` builds for a pool
    (e.g. reference models and a Ray Data feature pass), cached where its trials will find it."""
    from .attacks import ATTACKS, PrepareContext, QueryStrategy
    from .data import load_pool
    from .pools.features import ray_map_pool
    from .serving.runtime import init_ray, shutdown

    strategy = QueryStrategy.create(args.strategy, _options(args.strategy_option))
    if not strategy.prepares():
        with_step = [n for n in ATTACKS.names() if ATTACKS.get(n).prepares()]
        raise DmeError(f"attack strategy {args.strategy!r} has no preparation step, so there is nothing to compute "
                       f"for a pool; strategies with one: {', '.join(with_step) or 'none'}")
    pool = load_pool(args.pool, root=args.data_root, download=args.download)
    _check_preparation(strategy, pool, args)
    records: list[tuple[str, str]] = []

    def record(metrics: dict[str, float], tags: dict[str, str]) -> None:
        records.extend([(k, f"{v:.4g}") for k, v in metrics.items()] + list(tags.items()))

    init_ray(args.address, num_cpus=args.num_cpus)
    try:
        ctx = PrepareContext(progress=not args.quiet, record=record,
                             map_pool=ray_map_pool(actors=args.actors, batch_size=args.batch_size,
                                                   progress=not args.quiet))
        products = strategy.prepare(pool, ctx)
    finally:
        shutdown()
    rows = [(k, str(v)) for k, v in products.items()] + records
    print(_table(rows or [("prepared", "nothing to do (precomputed)")], f"{args.strategy} prepared for {pool.name}"))
    return 0


def _check_preparation(strategy: Any, pool: Any, args: argparse.Namespace) -> None:
    """Price a preparation before it starts: print the projection when it is over a minute, refuse it over the
    limit with the strategy's cpu-small options as the alternative."""
    from .cost.guard import ANNOUNCE_S, check_limit, limit_seconds
    from .cost.plan import describe, project
    from .cost.rates import Device, Rates
    from .cost.work import human

    device = Device.here()
    rates = Rates(device)
    projected = project(strategy.prepare_cost(pool), rates)  # not corrected by recorded runs yet
    if projected.total > ANNOUNCE_S and not args.quiet:
        print(describe(projected, f"{strategy.name} preparation on {pool.name}, on {device.label}"), flush=True)
    if args.no_cost_limit:
        return

    def alternative() -> str | None:
        small = type(strategy)(**{**strategy.model_dump(), **strategy.cpu_small_options})
        small_s = project(small.prepare_cost(pool), rates).total
        flags = " ".join(f"--strategy-option {k}={v}" for k, v in strategy.cpu_small_options.items()
                         if getattr(strategy, k) != v)
        return f"{flags} (projected {human(small_s)})" if flags and small_s < projected.total else None

    check_limit(f"the {strategy.name} preparation on {pool.name}", projected.total, device.label,
                limit_seconds(args.max_hours), alternative)


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    out = write_report(args.sweep, Path(args.out) if args.out else None, experiment=args.experiment)
    print(out.table)
    print(f"\nreport: {out.markdown}\nplots: {', '.join(str(p) for p in out.plots)}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    run_bench(args.name, args)
    return 0


def _version_args(p: argparse.ArgumentParser, defense: str) -> None:
    """The flags every model-side defense command shares (the victim, the new version's name and bundle, …)."""
    _victim_arg(p)
    p.add_argument("--name", help="registered model name of the new version (default: the victim's registered name, "
                                  "else its bundle name)")
    p.add_argument("--alias", help=f"also point this alias of the registered model at the new version (e.g. "
                                   f"{defense}), so sweeps can name it models:/NAME@ALIAS")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help=f"bundle folder of the new version (default under $DME_HOME/victims/{defense}/)")
    p.add_argument("--no-mlflow", action="store_true", help="write the bundle only")
    p.add_argument("-q", "--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dme", description="Benchmark model-extraction attacks and defenses.",
                                formatter_class=HelpFormatter)
    _common_args(p, argparse.SUPPRESS)
    # every subcommand takes them too (`dme sweep X -v`), without overriding the ones given before it
    common = argparse.ArgumentParser(add_help=False)
    _common_args(common, argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, **kw: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[common], formatter_class=HelpFormatter, **kw)

    tv = command("train-victim", help="train a victim classifier, write its bundle, register it in MLflow")
    tv.add_argument("--dataset", help="dataset name, labeled .npz (train file) or image folder; default: embedded "
                                      f"digits; datasets: {names('datasets')}")
    tv.add_argument("--arch", help=f"model architecture (default cnn32): {names('architectures')}")
    tv.add_argument("--epochs", type=int)
    tv.add_argument("--optimizer", default="adam", help=f"(default adam): {names('optimizers')}")
    tv.add_argument("--lr", type=float, default=1e-3)
    tv.add_argument("--batch-size", type=int, default=64)
    tv.add_argument("--img-size", type=int, help="input size (default: the dataset's)")
    tv.add_argument("--seed", type=int, default=0, help="seed of the data split and training")
    tv.add_argument("--no-augment", action="store_true")
    tv.add_argument("--hflip", action="store_true", help="random horizontal flips (natural images only)")
    tv.add_argument("--name", help="registered model name in MLflow")
    tv.add_argument("--out", help="bundle folder (default: under $DME_HOME/victims)")
    _data_args(tv)
    tv.add_argument("--no-mlflow", action="store_true", help="do not register the victim in MLflow")
    _cost_args(tv)
    tv.add_argument("-q", "--quiet", action="store_true")
    tv.set_defaults(func=cmd_train_victim)

    de = command("defense", help="defenses that carry their own models: train them for a victim")
    des = de.add_subparsers(dest="defense_command", required=True)
    dt = des.add_parser("train", parents=[common], formatter_class=HelpFormatter,
                        help="train a defense's models for a victim (MAD's surrogate, AM's misinformation model, "
                             "CIP's energy thresholds) and store them beside the victim, in MLflow too")
    _victim_arg(dt)
    dt.add_argument("--defense", required=True, help=f"the defense kit to build: {names('defense kits')}")
    dt.add_argument("--epochs", type=int, help="epochs of a kit's trained model (default: the defense's own)")
    dt.add_argument("--seed", type=int, default=0)
    _data_args(dt)
    dt.add_argument("--no-mlflow", action="store_true", help="keep the kit on disk only")
    dt.add_argument("--probe-pool", help="also show what each policy on the kit does to queries from this pool (an "
                                         "attacker's): top-1 kept and KL, beside the test split's")
    dt.add_argument("--probe-images", type=int, default=2000, help="pool images the probe sends (default 2000)")
    dt.add_argument("-q", "--quiet", action="store_true")
    dt.set_defaults(func=cmd_defense_train)
    da = des.add_parser("advft", parents=[common], formatter_class=HelpFormatter,
                        help="AdvFT (paper 002): fine-tune a protected copy of a victim and register it as the next "
                             "version of the victim's registered model, with its lineage and costs")
    _version_args(da, "advft")
    da.add_argument("--margin", type=float, help="m of eq. (2) (default 100, the paper's)")
    da.add_argument("--epochs", type=int, help="N, AdvFT epochs (default 30, the paper's CIFAR10 value)")
    da.add_argument("--gen-steps", type=int, help="I_G per epoch (default: one pass over the training batches)")
    da.add_argument("--model-steps", type=int, help="I_F per epoch (default: one pass over the training batches)")
    da.add_argument("--batch-size", type=int, help="real and generated images per step (default 128)")
    da.set_defaults(func=cmd_defense_advft)

    dw = des.add_parser("ewe", parents=[common], formatter_class=HelpFormatter,
                        help="EWE (Jia et al. 2021): entangle a trigger set with a class in a copy of a victim and "
                             "register it as the next version, with its trigger set as ownership evidence")
    _version_args(dw, "ewe")
    dw.add_argument("--w-epochs", type=int, help="epochs of watermarked training (default 10, the authors' MNIST)")
    dw.add_argument("--batch-size", type=int, help="default 512 (the authors' MNIST), capped at the training set")
    dw.add_argument("--ratio", type=float, help="normal batches per watermark batch (default 1)")
    dw.add_argument("--target", type=int, help="class the triggers are answered with (default 7)")
    dw.add_argument("--source-pool", help="pool the triggers come from, out of distribution (default: the embedded "
                                          "'photos')")
    dw.add_argument("--source-class", type=int, help="class of a labeled source pool (default: any image)")
    dw.add_argument("--references", type=int, help="from-scratch models that calibrate p0 (default 3)")
    dw.set_defaults(func=cmd_defense_ewe)

    ve = command("verify", help="was SUSPECT extracted from the victim? a p-value from the watermark evidence (DAWN's "
                                "records, or an EWE version's trigger set)")
    ve.add_argument("suspect", help="piracy model file (piracy_model.pt, or runs:/RUN/piracy_model.pt) or any victim "
                                    "source (bundle, registered name, models:/ URI)")
    _victim_arg(ve)
    ve.add_argument("--evidence", help="DAWN: the records, <query_log>/watermarks/<victim name> of the deployment (or "
                                       "LocalOracle's $DME_HOME/watermarks/NAME); EWE: the ewe_watermark.npz or its "
                                       "bundle (default: the victim's own, when it is an EWE version)")
    ve.add_argument("--alpha", type=float, help="significance level of the verdict (default 1e-3)")
    ve.add_argument("-q", "--quiet", action="store_true")
    ve.set_defaults(func=cmd_verify)

    at = command("attack", help="run one extraction in process and print the result")
    _victim_arg(at)
    at.add_argument("--pool", default=None, help="pool name, dataset name or .npz path (default: embedded photos); "
                                                 f"pools: {names('pools')}; datasets: {names('datasets')}")
    # attacker choices default to None: AttackSpec owns the defaults (shown in the help from there)
    at.add_argument("--budget", type=int, help=f"queries (default {_default('budget')})")
    at.add_argument("--strategy", help=f"query strategy (default {_default('strategy')}): {names('strategies')}")
    at.add_argument("--strategy-option", action="append", metavar="KEY=VALUE")
    at.add_argument("--arch", help=f"piracy model architecture (default {_default('arch')}): "
                                       f"{names('architectures')}")
    at.add_argument("--pretrained", help="'true' for hub weights or a local checkpoint path")
    at.add_argument("--optimizer", help=f"(default {_default('optimizer')}): {names('optimizers')}")
    at.add_argument("--lr", type=float, help="learning rate (default: the optimizer's paper default)")
    at.add_argument("--epochs", type=int, help=f"piracy training epochs (default {_default('epochs')})")
    at.add_argument("--batch-size", type=int, help=f"(default {_default('batch_size')})")
    at.add_argument("--no-augment", action="store_true")
    at.add_argument("--targets", choices=("scores", "labels"),
                    help=f"(default {_default('targets')}) train on the API's scores, or on each answer's top-1 label "
                         "only (the counter to defenses that bend scores but keep the label)")
    at.add_argument("--output-policy", default="probabilities", help="a chain such as round:2,topk:1; policies: "
                                                                    f"{names('output policies')}")
    at.add_argument("--seed", type=int, help=f"(default {_default('seed')})")
    at.add_argument("--adv-samples", type=int, help="test images used for adversarial fidelity (default: all)")
    _data_args(at)
    at.add_argument("--victim-url", help="attack through the victim API, e.g. http://127.0.0.1:8000/v1/victims/NAME "
                                         "(--victim then names the same victim, used only to judge fidelity)")
    at.add_argument("--api-key", default=os.environ.get("DME_API_KEY"), help="API key for --victim-url "
                                                                              "(default $DME_API_KEY)")
    at.add_argument("--experiment", default="dme-attacks", help="MLflow experiment")
    at.add_argument("--no-mlflow", action="store_true")
    at.add_argument("--json", action="store_true", help="print the result as one JSON object")
    _cost_args(at)
    at.add_argument("-q", "--quiet", action="store_true")
    at.set_defaults(func=cmd_attack)

    sv = command("serve", help="host victims as an MLaaS API on Ray Serve (127.0.0.1 by default)",
                 epilog=serve_epilog())
    sv.add_argument("config", nargs="?", default="deployments/local.yaml", help="Serve config YAML")
    sv.add_argument("--address", help="join this Ray cluster ('auto' = the local `ray start` one) instead of "
                                      "starting a private one")
    sv.add_argument("--host", help="HTTP host (default: the config's http_options, else 127.0.0.1)")
    sv.add_argument("--port", type=int, help="HTTP port (default: the config's http_options, else 8000)")
    sv.add_argument("--app-name", default="dme")
    sv.add_argument("--num-cpus", type=int, help="CPUs of a private cluster (default: all)")
    sv.add_argument("--detach", action="store_true", help="deploy and exit (with --address: the service stays up)")
    sv.set_defaults(func=cmd_serve)

    sw = command("sweep", help="run a sweep of attack trials on Ray Tune against victims on Ray Serve",
                 epilog=sweep_epilog())
    sw.add_argument("spec", nargs="?", help="sweep YAML (default sweeps/quickstart.yaml)")
    sw.add_argument("--preset", help="apply one of the sweep's presets (e.g. cpu-small, full)")
    sw.add_argument("--set", action="append", metavar="FIELD=VALUE",
                    help="override a field after the preset, dotted, value as JSON, e.g. --set "
                         "resources.trial_resources='{\"trials\": 0.01}' (repeatable)")
    sw.add_argument("--resume", metavar="NAME", help="resume sweep NAME: finished trials are not run again")
    sw.add_argument("--address", help="join this Ray cluster ('auto' = the local `ray start` one)")
    sw.add_argument("--num-cpus", type=int, help="CPUs of a private cluster (default: all)")
    sw.add_argument("--dry-run", action="store_true", help="validate the spec and print its plan: every step's "
                    "projected time, the total, CPU/GPU-hours and the finish time; run nothing")
    sw.add_argument("--gpu", help="with --dry-run: plan for a cluster with this GPU model (priced from FLOPs), "
                                  "e.g. a100, h100, t4, l4, v100, a10g")
    sw.add_argument("--gpus", type=int, help="with --dry-run: GPUs of that cluster (default 1 with --gpu)")
    sw.add_argument("--cpus", type=int, help="with --dry-run: CPUs of that cluster (default 8 per GPU)")
    _cost_args(sw)
    sw.add_argument("--fresh", action="store_true", help="start again a sweep that ran before under this name")
    sw.add_argument("-q", "--quiet", action="store_true")
    sw.set_defaults(func=cmd_sweep)

    se = command("services", help="list (or stop) the long-lived victim services sweeps join "
                                  "(resources.keep_victims) on a Ray cluster")
    se.add_argument("--address", default="auto", help="the Ray cluster ('auto' = the local `ray start` one)")
    se.add_argument("--stop", action="append", metavar="NAME", help="delete this service (repeatable)")
    se.add_argument("--stop-all", action="store_true", help="delete every victim service on the cluster")
    se.set_defaults(func=cmd_services)

    po = command("pool", help="pools at scale: Parquet shards, Ray Data feature passes")
    pos = po.add_subparsers(dest="pool_command", required=True)
    pb = pos.add_parser("build", parents=[common], formatter_class=HelpFormatter,
                        help="convert a pool (name, .npz, ImageNet64 batch dir, image folder) into Parquet shards "
                             "with stable sample ids")
    pb.add_argument("source", help="pool name, dataset name, .npz, ImageNet64 batch directory or image folder; "
                                   f"pools: {names('pools')}; datasets: {names('datasets')}")
    pb.add_argument("out", help="output directory (a new one)")
    pb.add_argument("--rows-per-shard", type=int, default=50_000)
    pb.add_argument("--row-group-size", type=int, default=1024)
    pb.add_argument("--encoding", choices=["auto", "raw", "jpeg"], default="auto",
                    help="auto: keep a JPEG pool's bytes, raw pixels otherwise")
    pb.add_argument("--overwrite", action="store_true")
    _data_args(pb)
    pb.add_argument("-q", "--quiet", action="store_true")
    pb.set_defaults(func=cmd_pool_build)
    pf = pos.add_parser("features", parents=[common], formatter_class=HelpFormatter,
                        help="run a strategy's once-per-sweep preparation for a pool (e.g. reference models and a "
                             "Ray Data feature pass), cached where its trials read it")
    pf.add_argument("pool", help="pool name, dataset name or path (a Parquet pool directory streams shard by "
                                 f"shard); pools: {names('pools')}; datasets: {names('datasets')}")
    pf.add_argument("--strategy", required=True, help="a strategy with a preparation step: "
                                                      f"{preparing_strategies()}")
    pf.add_argument("--strategy-option", action="append", metavar="KEY=VALUE",
                    help="the strategy's options that define what is prepared, e.g. n_reference=4")
    pf.add_argument("--actors", type=int, default=2)
    pf.add_argument("--batch-size", type=int, default=256)
    pf.add_argument("--address", help="join this Ray cluster instead of starting a private one")
    pf.add_argument("--num-cpus", type=int)
    _data_args(pf)
    _cost_args(pf)
    pf.add_argument("-q", "--quiet", action="store_true")
    pf.set_defaults(func=cmd_pool_features)

    ui = command("ui", help="start the MLflow UI on the tracking store, bound to 127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--sweep", help="open filtered to this sweep's runs")
    ui.set_defaults(func=cmd_ui)

    rp = command("report", help="Markdown report with PNG plots of a sweep, read from MLflow")
    rp.add_argument("sweep", help="sweep name")
    rp.add_argument("--out", help="folder (default reports/SWEEP)")
    rp.add_argument("--experiment", default=None, help="MLflow experiment (default: found by the sweep's tag)")
    rp.set_defaults(func=cmd_report)

    from .report.leaderboard import add_parser as add_leaderboard_parser  # here: keeps `import cli` light

    add_leaderboard_parser(sub, parents=[common], formatter_class=HelpFormatter)

    bn = command("bench", help="benchmarks (speed, memory, quality) → bench-results/NAME.json")
    bn.add_argument("name", help="benchmark name, e.g. extraction")
    bn.add_argument("--data-dir", default=None, help="folder with the shared .npz data (default: ../shared/data)")
    bn.add_argument("--epochs", type=int, default=None)
    bn.add_argument("--quick", action="store_true", help="a small version for smoke tests")
    bn.add_argument("--victim", default=None, help="victim of the serve bench: a bundle folder or name "
                                                   "(default: the embedded one)")
    bn.add_argument("--sweep", default=None, help="sweep the mlflow-ui bench opens (default: quickstart)")
    bn.add_argument("--out", default="bench-results",
                    help="folder for NAME.json (default: bench-results), or the .json file itself")
    bn.set_defaults(func=cmd_bench)
    return p


def _default(field: str) -> object:
    from .extraction import AttackSpec

    return AttackSpec.model_fields[field].default


def _common_args(p: argparse.ArgumentParser, default: Any) -> None:
    p.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="log at INFO level, Ray's, Serve's and MLflow's loggers included")
    p.add_argument("--plugin", action="append", default=default, metavar="FILE.py|MODULE",
                   help="import a module that registers attacks, defenses, models, … first (repeatable); its names "
                        "then show in --help too (a sweep file lists its own under `plugins`: its trials load them)")


def _victim_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--victim", default="embedded", help="bundle path, registered name, or MLflow model URI "
                                                        "(default: the embedded digits victim)")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", help="where torchvision datasets live (default $DME_DATA or ~/.cache/...)")
    p.add_argument("--download", action="store_true", help="download torchvision datasets (needs internet)")


def main(argv: list[str] | None = None) -> int:
    standalone = argv is None
    argv = sys.argv[1:] if argv is None else argv
    try:
        # plugins first: their names belong in the parser's choices and --help, which are built from the registries
        early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        early.add_argument("--plugin", action="append", default=[])
        load_plugins(early.parse_known_args(argv)[0].plugin)
        args = build_parser().parse_args(argv)
    except DmeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    verbose = bool(getattr(args, "verbose", False))
    # the process-wide Ray settings only when this process is `dme` itself, not a library call of main([...])
    _quiet_third_parties(verbose, private_ray=standalone and not getattr(args, "address", None))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except DmeError as e:
        if os.environ.get("DME_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _quiet_third_parties(verbose: bool, private_ray: bool) -> None:
    """Ray's, Serve's and MLflow's INFO chatter only with ``-v``; set through the environment too, which the workers
    of a private Ray cluster (and MLflow in them) inherit."""
    from .serving.runtime import set_ray_log_level

    # MLflow logs its store's set-up at INFO ("Creating initial MLflow database tables..."); a level the user set
    # stays, except that -v brings INFO back
    if verbose and logging.getLevelName(os.environ.get("MLFLOW_LOGGING_LEVEL", "INFO").upper()) != logging.DEBUG:
        os.environ["MLFLOW_LOGGING_LEVEL"] = "INFO"
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    if not verbose:  # MLflow writes "🏃 View run NAME at: URL" to stdout (not a log line) at the end of every run,
        # and a progress bar for every artifact a report reads back (one small JSON)
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"].upper())  # if MLflow is loaded already
    set_ray_log_level(logging.INFO if verbose else logging.WARNING)
    # A private cluster keeps Ray's own default, token authentication (no other local process can attach to it), but
    # chosen here rather than left to Ray, which warns on every start that it chose it. Ray reads the mode when it
    # is imported, so only before that; never when joining a cluster (`--address`, RAY_ADDRESS: its mode rules)
    if private_ray and not os.environ.get("RAY_ADDRESS") and "ray" not in sys.modules:
        os.environ.setdefault("RAY_AUTH_MODE", "token")


if __name__ == "__main__":
    sys.exit(main())
