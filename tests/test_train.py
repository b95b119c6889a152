"""Training: a real loss decrease on real slices, resume, Ctrl-C, DDP agreement, dataset errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medconddiff.checkpoint import load_checkpoint
from medconddiff.cli import main
from medconddiff.datasets import Case, DatasetError, SliceDataset, discover_pairs, load_case
from medconddiff.nifti import VolumeMeta
from medconddiff.train import Trainer
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def liver_case(liver_volume):
    image, labels = liver_volume
    return Case("liver", image, labels, VolumeMeta.identity())


def test_loss_decreases_on_real_slices(tmp_path, liver_case):
    config = tiny_config()
    config.train.augment = False
    config.train.iterations_per_epoch = 8
    config.train.epochs = 3
    config.train.lr = 3e-3
    config.train.warmup_steps = 1
    train_set = SliceDataset([liver_case], config.preprocess, config.model.image_size)
    trainer = Trainer(config, train_set, tmp_path, device="cpu")
    trainer.fit()
    losses = [record["loss"] for record in trainer.history]
    assert losses[-1] < losses[0], losses
    checkpoint = load_checkpoint(tmp_path / "final.safetensors")
    assert checkpoint.config == config and checkpoint.extra["step"] == 24


def test_resume_and_interrupt_keep_the_run(tmp_path, liver_case, monkeypatch):
    config = tiny_config()
    config.train.epochs = 3
    train_set = SliceDataset([liver_case], config.preprocess, config.model.image_size, augment=True)
    trainer = Trainer(config, train_set, tmp_path, device="cpu")
    calls = {"n": 0}
    original = Trainer.train_step

    def interrupt_in_second_epoch(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(Trainer, "train_step", interrupt_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    monkeypatch.setattr(Trainer, "train_step", original)
    saved = load_checkpoint(tmp_path / "last.safetensors")
    assert saved.extra["epoch"] == 1 and saved.extra["step"] == 2
    assert any(k.startswith("aux.optim.") for k in saved.state_dict)
    resumed = Trainer(config, train_set, tmp_path, device="cpu")
    resumed.resume(tmp_path / "last.safetensors")
    assert resumed.step == 2 and resumed.epoch == 1
    torch.testing.assert_close(resumed.ema.module.state_dict()["denoiser.head.2.weight"],
                               saved.state_dict["denoiser.head.2.weight"])
    resumed.fit()
    assert load_checkpoint(tmp_path / "final.safetensors").extra["step"] == 6


def test_ddp_two_cpu_processes_agree(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    digests = [(tmp_path / f"rank{r}_of_2.txt").read_text() for r in range(2)]
    assert digests[0] == digests[1], "DDP ranks diverged"
    assert (tmp_path / "final.safetensors").is_file()
    assert load_checkpoint(tmp_path / "final.safetensors").extra["world_size"] == 2


def write_pair(folder: Path, name: str, shape=(16, 16, 3), label_max=2, label_affine=None, suffix=""):
    image = np.random.default_rng(0).normal(0, 100, shape).astype(np.float32)
    labels = np.zeros(shape, np.uint8)
    labels[4:8, 4:8] = label_max
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(folder / f"{name}_image.nii.gz"))
    affine = np.eye(4) if label_affine is None else label_affine
    nib.save(nib.Nifti1Image(labels, affine), str(folder / f"{name}_label{suffix}.nii.gz"))
    return folder / f"{name}_image.nii.gz", folder / f"{name}_label{suffix}.nii.gz"


def test_dataset_layouts_and_errors(tmp_path):
    with pytest.raises(DatasetError, match="no training cases"):
        discover_pairs(tmp_path)
    image, label = write_pair(tmp_path, "a")
    assert discover_pairs(tmp_path) == [(image, label)]
    msd = tmp_path / "msd"
    (msd / "imagesTr").mkdir(parents=True)
    (msd / "labelsTr").mkdir()
    (msd / "imagesTr" / "case_0000.nii.gz").write_bytes(image.read_bytes())
    (msd / "labelsTr" / "case.nii.gz").write_bytes(label.read_bytes())
    assert [p.name for p in discover_pairs(msd)[0]] == ["case_0000.nii.gz", "case.nii.gz"]
    (msd / "dataset.json").write_text(json.dumps({"training": [{"image": "./imagesTr/case_0000.nii.gz",
                                                                "label": "./labelsTr/missing.nii.gz"}]}))
    with pytest.raises(DatasetError, match="do not exist"):
        discover_pairs(msd)
    bad_shape = write_pair(tmp_path, "b", shape=(16, 16, 3))
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 4), np.uint8), np.eye(4)), str(bad_shape[1]))
    with pytest.raises(DatasetError, match="shape"):
        load_case(*bad_shape, num_classes=3)
    shifted = np.eye(4)
    shifted[0, 3] = 5
    with pytest.raises(DatasetError, match="affine"):
        load_case(*write_pair(tmp_path, "c", label_affine=shifted), num_classes=3)
    with pytest.raises(DatasetError, match="label 5"):
        load_case(*write_pair(tmp_path, "d", label_max=5), num_classes=3)


def test_train_cli_refuses_to_clobber_and_reports_errors(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "final.safetensors").write_bytes(b"previous run")
    image, label = write_pair(tmp_path, "a")
    assert main(["train", "--pair", str(image), str(label), "-o", str(tmp_path / "run")]) == 2
    assert "exists" in capsys.readouterr().err
    assert (tmp_path / "run" / "final.safetensors").read_bytes() == b"previous run"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", str(empty), "-o", str(tmp_path / "x")]) == 2
    assert "no training cases" in capsys.readouterr().err
