"""The labelled data of a training run: a dataset folder and/or image/label pairs, and what they say.

Wraps :func:`medconddiff.dataset_layout.describe_dataset` (Decathlon v1, nnU-Net v2, plain pairs)
with the run's view of it: class and channel names the data states (None where it states nothing),
its fingerprint and the plan it implies (computed once, on demand), and the loaded cases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .config import PreprocessPlan
from .errors import ConfigError
from .dataset_layout import CaseFiles, DatasetDescription, DatasetError, describe_dataset, load_case_image
from .datasets import Case, SliceRanges, load_case, parse_ranges
from .outputs import strip_nifti_suffix


@dataclass
class TrainingData:
    cases: list[CaseFiles]
    class_names: Optional[tuple[str, ...]]
    channel_names: Optional[tuple[str, ...]]
    label: str                                    # how messages name the data ("dataset.json of X", "--pair")
    description: Optional[DatasetDescription] = None
    ignore_label: Optional[int] = None            # the dataset's "ignore" value (sparse labels), if any
    _fingerprint: Any = field(default=None, repr=False)

    @classmethod
    def from_sources(cls, dataset: Optional[Path], pairs: Sequence[tuple[Path, Path]] = (),
                     channel_names: Optional[Sequence[str]] = None) -> "TrainingData":
        """A dataset folder, explicit (image, label) pairs, or both (their cases are concatenated).

        ``channel_names`` (``--channel-names``) name the channels of data that names none (plain pairs,
        ``--pair``): its fingerprint, plan (a channel not called CT is not read through a CT window) and the
        number of channels every case must have follow them. A dataset.json's own names are kept (a flag that
        contradicts them is refused by :func:`~medconddiff.experiment.training_config`)."""
        cases: list[CaseFiles] = []
        description = None
        class_names = channel_names_stated = None
        label = "--pair"
        if dataset is not None:
            from .training_set import finish_interrupted_add

            finish_interrupted_add(Path(dataset))     # an add a killed program left half done: finished first
            description = describe_dataset(dataset)
            cases += [case for case in description.training if case.label is not None]
            class_names, channel_names_stated = description.class_names, description.channel_names
            label = (f"{Path(description.root).name}/dataset.json" if description.layout != "pairs"
                     else f"the dataset folder {Path(description.root).name}")
        for image, label_path in pairs:
            for path in (image, label_path):
                if not Path(path).is_file():
                    raise DatasetError(f"--pair file not found: {path}")
            cases.append(CaseFiles(strip_nifti_suffix(image), (Path(image),), Path(label_path)))
        if not cases:
            raise ConfigError("no training data: give a dataset folder or --pair IMAGE LABEL")
        names = [case.name for case in cases]
        if len(set(names)) != len(names):
            raise DatasetError(f"two cases share a name ({sorted(n for n in names if names.count(n) > 1)[0]}); "
                               "rename one so logs and checkpoints can tell them apart")
        channel_names = channel_names_stated or (tuple(str(name) for name in channel_names) if channel_names
                                                 else None)
        return cls(cases, class_names, channel_names, label, description,
                   description.ignore_label if description is not None else None)

    @property
    def has_labels(self) -> bool:
        return all(case.label is not None for case in self.cases)

    def derived_class_names(self) -> tuple[str, ...]:
        """The data's class names, or generic ones ('class_1', …) up to the largest label value found."""
        if self.class_names:
            return self.class_names
        from .nifti import load_labels

        top = max(int(load_labels(case.label)[0].max()) for case in self.cases if case.label is not None)
        return ("background",) + tuple(f"class_{k}" for k in range(1, max(top, 1) + 1))

    def fingerprint(self, channel_names: Sequence[str]):
        """The dataset fingerprint (spacing, intensities, class frequencies), computed once."""
        if self._fingerprint is None:
            from .fingerprint import compute_fingerprint

            description = DatasetDescription(root=Path("."), layout="pairs", name=self.label,
                                             class_names=self.class_names, channel_names=tuple(channel_names),
                                             training=self.cases, test=[], file_ending=".nii.gz",
                                             ignore_label=self.ignore_label)
            self._fingerprint = compute_fingerprint(description, self.derived_class_names(),
                                                    tuple(channel_names))
        return self._fingerprint

    def plan(self, base: Optional[PreprocessPlan] = None) -> PreprocessPlan:
        """The plan the data's fingerprint implies (channels named by the data, else by ``base``)."""
        from .fingerprint import plan_from_fingerprint

        channels = self.channel_names or (base.channel_names if base else PreprocessPlan().channel_names)
        return plan_from_fingerprint(self.fingerprint(channels), channels, base)

    def fingerprint_record(self) -> Optional[dict]:
        return self._fingerprint.to_dict() if self._fingerprint is not None else None

    def load_cases(self, num_classes: int, channel_names: Optional[Sequence[str]] = None) -> list[Case]:
        """Every case, its channels in the order of ``channel_names`` (the run's plan's) where the data names
        the same channels in another order (see :func:`~medconddiff.experiment.channel_order`)."""
        from .experiment import channel_order

        expected = len(self.channel_names) if self.channel_names else None
        order = channel_order(channel_names, self.channel_names, data_label=self.label) if channel_names else None
        cases = []
        for files in self.cases:
            image, meta = load_case_image(files, expected)
            if order is not None:
                image = image[..., list(order)]
            cases.append(load_case(files.name, image, meta, files.label, num_classes, self.ignore_label))
        return cases

    @staticmethod
    def ranges(text: Optional[str], what: str = "slices") -> SliceRanges:
        return parse_ranges(text, what)

    def summary(self, cases: Sequence[Case]) -> str:
        return (f"{len(cases)} case(s) from {self.label}: {', '.join(c.name for c in cases[:8])}"
                f"{' …' if len(cases) > 8 else ''}")
