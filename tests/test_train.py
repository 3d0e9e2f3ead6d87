"""Training, resuming, DDP, evaluation and prediction, on the embedded set with the tiny model.

Everything runs on the CPU with tiny data (a few images per class, 40 px, a
few steps), so the file takes a couple of minutes on two busy cores.
"""

import errno
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import require_backend
from xception import checkpoint as ckpt
from xception import evaluate, predict, train
from xception.data import SYNTHETIC_CLASSES, Preprocess, ShardedBatches, make_synthetic, synthetic_splits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 40 images: 32 train (4 steps of 8) + 8 val.
SMALL = ["--per-class", "4", "--batch-size", "8", "--img-size", "40", "--lr", "0.05"]


def run_train(out, *extra, on_step=None):
    args = train.parse_args([*SMALL, "--out", str(out), *extra])
    return train.train(args, on_step=on_step)


def step_losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as file:
        return [record["loss"] for record in map(json.loads, file) if record["type"] == "step"]


def weights(path):
    return ckpt.load(str(path))["state_dict"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint after one short epoch of training (shared by the evaluate / predict / bad-input tests)."""
    out = tmp_path_factory.mktemp("trained")
    assert run_train(out, "--epochs", "1", "--backend", "torch") == 0
    return out


def test_synthetic_set_is_deterministic_and_balanced():
    images, labels = make_synthetic(per_class=3, size=40, seed=7)
    again, _ = make_synthetic(per_class=3, size=40, seed=7)
    assert images.shape == (30, 3, 40, 40) and images.dtype == torch.uint8
    assert torch.equal(images, again)
    assert labels.bincount().tolist() == [3] * len(SYNTHETIC_CLASSES)
    train_set, val_set = synthetic_splits(Preprocess(72), per_class=3, val_split=0.2)
    image, label = train_set[(0, 1)]
    assert image.shape == (3, 72, 72) and -1.0 <= image.min() and image.max() <= 1.0
    assert torch.equal(image, train_set[(0, 1)][0])          # augmentation fixed by (seed, epoch, index)
    assert not torch.equal(image, train_set[(0, 2)][0])      # and different in another epoch
    assert val_set[0][0].shape == (3, 72, 72)


def test_sharded_batches_split_the_global_batch():
    single = list(ShardedBatches(20, 8, world_size=1, accum_steps=2, epoch=3))
    ranks = [list(ShardedBatches(20, 8, world_size=2, rank=r, epoch=3)) for r in range(2)]
    assert [len(b) for b in single] == [4] * 4
    # one process accumulating two micro-batches reads what two ranks read
    assert single[0::2] == ranks[0] and single[1::2] == ranks[1]
    resumed = list(ShardedBatches(20, 8, world_size=1, accum_steps=2, epoch=3, start_step=1))
    assert resumed == single[2:]
    with pytest.raises(ValueError, match="multiple of world size"):
        ShardedBatches(20, 6, world_size=4)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_backends_give_the_same_losses(backend, tmp_path):
    if backend == "cpp":
        require_backend("cpp")
    reference = tmp_path / "torch"
    if backend == "cpp":
        assert run_train(reference, "--backend", "torch", "--max-steps", "3", "--log-interval", "1") == 0
    out = tmp_path / backend
    assert run_train(out, "--backend", backend, "--max-steps", "3", "--log-interval", "1") == 0
    losses = step_losses(out)
    assert len(losses) == 3 and all(0 < loss < 10 for loss in losses)
    if backend == "cpp":
        assert losses == pytest.approx(step_losses(reference), rel=1e-4, abs=1e-5)


def test_resume_after_sigint_matches_uninterrupted_run_bitwise(tmp_path):
    common = ("--epochs", "2", "--backend", "torch", "--drop-rate", "0.2", "--per-class", "2")  # 2 steps/epoch
    handler = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN when started in the background
    assert run_train(tmp_path / "straight", *common) == 0

    def interrupt(epoch, step):
        if (epoch, step) == (0, 0):
            os.kill(os.getpid(), signal.SIGINT)  # the real handler: finish this step, checkpoint, stop
        return False

    interrupted = tmp_path / "interrupted"
    assert run_train(interrupted, *common, on_step=interrupt) == 130
    state = ckpt.load(str(interrupted / "last.pt"))
    assert (state["epoch"], state["step"]) == (0, 1)
    assert signal.getsignal(signal.SIGINT) is handler  # handler restored
    assert run_train(interrupted, *common, "--resume", str(interrupted / "last.pt")) == 0

    expected, got = weights(tmp_path / "straight" / "last.pt"), weights(interrupted / "last.pt")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_two_processes_match_one_process(tmp_path):
    common = [*SMALL, "--backend", "torch", "--max-steps", "3", "--threads", "1"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
              "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    # One process with the same global batch of 8 as two accumulated micro-batches of 4: the chunks the ranks read.
    # Both at one thread: BatchNorm over 4 images amplifies rounding differences of other thread counts.
    for name, command in (("ddp", launch), ("single", [sys.executable])):
        extra = ["--accum-steps", "2"] if name == "single" else []
        result = subprocess.run([*command, "-m", "xception.train", *common, *extra, "--out", str(tmp_path / name)],
                                env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        assert f"{2 if name == 'ddp' else 1} process(es)" in result.stdout

    expected, got = weights(tmp_path / "single" / "last.pt"), weights(tmp_path / "ddp" / "last.pt")
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        if "running_" in key or "num_batches" in key:
            continue  # BatchNorm running statistics: DDP keeps rank 0's, one process sees both halves
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_evaluate_and_predict_a_trained_checkpoint(trained, tmp_path, capsys):
    weights_path = str(trained / "last.pt")
    assert evaluate.main(["--weights", weights_path, "--per-class", "4", "--json", "--backend", "torch"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 8 and 0 <= result["top1"] <= result["top5"] <= 100 and result["images_per_s"] > 0

    images, labels = make_synthetic(per_class=1, size=44, seed=3)
    path = tmp_path / "ring.png"
    Image.fromarray(images[0].permute(1, 2, 0).numpy()).save(path)
    assert predict.main([str(path), "--weights", weights_path, "--backend", "torch"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(path) and len(lines) == 6
    assert all(line.split()[-1] in SYNTHETIC_CLASSES for line in lines[1:])


def write_folder(root, classes=("cat", "dog"), per_class=6, size=(50, 44)):
    images, _ = make_synthetic(per_class=per_class, size=96, seed=5)
    for index, name in enumerate(classes):
        os.makedirs(root / name, exist_ok=True)
        for k in range(per_class):
            picture = images[index * per_class + k].permute(1, 2, 0).numpy()
            Image.fromarray(picture).resize(size).save(root / name / f"{k}.png")


def test_train_and_evaluate_on_an_image_folder(tmp_path, capsys):
    write_folder(tmp_path / "data")
    out = tmp_path / "out"
    code = train.main(["--data", str(tmp_path / "data"), "--model", "xception_tiny", "--img-size", "40",
                       "--batch-size", "4", "--epochs", "1", "--val-split", "0.25", "--backend", "torch",
                       "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    state = ckpt.load(str(out / "last.pt"))
    assert state["classes"] == ["cat", "dog"] and state["model"]["kwargs"]["num_classes"] == 2
    capsys.readouterr()
    assert evaluate.main(["--weights", str(out / "last.pt"), "--data", str(tmp_path / "data"),
                          "--val-split", "0.25", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 3


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_missing_or_empty_data_folder(case, tmp_path, capsys):
    folder = tmp_path / "data"
    if case == "empty":
        (folder / "cat").mkdir(parents=True)
    assert train.main(["--data", str(folder), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert str(folder) in error
    assert ("does not exist" if case == "missing" else "holds no images") in error


def test_unreadable_image_is_named(tmp_path, capsys):
    write_folder(tmp_path / "data", per_class=4)
    broken = tmp_path / "data" / "dog" / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    code = train.main(["--data", str(tmp_path / "data"), "--img-size", "40", "--batch-size", "9",
                       "--model", "xception_tiny", "--epochs", "1", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "cannot read image" in (error := capsys.readouterr().err) and "broken.jpg" in error


def test_checkpoint_of_another_model_is_refused_by_name(trained, tmp_path, capsys):
    last = trained / "last.pt"
    before = last.read_bytes()
    # another number of classes: an image folder with 2 classes against the 10-class checkpoint
    write_folder(tmp_path / "data")
    assert train.main(["--data", str(tmp_path / "data"), "--model", "xception_tiny", "--img-size", "40",
                       "--batch-size", "4", "--out", str(tmp_path / "out"), "--resume", str(last)]) == 2
    assert "num_classes=10" in (error := capsys.readouterr().err) and "num_classes=2" in error
    # another architecture
    with pytest.raises(ckpt.CheckpointError, match="'xception_tiny', but this run builds 'xception'"):
        run_train(tmp_path / "out2", "--model", "xception", "--resume", str(last))
    # a bare state dict of a different shape: the mismatching parameters are named
    state = weights(last)
    state["head.fc.weight" if "head.fc.weight" in state else next(iter(state))] = torch.zeros(3, 3)
    bare = tmp_path / "bare.pt"
    torch.save(state, bare)
    assert predict.main([str(tmp_path / "any.png"), "--weights", str(bare)]) == 2
    assert "does not say which model" in capsys.readouterr().err
    with pytest.raises(ckpt.CheckpointError, match="shape mismatch"):
        import xception

        model = xception.create_model("xception_tiny", num_classes=10)
        ckpt.check_compatible({"state_dict": state}, str(bare), "xception_tiny", {}, model)
    assert last.read_bytes() == before


def test_disk_full_keeps_the_previous_checkpoint(trained, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    last = out / "last.pt"
    last.write_bytes((trained / "last.pt").read_bytes())
    before = last.read_bytes()
    real_save = torch.save

    def full_disk(obj, file, *args, **kwargs):
        real_save({"partial": torch.zeros(1000)}, file)  # some bytes reach the temporary file, then:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(ckpt.CheckpointError, match="no space left on device.*previous checkpoint there is unchanged"):
        ckpt.save_atomic({"x": torch.ones(3)}, str(last))
    assert last.read_bytes() == before
    assert os.listdir(out) == ["last.pt"]  # no temporary file left behind

    # the same through training: a clear error, exit status 2, the old checkpoint intact
    assert train.main([*SMALL, "--epochs", "1", "--max-steps", "1", "--backend", "torch", "--out", str(out)]) == 2
    assert "no space left on device" in capsys.readouterr().err
    assert last.read_bytes() == before
    assert ckpt.load(str(last))["epoch"] == 1
