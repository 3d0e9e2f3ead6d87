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
from xception.engine import pick_device

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


@pytest.mark.parametrize("argv,message", [
    (["--threads", "0"], "argument --threads: must be >= 1, got 0"),
    (["--workers", "-1"], "argument --workers: must be >= 0, got -1"),
    (["--weight-decay", "-0.0001"], "argument --weight-decay: must be >= 0.0, got -0.0001"),
    (["--momentum", "-0.5"], "argument --momentum: must be >= 0.0, got -0.5"),
    (["--warmup-epochs", "-1"], "argument --warmup-epochs: must be >= 0, got -1"),
    (["--log-interval", "-1"], "argument --log-interval: must be >= 0, got -1"),
    (["--max-steps", "-1"], "argument --max-steps: must be >= 0, got -1"),
    (["--threads", "two"], "argument --threads: invalid int value: 'two'"),
])
def test_train_options_out_of_range_are_named(argv, message, capsys):
    """Values argparse rejects, naming the option (--threads -2 was torch's RuntimeError, --threads 0 silently
    torch's default, a negative --weight-decay or --log-interval ran)."""
    with pytest.raises(SystemExit) as info:
        train.parse_args(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--lr-decay", "0"], "--lr-decay must be positive, got 0.0"),
    (["--crop-scale", "0.9", "0.1"], "--crop-scale MIN MAX must have 0 < MIN <= MAX <= 1, got 0.9 0.1"),
    (["--crop-scale", "0", "0.5"], "--crop-scale MIN MAX must have 0 < MIN <= MAX <= 1, got 0.0 0.5"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
])
def test_train_settings_out_of_range_are_named(argv, message):
    with pytest.raises(ValueError) as info:
        train.parse_args(argv)
    assert str(info.value) == message


@pytest.mark.parametrize("main,argv,message", [
    (evaluate.main, ["--weights", "w.pt", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (evaluate.main, ["--weights", "w.pt", "--threads", "-2"], "argument --threads: must be >= 1, got -2"),
    (evaluate.main, ["--weights", "w.pt", "--img-size", "8"], "argument --img-size: must be >= 32, got 8"),
    (predict.main, ["x.png", "--weights", "w.pt", "--top", "0"], "argument --top: must be >= 1, got 0"),
])
def test_evaluate_and_predict_options_out_of_range_are_named(main, argv, message, capsys):
    """--batch-size 0 was "range() arg 3 must not be zero", --threads -2 torch's RuntimeError."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("name,message", [
    ("tpu", "--device 'tpu' is not a device: use auto, cpu, cuda or cuda:INDEX"),
    ("cpu:x", "--device 'cpu:x' is not a device: use auto, cpu, cuda or cuda:INDEX"),
])
def test_an_unknown_device_is_named(name, message):
    """torch.device's own RuntimeError escaped the CLIs' error handling as a traceback."""
    with pytest.raises(ValueError) as info:
        pick_device(name)
    assert str(info.value) == message
    assert pick_device("cpu") == torch.device("cpu")


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
        # The backends round differently (fp32), and this small model at 40x40 (BatchNorm over a few
        # values at the deepest layers) magnifies that step by step: the third loss differed by 1.5e-4
        # relative with torch 2.6 (with 2.13 by < 1e-6). A wrong gradient moves the losses far more.
        assert losses == pytest.approx(step_losses(reference), rel=1e-3, abs=1e-5)


def test_resume_after_sigint_matches_uninterrupted_run_bitwise(tmp_path, capsys):
    common = ("--epochs", "2", "--backend", "torch", "--drop-rate", "0.2", "--per-class", "2",  # 2 steps/epoch
              "--log-interval", "1")
    handler = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN when started in the background
    assert run_train(tmp_path / "straight", *common) == 0

    def interrupt(epoch, step):
        if (epoch, step) == (0, 0):
            os.kill(os.getpid(), signal.SIGINT)  # the real handler: finish this step, checkpoint, stop
        return False

    interrupted = tmp_path / "interrupted"
    assert run_train(interrupted, *common, on_step=interrupt) == 130
    last = str(interrupted / "last.pt")
    assert f"continue with --resume {last}" in capsys.readouterr().err
    state = ckpt.load(last)
    assert (state["epoch"], state["step"]) == (0, 1)
    assert signal.getsignal(signal.SIGINT) is handler  # handler restored
    # exactly what the message says: --resume alone (the run's arguments come from the checkpoint)
    assert train.train(train.parse_args(["--resume", last])) == 0
    assert f"resumed run {state['run_id']}" in capsys.readouterr().out

    expected, got = weights(tmp_path / "straight" / "last.pt"), weights(interrupted / "last.pt")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert step_losses(interrupted) == step_losses(tmp_path / "straight")
    with open(interrupted / "metrics.jsonl") as file:
        records = [json.loads(line) for line in file]
    assert {record["run"] for record in records} == {state["run_id"]}
    assert [record["type"] for record in records if record["type"] in ("start", "resume")] == ["start", "resume"]


def test_resume_refuses_flags_that_change_the_run(trained):
    last = str(trained / "last.pt")
    for flags, named in ((["--batch-size", "16"], "--batch-size 16"), (["--per-class", "50"], "--per-class 50"),
                         (["--model", "xception"], "--model xception"), (["--seed", "3"], "--seed 3"),
                         (["--data", str(trained)], "--data")):
        with pytest.raises(ValueError, match="would change the run") as info:
            train.parse_args([*flags, "--resume", last])
        assert named in str(info.value)
    args = train.parse_args(["--resume", last, "--epochs", "3", "--workers", "2"])
    assert (args.epochs, args.workers, args.per_class, args.batch_size) == (3, 2, 4, 8)
    assert args.out == str(trained) and args.resume_changes == ["--epochs 1 -> 3", "--workers 0 -> 2"]
    repeated = train.parse_args([*SMALL, "--backend", "torch", "--epochs", "1", "--resume", last])
    assert repeated.resume_changes == [] and repeated.lr == 0.05
    with pytest.raises(ValueError, match="already finished 1 epochs"):
        train.parse_args(["--resume", last, "--epochs", "0"])
    # every flag is either run-defining, changeable or per-invocation
    assert set(train.ARG_NAMES) == {*train.RUN_DEFINING, *train.CHANGEABLE, *train.PER_INVOCATION}


def test_each_run_has_its_own_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = train.parse_args(SMALL).out
    assert os.path.dirname(first) == os.path.join("runs", "train")
    os.makedirs(first)
    assert train.parse_args(SMALL).out != first  # a run started in the same second gets its own folder too
    out = tmp_path / "out"
    assert run_train(out, "--epochs", "1", "--per-class", "2", "--backend", "torch") == 0
    assert sorted(os.listdir(out)) == ["best.pt", "last.pt", "metrics.jsonl"]
    capsys.readouterr()
    # the same folder again: refused, nothing touched
    before = (out / "best.pt").read_bytes()
    assert train.main([*SMALL, "--out", str(out), "--epochs", "1"]) == 2
    assert "already holds a run" in capsys.readouterr().err and (out / "best.pt").read_bytes() == before
    # --overwrite, and a run without a validation split: no best.pt from the earlier run is left behind
    write_folder(tmp_path / "data", per_class=4)
    assert train.main(["--data", str(tmp_path / "data"), "--model", "xception_tiny", "--img-size", "40",
                       "--batch-size", "4", "--epochs", "1", "--backend", "torch", "--out", str(out),
                       "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["last.pt", "metrics.jsonl"]
    assert f"wrote last.pt, metrics.jsonl in {out}" in capsys.readouterr().out
    with open(out / "metrics.jsonl") as file:
        assert len({json.loads(line)["run"] for line in file}) == 1


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
    # the run's data settings (--per-class 4, --val-split 0.2) come with the checkpoint
    assert evaluate.main(["--weights", weights_path, "--json", "--backend", "torch"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["images"] == 8 and 0 <= result["top1"] <= result["top5"] <= 100 and result["images_per_s"] > 0
    assert result["per_class"] == 4 and "as trained: --val-split 0.2, --per-class 4" in captured.err

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


def test_unreadable_image_is_skipped_and_named(tmp_path, capsys):
    write_folder(tmp_path / "data", per_class=4)
    broken = tmp_path / "data" / "dog" / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    common = ["--data", str(tmp_path / "data"), "--img-size", "40", "--batch-size", "9", "--model", "xception_tiny",
              "--epochs", "1", "--backend", "torch"]
    # 1 of 9 images is past the default 1%: the run stops and names it
    assert train.main([*common, "--out", str(tmp_path / "strict")]) == 2
    error = capsys.readouterr().err
    assert "1 unreadable images, more than --max-bad-images 0.01" in error and "broken.jpg" in error
    # within the allowed fraction: a warning naming it, the count at the end, the run goes on
    assert train.main([*common, "--out", str(tmp_path / "out"), "--max-bad-images", "0.2"]) == 0
    captured = capsys.readouterr()
    assert "cannot read image" in captured.err and "broken.jpg" in captured.err
    assert "skipped 1 unreadable images" in captured.out
    with open(tmp_path / "out" / "metrics.jsonl") as file:
        assert [r["skipped_images"] for r in map(json.loads, file) if r["type"] == "epoch"] == [1]


def test_help_needs_no_pillow_and_reading_images_says_it_does(monkeypatch, tmp_path):
    script = ("import sys; sys.modules['PIL'] = None\n"
              "from xception import evaluate, predict, train\n"
              "train.main(['--help'])")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "--resume" in result.stdout, result.stderr[-2000:]
    from xception.data import DataError, load_image

    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(DataError, match="needs pillow"):
        load_image(str(tmp_path / "any.png"))


def test_checkpoint_of_another_model_is_refused_by_name(trained, tmp_path, capsys):
    last = trained / "last.pt"
    before = last.read_bytes()
    # weights of another architecture to start a run from
    write_folder(tmp_path / "data")
    assert train.main(["--data", str(tmp_path / "data"), "--model", "xception", "--img-size", "40",
                       "--batch-size", "4", "--out", str(tmp_path / "out"), "--weights", str(last)]) == 2
    assert "holds a 'xception_tiny' model, but this run builds 'xception'" in capsys.readouterr().err
    # a bare state dict of a different shape: no model fits it
    state = weights(last)
    state[next(iter(state))] = torch.zeros(3, 3)
    bare = tmp_path / "bare.pt"
    torch.save(state, bare)
    assert predict.main([str(tmp_path / "any.png"), "--weights", str(bare)]) == 2
    assert "fits none of the models" in capsys.readouterr().err
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

    # the same through training (a resumed run that stops after one more step): a clear error, exit status 2,
    # the old checkpoint intact
    assert train.main(["--resume", str(last), "--epochs", "2", "--max-steps", "5"]) == 2
    assert "no space left on device" in capsys.readouterr().err
    assert last.read_bytes() == before
    assert ckpt.load(str(last))["epoch"] == 1


def test_pretrained_weights_files_in_every_cli(trained, tmp_path, capsys):
    """Weights without the training run's metadata (save_weights, Cadene's names, safetensors) in evaluate,
    predict and train (fine-tuning onto 2 classes)."""
    import xception

    model, _ = ckpt.load_for_inference(str(trained / "last.pt"), "torch")
    bare = tmp_path / "tiny.pt"
    xception.save_weights(model, bare)
    common = ["--per-class", "4", "--json", "--backend", "torch"]
    assert evaluate.main(["--weights", str(trained / "last.pt"), *common]) == 0
    expected = json.loads(capsys.readouterr().out)
    # the model is found from the names and shapes; the size 40 is not in the file, so it is given
    assert evaluate.main(["--weights", str(bare), "--img-size", "40", *common]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["model"], got["images"], got["top1"], got["loss"]) == (
        "xception_tiny", 8, expected["top1"], expected["loss"])

    from safetensors.torch import save_file

    safetensors_path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(safetensors_path))
    images, _ = make_synthetic(per_class=1, size=44, seed=3)
    picture = tmp_path / "ring.png"
    Image.fromarray(images[0].permute(1, 2, 0).numpy()).save(picture)
    assert predict.main([str(picture), "--weights", str(safetensors_path), "--img-size", "40", "--backend",
                         "torch"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and all(line.split()[-2] == "class" for line in lines[1:])

    cadene = {"module." + key.replace("fc.", "last_linear."): value for key, value in model.state_dict().items()}
    cadene_path = tmp_path / "cadene.pth"
    torch.save({"state_dict": cadene}, cadene_path)
    write_folder(tmp_path / "data", per_class=4)
    out = tmp_path / "finetuned"
    assert train.main(["--data", str(tmp_path / "data"), "--model", "xception_tiny", "--img-size", "40",
                       "--batch-size", "4", "--max-steps", "1", "--lr", "1e-30", "--backend", "torch",
                       "--weights", str(cadene_path), "--out", str(out)]) == 0
    assert "its classifier (10 classes) does not fit the 2 classes" in capsys.readouterr().out
    tuned, source = weights(out / "last.pt"), model.state_dict()
    assert tuned["fc.weight"].shape == (2, source["fc.weight"].shape[1])
    assert torch.equal(tuned["block3.skip.weight"], source["block3.skip.weight"])  # lr 1e-30: not moved
