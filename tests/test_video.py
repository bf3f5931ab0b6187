"""Video: moving digits, the PyAV reader (round trip, bad files), UCF101 lists, 3D models, a tiny run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from deeprecipe.data import DATASETS, DataError
from deeprecipe.data.core import DataSpec
from deeprecipe.data.video import MOTIONS, MovingDigitsData, VideoFolderData, probe, read_frames
from deeprecipe.families import video
from deeprecipe.family import PredictOptions
from deeprecipe.models import MODELS
from deeprecipe.recipe import load

av = pytest.importorskip("av")
VIDEO_MODELS = ["c3d", "r2plus1d"]


def encode(path: Path, frames: np.ndarray, codec: str = "mpeg4", pix_fmt: str = "yuv420p") -> str:
    """frames (T, H, W, 3) uint8 -> a video file written with PyAV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=10)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        for f in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return str(path)


def ramp(T: int, H: int = 16, W: int = 16) -> np.ndarray:
    """Frame t is a flat grey of level 10 + 12 t: which frame was read is visible in its mean."""
    return np.broadcast_to((10 + 12 * np.arange(T, dtype=np.uint8)).reshape(T, 1, 1, 1), (T, H, W, 3)).copy()


def test_registered():
    assert all(m in MODELS for m in VIDEO_MODELS) and {"moving-digits", "videofolder"} <= set(DATASETS)


def test_reader_round_trips_a_clip_encoded_with_pyav(tmp_path):
    frames = ramp(20)
    frames[:, :8, :8] = 250  # a bright corner: the frames must not come back flipped or shifted
    path = encode(tmp_path / "clip.mkv", frames, codec="ffv1", pix_fmt="yuv444p")  # near-lossless
    assert probe(path) == 20
    x = read_frames(path, [0, 3, 3, 19], 3, 16)  # (C, T, H, W), repeats allowed
    assert x.shape == (3, 4, 16, 16) and x.dtype == torch.uint8
    want = torch.from_numpy(frames[[0, 3, 3, 19]]).permute(3, 0, 1, 2).float()
    assert (x.float() - want).abs().max() <= 3


def test_moving_digits_deterministic_balanced_and_moving():
    cfg = MovingDigitsData(frames=8, size=32, train_size=200, val_size=20, test_size=20)
    a, b = cfg.build(), cfg.build()
    x, y = a.train.tensors
    assert x.shape == (200, 1, 8, 32, 32) and x.dtype == torch.uint8 and a.spec.num_classes == len(MOTIONS)
    assert torch.equal(x, b.train.tensors[0]) and torch.equal(y, b.train.tensors[1])
    assert torch.bincount(y, minlength=10).min() >= 8
    # a digit moving right has its brightest column further right at the end than at the start
    right = x[y == MOTIONS.index("right")].float()[:, 0]
    col = right.sum(2)  # (n, T, W)
    centre = (col * torch.arange(32)).sum(-1) / col.sum(-1)
    assert (centre[:, -1] > centre[:, 0]).float().mean() > 0.9
    still = x[y == MOTIONS.index("still")].float()
    assert (still[:, :, 0] - still[:, :, -1]).abs().max() == 0
    assert not torch.equal(a.val.tensors[0], x[:20])


def _folder(tmp_path: Path) -> Path:
    root = tmp_path / "videos"
    for c, cls in enumerate(["jump", "walk"]):
        for i in range(3):
            encode(root / cls / f"v{i}.mp4", ramp(24) // (1 + c))
    return root


def test_video_folder_clips_and_eval_clips(tmp_path):
    root = _folder(tmp_path)
    data = VideoFolderData(path=str(root), frames=4, stride=2, size=16, eval_clips=3, val_fraction=0.34).build()
    assert data.spec.class_names == ["jump", "walk"]
    x, y = data.train.take(torch.arange(len(data.train)))
    # 4 training videos of 24 frames, clips of 7 frames taken every 7: starts 0, 7, 14 -> 3 clips each
    assert x.shape == (12, 3, 4, 16, 16) and len(data.val) == 2
    xv, yv = data.val.take(torch.arange(2))
    assert xv.shape == (2, 3, 3, 4, 16, 16)  # (videos, K clips, C, T, H, W)


def test_bad_videos_are_skipped_and_counted_or_stop_the_build(tmp_path):
    root = _folder(tmp_path)
    (root / "jump" / "empty.mp4").write_bytes(b"")
    (root / "jump" / "garbage.avi").write_bytes(bytes(range(256)) * 40)
    encode(root / "walk" / "short.mp4", ramp(3))
    with pytest.warns(UserWarning, match="skipped 3 of 9 videos") as notes:
        data = VideoFolderData(path=str(root), frames=4, stride=2, size=16, val_fraction=0).build()
    note = str(notes[0].message)
    assert all(name in note for name in ("empty.mp4: empty file", "garbage.avi: cannot decode", "short.mp4: 3 frames"))
    assert len(data.train) == 6 * 3
    with pytest.raises(DataError, match="empty file"):
        VideoFolderData(path=str(root), frames=4, stride=2, size=16, strict=True).build()
    with pytest.raises(DataError, match="shorter than a clip"):
        VideoFolderData(path=str(root), frames=4, stride=2, size=16, short="error").build()
    looped = VideoFolderData(path=str(root), frames=4, stride=2, size=16, short="loop", val_fraction=0).build()
    assert len(looped.train) == 6 * 3 + 1


def test_the_skip_note_names_the_first_ten_and_counts_the_rest(tmp_path):
    root = _folder(tmp_path)
    for i in range(12):
        (root / "walk" / f"bad{i:02d}.mp4").write_bytes(b"")
    with pytest.warns(UserWarning) as notes:
        VideoFolderData(path=str(root), frames=4, stride=2, size=16, val_fraction=0).build()
    note = str(notes[0].message)
    assert "skipped 12 of 18 videos" in note and "bad09.mp4" in note and "bad10.mp4" not in note
    assert note.endswith("; and 2 more")


def test_all_videos_unreadable_is_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.mp4").write_bytes(b"not a video at all")
    with pytest.raises(DataError, match="none of the 1 videos"):
        VideoFolderData(path=str(tmp_path), frames=4).build()
    with pytest.raises(DataError, match="nope.mp4: file not found"):  # predict's path: a DataError, not an OSError
        probe(str(tmp_path / "nope.mp4"))


def test_frame_folders_and_ucf101_split_lists(tmp_path):
    from torchvision.io import write_png

    root = tmp_path / "UCF"
    for cls in ("Archery", "Biking"):
        for g in (1, 2):
            d = root / cls / f"v_{cls}_g{g:02d}_c01"
            d.mkdir(parents=True)
            for t in range(10):
                write_png(torch.full((3, 12, 12), 20 * t, dtype=torch.uint8), str(d / f"{t:05d}.png"))
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "classInd.txt").write_text("1 Archery\n2 Biking\n")
    (lists / "trainlist01.txt").write_text("Archery/v_Archery_g01_c01 1\nBiking/v_Biking_g01_c01 2\n")
    (lists / "testlist01.txt").write_text("Archery/v_Archery_g02_c01\nBiking/v_Biking_g02_c01\n")
    data = VideoFolderData(
        path=str(root), split_dir=str(lists), frames=5, stride=2, size=12, eval_clips=2, val_fraction=0
    ).build()
    assert data.spec.class_names == ["Archery", "Biking"] and len(data.test) == 2
    x, y = data.train.take(torch.tensor([0]))
    assert y.tolist() == [0] and x[0, 0, :, 0, 0].tolist() == [0, 40, 80, 120, 160]  # frames 0, 2, 4, 6, 8
    (lists / "testlist01.txt").write_text("Cooking/v_Cooking_g01_c01.avi\n")
    with pytest.raises(DataError, match="'Cooking'.*not in classInd.txt"):
        VideoFolderData(path=str(root), split_dir=str(lists), frames=5).build()


def test_clip_average_is_the_mean_of_the_clip_softmaxes():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1 * 2 * 3 * 3, 4))
    x = torch.randn(2, 3, 1, 2, 3, 3)  # 2 videos, 3 clips each
    want = torch.stack([model(x[i]).softmax(-1).mean(0) for i in range(2)]).log()
    assert torch.allclose(video.clip_average(model, x), want, atol=1e-6)


@pytest.mark.parametrize("name", VIDEO_MODELS)
@pytest.mark.parametrize("frames", [8, 5])
def test_model_shapes_and_backward(name, frames):
    spec = DataSpec(num_classes=7, in_channels=3, image_size=(24, 24))
    model = MODELS[name]().build(spec)
    torch.nn.init.normal_(model.head.weight)  # c3d starts with a zero head: give the input a gradient path
    x = torch.randn(2, 3, frames, 24, 24, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", VIDEO_MODELS)
def test_tiny_training_run_then_predict_a_video_file(tmp_path, name):
    from deeprecipe.cli.runs import open_run
    from deeprecipe.engine.loop import train
    from deeprecipe.families import get_family

    cfg = load(
        f"moving-digits-{name}",
        [
            "data.frames=8",
            "data.train_size=16",
            "data.val_size=8",
            "data.test_size=8",
            "train.steps=2",
            "train.batch_size=8",
            "train.eval_every=2",
            "train.device=cpu",
        ],
    )
    run = tmp_path / "run"
    final = train(cfg, get_family(cfg.task), run)
    assert 0 <= final["test_top1"] <= final["test_top5"] <= 1
    assert (run / "plots" / "confusion.png").is_file()
    clip = MovingDigitsData(frames=8, train_size=1, val_size=0, test_size=0).build().train.tensors[0][0, 0]
    path = encode(tmp_path / "digit.mp4", clip[..., None].expand(-1, -1, -1, 3).numpy().copy())
    try:
        cfg, spec, model, rt, family = open_run(str(run), "cpu")
        out = family.predict(model, spec, cfg, rt, [path], PredictOptions(top=5))
    finally:
        torch.set_grad_enabled(True)  # in case loading a run turns autograd off for the process
    assert out[0]["label"] in MOTIONS and len(out[0]["top"]) == 5
    assert math.isclose(sum(t["prob"] for t in out[0]["top"]), 1.0, abs_tol=0.5)


def test_training_step_on_cpu_has_finite_gradients_under_bf16_autocast():
    """Regression: bf16 Conv3d (3, 1, 1) weight gradients on 2-frame inputs are NaN on the CPU; the task runs
    the 3D nets in fp32 there, so a (2+1)D net whose last stage sees 2 frames trains."""
    spec = DataSpec(num_classes=10, in_channels=1, image_size=(32, 32), mean=(0.5,), std=(0.25,))
    model = MODELS["r2plus1d"]().build(spec)
    cfg = load("moving-digits-r2plus1d")
    x, y = torch.randn(8, 1, 8, 16, 16), torch.randint(0, 10, (8,))
    for _ in range(3):  # the NaN showed up in about 5 of 6 steps without the fix
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = video.Video().loss(model, (x, y), cfg, "model")
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        model.zero_grad()
