"""Segment NIfTI scans or DICOM series with a MedCondDiff/LSegDiff checkpoint.

  medconddiff segment scan.nii.gz -o scan_seg.nii.gz
  medconddiff segment scans/ -o results/ [--skip-existing]     (a cohort: a folder in, a folder out)
  medconddiff segment SERIES_DIR -o seg.dcm                     (a DICOM series in, a DICOM SEG out)
  medconddiff segment EXPORT_DIR --series 3 -o labels.nii.gz    (one series of a PACS export)
  medconddiff segment EXPORT_DIR --all-series -o results/ [--output-format dicom-seg]
  medconddiff segment flair.nii.gz t1.nii.gz t1c.nii.gz t2.nii.gz -o seg.nii.gz --checkpoint brats.safetensors
  torchrun --nproc-per-node 4 -m medconddiff segment scans/ -o results/   (scans shared across ranks)

Scans are segmented in any orientation and at any voxel size: the checkpoint's plan reorients each
to canonical, resamples its slices to the plan's spacing and maps the result back, so the output
lies on the scan's own grid with its affine. A multi-channel model takes one 4-D file per scan, or
one file per channel (in a folder: nnU-Net naming, CASE_0000.nii.gz, CASE_0001.nii.gz, …).

Writes the consensus labels (uint8, the scan's affine), optionally the uncertainty map and the
per-step x̂0 labels (4-D, step axis last), and a JSON sidecar with everything needed to reproduce it.
Existing files are never overwritten unless --overwrite is given; every file is written atomically, and a
scan's files are moved into place together (a hidden .NAME.medconddiff-pending marker stands beside them
meanwhile), so --skip-existing segments again only what a stopped run of its own left, never a user's file.
In a cohort a scan that cannot be read or segmented is reported in one line (a bug in medconddiff:
with its traceback) and the others go on; the summary counts done / skipped / failed and the exit
status is 1 if any failed. A cohort also writes medconddiff_volumes.csv into the output folder: one row
per scan (done, skipped or failed, and why), the millilitres of each class. --slices takes the slice
lists of every command (see its help).

DICOM: a .dcm file (or any file with DICOM's DICM marker) is read as DICOM. A folder with .nii/.nii.gz
files at its top level is a NIfTI cohort; a folder without them that holds DICOM files (at any depth)
is read as DICOM series, and a folder with both is refused. A DICOM folder with several series needs
--series N|UID (the error lists them) or --all-series (outputs named seriesN_DESCRIPTION_seg.nii.gz,
a series made only of localizers skipped with a note). Localizer (scout) images within a series are
left out with a note; a series of one image in a folder is refused (give its .dcm file to segment it
as a 2-D image). Labels are written as NIfTI with the affine read from DICOM, or as a DICOM SEG
(-o NAME.dcm, or --output-format dicom-seg for folder outputs) that references the source images,
one segment per class of the checkpoint; a SEG needs a DICOM input. --output-format dicom-rtstruct
writes the .dcm as an RT structure set instead (one ROI of closed contours per class, for planning
systems that import contours but not SEG). The sidecar records the series
(UIDs, number, description); no patient name, ID or birth date is printed or recorded.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..cohort_table import DONE, FAILED, SKIPPED, ScanOutcome, table_path, write_cohort_table
from ..config import SamplingConfig, add_dataclass_arguments, override_from_args
from ..errors import ConfigError, StorageError, UserInputError, is_disk_full
from ..nifti import NIFTI_SUFFIXES
from .common import SLICES_HELP, check_device, failure_report, scan_slices
from ..dicom_inputs import (DicomPick, folder_kind, is_dicom_input, is_dicom_seg_name, media_folder, pick_series,
                            read_pick, top_level_nifti)
from ..outputs import (default_output, folder_holding, output_paths, outputs_recorded_in, pending_marker,
                       segmentation_record, strip_nifti_suffix, trajectory_volume)

OPTIONAL_OUTPUTS = ("uncertainty", "trajectory")
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, nargs="*", help="NIfTI scan(s) or a folder of them, or DICOM: a "
                        "series folder or a .dcm file (default: the bundled sample scan); for a multi-channel "
                        "model, one file per channel of one scan")
    parser.add_argument("-o", "--output", type=Path, help="output .nii.gz, or .dcm for a DICOM SEG of a DICOM "
                        "input (a folder for a cohort or --all-series); default: <input>_seg.nii.gz next to the "
                        "input, or ./ for the sample")
    dicom = parser.add_mutually_exclusive_group()
    dicom.add_argument("--series", help="DICOM folder with several series: the one to segment, by Series Number "
                       "or Series Instance UID")
    dicom.add_argument("--all-series", action="store_true", help="DICOM folder: segment every series (except "
                       "localizer-only ones) into the -o folder, named seriesN_DESCRIPTION_seg.*")
    parser.add_argument("--output-format", choices=("nifti", "dicom-seg", "dicom-rtstruct"),
                        help="labels written: NIfTI (default), DICOM SEG, or an RT structure set of contours for a "
                        "planning system (DICOM inputs only); for -o FILE its suffix decides between NIfTI and .dcm, "
                        "which is a SEG unless dicom-rtstruct is named")
    parser.add_argument("--checkpoint", help="checkpoint .safetensors, or a bundled model: medconddiff-liver "
                        "(default), lsegdiff-liver")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--channel", type=int, help="for 4-D scans and a one-channel model: which volume of "
                        "the 4th axis to segment")
    parser.add_argument("--slices", help=f"segment only these {SLICES_HELP} (default: all)")
    parser.add_argument("--save-uncertainty", action="store_true", help="also write <output>_uncertainty.nii.gz")
    parser.add_argument("--save-trajectory", action="store_true",
                        help="also write <output>_trajectory.nii.gz: the x̂0 labels of every step (step axis last)")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace existing output files")
    existing.add_argument("--skip-existing", action="store_true",
                          help="skip scans whose outputs exist (resume an interrupted cohort)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice; 1 is "
                        "steadier on a machine shared with other jobs)")
    add_dataclass_arguments(parser, SamplingConfig, title="sampling")


@dataclass(frozen=True)
class ScanJob:
    """One scan to segment: its file(s) (one per channel, or one) and where its labels go."""

    name: str
    files: tuple[Path, ...]
    output: Path
    dicom: Optional[DicomPick] = None


def group_channel_files(files: list[Path], channels: int) -> list[tuple[str, tuple[Path, ...]]]:
    """(case name, files) per scan: nnU-Net's CASE_0000… grouping for several channels, else one file each."""
    if channels == 1:
        return [(strip_nifti_suffix(f), (f,)) for f in files]
    groups: dict[str, dict[int, Path]] = {}
    singles = []
    for f in files:
        match = _CHANNEL_FILE.match(strip_nifti_suffix(f))
        if match:
            groups.setdefault(match["case"], {})[int(match["channel"])] = f
        else:
            singles.append((strip_nifti_suffix(f), (f,)))   # a 4-D file holding every channel
    scans = list(singles)
    for case, by_channel in sorted(groups.items()):
        if sorted(by_channel) == list(range(channels)):
            scans.append((case, tuple(by_channel[c] for c in range(channels))))
        else:
            # Reported as a failed scan with a clear reason, not silently dropped.
            scans.append((case, tuple(by_channel[c] for c in sorted(by_channel))))
    return sorted(scans)


class NotePrinter:
    """Prints each note once, to stderr: a folder's notes (files skipped) would repeat for every series."""

    def __init__(self) -> None:
        self.shown: set[str] = set()

    def __call__(self, text: str, where: str) -> None:
        if text not in self.shown:
            self.shown.add(text)
            print(f"{where}: note: {text}", file=sys.stderr, flush=True)


#: --output-format values that write a .dcm file.
DICOM_OUTPUTS = ("dicom-seg", "dicom-rtstruct")


def plan_jobs(inputs: list[Path], output: Optional[Path], channels: int, *, series: Optional[str] = None,
              all_series: bool = False, output_format: Optional[str] = None,
              note: Optional[NotePrinter] = None) -> tuple[list[ScanJob], bool]:
    """The scans to segment (for torchrun, only this rank's share) and whether they form a cohort (a
    failure is reported and the others go on)."""
    from ..nifti import sample_scan_path

    suffix = ".dcm" if output_format in DICOM_OUTPUTS else ".nii.gz"
    note = note or NotePrinter()
    picks_series = series is not None or all_series
    folder = inputs[0] if len(inputs) == 1 and inputs[0].is_dir() else None
    cohort = False
    if not inputs:
        if picks_series:
            raise ConfigError("--series and --all-series choose DICOM series; give a DICOM folder")
        sample = sample_scan_path()
        jobs = [ScanJob(strip_nifti_suffix(sample), (sample,), output or default_output(sample, Path.cwd()))]
    elif folder is not None and folder_kind(folder) == "nifti":
        if picks_series:
            raise ConfigError(f"--series and --all-series choose DICOM series; {folder} is a folder of NIfTI files")
        if output is None:
            raise ConfigError("a folder input needs -o OUTPUT_FOLDER")
        if output.exists() and not output.is_dir():
            raise ConfigError(f"{output} is a file; a folder input needs an output folder")
        files = top_level_nifti(folder)
        ours = outputs_recorded_in(folder)       # an earlier run's results written into the scans' folder
        left_out = [f for f in files if f.name in ours]
        if left_out:
            files = [f for f in files if f.name not in ours]
            note(f"left out {len(left_out)} file(s) that earlier runs wrote here (their sidecars list them as "
                 "outputs)", folder.name)
        jobs = [ScanJob(name, group, output / f"{name}_seg{suffix}")
                for name, group in group_channel_files(files, channels)]
        cohort = True
    elif any(is_dicom_input(path) for path in inputs):
        jobs, cohort = _dicom_jobs(inputs, output, channels, series, all_series, suffix, note)
    elif picks_series:
        raise ConfigError("--series and --all-series choose DICOM series; the input is not DICOM")
    elif channels > 1 and len(inputs) == channels:
        name = strip_nifti_suffix(inputs[0])
        name = _CHANNEL_FILE.match(name)["case"] if _CHANNEL_FILE.match(name) else name
        jobs = [ScanJob(name, tuple(inputs), output or default_output(inputs[0].with_name(name + ".nii.gz")))]
    elif len(inputs) == 1:
        jobs = [ScanJob(strip_nifti_suffix(inputs[0]), (inputs[0],), output or default_output(inputs[0]))]
    else:
        if channels > 1:
            raise UserInputError(f"the model expects {channels} channels: give one file per channel "
                                 f"({channels} files), one 4-D file, or a folder")
        _check_output_folder(output, "several scans")
        jobs = [ScanJob(strip_nifti_suffix(p), (p,), output / f"{strip_nifti_suffix(p)}_seg{suffix}") for p in inputs]
        cohort = True
    for job in jobs:
        # Checked before any work: the writer would refuse the name only after the scan is segmented.
        _check_output_name(job, output_format)
    _check_distinct_outputs(jobs)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return jobs[rank::world], cohort or len(jobs) > 1


def _check_distinct_outputs(jobs: list[ScanJob]) -> None:
    """Two scans never write one file (``--overwrite`` would let the second replace the first's results),
    and no output is an input (``-o scan.nii.gz`` would replace the scan with its labels), nor lies in a
    DICOM folder that is read (``-o SERIES/IM_0003.dcm`` would replace one of the series' images)."""
    inputs = {path.resolve(): job for job in jobs for path in job.files if path.is_file()}
    read_folders = {folder: job for job in jobs for folder in _dicom_folders_read(job)}
    written: dict[Path, ScanJob] = {}
    for job in jobs:
        for path in output_paths(job.output).values():
            where = path.resolve()
            if where in inputs:
                raise ConfigError(f"{job.name} would write {path}, which is an input ({inputs[where].name}); "
                                  "choose another -o")
            folder = next((folder for folder in read_folders if where.is_relative_to(folder)), None)
            if folder is not None:
                reader = "it is" if read_folders[folder] is job else f"{read_folders[folder].name} is"
                if where.exists() or where.is_symlink():
                    raise ConfigError(f"{job.name} would write {path}, which is an input (a file of the DICOM folder "
                                      f"{folder.name} {reader} read from); choose another -o")
                raise ConfigError(f"{job.name} would write {path} into the DICOM folder {folder.name} {reader} read "
                                  "from (the folder would no longer read as its series alone); choose another -o")
            if where in written and written[where] is not job:
                raise ConfigError(f"{written[where].name} and {job.name} would both write {path}; give their "
                                  "files distinct names, or segment them in separate runs")
            written[where] = job


def _dicom_folders_read(job: ScanJob) -> list[Path]:
    """The folders whose files a DICOM job reads: a folder given, or the series folder of one file given."""
    if job.dicom is None:
        return []
    folders = [path for path in job.files if path.is_dir()]
    if job.dicom.folder is not None:
        folders.append(job.dicom.folder)
    return [folder.resolve() for folder in folders]


def cohort_folder(jobs: list[ScanJob]) -> Path:
    """The folder a cohort's outputs share (the -o folder), where its table goes."""
    try:
        return Path(os.path.commonpath([job.output.parent for job in jobs]))
    except ValueError:      # relative and absolute paths mixed
        return Path(os.path.commonpath([job.output.parent.absolute() for job in jobs]))


def make_output_folders(jobs: list[ScanJob]) -> None:
    """Creates every job's output folder before any scan is segmented: a folder that cannot be made
    must not fail a run at its last step, after minutes of sampling."""
    for folder in dict.fromkeys(job.output.parent for job in jobs):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except FileExistsError as error:
            raise NotADirectoryError(f"cannot write into {folder}: it is a file, not a folder") from error
        except OSError as error:
            raise UserInputError(f"cannot create the output folder {folder}: {error.strerror or error}") from error
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"cannot write into the output folder {folder}: permission denied")


def _check_output_folder(output: Optional[Path], what: str) -> None:
    if output is None or (output.exists() and not output.is_dir()) or output.name.lower().endswith(NIFTI_SUFFIXES) \
            or is_dicom_seg_name(output):
        raise ConfigError(f"{what} need -o OUTPUT_FOLDER")


def _check_output_name(job: ScanJob, output_format: Optional[str]) -> None:
    if job.output.is_dir():      # even with --overwrite: found only when writing, after the whole run
        raise ConfigError(f"-o {job.output} is a folder; give a labels file name (a folder -o is for several scans)")
    seg = is_dicom_seg_name(job.output)
    if seg and job.dicom is None:
        raise ConfigError(f"-o {job.output}: a DICOM SEG references the DICOM series it segments, and "
                          f"{job.name} is not DICOM; write NIfTI (.nii.gz) instead")
    if not seg and not job.output.name.lower().endswith(NIFTI_SUFFIXES):
        raise ConfigError(f"-o {job.output}: a labels file name must end with .nii or .nii.gz "
                          "(or .dcm for a DICOM SEG of a DICOM input)")
    if output_format is not None and seg != (output_format in DICOM_OUTPUTS):
        raise ConfigError(f"--output-format {output_format} does not match -o {job.output}")


def _dicom_jobs(inputs: list[Path], output: Optional[Path], channels: int, series: Optional[str],
                all_series: bool, suffix: str, note) -> tuple[list[ScanJob], bool]:
    """Jobs for inputs of which at least one is DICOM (a file, or a folder of one or several series)."""
    if channels > 1:
        raise UserInputError(f"the model expects {channels} channels, and a DICOM series is one; convert the "
                             "channels to one 4-D NIfTI or to one NIfTI file per channel")
    found: list[tuple[str, Path, Optional[DicomPick]]] = []
    for path in inputs:
        path = media_folder(path)   # a CD's DICOMDIR stands for its folder: named, and written beside, as it
        if is_dicom_input(path):
            found += [(pick.name, path, pick) for pick in pick_series(path, series, all_series, note)]
        elif path.is_dir():
            raise ConfigError(f"{path}: a folder of NIfTI files is segmented on its own, not with other inputs")
        else:
            found.append((strip_nifti_suffix(path), path, None))
    if len(found) == 1 and not all_series:
        name, path, pick = found[0]
        beside = folder_holding(pick.folder if pick is not None and pick.folder is not None else path)
        return [ScanJob(name, (path,), output or beside / f"{name}_seg{suffix}", pick)], False
    _check_output_folder(output, "several scans or series")
    names = [name for name, _, _ in found]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"several inputs would write {repeated[0]}_seg{suffix}; segment them in separate runs")
    return [ScanJob(name, (path,), output / f"{name}_seg{suffix}", pick) for name, path, pick in found], True


def wanted_outputs(args: argparse.Namespace) -> list[str]:
    return ["labels", "sidecar"] + [k for k in OPTIONAL_OUTPUTS if getattr(args, f"save_{k}")]


def outputs_exist(paths: dict[str, Path], wanted: list[str]) -> list[Path]:
    # A link counts even when it leads nowhere: replacing it would replace the user's link.
    return [paths[key] for key in wanted if paths[key].exists() or paths[key].is_symlink()]


def outputs_complete(paths: dict[str, Path], wanted: list[str]) -> bool:
    """Every wanted output is there. Outputs are moved into place together, the sidecar last, with a pending
    marker beside them meanwhile (see :func:`write_outputs`): without that marker they are a finished scan."""
    return len(outputs_exist(paths, wanted)) == len(wanted)


def existing_outputs_note(paths: dict[str, Path], wanted: list[str]) -> str:
    """Why ``--skip-existing`` leaves a scan whose outputs are only partly there (and no run of this program was
    left unfinished there): the file it would have to replace, by name."""
    if paths["sidecar"].exists():
        missing = [paths[key].name for key in wanted if not paths[key].exists()]
        return (f"its outputs of an earlier run exist without {missing[0]} (that run was not asked for it); pass "
                "--overwrite to segment it again")
    return (f"{outputs_exist(paths, wanted)[0].name} exists without the sidecar this program writes with its "
            "labels, so it is not this program's unfinished output (your own file?); not replaced: pass "
            "--overwrite to replace it, or choose another -o")


def load_scan(job: ScanJob, channels: int, channel: Optional[int]):
    """(array, meta, DicomSource or None) of a job: file order, channels last for a multi-channel model."""
    if job.dicom is not None:
        if channel is not None:
            raise ConfigError(f"--channel picks a volume of a 4-D NIfTI; {job.name} is a DICOM series")
        scan = read_pick(job.dicom)
        return scan.volume, scan.meta, scan.source
    return (*_load_nifti(job, channels, channel), None)


def _load_nifti(job: ScanJob, channels: int, channel: Optional[int]):
    from ..nifti import load_channels, load_volume

    if channels == 1:
        if len(job.files) != 1:
            raise UserInputError(f"{job.name}: a one-channel model takes one file per scan, "
                                 f"got {len(job.files)}")
        return load_volume(job.files[0], channel=channel)
    if channel is not None:
        raise ConfigError("--channel picks one volume for a one-channel model; this model takes "
                          f"{channels} channels")
    volume, meta = load_channels(job.files)
    if volume.shape[3] != channels:
        raise UserInputError(f"{job.name}: the model expects {channels} channels, the scan has {volume.shape[3]} "
                             f"({', '.join(f.name for f in job.files)})")
    return volume, meta


def segment_one(segmenter, job: ScanJob, sampling: SamplingConfig, args: argparse.Namespace,
                note: Optional[NotePrinter] = None, replace: bool = False) -> dict:
    """Segment one scan and write its outputs (:func:`write_outputs`). ``replace``: outputs may be replaced
    (``--overwrite``, or what an interrupted run left for ``--skip-existing`` to finish)."""
    wanted = wanted_outputs(args)
    paths = output_paths(job.output)
    replace = replace or args.overwrite
    if not replace:
        existing = outputs_exist(paths, wanted)
        if existing:
            raise FileExistsError(f"{existing[0]} exists; pass --overwrite to replace it or --skip-existing")
    volume, meta, source = load_scan(job, segmenter.plan.num_channels, args.channel)
    if is_dicom_seg_name(paths["labels"]) and args.output_format != "dicom-rtstruct":
        from ..dicom_seg import check_seg_writable

        check_seg_writable(paths["labels"], source)     # before the sampling, not at its last step
    note = note or NotePrinter()
    for text in source.notes if source is not None else ():
        note(text, job.name)
    geometry = segmenter.preprocessor.geometry(volume.shape[:3], meta)
    slices = scan_slices(args.slices, geometry.n_slices, where=job.name)
    started = time.perf_counter()
    run = segmenter.run(volume, sampling, slices, meta=meta)
    for geometry_note in run.geometry.notes:
        print(f"{job.name}: note: {geometry_note}", file=sys.stderr)
    bar = None if args.quiet else _progress_bar(len(run), job.name)
    for event in run:
        if bar is not None and hasattr(event, "completed"):
            bar.n = event.completed
            bar.refresh()
    if bar is not None:
        bar.close()
    result = run.result
    seconds = time.perf_counter() - started
    if result.skip_first_note:
        note(result.skip_first_note, job.name)
    meta = meta.without_header_text()      # the scan's geometry, not its header's free text
    record = segmentation_record(result, meta, result.labels, inputs=job.files,
                                 outputs={k: paths[k] for k in wanted if k != "sidecar"},
                                 seconds=seconds, dicom_source=source)
    job.output.parent.mkdir(parents=True, exist_ok=True)
    write_outputs(paths, wanted, lambda staged: _write_labels_and_maps(staged, result, meta, source, args), record,
                  replace=replace)
    return record


def _write_labels_and_maps(paths: dict[str, Path], result, meta, source, args: argparse.Namespace) -> None:
    from ..nifti import save_volume

    if is_dicom_seg_name(paths["labels"]) and args.output_format == "dicom-rtstruct":
        from ..dicom_rtstruct_write import write_rtstruct

        write_rtstruct(paths["labels"], result.labels, meta, source, result.class_names)
    elif is_dicom_seg_name(paths["labels"]):
        from ..dicom_seg import write_dicom_seg

        write_dicom_seg(paths["labels"], result.labels, source, result.class_names)
    else:
        save_volume(paths["labels"], result.labels, meta, dtype=np.uint8, intent="label")
    if args.save_uncertainty:
        save_volume(paths["uncertainty"], result.uncertainty, meta, dtype=np.float32)
    if args.save_trajectory:
        save_volume(paths["trajectory"], trajectory_volume(result), meta, dtype=np.uint8)


def write_outputs(paths: dict[str, Path], wanted: list[str], write_files, record: dict, *, replace: bool) -> None:
    """Write one scan's outputs so that a stop anywhere leaves the earlier outputs whole or the new ones whole.

    ``write_files(staged)`` writes the labels and maps into a hidden staging folder beside them (under their own
    names, so every writer behaves as for the real targets); the sidecar follows, then everything is moved into
    place, the sidecar last. The pending marker stands beside them from before the first file to after the last
    move: a run stopped during the moves (or killed outright) leaves it, and ``--skip-existing`` then segments the
    scan again. A failure before the moves (a full disk, Ctrl-C while writing) has changed no output, so the marker
    goes with the staged files.
    """
    import shutil

    from ..atomic import check_target, fsync_folder, raise_naming
    from ..nifti import write_json_atomic

    marker, staging = pending_marker(paths["labels"]), _staging_folder(paths["labels"])
    shutil.rmtree(staging, ignore_errors=True)          # what a killed run of this scan left
    try:
        marker.touch()      # empty: nothing in it to read, and no data block to find on a nearly full disk
        staging.mkdir()
    except OSError as error:
        marker.unlink(missing_ok=True)
        raise_naming(error, paths["labels"])            # a read-only disk: said of the labels, not of the marker
    order = [key for key in wanted if key != "sidecar"] + ["sidecar"]
    moved = False
    try:
        write_files({key: staging / paths[key].name for key in order})
        write_json_atomic(staging / paths["sidecar"].name, record)
        for key in order:
            # Checked again: a file may have appeared at a target while the scan was sampled.
            check_target(paths[key], replace)
        for key in order:
            os.replace(staging / paths[key].name, paths[key])
            moved = True
        fsync_folder(paths["labels"].parent)
    except BaseException:
        if not moved:
            marker.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    marker.unlink()


def _staging_folder(labels: Path) -> Path:
    return labels.with_name(f".{labels.name}.medconddiff-staging")


def _progress_bar(total: int, name: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"segmenting {name}", unit="slice", file=sys.stderr)


def sampling_line(segmenter, sampling: SamplingConfig) -> str:
    """One line on how every scan will be sampled, the model's own choices resolved and explained."""
    used = segmenter.resolve_sampling(sampling)
    steps = (f"adaptive, at most {used.step_cap} of {used.steps} steps" if used.adaptive
             else f"{used.steps} fixed steps")
    text = f"sampling: {steps}, consensus {used.consensus}"
    choice = segmenter.consensus_choice
    model_cap = sampling.adaptive and sampling.step_cap == 0
    if choice is not None and sampling.consensus == "auto" and not choice.holds_for_schedule(sampling.steps):
        text += (f" (the model's choice '{choice.method}' and its cap of {choice.step_cap} steps were measured on a "
                 f"{choice.measured_schedule}-step schedule; on {sampling.steps} steps it fuses with {used.consensus})")
    elif choice is not None and sampling.consensus == "auto" and used.consensus != choice.method:
        text += (f" (the model's choice '{choice.method}' holds for runs of at most {choice.step_cap} steps, where it "
                 f"was measured; longer runs fuse with {used.consensus})")
    elif choice is not None and sampling.consensus == "auto":
        text += f" (the model's own: {choice.origin()})"
    elif choice is not None and model_cap:
        text += f" (the model's step cap, {choice.origin()})"
    return text


def run(args: argparse.Namespace) -> int:
    from ..segmenter import Segmenter

    sampling = override_from_args(SamplingConfig(), args)
    check_device(args.device)
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto" and "LOCAL_RANK" in os.environ:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    segmenter = Segmenter.from_checkpoint(args.checkpoint, device=device)
    segmenter.config.check_sampling(sampling)
    print(sampling_line(segmenter, sampling))
    note = NotePrinter()
    jobs, cohort = plan_jobs(list(args.input), args.output, segmenter.plan.num_channels, series=args.series,
                             all_series=args.all_series, output_format=args.output_format, note=note)
    table = table_path(cohort_folder(jobs)) if cohort and jobs else None
    if cohort and not (args.overwrite or args.skip_existing):
        # Checked before any work: a long cohort run must not end in a column of "exists" failures.
        existing = [job for job in jobs if outputs_exist(output_paths(job.output), wanted_outputs(args))]
        if existing:
            raise FileExistsError(f"{len(existing)} of {len(jobs)} scans already have outputs (e.g. "
                                  f"{existing[0].output}); pass --skip-existing to resume the cohort or "
                                  "--overwrite to replace them")
        if table is not None and table.exists():
            raise FileExistsError(f"{table} exists; pass --skip-existing to resume the cohort (the table is "
                                  "written again, with every scan) or --overwrite to replace it")
    make_output_folders(jobs)
    done, skipped, failed, table_lost = 0, 0, 0, False
    outcomes: list[ScanOutcome] = []
    wanted = wanted_outputs(args)
    for index, job in enumerate(jobs):
        paths = output_paths(job.output)
        sidecar = paths["sidecar"]
        unfinished = args.skip_existing and pending_marker(paths["labels"]).exists()
        if unfinished:
            print(f"{job.name}: a run stopped while writing its outputs (its pending marker is there): segmenting "
                  "it again", file=sys.stderr)
        elif args.skip_existing and outputs_complete(paths, wanted):
            print(f"{job.name}: skipped (outputs exist)")
            skipped += 1
            outcomes.append(ScanOutcome(job.name, job.output, sidecar, SKIPPED))
            continue
        elif args.skip_existing and outputs_exist(paths, wanted):
            why = existing_outputs_note(paths, wanted)
            print(f"{job.name}: skipped: {why}", file=sys.stderr)
            skipped += 1
            outcomes.append(ScanOutcome(job.name, job.output, sidecar, SKIPPED, why))
            continue
        try:
            record = segment_one(segmenter, job, sampling, args, note, replace=unfinished)
        except Exception as error:  # noqa: BLE001 - a cohort reports every failure and goes on
            if not cohort:
                raise
            # A user error is one line; a bug keeps its traceback (failure_report says which).
            text, _ = failure_report(error, f"{job.name}: FAILED")
            print(text, file=sys.stderr, flush=True)
            failed += 1
            # The line that says what failed: a bug's comes after its traceback.
            said = next(line for line in reversed(text.splitlines()) if line.startswith(f"{job.name}: FAILED"))
            reason = said.removeprefix(f"{job.name}: FAILED: ")
            outcomes.append(ScanOutcome(job.name, job.output, sidecar, FAILED, reason))
            if is_disk_full(error):
                # Every later scan would fail the same way at its last step, after its sampling.
                rest = jobs[index + 1:]
                print(f"stopping: no space is left for outputs; {len(rest)} scan(s) not segmented (free space, then "
                      "resume with --skip-existing)", file=sys.stderr, flush=True)
                failed += len(rest)
                outcomes += [ScanOutcome(other.name, other.output, output_paths(other.output)["sidecar"], FAILED,
                                         "not segmented: the disk was full") for other in rest]
                break
            continue
        done += 1
        outcomes.append(ScanOutcome(job.name, job.output, sidecar, DONE))
        names = record["class_names"]
        volumes = ", ".join(f"{name} {v['ml']} ml" for name, v in record["class_volumes"].items() if name != names[0])
        where = f"{job.dicom.label} in {job.files[0]}" if job.dicom else ", ".join(str(f) for f in job.files)
        print(f"{where} -> {job.output} ({record['seconds']:.1f} s; {volumes})")
    if table is not None:
        try:
            write_cohort_table(table, outcomes, segmenter.class_names, overwrite=True)
        except StorageError as error:    # the summary still tells what became of each scan
            print(f"{error}", file=sys.stderr)
            table_lost, table = True, None
    if cohort:
        rank = f" (rank {os.environ['RANK']})" if "RANK" in os.environ else ""
        print(f"summary{rank}: {done} done, {skipped} skipped, {failed} failed of {len(jobs)} scan(s)"
              + (f"; class volumes of every scan: {table}" if table is not None else ""))
    return 1 if failed or table_lost else 0
