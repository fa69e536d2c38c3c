"""Reference-parity harness: rebuild the golden cases and compare with the recorded numbers.

The golden file (``tests/data/golden_public.json``) records what the reference code
(RepDistiller, TTM, mdistiller) computes for fixed inputs and name-seeded weights. This module
re-runs the same experiments against the project's ``models`` and ``distiller_zoo`` packages:

* :func:`fill_value` / :func:`apply_fill` -- the weight rule keyed by the state-dict name;
* :func:`build_input` / :func:`input_drift` -- the deterministic inputs and their checksums;
* :func:`summarize` / :func:`compare_summary` -- float64 statistics and relative errors;
* :func:`check_model` / :func:`run_case` / :func:`check_case` -- one verdict per golden entry.

Every ``check_*`` function returns a :class:`Verdict` that lists, for each quantity above the
tolerance, what it was, what the reference says and the relative error. A missing model or
class raises :class:`Missing`.

Run as a script for one line per case and a summary line
(``python tests/parity.py [GOLDEN] [--only TEXT] [-v]``; the packages are imported as installed).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import json
import math
import pkgutil
import sys
import traceback
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

TESTS_DIR = Path(__file__).resolve().parent
GOLDEN_PATH = TESTS_DIR / "data" / "golden_public.json"
GOLDEN_FORMAT = "kd-parity-golden/1"

SUMMARY_SEED = 777       # weights of the 'wsum' statistic
OBJECTIVE_SEED = 4242    # + output index: weights of the 'wsum' backward objective
N_FIRST = 5              # leading values kept by a summary
ZERO_FLOOR = 1e-12       # denominator floor for quantities that are zero in the reference
INPUT_DRIFT_TOL = 1e-6   # rebuilt inputs must match their recorded checksums this closely
PACKAGES = ("models", "distiller_zoo")


class Missing(Exception):
    """The model, class or function under test does not exist (or its package fails to import).

    ``absent`` is True when the packages import but lack the name: only then may an optional
    case be skipped; a package that does not import fails every case that needs it.
    """

    def __init__(self, why: str, absent: bool = True):
        super().__init__(why)
        self.absent = absent


def load_golden(path: Path | str = GOLDEN_PATH) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"golden reference file {path} not found (it ships in tests/data/)")
    with open(path) as f:
        golden = json.load(f)
    if golden.get("format") != GOLDEN_FORMAT:
        raise ValueError(f"{path}: format {golden.get('format')!r}, expected {GOLDEN_FORMAT!r}")
    return golden


@contextlib.contextmanager
def quiet():
    """Silence stdout (MobileNetV2 and ContrastMemory print) and warnings (deprecated kl_div)."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def single_threaded(fn: Callable) -> Callable:
    """Run `fn` with one torch thread: these small CPU workloads gain little from intra-op
    threads and lose a lot when the cores are shared (CI runners, parallel test jobs)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)
    return wrapper


# ----------------------------------------------------------------------------- weight fill
def fill_value(name: str, current: torch.Tensor) -> Optional[torch.Tensor]:
    """Value that the name-seeded rule gives the state-dict entry `name`, or None to keep it."""
    if not current.is_floating_point():
        return None
    shape = tuple(current.shape)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode("utf-8")))
    if name.endswith("running_var"):
        new = 0.5 + torch.rand(shape, generator=g)
    elif name.endswith("running_mean"):
        new = 0.1 * torch.randn(shape, generator=g)
    elif len(shape) >= 2:
        new = torch.randn(shape, generator=g) * (1.0 / math.prod(shape[1:])) ** 0.5
    elif len(shape) == 1 and (name.endswith("weight") or name.endswith("gamma")):
        new = 1 + 0.1 * torch.randn(shape, generator=g)
    elif len(shape) == 1 and name.endswith("bias"):
        new = 0.1 * torch.randn(shape, generator=g)
    else:
        return None
    return new.to(current.dtype)


def apply_fill(module: nn.Module, keys: Optional[list[str]] = None,
               shapes: Optional[dict[str, list[int]]] = None) -> None:
    """Fill every entry of ``module.state_dict()`` (or exactly `keys`) in place.

    `shapes` maps keys to the reference shapes; a key that is absent or shaped otherwise
    raises ValueError.
    """
    state = module.state_dict()
    for key in state if keys is None else keys:
        if key not in state:
            raise ValueError(f"fill: state_dict has no entry {key!r} (it has {list(state)[:10]})")
        if shapes and key in shapes and list(state[key].shape) != list(shapes[key]):
            raise ValueError(f"fill: {key!r} has shape {list(state[key].shape)}, reference {shapes[key]}")
        new = fill_value(key, state[key])
        if new is not None:
            with torch.no_grad():
                state[key].copy_(new)


# ----------------------------------------------------------------------------- inputs
def build_input(spec: dict):
    """One tensor (or a list for ``{"list": [...]}``) from a golden input spec."""
    if "list" in spec:
        return [build_input(s) for s in spec["list"]]
    shape = tuple(spec.get("shape", ()))
    g = torch.Generator().manual_seed(int(spec["seed"])) if "seed" in spec else None
    gen = spec["gen"]
    if gen in ("randn", "rand"):
        draw = torch.randn if gen == "randn" else torch.rand
        t = draw(shape, generator=g) * float(spec.get("scale", 1.0)) + float(spec.get("shift", 0.0))
    elif gen == "randint":
        t = torch.randint(int(spec["low"]), int(spec["high"]), shape, generator=g)
    elif gen == "values":
        t = torch.tensor(spec["values"], dtype=getattr(torch, spec.get("dtype", "float32")))
    else:
        raise ValueError(f"unknown input generator {gen!r}")
    post = spec.get("post")
    if post == "relu":
        t = torch.relu(t)
    elif post == "abs":
        t = t.abs()
    elif post == "l2rows":
        t = t / t.norm(dim=1, keepdim=True)
    elif post not in (None, "none"):
        raise ValueError(f"unknown post-processing {post!r}")
    if t.is_floating_point() and spec.get("requires_grad"):
        t.requires_grad_(True)
    return t


def labelled(name: str, value) -> list[tuple[str, Any]]:
    """[(label, tensor)]: ``name`` for a tensor, ``name[i]`` for the items of a list input."""
    if isinstance(value, (list, tuple)):
        return [(f"{name}[{i}]", v) for i, v in enumerate(value)]
    return [(name, value)]


def input_drift(spec: dict, value) -> float:
    """Largest relative difference between a built input and its recorded ``check`` sums."""
    specs = spec["list"] if "list" in spec else [spec]
    tensors = value if isinstance(value, list) else [value]
    worst = 0.0
    for s, t in zip(specs, tensors):
        chk = s.get("check")
        if chk is None:
            continue
        d = t.detach().double()
        worst = max(worst,
                    abs(d.sum().item() - chk["sum"]) / max(abs(chk["sum"]), chk["abs_sum"], ZERO_FLOOR),
                    abs(d.abs().sum().item() - chk["abs_sum"]) / max(chk["abs_sum"], ZERO_FLOOR))
    return worst


def decode(arg, inputs: dict):
    """Turn the golden argument encoding ($in, $size, $sizes, $ns) into Python values."""
    if isinstance(arg, list):
        return [decode(a, inputs) for a in arg]
    if isinstance(arg, dict) and len(arg) == 1:
        (tag, val), = arg.items()
        if tag == "$in":
            return inputs[val]
        if tag == "$size":
            return torch.Size(val)
        if tag == "$sizes":
            return [torch.Size(s) for s in val]
        if tag == "$ns":
            return argparse.Namespace(**val)
        if tag == "$class_means":   # KD++'s center_emb_train.json as json.load returns it
            return {str(i): row.tolist() for i, row in enumerate(inputs[val])}
    return arg


# ----------------------------------------------------------------------------- summaries
_summary_weights: dict[int, torch.Tensor] = {}


def summarize(t: torch.Tensor, values: bool = False) -> dict:
    """Float64 statistics of `t` (row-major flattening): shape, sum, abs_sum, norm, wsum, first."""
    d = t.detach().double().reshape(-1)
    n = d.numel()
    if n not in _summary_weights:
        _summary_weights[n] = torch.randn(n, generator=torch.Generator().manual_seed(SUMMARY_SEED),
                                          dtype=torch.float64)
    out = {"shape": list(t.shape), "sum": d.sum().item(), "abs_sum": d.abs().sum().item(),
           "norm": d.norm().item(), "wsum": (d * _summary_weights[n]).sum().item(),
           "first": d[:N_FIRST].tolist()}
    if values:
        out["values"] = d.tolist()
    return out


def describe_output(out) -> dict:
    """Record of a return value: a single value, a tensor summary, a list/tuple, or a number."""
    if isinstance(out, torch.Tensor):
        if out.numel() == 1:
            return {"type": "tensor", "shape": list(out.shape), "value": out.detach().double().item()}
        return {"type": "tensor", **summarize(out)}
    if isinstance(out, (list, tuple)):
        return {"type": type(out).__name__, "items": [describe_output(o) for o in out]}
    if isinstance(out, (int, float)):
        return {"type": "number", "value": float(out)}
    raise TypeError(f"cannot describe a return value of type {type(out).__name__}")


def output_tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in output_tensors(o)]
    return []


def ctkd_objective(out: torch.Tensor, spec: dict, inputs: dict) -> torch.Tensor:
    """CTKD's KD loss at the temperature ``t_start + t_end * sigmoid(out)``, in float64.

    ``KL(softmax(y_t / temp) || softmax(y_s / temp))`` summed over classes, divided by the
    batch size and multiplied by ``temp**2`` (CTKD's ``DistillKL`` with a tensor temperature).
    """
    temp = spec["t_start"] + spec["t_end"] * torch.sigmoid(out.double())
    y_s, y_t = inputs[spec["logit_s"]].double(), inputs[spec["logit_t"]].double()
    log_p_s = torch.log_softmax(y_s / temp, dim=1)
    log_p_t = torch.log_softmax(y_t / temp, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum() / y_s.shape[0]
    return kl * temp.reshape(()) ** 2


def objective(out, kind, inputs: Optional[dict] = None) -> Optional[torch.Tensor]:
    """Scalar to backpropagate: plain sum ('sum'), seeded weighted sum ('wsum') of the outputs,
    or a dict objective (``{"kind": "ctkd_kd", ...}``, see :func:`ctkd_objective`)."""
    if isinstance(kind, dict):
        if kind.get("kind") != "ctkd_kd":
            raise ValueError(f"unknown objective {kind!r}")
        return ctkd_objective(out, kind, inputs or {})
    terms = []
    for i, t in enumerate(output_tensors(out)):
        if not t.requires_grad:
            continue
        if kind == "sum":
            terms.append(t.sum())
        elif kind == "wsum":
            w = torch.randn(tuple(t.shape), generator=torch.Generator().manual_seed(OBJECTIVE_SEED + i))
            terms.append((t * w.to(t.dtype)).sum())
        else:
            raise ValueError(f"unknown objective {kind!r}")
    return sum(terms) if terms else None


# ----------------------------------------------------------------------------- comparison
def rel_err(got: float, ref: float, floor: float = 0.0) -> float:
    """|got - ref| / max(|ref|, floor); NaN counts as infinitely wrong."""
    err = abs(got - ref) / max(abs(ref), floor, ZERO_FLOOR)
    return math.inf if math.isnan(err) else err


class Verdict:
    """Collects relative errors against a tolerance and the problems worth reporting."""

    def __init__(self, tol: float):
        self.tol = tol
        self.worst = 0.0
        self.problems: list[str] = []
        self.notes: list[str] = []

    @property
    def ok(self) -> bool:
        return not self.problems

    def fail(self, label: str, why: str) -> None:
        self.worst = math.inf
        self.problems.append(f"{label}: {why}")

    def number(self, label: str, got: float, ref: float, floor: float = 0.0) -> float:
        """Compare one number (see :func:`rel_err`) and report it when above the tolerance."""
        err = rel_err(got, ref, floor)
        self.worst = max(self.worst, err)
        if err > self.tol:
            self.problems.append(f"{label}: {got:.7g}, reference {ref:.7g} "
                                 f"(rel err {err:.3g} > tol {self.tol:g})")
        return err

    def summary(self, label: str, got: dict, ref: dict) -> None:
        compare_summary(self, label, got, ref)

    def message(self, title: str) -> str:
        lines = [f"{title}: {len(self.problems)} quantit{'y' if len(self.problems) == 1 else 'ies'} "
                 f"differ from the reference (tol {self.tol:g}, max rel err {self.worst:.3g})"]
        return "\n  ".join(lines + self.problems)


def compare_summary(v: Verdict, label: str, got: dict, ref: dict) -> None:
    """Report the worst statistic of a tensor summary (errors as in PARITY.md section 6)."""
    if list(got["shape"]) != list(ref["shape"]):
        v.fail(label, f"shape {list(got['shape'])}, reference {list(ref['shape'])}")
        return
    numel = math.prod(ref["shape"])
    typical = ref["abs_sum"] / max(numel, 1)
    checks = [("sum", got["sum"], ref["sum"], ref["abs_sum"]),
              ("abs_sum", got["abs_sum"], ref["abs_sum"], 0.0),
              ("norm", got["norm"], ref["norm"], 0.0)]
    if "wsum" in ref:
        checks.append(("wsum", got["wsum"], ref["wsum"], ref["norm"]))
    for key in ("first", "values"):
        if key in ref and key in got:
            checks += [(f"{key}[{i}]", g, r, typical) for i, (g, r) in enumerate(zip(got[key], ref[key]))]
    errs = [rel_err(g, r, floor) for _, g, r, floor in checks]
    worst = max(range(len(errs)), key=lambda i: errs[i])
    v.worst = max(v.worst, errs[worst])
    if errs[worst] > v.tol:
        name, g, r, floor = checks[worst]
        more = sum(e > v.tol for e in errs) - 1
        v.problems.append(f"{label} {name}: {g:.7g}, reference {r:.7g} (rel err {errs[worst]:.3g} > tol "
                          f"{v.tol:g})" + (f"; {more} more statistic(s) of it off" if more else ""))


def compare_output(v: Verdict, label: str, got: dict, ref: dict) -> None:
    if ref["type"] in ("list", "tuple"):
        if got["type"] not in ("list", "tuple"):
            return v.fail(label, f"returns a {got['type']}, reference a {ref['type']}")
        if len(got["items"]) != len(ref["items"]):
            return v.fail(label, f"{len(got['items'])} items, reference {len(ref['items'])}")
        for i, (g, r) in enumerate(zip(got["items"], ref["items"])):
            compare_output(v, f"{label}[{i}]", g, r)
        return
    if ref["type"] == "tensor" and got["type"] != "tensor":
        return v.fail(label, f"returns a {got['type']}, reference a tensor")
    if "value" in ref:
        if "value" not in got:
            return v.fail(label, f"shape {got.get('shape')}, reference is a single value")
        v.number(label, got["value"], ref["value"])
        return
    if "value" in got:
        return v.fail(label, f"a single value of shape {got['shape']}, reference shape {ref['shape']}")
    compare_summary(v, label, got, ref)


# ----------------------------------------------------------------------------- lookup
_packages: Optional[tuple[dict, dict]] = None
_submodules: dict[str, list] = {}


def packages() -> tuple[dict, dict]:
    """({name: module}, {name: import error}) for the packages under test, imported once."""
    global _packages
    if _packages is None:
        found, errors = {}, {}
        for name in PACKAGES:
            try:
                with quiet():
                    found[name] = importlib.import_module(name)
            except Exception as e:  # reported as Missing by the cases that need it
                errors[name] = f"import {name} failed: {type(e).__name__}: {e}"
        _packages = (found, errors)
    return _packages


def submodules(pkg) -> list:
    """The importable submodules of a package, sorted by dotted name (import errors skipped)."""
    if pkg.__name__ not in _submodules:
        mods = []
        infos = pkgutil.walk_packages(getattr(pkg, "__path__", []), pkg.__name__ + ".", onerror=lambda _: None)
        for info in sorted(infos, key=lambda i: i.name):
            try:
                with quiet():
                    mods.append(importlib.import_module(info.name))
            except Exception:
                pass
        _submodules[pkg.__name__] = mods
    return _submodules[pkg.__name__]


def find_target(target: dict) -> Callable:
    """The class/function `target['name']`: top level of the search packages, then submodules."""
    found, errors = packages()
    search = target.get("search", ["distiller_zoo"])
    pkgs = [found[p] for p in search if p in found]
    if not pkgs:
        raise Missing("; ".join(errors.get(p, f"{p} not importable") for p in search), absent=False)
    name = target["name"]
    for mod in pkgs + [m for p in pkgs for m in submodules(p)]:
        if hasattr(mod, name):
            return getattr(mod, name)
    raise Missing(f"{target['kind']} {name} not found in {' or '.join(search)} (nor in any submodule)")


def model_dict() -> dict:
    found, errors = packages()
    if "models" not in found:
        raise Missing(errors["models"], absent=False)
    md = getattr(found["models"], "model_dict", None)
    if md is None:
        raise Missing("models.model_dict not found")
    return md


# ----------------------------------------------------------------------------- models
def describe_modules(model: nn.Module, mods) -> list[dict]:
    """Path (by identity in ``named_modules()``), type and size of each module in `mods`."""
    where: dict[int, str] = {}
    for path, m in model.named_modules():
        where.setdefault(id(m), path)
    described = []
    for m in mods:
        cls = type(m)
        rec = {"path": where.get(id(m)), "type": cls.__name__,
               "nn_types": [c.__name__ for c in cls.__mro__ if getattr(nn, c.__name__, None) is c],
               "num_params": sum(p.numel() for p in m.parameters())}
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            rec["num_features"] = m.num_features
        if isinstance(m, nn.Conv2d):
            rec["in_channels"], rec["out_channels"] = m.in_channels, m.out_channels
        inner = [c for c in m.modules() if isinstance(c, (nn.modules.batchnorm._BatchNorm, nn.Conv2d))]
        if list(m.children()) and inner:   # containers: width of their last BN (or conv)
            rec["last_channels"] = getattr(inner[-1], "num_features", None) or inner[-1].out_channels
        described.append(rec)
    return described


def module_list(model: nn.Module, method: str) -> dict:
    fn = getattr(model, method, None)
    if fn is None:
        return {"absent": True}
    try:
        mods = fn()
    except NotImplementedError as e:
        return {"raises": "NotImplementedError", "message": str(e)}
    return {"modules": describe_modules(model, list(mods))}


def compare_module_list(v: Verdict, method: str, got: dict, ref: dict) -> None:
    if "raises" in ref:   # the reference raises: raising (or lacking the method) is right
        if "modules" in got:
            v.fail(method, f"returns {len(got['modules'])} modules, reference raises {ref['raises']}")
        return
    if "modules" not in ref:
        return
    if "modules" not in got:
        return v.fail(method, f"{'is absent' if 'absent' in got else 'raises ' + got['raises']}, "
                              f"reference returns {len(ref['modules'])} modules")
    g, r = got["modules"], ref["modules"]
    if len(g) != len(r):
        return v.fail(method, f"{len(g)} modules {[m['path'] for m in g]}, reference {len(r)} "
                              f"{[m['path'] for m in r]}")
    for i, (gm, rm) in enumerate(zip(g, r)):
        lab = f"{method}[{i}]"
        if gm["path"] != rm["path"]:
            v.fail(lab, f"module at {gm['path']!r}, reference {rm['path']!r}")
        if gm["num_params"] != rm["num_params"]:
            v.fail(lab, f"{gm['num_params']} parameters, reference {rm['num_params']} (at {rm['path']!r})")
        if rm.get("torch_nn_type") and rm["type"] not in gm["nn_types"]:
            v.fail(lab, f"type {gm['type']}, reference torch.nn.{rm['type']} (at {rm['path']!r})")
        for key in ("num_features", "in_channels", "out_channels"):
            if key in rm and gm.get(key) != rm[key]:
                v.fail(lab, f"{key} {gm.get(key)}, reference {rm[key]} (at {rm['path']!r})")
        if "last_channels" in rm and gm.get("last_channels") != rm["last_channels"]:   # informational
            v.notes.append(f"{lab}: last_channels {gm.get('last_channels')}, reference {rm['last_channels']}")


def split_feat(out) -> tuple[list, torch.Tensor]:
    if not isinstance(out, (list, tuple)) or len(out) != 2:
        raise TypeError(f"forward(x, is_feat=True) returned {type(out).__name__}, expected (features, logits)")
    return list(out[0]), out[1]


@single_threaded
def check_model(name: str, golden: dict) -> Verdict:
    """Build `name` from ``models.model_dict``, fill it, run it and compare with the golden entry."""
    ref = golden["models"][name]
    v = Verdict(ref.get("tol", golden.get("default_tol", 1e-4)))
    md = model_dict()
    if name not in md:
        raise Missing(f"{name!r} not in models.model_dict (it has {sorted(md)})")
    torch.manual_seed(0)
    with quiet():
        model = md[name](num_classes=ref.get("num_classes", 100))
    state = model.state_dict()
    got_sd = [(k, list(t.shape), str(t.dtype).replace("torch.", "")) for k, t in state.items()]
    ref_sd = [(k, list(s), d) for k, s, d in ref["state_dict"]]
    if got_sd != ref_sd:
        got_set, ref_set = {repr(e) for e in got_sd}, {repr(e) for e in ref_sd}
        lost = [e for e in ref_sd if repr(e) not in got_set]
        extra = [e for e in got_sd if repr(e) not in ref_set]
        if lost or extra:
            v.fail("state_dict", f"{len(lost)} reference entries missing or different (e.g. {lost[:2]}), "
                                 f"{len(extra)} unexpected (e.g. {extra[:2]})")
        else:
            v.notes.append("state_dict order differs from the reference (loading still works)")
    n_params = sum(p.numel() for p in model.parameters())
    if n_params != ref["num_params"]:
        v.fail("num_params", f"{n_params}, reference {ref['num_params']}")
    apply_fill(model)
    model = model.float().eval()
    for label, ref_out in ref["outputs"].items():
        spec = golden["model_inputs"][label]
        x = build_input(spec)
        drift = input_drift(spec, x)
        if drift > INPUT_DRIFT_TOL:
            v.fail(f"input {label}", f"rebuilt input differs from its checksum (rel {drift:.2g}): torch RNG changed?")
            continue
        with torch.no_grad(), quiet():
            logits = model(x)
            runs = {"feat": split_feat(model(x, is_feat=True))}
            if "preact" in ref_out:   # ViT records have no preact run
                runs["preact"] = split_feat(model(x, is_feat=True, preact=True))
        v.summary(f"{label} logits", summarize(logits, values="values" in ref_out["logits"]), ref_out["logits"])
        for kind, (feats, lg) in runs.items():
            ref_feats = ref_out[kind]["features"]
            if len(feats) != len(ref_feats):
                v.fail(f"{label} {kind}", f"{len(feats)} features, reference {len(ref_feats)}")
            else:
                for i, (f, rf) in enumerate(zip(feats, ref_feats)):
                    v.summary(f"{label} {kind}[{i}]", summarize(f), rf)
            v.summary(f"{label} {kind} logits", summarize(lg), ref_out[kind]["logits"])
    for method in ("get_feat_modules", "get_bn_before_relu"):
        if method in ref:   # recorded for the CIFAR networks only
            compare_module_list(v, method, module_list(model, method), ref[method])
    return v


# ----------------------------------------------------------------------------- loss / module cases
def run_case(case: dict, target: Callable) -> list[dict]:
    """Run the calls of a golden case on `target` (a class or function); one record per call."""
    is_class = case["target"]["kind"] == "class"
    obj = None
    if is_class:
        init = case.get("init", {})
        torch.manual_seed(0)
        with quiet():
            obj = target(*decode(init.get("args", []), {}),
                         **{k: decode(a, {}) for k, a in init.get("kwargs", {}).items()})
        if "fill" in case:
            shapes = {k: s for k, s, _ in case.get("state_dict", [])}
            apply_fill(obj, case["fill"]["filled"], shapes)
        if isinstance(obj, nn.Module):
            obj = obj.float()
    records = []
    for call in case["calls"]:
        inputs = {n: build_input(s) for n, s in call["inputs"].items()}
        drift = max([input_drift(s, inputs[n]) for n, s in call["inputs"].items()], default=0.0)
        if isinstance(obj, nn.Module):
            obj.train(call.get("mode", "train") == "train")
            for p in obj.parameters():
                p.grad = None
        fn = getattr(obj, call.get("method") or "forward") if is_class else target
        args = decode(call.get("args", []), inputs)
        kwargs = {k: decode(a, inputs) for k, a in call.get("kwargs", {}).items()}
        with torch.enable_grad(), quiet():
            if "torch_seed" in call:   # the call's own global draws (ViTKD's mask) start here
                torch.manual_seed(int(call["torch_seed"]))
            out = fn(*args, **kwargs)
            rec = {"output": describe_output(out), "grads": {}, "state_after": {}, "input_drift": drift}
            loss = objective(out, case.get("objective", "sum"), inputs)
            if loss is not None:
                loss.backward()
        for name, value in inputs.items():
            for label, t in labelled(name, value):
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    rec["grads"][label] = None if t.grad is None else summarize(t.grad)
        if isinstance(obj, nn.Module):
            for pname, p in obj.named_parameters():
                if p.grad is not None:
                    rec["grads"]["param:" + pname] = summarize(p.grad)
            state = obj.state_dict()
            for key in call.get("state_after") or []:
                rec["state_after"][key] = summarize(state[key]) if key in state else None
        records.append(rec)
    return records


def compare_case(case: dict, records: list[dict], default_tol: float) -> Verdict:
    v = Verdict(case.get("tol", default_tol))
    for ci, (got, ref) in enumerate(zip(records, case["calls"])):
        pre = f"call{ci} " if len(case["calls"]) > 1 else ""
        if got["input_drift"] > INPUT_DRIFT_TOL:
            v.fail(pre + "inputs", f"rebuilt inputs differ from their checksums (rel {got['input_drift']:.2g}): "
                                   "torch RNG changed?")
            continue
        compare_output(v, pre + "output", got["output"], ref["output"])
        for label, rg in ref.get("grads", {}).items():
            gg = got["grads"].get(label)
            lab = f"{pre}grad {label}"
            if rg is None or gg is None:
                if (rg is None) != (gg is None):
                    v.fail(lab, "no gradient, the reference has one" if gg is None
                           else "has a gradient, the reference has none")
                continue
            if rg.get("zero"):   # analytically zero in the reference: only bound the round-off
                if list(gg["shape"]) != list(rg["shape"]):
                    v.fail(lab, f"shape {gg['shape']}, reference {rg['shape']}")
                elif not gg["norm"] <= rg["max_norm"]:
                    v.fail(lab, f"norm {gg['norm']:.3g}, reference is zero (allowed up to {rg['max_norm']:.3g})")
                continue
            compare_summary(v, lab, gg, rg)
        for key, rs in (ref.get("state_after") or {}).items():
            gs = got["state_after"].get(key)
            if gs is None:
                v.fail(f"{pre}state {key}", "missing from state_dict()")
            else:
                compare_summary(v, f"{pre}state {key}", gs, rs)
    return v


@single_threaded
def check_case(case: dict, golden: dict, target: Optional[Callable] = None) -> Verdict:
    """Look up the case's target (unless given), run it and compare. Raises Missing."""
    if target is None:
        target = find_target(case["target"])
    return compare_case(case, run_case(case, target), golden.get("default_tol", 1e-4))


def case_list(golden: dict) -> list[tuple[str, dict]]:
    """[(test id, case)] for the loss and helper-module sections, e.g. ``loss/DistillKL/public/a``."""
    prefix = {"losses": "loss", "modules": "module"}
    return [(f"{prefix[sec]}/{c['id']}", c) for sec in prefix for c in golden.get(sec, [])]


# ----------------------------------------------------------------------------- script
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Compare models/ and distiller_zoo/ with the golden numbers.")
    ap.add_argument("golden", nargs="?", default=str(GOLDEN_PATH))
    ap.add_argument("--only", default="", help="keep the cases whose id contains this text")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every problem")
    a = ap.parse_args(argv)
    golden = load_golden(a.golden)
    jobs = [(f"model/{n}", lambda n=n: check_model(n, golden), False) for n in golden["models"]]
    jobs += [(cid, lambda c=c: check_case(c, golden), bool(c.get("optional"))) for cid, c in case_list(golden)]
    counts = {"PASS": 0, "FAIL": 0, "MISSING": 0, "SKIP": 0}
    for cid, job, optional in jobs:
        if a.only not in cid:
            continue
        try:
            v = job()
            status = "PASS" if v.ok else "FAIL"
            info = [f"max_rel_err={v.worst:.2e}"] + (v.problems if a.verbose else v.problems[:3]) + v.notes
        except Missing as e:
            status, info = ("SKIP" if optional and e.absent else "MISSING"), [str(e)]
        except Exception as e:
            if a.verbose:
                traceback.print_exc()
            status, info = "FAIL", [f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"]
        counts[status] += 1
        print(f"{status:<7} {cid}  " + "  ".join(info), flush=True)
    print(f"parity: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['MISSING']} missing, "
          f"{counts['SKIP']} skipped")
    return int(bool(counts["FAIL"] or counts["MISSING"]))


if __name__ == "__main__":
    sys.exit(main())
