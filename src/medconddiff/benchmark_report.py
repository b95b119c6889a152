"""The benchmark's targets, the environment it ran in, and its report as a table.

One column per model, one row per quantity; a target's verdict (PASS / MISS) follows its value.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any, Callable, Optional

import numpy as np

GB = 1e9

#: name → (description, upper bound on CPU, upper bound on CUDA); None: no target on that device.
TARGETS = {
    "one_shot_ratio": ("fixed-step consensus time / one-shot time at the reference steps", 3.0, 3.0),
    "adaptive_ratio": ("adaptive consensus time / one-shot time (at most the reference steps)", 3.0, 3.0),
    "overhead_fraction": ("sampling time beyond 1 encode_condition + S denoise passes, as a fraction (CPU: the "
                          "passes timed inside the run; CUDA: timed apart)", 0.10, 0.10),
    "big_volume_peak_bytes": ("peak memory for the big volume (host RSS; CUDA: reserved)", 4 * GB, 1.5 * GB),
    "big_volume_seconds": ("big volume end to end (512²×300 at 0.7 mm: 60 s on 2 CPU cores, 3 s on a GPU)",
                           60.0, 3.0),
    "real_size_seconds": ("slowest of the further real-size scans end to end (--real-size; 60 s on 2 CPU cores, "
                          "3 s on a GPU)", 60.0, 3.0),
    "end_to_end_seconds": ("bundled 128³ sample, load + segment", 60.0, 60.0),
    "finetune_seconds": ("fine-tuning on 3 corrected slices (2 min on 2 CPU cores, 15 s on a GPU)", 120.0, 15.0),
    "set_finetune_seconds": ("fine-tuning on a training set of 5 cases × 3 slices (2 min on 2 CPU cores)", 120.0, None),
    "consensus_margin": ("held-out: consensus − max(best step, one-shot) mean Dice (at least 0)", 0.0, 0.0),
    "step_drift": ("held-out: last step − first step x̂0 mean Dice (at least 0: later steps no worse)", 0.0, 0.0),
}
#: Targets that are lower bounds (the value must reach the threshold); every other one is an upper bound.
AT_LEAST = {"consensus_margin", "step_drift"}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: Any) -> dict:
    import torch

    from . import __version__

    from .devices import usable_cpus

    info = {
        "medconddiff": __version__, "torch": torch.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "device": str(device), "device_name": cpu_name(), "cpu_name": cpu_name(),
        "cpu_count": os.cpu_count(), "cpus_usable": usable_cpus(),
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if getattr(device, "type", "") == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


# ------------------------------------------------------------------------------------------ targets

def evaluate_targets(model_report: dict, device_type: str = "cpu",
                     other_workload: Optional[dict[str, str]] = None) -> dict:
    """Each target's value, threshold and verdict. ``other_workload`` names the targets whose run was not
    the workload they are stated for (how it differed): a time of 2 fine-tuning steps says nothing about
    200, so those get no verdict (``passed`` None) and say why (``workload``)."""
    other_workload = other_workload or {}
    memory = model_report["memory"] or {}
    finetune = model_report.get("finetune") or {}
    set_finetune = model_report.get("set_finetune") or {}
    held_out = model_report.get("diffusion_check") or {}
    values = {
        "one_shot_ratio": model_report["one_shot"]["ratio"],
        "adaptive_ratio": model_report["adaptive"]["ratio"],
        "overhead_fraction": model_report["overhead_fraction"],
        "big_volume_peak_bytes": memory.get("peak_bytes"),
        "big_volume_seconds": memory.get("seconds"),
        "real_size_seconds": max((r["seconds"] for r in model_report.get("real_size") or ()), default=None),
        "end_to_end_seconds": model_report["end_to_end"]["seconds"],
        "finetune_seconds": finetune.get("seconds"),
        "set_finetune_seconds": set_finetune.get("seconds"),
        "consensus_margin": held_out.get("consensus_minus_best_of_steps_and_one_shot"),   # None: nothing scored
        "step_drift": held_out.get("last_step_minus_first_step"),
    }
    targets = {}
    for name, (description, cpu_bound, cuda_bound) in TARGETS.items():
        value = values[name]
        threshold = cuda_bound if device_type == "cuda" else cpu_bound
        passed = None
        if value is not None and threshold is not None and name not in other_workload:
            passed = bool(value >= threshold) if name in AT_LEAST else bool(value <= threshold)
        targets[name] = {"description": description, "value": value, "threshold": threshold, "passed": passed,
                         "workload": other_workload.get(name)}
    return targets


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _verdict(target: dict) -> str:
    if target.get("workload"):
        return " (no verdict)"
    return "" if target["passed"] is None else (" PASS" if target["passed"] else " MISS")


def _gb(value: Optional[float]) -> Optional[float]:
    return None if value is None else value / GB


def table_rows(report: dict) -> list[tuple[str, list[str]]]:
    models = report["models"]
    options = report["options"]
    ref = options["reference_steps"]
    rows: list[tuple[str, list[str]]] = []

    def row(name: str, cell: Callable[[dict], str]) -> None:
        rows.append((name, [cell(m) for m in models]))

    row("model", lambda m: f"{m['family']} {m['backbone']} {m['model_plane'][0]}×{m['model_plane'][1]}")
    parts = sorted({k for m in models for k in m["parameters"] if k != "total"},
                   key=lambda k: ((["backbone", "adapter", "denoiser"] + [k]).index(k), k))
    for part in parts + ["total"]:
        row(f"parameters: {part} (M)", lambda m, part=part: _fmt(
            None if part not in m["parameters"] else m["parameters"][part] / 1e6, ".2f"))
    row(f"encode_condition, ms/slice (batch {options['latency_batch']})",
        lambda m: _fmt(1e3 * m["parts"]["encode_condition_s"] / m["parts"]["batch"], ".1f"))
    row("denoise pass, ms/slice", lambda m: _fmt(1e3 * m["parts"]["denoise_s"] / m["parts"]["batch"], ".2f"))
    for i, steps in enumerate(entry["steps"] for entry in models[0]["latency"]):
        row(f"consensus, {steps} fixed steps, ms/slice",
            lambda m, i=i: _fmt(m["latency"][i]["ms_per_slice"], ".1f"))
    row("one-shot forward, ms/slice", lambda m: _fmt(m["one_shot"]["ms_per_slice"], ".1f"))
    row(f"{ref}-step / one-shot (target ≤ 3×)",
        lambda m: _fmt(m["one_shot"]["ratio"], ".2f", "×") + _verdict(m["targets"]["one_shot_ratio"]))
    row(f"adaptive (≤ {ref} steps): mean steps, ms/slice",
        lambda m: f"{m['adaptive']['mean_steps']:.1f}, {m['adaptive']['ms_per_slice']:.1f}")
    row("adaptive / one-shot (target ≤ 3×)",
        lambda m: _fmt(m["adaptive"]["ratio"], ".2f", "×") + _verdict(m["targets"]["adaptive_ratio"]))
    row(f"overhead beyond 1 encode + {ref} denoise (target ≤ 10%)",
        lambda m: _fmt(100 * m["overhead_fraction"], "+.1f", "%") + _verdict(m["targets"]["overhead_fraction"]))
    row("  the same, passes timed apart (moves with load)",
        lambda m: _fmt(100 * m["overhead_in_run"]["fraction_parts_apart"], "+.1f", "%") if m["overhead_in_run"] else "–")
    row(f"feature reuse speed-up vs re-extracting ({ref} steps)",
        lambda m: _fmt(m["feature_reuse"]["speedup"], ".2f", "×"))
    for i, batch_size in enumerate(entry["batch_size"] for entry in models[0]["throughput"]["by_batch_size"]):
        row(f"volume of {options['volume_slices']} slices, batch {batch_size}, slices/s",
            lambda m, i=i: _fmt(m["throughput"]["by_batch_size"][i]["slices_per_second"], ".1f"))
    row("best batch size → slices/s",
        lambda m: f"{m['throughput']['best_batch_size']} → {m['throughput']['best_slices_per_second']:.1f}")
    shape = "×".join(map(str, (models[0]["memory"] or {}).get("shape", options["big_volume_shape"])))
    row(f"big volume {shape} → model plane",
        lambda m: "×".join(map(str, (m["memory"] or {}).get("model_plane", []))) or "n/a")
    row("  end to end, s",
        lambda m: _fmt((m["memory"] or {}).get("seconds"), ".1f") + _verdict(m["targets"]["big_volume_seconds"]))
    row("  slices/s, mean steps",
        lambda m: f"{_fmt((m['memory'] or {}).get('slices_per_second'), '.2f')}, "
                  f"{_fmt((m['memory'] or {}).get('mean_steps'), '.1f')}")
    for part in list((models[0]["memory"] or {}).get("profile_seconds", {})):
        row(f"    {part}, s", lambda m, part=part: _fmt((m["memory"] or {}).get("profile_seconds", {}).get(part), ".1f"))
    row("  peak memory",
        lambda m: _fmt(_gb((m["memory"] or {}).get("peak_bytes")), ".2f", " GB") + _verdict(
            m["targets"]["big_volume_peak_bytes"]))
    row("  process after model load (host RSS)",
        lambda m: _fmt(_gb((m["memory"] or {}).get("rss_after_model_load_bytes")), ".2f", " GB"))
    row("  added by the run (host RSS)",
        lambda m: _fmt(_gb((m["memory"] or {}).get("run_increment_bytes")), ".2f", " GB"))
    row("  of which trajectory kept", lambda m: _fmt(_gb((m["memory"] or {}).get("trajectory_bytes")), ".3f", " GB"))
    for i, scan in enumerate((models[0].get("real_size") or [])):
        row(f"real-size {os.path.basename(scan['source'])} → model plane, mean steps",
            lambda m, i=i: "×".join(map(str, m["real_size"][i]["model_plane"]))
            + f", {m['real_size'][i]['mean_steps']:.1f}")
        row("  end to end, s; peak memory",
            lambda m, i=i: _fmt(m["real_size"][i]["seconds"], ".1f") + _seconds_verdict(m, m["real_size"][i])
            + f"; {_fmt(_gb(m['real_size'][i]['peak_bytes']), '.2f', ' GB')}")
    row("end to end bundled sample, s (target ≤ 60 s)",
        lambda m: _fmt(m["end_to_end"]["seconds"], ".1f") + f" ({m['end_to_end']['slices']} sl)"
        + _verdict(m["targets"]["end_to_end_seconds"]))
    row("fine-tune on 3 slices: steps, s (s/step)",
        lambda m: "n/a" if not (m.get("finetune") or {}).get("seconds") else
        f"{m['finetune']['steps']}, {m['finetune']['seconds']:.1f} ({m['finetune']['seconds_per_step']:.2f})"
        + _verdict(m["targets"]["finetune_seconds"]))
    row("fine-tune on a set of 5 cases × 3 slices: steps, s (s/step; ÷ 3-slice s/step)",
        lambda m: "n/a" if not (m.get("set_finetune") or {}).get("seconds") else
        f"{m['set_finetune']['steps']}, {m['set_finetune']['seconds']:.1f} "
        f"({m['set_finetune']['seconds_per_step']:.2f}; "
        f"{m['set_finetune']['seconds_per_step'] / m['finetune']['seconds_per_step']:.2f}×)"
        + _verdict(m["targets"]["set_finetune_seconds"]))
    held = (models[0].get("diffusion_check") or {}).get("slices") or options.get("heldout_slices")
    if held:
        slab = f"{held[0]}:{held[1]}"
        scan = os.path.basename((options.get("heldout_scan") or ["sample"])[0])
        row(f"held-out {scan} {slab}: consensus / one-shot / best step Dice",
            lambda m: _held_out(m, lambda c: f"{_fmt(c['consensus'], '.4f')} / {_fmt(c['one_shot'], '.4f')} / "
                                             f"{_fmt(_best(c['step_mean_dice']), '.4f')} "
                                             f"({c['steps_used_mean']:.1f} steps)"))
        row("  consensus − max(best step, one-shot) (target ≥ 0)",
            lambda m: _held_out(m, lambda c: _fmt(c["consensus_minus_best_of_steps_and_one_shot"], "+.4f"))
            + _verdict(m["targets"]["consensus_margin"]))
        row("  last step − first step (target ≥ 0)",
            lambda m: _held_out(m, lambda c: _fmt(c["last_step_minus_first_step"], "+.4f"))
            + _verdict(m["targets"]["step_drift"]))
    row("checkpoint load, s", lambda m: _fmt(m["checkpoint_load_seconds"], ".2f"))
    return rows


def _seconds_verdict(model: dict, scan: dict) -> str:
    """PASS/MISS of one real-size scan against the real-size time target."""
    threshold = model["targets"]["real_size_seconds"]["threshold"]
    return "" if threshold is None else (" PASS" if scan["seconds"] <= threshold else " MISS")


def _best(values: list) -> Optional[float]:
    return max((v for v in values if v is not None), default=None)


def _held_out(model: dict, cell: Callable[[dict], str]) -> str:
    check = model.get("diffusion_check")
    if not check:
        return "n/a"
    return f"n/a ({check['skipped']})" if "skipped" in check else cell(check)


def format_report(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"medconddiff benchmark on {env['device']} ({env['device_name']}), torch {env['torch']}, "
        f"{env['torch_threads']} torch threads, {env['cpu_count']} CPUs ({env['cpus_usable']} usable), "
        f"load average {_fmt((env.get('load_average') or [None])[0], '.2f')} → "
        f"{_fmt((env.get('load_average_after') or [None])[0], '.2f')}, "
        f"precision {report['options'].get('precision', 'auto')}",
    ]
    for m in report["models"]:
        lines.append(f"  {m['label']}: {m['source']}")
    rows = table_rows(report)
    headers = [m["label"] for m in report["models"]]
    width0 = max(len(name) for name, _ in rows)
    widths = [max(len(h), *(len(cells[i]) for _, cells in rows)) for i, h in enumerate(headers)]
    lines.append("")
    lines.append("  ".join([" " * width0] + [h.rjust(w) for h, w in zip(headers, widths)]))
    for name, cells in rows:
        lines.append("  ".join([name.ljust(width0)] + [c.rjust(w) for c, w in zip(cells, widths)]))
    lines.append("")
    lines.append(f"medians of {report['options']['repeats']} interleaved rounds after {report['options']['warmup']} "
                 "warm-up (ratios: median of per-round ratios); end to end and memory are single runs")
    differing = sorted({why for m in report["models"] for t in m["targets"].values() if (why := t.get("workload"))})
    if differing:
        lines.append("no verdict where the run was not the target's workload: " + "; ".join(differing))
    return "\n".join(lines)
