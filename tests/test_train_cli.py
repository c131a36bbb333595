"""`sfpc train` as a user meets it: a help line for every flag, bad values refused with exit 2
and a message naming the flag before any data is read, a 2D spacing of two values, a run
without validation data, the warning for a class the model never predicts, and --init."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from sfpc.cli import main, train_parser
from sfpc.training.config import HELP, TrainConfig
from sfpc.training.trainer import PredictionWatch

SMALL = ["--channels", "4,8,16,32,64", "--patch-size", "32,32", "--threads", "1",
         "--progress", "false"]
REPO = Path(__file__).resolve().parents[1]


def write_cases(folder: Path, n: int, learnable: bool = True, seed: int = 0) -> Path:
    """n labelled 32 x 32 x 6 cases at 0.8 x 0.8 x 3 mm. Learnable: a bright square is the
    label. Not learnable: a constant image with 3 % of its voxels labelled at random."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    for i in range(n):
        if learnable:
            image = rng.normal(0, 1, (32, 32, 6)).astype(np.float32)
            label = np.zeros((32, 32, 6), dtype=np.uint8)
            x, y = rng.integers(4, 20, 2)
            label[x:x + 10, y:y + 10, 1:5] = 1
            image[label > 0] += 4
        else:
            image = np.full((32, 32, 6), 100.0, dtype=np.float32)
            label = (rng.random((32, 32, 6)) < 0.03).astype(np.uint8)
        nib.Nifti1Image(image, affine).to_filename(str(folder / f"c{i}_image.nii.gz"))
        nib.Nifti1Image(label, affine).to_filename(str(folder / f"c{i}_label.nii.gz"))
    return folder


def test_every_flag_has_a_help_line() -> None:
    parser = train_parser()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) > 50
    for action in flags:
        text = action.help or ""
        # more than the bare default: a sentence saying what the flag does
        assert len(text.split("(default")[0].split("(planned")[0].strip()) > 15, action.dest
    assert set(HELP) == set(TrainConfig.__dataclass_fields__)


BAD = [
    (["--spacing", "0.8,0.8,0.8,0.8"], "--spacing"),
    (["--spacing", "0,1"], "--spacing"),
    (["--spatial-dims", "3", "--spacing", "0.8,0.8"], "--spacing"),
    (["--patch-size", "100,100"], "--patch-size"),
    (["--spatial-dims", "2", "--patch-size", "96,96,96"], "--patch-size"),
    (["--iterations", "abc"], "--iterations"),
    (["--iterations", "0"], "--iterations"),
    (["--lr", "-1"], "--lr"),
    (["--momentum", "1.5"], "--momentum"),
    (["--val-count", "-1"], "--val-count"),
    (["--labelled-fraction", "2"], "--labelled-fraction"),
    (["--normalisation", '{"kind": "ct"}'], "--normalisation"),
    (["--normalisation", "zscore"], "--normalisation"),
    (["--method", "sfcp"], "--method"),
    (["--spatial-dims", "4"], "--spatial-dims"),
    (["--plane", "oblique"], "--plane"),
    (["--augment", '{"flipp": true}'], "--augment"),
    (["--input-mode", "resize", "--spatial-dims", "3"], "--input-mode"),
    (["--channels", "8,16,32"], "--encoder-dropout"),
    (["--foreground-fraction", "1.5"], "--foreground-fraction"),
    (["--progress", "maybe"], "--progress"),
    (["--device", "gpu"], "--device"),
    (["--init", "/no/such/model"], "--init"),
    (["--label-map", "bin"], "--label-map"),
    (["--layout", "nifti"], "--layout"),
]


@pytest.mark.parametrize(("args", "flag"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_values_exit_2_naming_the_flag_before_reading_data(args, flag, tmp_path, capsys):
    # --data does not exist: a message about --data would mean the data was looked at first
    missing = tmp_path / "no_such_data"
    with pytest.raises(SystemExit) as info:
        main(["train", "--data", str(missing), *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err
    assert "does not exist" not in err


def test_missing_data_is_a_message_not_a_traceback(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "--data", str(tmp_path / "nothing")])
    assert info.value.code == 2
    assert "--data" in capsys.readouterr().err


def test_data_errors_found_while_reading_exit_2(tmp_path, capsys) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    nib.Nifti1Image(np.zeros((8, 8, 4), np.float32), np.eye(4)).to_filename(
        str(folder / "a_image.nii.gz"))
    nib.Nifti1Image(np.zeros((8, 8, 5), np.uint8), np.eye(4)).to_filename(
        str(folder / "a_label.nii.gz"))
    assert main(["train", "--data", str(folder), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "label shape" in err and "Traceback" not in err


def test_two_value_spacing_and_no_validation(tmp_path, capsys, one_torch_thread) -> None:
    data = write_cases(tmp_path / "data", 2)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--spacing", "0.8,0.8",
                 "--val-count", "0", "--iterations", "4", "--val-every", "2", *SMALL]) == 0
    text = capsys.readouterr().out
    assert "-1.0000" not in text and "val mean Dice" not in text
    assert "validation: none" in text and "no validation data" in text
    assert "cases: 2 labelled, 0 unlabelled, 0 validation" in text
    report = json.loads(text[text.rindex("{\n"):])
    assert report["best_val_dice"] is None and report["best_iteration"] is None
    assert report["checkpoint"] == str(out / "last.pt") and "note" in report
    assert (out / "last.pt").exists() and not (out / "best.pt").exists()
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["val_dice"] for h in history] == [None, None]
    config = json.loads((out / "config.json").read_text())
    assert config["spatial_dims"] == 2
    assert config["spacing"] == [0.8, 0.8, None]  # two in-plane values, the internal form
    assert json.loads((out / "plan.json").read_text())["plan"]["config"]["spacing"]["why"] \
        .startswith("given")


def test_a_run_says_what_it_will_do_and_sums_up(tmp_path, capsys, one_torch_thread) -> None:
    data = write_cases(tmp_path / "data", 4)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--iterations", "6",
                 "--val-every", "3", *SMALL]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "plan for cpu" in captured.err  # the plan, value by value
    assert "cases: 3 labelled, 0 unlabelled, 1 validation" in text  # 4 labelled: one held out
    assert "windows per case" in text and "schedule: 6 iterations" in text
    assert "done: 6 iterations" in text and "best validation mean Dice" in text
    report = json.loads(text[text.rindex("{\n"):])
    assert report["checkpoint"] == str(out / "best.pt") and report["best_val_dice"] >= 0


def test_prediction_watch_warns_once_after_the_window() -> None:
    watch = PredictionWatch(["background", "lesion", "organ"], window=3)
    labels = torch.tensor([[0, 1, 2]])

    def step(i: int, predicted: list[int]) -> list[str]:
        watch.arm(1)
        logits = torch.zeros(2, 3, 3)  # 1 labelled + 1 unlabelled image, 3 classes, 3 voxels
        for voxel, cls in enumerate(predicted):
            logits[0, cls, voxel] = 1.0
        logits[1, 1] = 5.0  # the unlabelled image predicts lesion: must not count
        watch.hook(None, (), logits)
        watch.hook(None, (), torch.ones(2, 3, 3))  # a later classifier call in the same step
        return watch.update(i, labels)

    assert step(1, [0, 0, 2]) == []
    assert step(2, [0, 0, 2]) == []
    warnings = step(3, [0, 0, 2])
    assert len(warnings) == 1 and "'lesion'" in warnings[0] and "never been predicted" in \
        warnings[0]
    for cause in ("--foreground-fraction", "empty_slice_prob", "--patch-size", "--lr"):
        assert cause in warnings[0]
    assert step(4, [0, 0, 2]) == []  # once per class
    assert step(5, [0, 1, 0]) == []  # organ last predicted at 4: not yet 3 iterations
    assert step(6, [0, 1, 0]) == []
    organ = step(7, [0, 1, 0])
    assert len(organ) == 1 and "since iteration 4" in organ[0]


def test_a_class_the_model_never_predicts_is_reported(tmp_path, capsys, one_torch_thread) -> None:
    data = write_cases(tmp_path / "data", 2, learnable=False)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--iterations", "60",
                 "--val-every", "60", "--val-count", "0", "--warn-unpredicted", "20",
                 *SMALL]) == 0
    text = capsys.readouterr().out
    assert "warning: class 'class1' is in the labelled patches but" in text
    assert "--foreground-fraction" in text and "--lr" in text
    assert "went unpredicted for 20+ iterations: class1" in text
    assert json.loads(text[text.rindex("{\n"):])["warnings"] == 1


def test_init_from_a_checkpoint_starts_from_its_weights(tmp_path, capsys,
                                                        one_torch_thread) -> None:
    from sfpc.training.trainer import Trainer

    data = write_cases(tmp_path / "data", 2)
    first = tmp_path / "first"
    assert main(["train", "--data", str(data), "--out", str(first), "--iterations", "2",
                 "--val-every", "2", "--val-count", "0", *SMALL]) == 0
    saved = torch.load(first / "last.pt", weights_only=False)
    assert saved["metadata"]["training"]["augment"]["flip"] is True  # the sampler's default
    cfg = TrainConfig(**{**saved["config"], "out": str(tmp_path / "second"),
                         "init": str(first / "last.pt"), "split_file": None})
    trainer = Trainer(cfg)
    state = trainer.net.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved["model"].items())
    assert "init: " in trainer.init_notes[0]


def test_a_model_trained_without_flips_says_so_and_the_engine_refuses_flip(
        tmp_path, one_torch_thread) -> None:
    from sfpc.inference.backends import make_backend
    from sfpc.inference.contract import ModelMetadata
    from sfpc.inference.engine import Engine
    from sfpc.model.export import export_checkpoint

    data = write_cases(tmp_path / "data", 2)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--iterations", "1",
                 "--val-every", "1", "--val-count", "0", "--augment", '{"flip": false}',
                 *SMALL]) == 0
    export_checkpoint(run / "last.pt", tmp_path / "export")
    meta = ModelMetadata.load(tmp_path / "export")
    assert meta.training["augment"]["flip"] is False
    engine = Engine(make_backend("onnxruntime", export_dir=str(tmp_path / "export")), meta)
    image = np.zeros((1, 32, 32, 2), dtype=np.float32)
    with pytest.raises(Exception, match="trained without flips"):
        engine.segment(image, np.eye(4), flip=True)


def test_init_reads_the_default_model_back_from_its_onnx_graph() -> None:
    """The shipped model has no torch checkpoint: its weights come back from seg.onnx and, in
    eval mode, reproduce ONNX Runtime's output (load_initial_weights checks it and raises)."""
    from sfpc.inference.contract import ModelMetadata
    from sfpc.model.networks import NetConfig, SFPCNet
    from sfpc.training.init_model import load_initial_weights

    folder = REPO / "sfpc" / "default_model"
    meta = ModelMetadata.load(folder)
    net = SFPCNet(NetConfig.from_dict(meta.net))
    torch.manual_seed(0)
    batch = torch.rand(4, 1, 64, 64) * 2 - 0.5  # CT window scaled to [0, 1], and beyond
    before = net.classifier.weight.detach().clone()
    notes = load_initial_weights(net, folder, [batch])
    assert "checked against ONNX Runtime" in notes[0] and "recon_decoder" in notes[0]
    assert "FLPM's running spreads" in notes[0]
    assert float(net.flpm().running_dmu.mean()) == pytest.approx(
        meta.perturbation["running_dmu_mean"], rel=1e-5)
    assert not torch.equal(before, net.classifier.weight)
    # Folded BatchNorms re-expanded from this batch's statistics: in train mode (dropout off)
    # they normalise with the same statistics, so the output is the eval-mode one.
    net.eval()
    with torch.no_grad():
        eval_out = net(batch)
    net.train()
    for module in net.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    with torch.no_grad():
        train_out = net(batch)
    assert torch.allclose(train_out, eval_out, rtol=1e-3, atol=1e-3 * float(eval_out.abs().max()))


def test_2d_crops_centred_on_foreground() -> None:
    """--foreground-fraction now acts on 2D slices larger than the patch (it was ignored)."""
    from sfpc.training.data import SliceDataset2D, Volume

    label = np.zeros((200, 200, 1), dtype=np.int16)
    label[150, 20, 0] = 1  # one labelled pixel far from the centre
    volume = Volume("v", np.zeros((1, 200, 200, 1), np.float32), label, (1.0, 1.0, 1.0),
                    np.eye(4), None)  # type: ignore[arg-type]
    geometry = {"size": None, "patch_size": (32, 32), "flip": False, "rotation": 0.0}
    always = SliceDataset2D([volume], foreground_fraction=1.0, **geometry)
    uniform = SliceDataset2D([volume], **geometry)
    rng = np.random.default_rng(0)
    assert all(always.sample(rng)[1].sum() == 1 for _ in range(50))
    assert sum(uniform.sample(rng)[1].sum() for _ in range(50)) < 5
