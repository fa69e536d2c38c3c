"""``--resume`` continues the run it names, never a changed one.

A run folder's ``config.json`` records the flags the run was started with (``"flags"``) and
the values they resolved to. Resuming merges the command line into those flags: a flag not
given takes the saved value; a given flag must resolve to the value the run was trained with,
except the ones below that only change where output goes or how fast the same computation
runs, and ``--epochs``, which may grow. Anything else is refused with one line that lists each
difference, before data or networks are loaded and before any file is written.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, Optional

from errors import UserError

# Flags a resumed run may change: output, placement and speed, not what is computed.
FREE_TO_CHANGE = frozenset({
    "print_freq", "save_freq", "device", "compile", "compile_mode", "channels_last", "resume",
    "save_root", "run_name", "data_folder", "path_t", "workers", "teacher_cache", "cuda_graphs", "decode",
})
# Resolved values compared besides the flags themselves: what the flags do not pin down.
IDENTITY_KEYS = ("teacher_sha256", "model_t", "world_size")


def reconcile(cfg: Mapping[str, Any], flags: Mapping[str, Any], given: set[str], run_dir: str,
              resolve: Callable[[dict[str, Any], Optional[int]], Any], options: Mapping[str, str],
              unused: Callable[[Mapping[str, Any]], set[str]] = lambda cfg: set()) -> Any:
    """The configuration a ``--resume`` continues with: ``cfg`` itself when there is no saved
    run in ``run_dir`` (or no ``--resume``), else the saved run's flags merged with those given,
    resolved again by ``resolve(flags, saved_seed)``; refused when it would change the run.

    ``unused(cfg)`` names flags that do not act on the run ``cfg`` describes (the flags of
    methods it does not use); they may differ.
    """
    saved = saved_config(run_dir) if cfg["resume"] else None
    if saved is None:
        return cfg
    resolved = resolve(merged_flags(flags, given, saved), saved.get("seed"))
    options = {k: v for k, v in options.items() if k not in unused(saved) & unused(resolved)}
    refuse_changes(saved, resolved, given, options, run_dir)
    return resolved


def saved_config(run_dir: str) -> Optional[dict[str, Any]]:
    """The run's ``config.json`` as a dict, or None when the folder holds none.

    Raises:
        UserError: the file exists but cannot be read as a JSON object.
    """
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path} of the run being resumed ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} of the run being resumed is not a JSON object")
    return data


def merged_flags(flags: Mapping[str, Any], given: set[str], saved: Mapping[str, Any]) -> dict[str, Any]:
    """The flags of the resumed run: the saved ones, overridden by those given now.

    Flags the saved run does not know (added to the scripts since) keep today's defaults.
    Runs written before ``config.json`` held ``"flags"`` fall back to its top-level values.
    """
    recorded = saved.get("flags")
    if not isinstance(recorded, dict):
        recorded = {k: saved[k] for k in flags if k in saved and k not in _DERIVED_AT_TOP_LEVEL}
    out = dict(flags)
    out.update({k: v for k, v in recorded.items() if k in flags and k not in given})
    return out


_DERIVED_AT_TOP_LEVEL = ("learning_rate", "seed", "add", "alpha", "beta", "gamma")


def refuse_changes(saved: Mapping[str, Any], resolved: Mapping[str, Any], given: set[str],
                   options: Mapping[str, str], run_dir: str) -> None:
    """Raises UserError listing every training value that differs from the saved run.

    Args:
        saved: the run's ``config.json``.
        resolved: the configuration the merged flags resolve to now.
        given: destinations of the flags on this command line.
        options: destination → flag name, for the message.
        run_dir: the run folder, for the message.
    """
    changes = []
    for key in list(options) + list(IDENTITY_KEYS):
        if key in FREE_TO_CHANGE or key not in saved or key not in resolved:
            continue
        before, after = saved[key], resolved[key]
        if key == "epochs":
            if after < before:
                changes.append(f"--epochs {before} → {after} (it may only grow)")
            continue
        if _same(before, after):
            continue
        name = options.get(key, key)
        note = "" if key in given or key in IDENTITY_KEYS else " (not given: derived)"
        changes.append(f"{name} {_show(before)} → {_show(after)}{note}")
    if changes:
        raise UserError(f"--resume of {run_dir} refused, the run was trained with other values: "
                        f"{'; '.join(changes)}. Leave these flags out (the run's own values are "
                        f"used) or start a new run (another --trial or --run_name)")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _show(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]  # a SHA-256
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)
