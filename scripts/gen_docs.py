"""Generate ``docs/*.md`` from the code: module docstrings, registry entries and the typed specs' JSON schemas.

    .venv/bin/python scripts/gen_docs.py            # rewrite docs/
    .venv/bin/python scripts/gen_docs.py --check    # exit 1 if docs/ is not what the code says (CI, tests)

Why generated: the pages describe what the registries hold and what the specs accept, and both change with every new
attack, defense or spec field. A page written by hand drifts the day after; these are rebuilt from the source of truth
(``tests/test_docs.py`` fails when the checked-in pages differ from a fresh run). Only the short intro of each page is
written by hand, here in :data:`INTROS`. Output is deterministic: sorted registries, no dates, no machine paths.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distributed_me.attacks import ATTACKS  # noqa: E402
from distributed_me.cli import build_parser  # noqa: E402
from distributed_me.data import DATASETS, POOLS  # noqa: E402
from distributed_me.defenses import DETECTORS, KITS, POLICIES  # noqa: E402
from distributed_me.defenses.advft import AdvFTConfig  # noqa: E402
from distributed_me.defenses.ewe import EWEConfig  # noqa: E402
from distributed_me.extraction import FACTORS, METRIC_NAMES, AttackSpec  # noqa: E402
from distributed_me.models import MODELS, model_info  # noqa: E402
from distributed_me.serving.spec import ServeSpec  # noqa: E402
from distributed_me.sweep.spec import SweepSpec  # noqa: E402
from distributed_me.train import OPTIMIZERS  # noqa: E402

PAGES = ("index", "victims-and-api", "attacks", "defenses", "sweeps", "cost", "mlflow", "cluster")
TITLES = {"index": "distributed_me documentation", "victims-and-api": "Victims and the API", "attacks": "Attacks",
          "defenses": "Defenses", "sweeps": "Sweeps",
          "cost": "Know the cost before the work", "mlflow": "The MLflow layout", "cluster": "Running on a cluster"}
INTROS = {
    "index": "`dme` benchmarks model-extraction attacks and defenses: victims are served as an MLaaS-style API on Ray "
             "Serve, attackers run as Ray Tune trials that reach them only through that API, and every run is "
             "recorded in MLflow. One page per concept follows; each is generated from the code (docstrings, "
             "registries, spec schemas) by `python scripts/gen_docs.py`, so it says what the code does today.",
    "victims-and-api": "A victim is a trained classifier bundle (weights + metadata) that the attacker never sees: it "
                       "is hosted behind an API that answers queries through an output policy (the defense) and "
                       "charges every answered image to the caller's API key. `dme serve` hosts victims from a "
                       "serve config; `dme attack --victim-url` and sweep trials query them.",
    "attacks": "An attack is a query strategy: it chooses which pool samples to send to the victim API, and trains a "
               "piracy model on the answers. Strategies are registered by name; a sweep or `dme attack --strategy` "
               "names them, and `--strategy-option KEY=VALUE` (or `attack.strategy_options` in a sweep) sets the "
               "options listed for each below.",
    "defenses": "Output policies decide how much of the victim's confidence vector an answer reveals. A policy chain "
                "(`round:2,topk:1`) is applied inside the victim deployment, so attackers only ever see its output. "
                "Each policy below is named in a sweep's `policies`, a serve config's `output_policy` or "
                "`dme attack --output-policy`.",
    "cost": "Every step is priced before it starts: `dme sweep SPEC --dry-run` prints a sweep's plan (each trial and "
            "preparation step, the total, CPU/GPU-hours, the finish time), `dme attack` and `dme pool features` print "
            "their projection when it is over a minute, and work projected over the cost limit is refused before it "
            "starts. Projections are logged beside actual times in MLflow, and `dme report` shows how far off they "
            "were.",
    "sweeps": "A sweep is a YAML file (see `sweeps/`) validated into a typed spec before anything starts, then run as "
              "one Ray Tune trial per factor combination against victims served on Ray Serve. `dme sweep FILE "
              "--dry-run` validates and counts; `--preset` picks a size; `--resume NAME` continues.",
    "mlflow": "Every run leaves a record in MLflow: a parent run per sweep, a child run per trial attempt, victims "
              "as registered models. `dme ui` browses the store; `dme report SWEEP` turns a sweep's runs into "
              "tables and plots.",
    "cluster": "The same commands run on a laptop and on a Ray cluster. Without `--address`, `dme sweep` and "
               "`dme serve` start a private single-node cluster on 127.0.0.1; with `--address auto` (or as a "
               "`ray job submit` job) they join an existing one.",
}


# ------------------------------------------------------------------ text helpers
def rst_to_md(text: str) -> str:
    """The reST of our docstrings as Markdown: roles and double backticks become code, ``::`` blocks stay indented."""
    text = re.sub(r":(?:class|func|meth|mod|data|attr|exc):`~?([^`]+)`",
                  lambda m: f"`{m.group(1).split('.')[-1] if '~' in m.group(0) else m.group(1)}`", text)
    text = text.replace("``", "`")
    return re.sub(r"::\n", ":\n", text)


def module_doc(path: str) -> str:
    """A module's docstring, read from its source (no import, so documenting never starts anything)."""
    return rst_to_md(ast.get_docstring(ast.parse((ROOT / path).read_text())) or "")


def class_doc(cls: type) -> str:
    """The class's own docstring, else its module's: never the base class's (``inspect.getdoc`` would inherit)."""
    doc = cls.__dict__.get("__doc__") or sys.modules[cls.__module__].__doc__ or ""
    return rst_to_md(inspect.cleandoc(doc))


def cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


# ------------------------------------------------------------------ schemas
def _type(prop: dict[str, Any]) -> str:
    if "$ref" in prop:
        return prop["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in prop:
        return " or ".join(_type(p) for p in prop["anyOf"])
    if "enum" in prop:
        return " / ".join(json.dumps(v) for v in prop["enum"])
    if "const" in prop:
        return json.dumps(prop["const"])
    kind = prop.get("type", "any")
    if kind == "array":
        return f"list of {_type(prop.get('items', {}))}"
    if kind == "object" and isinstance(prop.get("additionalProperties"), dict):
        return f"mapping of {_type(prop['additionalProperties'])}"
    return {"object": "mapping"}.get(kind, kind)


def _models(model: type[BaseModel], found: dict[str, type[BaseModel]]) -> dict[str, type[BaseModel]]:
    """Every pydantic model reachable from ``model``'s fields, by name (the keys of its JSON schema's ``$defs``)."""
    found[model.__name__] = model

    def walk(tp: Any) -> None:
        if isinstance(tp, type) and issubclass(tp, BaseModel) and tp.__name__ not in found:
            _models(tp, found)
        for arg in get_args(tp):
            walk(arg)

    for field in model.model_fields.values():
        walk(field.annotation)
    return found


def schema_tables(model: type[BaseModel], title: str) -> str:
    """The model's fields (type, default, description) and those of every model it nests, one table each."""
    schema = model.model_json_schema(mode="validation")
    classes = _models(model, {})
    parts = [_one_schema(title, schema, model)]
    for name, sub in sorted(schema.get("$defs", {}).items()):
        if sub.get("properties"):
            parts.append(_one_schema(name, sub, classes.get(name)))
    return "\n\n".join(parts)


def _default(prop: dict[str, Any], field: str, model: type[BaseModel] | None) -> str:
    """The default as JSON; one made by a factory (absent from the schema) is made here, from the model itself."""
    if "default" in prop:
        value = prop["default"]
    elif model is not None and field in model.model_fields:
        value = to_jsonable_python(model.model_fields[field].get_default(call_default_factory=True))
    else:
        return "computed"
    return f"`{json.dumps(value)}`"


def _one_schema(title: str, schema: dict[str, Any], model: type[BaseModel] | None = None) -> str:
    required = set(schema.get("required", []))
    rows = []
    for field, prop in schema.get("properties", {}).items():
        default = "*required*" if field in required else _default(prop, field, model)
        rows.append([f"`{field}`", _type(prop), default, prop.get("description", "")])
    doc = rst_to_md(inspect.cleandoc(schema.get("description", "")))
    return f"### {title}\n\n" + (f"{doc}\n\n" if doc else "") + table(["field", "type", "default", "description"], rows)


def options_table(cls: type[BaseModel]) -> str:
    """A strategy's or policy's options (its pydantic fields) as a table, without a heading."""
    if not cls.model_fields:
        return "No options."
    schema = cls.model_json_schema()
    return _one_schema("options", {"properties": schema["properties"], "required": schema.get("required", [])},
                       cls).split("\n\n", 1)[1]


# ------------------------------------------------------------------ pages
def page_index() -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    rows = [[f"`dme {c.dest}`", c.help] for c in sub._choices_actions]  # noqa: SLF001
    pages = [[f"[{TITLES[p]}]({p}.md)", INTROS[p].split(". ")[0] + "."] for p in PAGES if p != "index"]
    return "\n\n".join(["## Pages", table(["page", "about"], pages), "## Commands",
                        "`dme COMMAND --help` lists every option, with the registered names each option accepts.",
                        table(["command", "does"], rows), "## Registered names",
                        table(["kind", "names"], [[k, ", ".join(r.names())] for k, r in [
                            ("strategies", ATTACKS), ("architectures", MODELS), ("optimizers", OPTIMIZERS),
                            ("output policies", POLICIES), ("datasets", DATASETS), ("pools", POOLS)]])])


def page_victims() -> str:
    return "\n\n".join([
        "## Victims", module_doc("distributed_me/victims/store.py"), "## The API on Ray Serve",
        module_doc("distributed_me/serving/app.py"), "## The gate every answer crosses",
        module_doc("distributed_me/serving/gate.py"), "## Accounting: keys, budgets, the query log",
        module_doc("distributed_me/serving/ledger.py"), "## Clients", module_doc("distributed_me/http_oracle.py"),
        module_doc("distributed_me/serving/clients.py"), "## The serve config",
        module_doc("distributed_me/serving/spec.py"), schema_tables(ServeSpec, "ServeSpec")])


def page_attacks() -> str:
    parts = ["## The strategy's life", module_doc("distributed_me/attacks/base.py"), "## Registered strategies"]
    for name in ATTACKS.names():
        cls = ATTACKS.get(name)
        accepts = ", ".join(cls.accepts)
        parts += [f"### `{name}`", f"Answers it works with: {accepts}. Preparation step: "
                  f"{'yes (`dme pool features`)' if cls.prepares() else 'no'}.", class_doc(cls), options_table(cls)]
    parts += ["## The attacker's choices", module_doc("distributed_me/extraction.py"),
              schema_tables(AttackSpec, "AttackSpec"),
              "## Optimizers", module_doc("distributed_me/train/optimizers.py"),
              table(["name", "lr", "betas", "weight decay", "reference"],
                    [[f"`{n}`", o.lr, o.betas, o.weight_decay, o.reference] for n, o in
                     ((n, OPTIMIZERS.get(n)) for n in OPTIMIZERS.names())]),
              "## Architectures", module_doc("distributed_me/models/__init__.py"),
              table(["name", "family", "source", "default input", "pretrained weights"],
                    [[f"`{n}`", i["family"], i["source"], i["default_img_size"], i.get("hub_weights") or "-"]
                     for n, i in ((n, model_info(n)) for n in MODELS.names())])]
    return "\n\n".join(parts)


def page_defenses() -> str:
    parts = [module_doc("distributed_me/defenses/policies.py"), "## Registered output policies"]
    for name in POLICIES.names():
        cls = POLICIES.get(name)
        kind = "format (ends a chain)" if cls.is_format else "transform (scores to scores)"
        kit = f" Needs the `{cls.needs_kit}` defense kit (`dme defense train --defense {cls.needs_kit}`)." \
            if cls.needs_kit else ""
        parts += [f"### `{name}`", f"Kind: {kind}.{kit}", class_doc(cls), options_table(cls)]
    parts += ["## Defense kits", module_doc("distributed_me/defenses/kits.py"), "### Registered kits",
              table(["kit", "what it builds"], [[f"`{n}`", rst_to_md(inspect.getdoc(KITS.get(n)) or "")
                                                .replace("\n", " ")] for n in KITS.names()]),
              "## Per-key detectors", module_doc("distributed_me/defenses/detectors/base.py")]
    for name in DETECTORS.names():
        cls = DETECTORS.get(name)
        parts += [f"### `{name}`", class_doc(cls), options_table(cls)]
    parts += ["## Model-side defenses", "A new version of the victim, registered beside the original: "
              "`dme defense advft` and `dme defense ewe` (see `dme defense --help`).",
              "### AdvFT (`dme defense advft`)", module_doc("distributed_me/defenses/advft.py"),
              options_table(AdvFTConfig),
              "### EWE (`dme defense ewe`)", module_doc("distributed_me/defenses/ewe.py"), options_table(EWEConfig),
              "## Ownership verification (`dme verify`)", module_doc("distributed_me/ownership.py")]
    return "\n\n".join(parts)


def page_sweeps() -> str:
    files = []
    for f in sorted((ROOT / "sweeps").glob("*.yaml")):
        doc = yaml.safe_load(f.read_text()) or {}
        files.append([f"`sweeps/{f.name}`", doc.get("description", ""), ", ".join(sorted(doc.get("presets", {})))])
    return "\n\n".join([
        "## The spec", module_doc("distributed_me/sweep/spec.py"), "## Sweep files",
        table(["file", "description", "presets"], files), "## What the driver does",
        module_doc("distributed_me/sweep/runner.py"), "## Victims: the sweep's own app, or a service sweeps join",
        module_doc("distributed_me/sweep/service.py"), "## One trial", module_doc("distributed_me/sweep/trial.py"),
        "## Console output", module_doc("distributed_me/sweep/progress.py"), "## Fields",
        schema_tables(SweepSpec, "SweepSpec")])


def page_cost() -> str:
    return "\n\n".join([
        "## The cost model", module_doc("distributed_me/cost/__init__.py"), "## Work as sizes",
        module_doc("distributed_me/cost/work.py"), "## Throughput on the device at hand",
        module_doc("distributed_me/cost/rates.py"), "## One extraction, priced",
        module_doc("distributed_me/cost/plan.py"),
        "## A sweep's plan", module_doc("distributed_me/sweep/plan.py"), "## Learning from recorded runs",
        module_doc("distributed_me/cost/history.py"), "## Guard rails", module_doc("distributed_me/cost/guard.py")])


def page_mlflow() -> str:
    return "\n\n".join([
        "## Where runs go", module_doc("distributed_me/tracking.py"), "## A sweep's runs",
        module_doc("distributed_me/sweep/tracking.py"), "## Params and metrics",
        "Every trial run has these params (the factors of a sweep):", ", ".join(f"`{f}`" for f in FACTORS),
        "and these metrics (the result schema, also `dme attack --json`):", ", ".join(f"`{m}`" for m in METRIC_NAMES),
        "## Reports", module_doc("distributed_me/report/__init__.py"),
        "## The leaderboard across sweeps", module_doc("distributed_me/report/leaderboard.py"),
        "## Checking it in a browser", module_doc("distributed_me/bench/mlflow_ui.py")])


def page_cluster() -> str:
    deployments = []
    for f in sorted((ROOT / "deployments").glob("*.yaml")):
        head = [line[1:].rstrip() for line in f.read_text().splitlines() if line.startswith("#")]
        first = []
        for line in head:
            if not line.strip():
                break
            first.append(line)
        deployments += [f"### `deployments/{f.name}`", "```\n" + "\n".join(first) + "\n```"]
    return "\n\n".join([
        "## Starting or joining Ray", module_doc("distributed_me/serving/runtime.py"), "## Deployment files",
        *deployments, "## Pools at scale", module_doc("distributed_me/pools/features.py")])


BUILDERS = {"index": page_index, "victims-and-api": page_victims, "attacks": page_attacks,
            "defenses": page_defenses, "sweeps": page_sweeps, "cost": page_cost, "mlflow": page_mlflow,
            "cluster": page_cluster}


def render() -> dict[str, str]:
    """Every page's Markdown, by file name."""
    header = "<!-- generated by scripts/gen_docs.py from the code: edit the code (or the intro there), not this -->"
    return {f"{p}.md": f"{header}\n\n# {TITLES[p]}\n\n{INTROS[p]}\n\n{BUILDERS[p]()}\n" for p in PAGES}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Generate docs/*.md from the code.")
    ap.add_argument("--out", default=str(ROOT / "docs"))
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page differs")
    args = ap.parse_args(argv)
    out = Path(args.out)
    pages = render()
    stale = [n for n, text in pages.items() if not (out / n).is_file() or (out / n).read_text() != text]
    if args.check:
        print("docs up to date" if not stale else f"docs out of date: {', '.join(stale)}; run scripts/gen_docs.py")
        return 1 if stale else 0
    out.mkdir(parents=True, exist_ok=True)
    for name, text in pages.items():
        (out / name).write_text(text)
    print(f"wrote {len(pages)} pages to {out} ({len(stale)} changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
