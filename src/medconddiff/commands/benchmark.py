"""Measure speed and memory of one or more checkpoints on this device.

  medconddiff benchmark                                   (bundled model; random weights if not trained yet)
  medconddiff benchmark --device cuda --json bench.json
  medconddiff benchmark --checkpoint default lsegdiff-liver   (pixel vs latent, one column each)
  medconddiff benchmark --quick                           (seconds; smoke test, not for numbers)
  medconddiff benchmark --checkpoint mine.safetensors --heldout-scan scan.nii.gz labels.nii.gz --heldout-slices 19 61
                                                          (a fine-tune's per-step / consensus / one-shot check)

Reports per-slice latency of consensus sampling for several step counts and with adaptive steps,
whole-volume slices/s for several batch sizes, the 10-step (and adaptive) / one-shot time ratio, the
sampler's overhead beyond its network passes, the speed-up of computing backbone features once per
slice, a 512×512×300 CT at 0.7 mm end to end (fresh subprocess: time, slices/s, where the time
goes, peak memory), the bundled sample end to end, and fine-tuning on 3 corrected slices, each
target with PASS/MISS (CPU targets on a CPU, GPU targets on CUDA), and the per-step, consensus and
one-shot Dice on held-out slices (the bundled sample's, or a scan given with --heldout-scan).
Timings are medians after warm-up; on a shared machine they are noisy, so compare runs side by side.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import PRECISIONS
from ..errors import ConfigError
from .common import check_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", action="extend", nargs="+", metavar="PATH",
                        help="checkpoint file(s) or bundled model name(s) to measure side by side; 'default' = "
                             "the bundled default model (default: that model, or a random-weight default-config "
                             "model if it is absent)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the full report as JSON")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    parser.add_argument("--quick", action="store_true",
                        help="tiny repeats, steps, batches and volumes (seconds); explicit flags still apply")
    parser.add_argument("--steps-list", type=int, nargs="+", metavar="S",
                        help="step counts for the latency rows (default: 1 5 10 20)")
    parser.add_argument("--reference-steps", type=int, metavar="S",
                        help="steps of the ratio, overhead, throughput, memory and end-to-end rows (default: 10)")
    parser.add_argument("--latency-batch", type=int, metavar="B", help="slices per batch for latency (default: 16)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", metavar="B",
                        help="batch sizes tried for whole-volume slices/s (default: 1 4 8 16 32)")
    parser.add_argument("--volume-slices", type=int, metavar="N",
                        help="slices of the whole-volume throughput run (default: 32)")
    parser.add_argument("--repeats", type=int, metavar="N", help="timed repeats per measurement (default: 3)")
    parser.add_argument("--warmup", type=int, metavar="N", help="untimed warm-up runs (default: 1)")
    parser.add_argument("--big-volume-shape", type=int, nargs=3, metavar=("X", "Y", "Z"),
                        help="volume of the peak-memory probe, sliced along the model's axis (default: 512 512 300)")
    parser.add_argument("--no-memory", action="store_true", help="skip the big-volume peak-memory probe")
    parser.add_argument("--big-volume", metavar="NIFTI", help="a real scan as the big volume (default: synthetic "
                        "512×512×300 CT-like noise at 0.7 mm in-plane, stored LPS)")
    parser.add_argument("--real-size", action="append", metavar="NIFTI", default=[],
                        help="a further real-size scan segmented end to end in a fresh process, with its own "
                        "row against the 60 s target (repeatable; docs/make_real_size_volumes.py writes two)")
    parser.add_argument("--fixed-steps", action="store_true",
                        help="segment the big volume with all reference steps instead of adaptive steps")
    parser.add_argument("--finetune-steps", type=int, metavar="N",
                        help="fine-tuning speed: steps on 3 slices of the sample, and on a training set of "
                             "5 cases × 3 slices, N and 3 N (default: 200; 0 = skip)")
    parser.add_argument("--heldout-slices", type=int, nargs=2, metavar=("A", "B"),
                        help="per-step, consensus and one-shot Dice on canonical slices A..B-1 of the held-out scan "
                             "(default: 48 72, the bundled models' held-out slab of the sample)")
    parser.add_argument("--heldout-scan", nargs=2, metavar=("IMAGE", "LABELS"),
                        help="score that check on this NIfTI scan and label map instead of the bundled sample (a "
                             "fine-tuned model's own held-out slices; give them with --heldout-slices)")
    parser.add_argument("--no-heldout", action="store_true", help="skip the held-out Dice check")
    parser.add_argument("--sample-slices", type=int, metavar="N",
                        help="end-to-end run on the first N slices of the bundled sample only (default: all)")
    parser.add_argument("--threads", type=int, metavar="N", help="torch.set_num_threads(N) first (default: torch's)")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="network arithmetic of every measurement (default: auto = bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def options_from_args(args: argparse.Namespace):
    from ..benchmark import BenchmarkOptions

    overrides = {}
    for name in ("reference_steps", "latency_batch", "volume_slices", "repeats", "warmup", "sample_slices",
                 "threads", "big_volume", "finetune_steps", "precision"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    for name in ("steps_list", "batch_sizes", "big_volume_shape", "heldout_slices"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = tuple(value)
    if args.checkpoint:
        overrides["checkpoints"] = tuple(None if c == "default" else c for c in args.checkpoint)
    overrides["device"] = args.device
    overrides["memory"] = not args.no_memory
    if args.no_heldout:
        overrides["heldout_slices"] = None
    if args.real_size:
        overrides["real_size"] = tuple(args.real_size)
    if args.heldout_scan:
        if args.no_heldout or args.heldout_slices is None:
            raise ConfigError("--heldout-scan needs --heldout-slices A B (the slices its model was not trained on), "
                              "and no --no-heldout")
        overrides["heldout_scan"] = tuple(args.heldout_scan)
    overrides["big_volume_adaptive"] = not args.fixed_steps
    return BenchmarkOptions.quick(**overrides) if args.quick else BenchmarkOptions(**overrides)


def run(args: argparse.Namespace) -> int:
    from ..benchmark import format_report, run_benchmark

    from ..atomic import check_target

    check_device(args.device)
    options = options_from_args(args)
    if args.json is not None:
        # Checked before measuring, so minutes of work are not lost to a file that cannot be written.
        check_target(args.json, args.overwrite, "--json")

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    report = run_benchmark(options, log=log)
    print(format_report(report))
    if args.json is not None:
        from ..nifti import write_json_atomic

        write_json_atomic(args.json, report, overwrite=args.overwrite)
        print(f"wrote {args.json}")
    return 0
