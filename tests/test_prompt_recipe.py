"""§7 prompt-training recipe: sub-batches, step counts, the CAM checkpoint iteration, the seg-loss
classes and crop sizes, through pipeline functions and the real stages on a tiny demo index."""
import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline.clip.model import create_clip
from pipeline.data.datasets import load_split
from pipeline.params import PromptsConfig
from pipeline.prompts.batches import BatchSource
from pipeline.prompts.checkpoints import load_learner
from pipeline.prompts.learner import PromptLearner
from pipeline.prompts.training import (
    batch_step, present_classes, segmentation_labels, segmentation_loss, segmentation_weight, sub_batches,
)
from pipeline.store import ImageStore
from stages import train_prompts as tp
from stages.cli import main
from tests.conftest import kill_prompt_training_at
from tests.tiny_params import use_tiny_clip

REPO = Path(__file__).resolve().parents[1]
N_TRAIN = 5


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def clip():
    return create_clip("tiny", seed=0)


def _learner(clip, n_fg=3, shared=False, position="front"):
    names = ["ball", "box", "kite", "cup"][:n_fg] + ["", ""]
    return PromptLearner(clip.model, names, n_fg=n_fg, n_ctx=4, shared_context=shared,
                         class_position=position, init_std=0.0125, seed=0)


def _seg_batch(n=6, crop=224):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, 1 + (crop // 16) ** 2, 64, generator=gen)
    crops = torch.zeros(n, crop, crop, dtype=torch.uint8)
    labels = torch.zeros(n, 3)
    for i in range(n):
        c = i % 3
        crops[i, 20 + 10 * i : 120 + 10 * i, 30:150] = c + 1
        labels[i, c] = 1
        labels[i, (c + 1) % 3] = 1  # a labelled class absent from the crop
        crops[i, : 10 * i] = 255
    crops[n - 1] = 0  # a view without any class in its crop
    return x, labels, crops


def _grad(clip, learner, cfg, which, x, labels, crops):
    learner.ctx.grad = None
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    loss, stepped = batch_step(which, cfg, clip, learner, x, labels, crops, scaler, precision="fp32")
    return loss, stepped, learner.ctx.grad.clone()


def test_sub_batches_split_the_batch():
    assert sub_batches(16, 4) == [slice(0, 4), slice(4, 8), slice(8, 12), slice(12, 16)]
    assert [s.stop - s.start for s in sub_batches(16, 8)] == [2] * 8
    assert [s.stop - s.start for s in sub_batches(7, 3)] == [2, 3, 2]
    with pytest.raises(ValueError):
        sub_batches(4, 5)


@pytest.mark.parametrize("k", [2, 3, 6])
def test_cls_sub_batched_gradient_equals_full_batch(clip, k):
    learner = _learner(clip, shared=True, position="end")
    x, labels, _ = _seg_batch()
    labels[0] = 1  # an image with no negative: not valid, it contributes no term
    cfg1 = PromptsConfig(batch_size=6, sub_batches=1)
    loss1, stepped1, g1 = _grad(clip, learner, cfg1, "cls", x, labels, None)
    lossk, steppedk, gk = _grad(clip, learner, dataclasses.replace(cfg1, sub_batches=k), "cls",
                                x, labels, None)
    assert stepped1 and steppedk and float(g1.abs().sum()) > 0
    assert lossk == pytest.approx(loss1, rel=1e-5)
    # float32 summation order differs: compare relative to the gradient's scale
    torch.testing.assert_close(gk, g1, rtol=1e-4, atol=1e-5 * float(g1.abs().max()))


@pytest.mark.parametrize("loss_classes", ["crop", "image"])
@pytest.mark.parametrize("k", [2, 3, 6])
def test_seg_sub_batched_gradient_equals_full_batch(clip, k, loss_classes):
    learner = _learner(clip)
    x, labels, crops = _seg_batch()
    cfg1 = PromptsConfig(batch_size=6, sub_batches=1, loss_classes=loss_classes)
    loss1, _, g1 = _grad(clip, learner, cfg1, "seg", x, labels, crops)
    lossk, _, gk = _grad(clip, learner, dataclasses.replace(cfg1, sub_batches=k), "seg", x, labels, crops)
    assert float(g1.abs().sum()) > 0
    assert lossk == pytest.approx(loss1, rel=1e-5)
    # float32 summation order differs: compare relative to the gradient's scale
    torch.testing.assert_close(gk, g1, rtol=1e-4, atol=1e-5 * float(g1.abs().max()))


def test_seg_batch_without_any_class_skips_its_step(clip):
    learner = _learner(clip)
    x, labels, crops = _seg_batch()
    crops[:] = 0
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    cfg = PromptsConfig(batch_size=6, sub_batches=3)
    loss, stepped = batch_step("seg", cfg, clip, learner, x, labels, crops, scaler, precision="fp32")
    assert (loss, stepped) == (0.0, False)


def test_gradcam_runs_in_fp32_under_fp16_autocast(clip):
    """Under the reference's fp16 AMP the loss is scaled, but the Grad-CAM's inner gradient
    ∂p/∂A is not: in fp16 it underflows. batched_gradcam computes it (and the CAMs, with their
    graph) in fp32 whatever the autocast around it: the same bits as without autocast."""
    from pipeline.prompts.training import batched_gradcam

    learner = _learner(clip)
    x, labels, crops = _seg_batch(n=3)
    text = learner.text_features(clip.model)
    grid = (14, 14)
    ref_cams, ref_w = batched_gradcam(clip, text, x, labels, 3, grid, create_graph=True, with_weights=True)
    with torch.autocast("cpu", dtype=torch.float16):
        cams, w = batched_gradcam(clip, text, x, labels, 3, grid, create_graph=True, with_weights=True)
    assert w.dtype == cams.dtype == torch.float32
    torch.testing.assert_close(w, ref_w, rtol=0, atol=0)
    torch.testing.assert_close(cams, ref_cams, rtol=0, atol=0)
    # still differentiable w.r.t. the prompts (L_CAL trains through it)
    (g,) = torch.autograd.grad(cams.square().sum(), learner.ctx)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_seg_loss_classes_crop_or_image_labels(clip):
    """VOC: the classes present in the seed crop; COCO: the image labels, so a labelled class
    absent from the crop still gets a CAM, an all-background L_bg term and a softmax place."""
    learner = _learner(clip)
    x, labels, crops = _seg_batch()
    crop_labels = segmentation_labels(labels, crops, "crop")
    image_labels = segmentation_labels(labels, crops, "image")
    torch.testing.assert_close(crop_labels, present_classes(crops, 3))
    torch.testing.assert_close(image_labels, labels)
    assert int(crop_labels.sum()) == 5 and int(image_labels.sum()) == 12
    # every class of a view counts that view's non-ignored pixels (fg or bg of that class)
    counted = (crops != 255).flatten(1).sum(1)
    assert segmentation_weight(image_labels, crops) == int((2 * counted).sum())
    loss_crop, n_crop = segmentation_loss(clip, learner, x, crops, crop_labels)
    loss_image, n_image = segmentation_loss(clip, learner, x, crops, image_labels)
    assert (n_crop, n_image) == (5, 12) and not torch.isclose(loss_crop, loss_image)
    # None: the crop's classes (the reference default)
    loss_default, _ = segmentation_loss(clip, learner, x, crops)
    torch.testing.assert_close(loss_default, loss_crop)
    with pytest.raises(ValueError, match="loss_classes"):
        segmentation_labels(labels, crops, "everything")


# -- through the stages ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    params = use_tiny_clip(yaml.safe_load((REPO / "params.yaml").read_text()))
    params["dataset"]["demo"] = {"n_train": N_TRAIN, "n_val": 1, "seed": 0}
    params["compute"] = {"scheduler": "local", "workers": 1, "device": "cpu", "precision": "fp32"}
    params["clip_features"]["n_views"] = 2
    for which in ("cls", "seg"):
        params["prompts"][which].update(iterations=4, warmup_iterations=1, batch_size=6,
                                        checkpoint_every=2)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert _invoke("prepare", "--params", root / "params.yaml", "--out", root / "index").exit_code == 0
    res = _invoke("clip-features", "--params", root / "params.yaml", "--index", root / "index",
                  "--out", root / "features")
    assert res.exit_code == 0, res.output
    seeds = root / "seeds"
    shutil.copytree(root / "index" / "demo" / "SegmentationClassAug", seeds)  # GT as coarse seeds
    return root


def _params(work, tmp_path, **prompts):
    params = yaml.safe_load((work / "params.yaml").read_text())
    for key, value in prompts.items():
        which, name = key.split("__")
        (params["compute"] if which == "compute" else params["prompts"][which])[name] = value
    path = tmp_path / f"params_{len(list(tmp_path.glob('params_*')))}.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _train(work, params, which, out, **kw):
    extra = ["--seeds", work / "seeds"] if which == "seg" else []
    res = _invoke("train-prompts", "--which", which, "--params", params, "--index", work / "index",
                  "--features", work / "features", *extra, "--out", out,
                  "--metrics", out.with_suffix(".csv"))
    assert res.exit_code == 0, res.output
    return torch.load(out, weights_only=True)


def test_every_iteration_is_one_step_over_the_full_batch(work, tmp_path, monkeypatch):
    """4 iterations = 4 optimizer steps of 6 samples each, whatever the sub-batch split (the old
    grad_accum drew a batch per iteration and stepped every k iterations); same result."""
    steps, batches = [], []
    original_step, original_batch = torch.optim.SGD.step, BatchSource.batch

    def counting_step(self, *a, **k):
        steps.append(1)
        return original_step(self, *a, **k)

    def recording_batch(self, iteration):
        out = original_batch(self, iteration)
        batches.append(out[0].shape[0])
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", counting_step)
    monkeypatch.setattr(BatchSource, "batch", recording_batch)
    results = {}
    for which, k in (("cls", 1), ("cls", 3), ("seg", 3)):
        steps.clear(), batches.clear()
        params = _params(work, tmp_path, **{f"{which}__sub_batches": k})
        results[which, k] = _train(work, params, which, tmp_path / f"{which}{k}.pt")
        assert len(steps) == 4 and batches == [6] * 4
    # (the seg split's gradient is checked against the full batch above, step by step)
    torch.testing.assert_close(results["cls", 3]["ctx"], results["cls", 1]["ctx"], rtol=1e-4, atol=1e-6)
    rows = (tmp_path / "cls3.csv").read_text().splitlines()[1:]
    lrs = [float(r.split(",")[2]) for r in rows]
    assert lrs[0] == pytest.approx(1e-5) and lrs[1] == pytest.approx(1e-3)  # scheduler: every iteration


def test_cams_use_the_context_of_cam_iteration(work, tmp_path, monkeypatch):
    """Training runs to the end (same final context as without cam_iteration), keeps the context
    after iteration 2, and `cams` uses that one."""
    plain = _train(work, _params(work, tmp_path), "cls", tmp_path / "plain.pt")
    params = _params(work, tmp_path, cls__cam_iteration=2)
    state = _train(work, params, "cls", tmp_path / "cls.pt")
    assert state["cam_iteration"] == 2 and sorted(state["contexts"]) == [2]
    torch.testing.assert_close(state["ctx"], plain["ctx"], rtol=0, atol=0)
    # the kept context is the one the run had after iteration 2 (its resume checkpoint there)
    revive = kill_prompt_training_at(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="killed"):
        _train(work, params, "cls", tmp_path / "killed.pt")
    revive()
    at_two = torch.load(tmp_path / "killed.pt.resume", weights_only=True)
    assert at_two["iteration"] == 2
    torch.testing.assert_close(state["contexts"][2], at_two["ctx"], rtol=0, atol=0)
    assert not torch.equal(state["contexts"][2], state["ctx"])

    from pipeline.cams.inference import image_cams

    out = tmp_path / "cams.zarr"
    res = _invoke("cams", "--which", "cls", "--params", params, "--index", work / "index",
                  "--features", work / "features", "--prompts", tmp_path / "cls.pt", "--out", out)
    assert res.exit_code == 0, res.output
    store, inference = ImageStore(out), ImageStore(work / "features" / "inference.zarr")
    assert store.attrs["cam_iteration"] == 2
    clip = create_clip("tiny", seed=0)
    record = load_split(work / "index", "train").good()[0]
    attrs = inference.read_attrs(record.id)
    grid = (attrs["grid_h"], attrs["grid_w"])
    cams = {}
    for name, ctx in (("kept", state["contexts"][2]), ("final", state["ctx"])):
        learner, _ = load_learner(clip, tmp_path / "cls.pt")
        with torch.no_grad():
            learner.ctx.copy_(ctx)
            text = learner.text_features(clip.model)
        cams[name] = image_cams(clip, text, learner.n_fg, inference.read(record.id)["tokens"],
                                record.labels, grid)[0]
    np.testing.assert_allclose(store.read(record.id)["cam"], cams["kept"], rtol=1e-5, atol=1e-6)
    # (the tiny random model's CAMs are about 1e-5: compare relative to their size)
    assert not np.allclose(cams["kept"], cams["final"], rtol=1e-3, atol=1e-3 * float(np.abs(cams["final"]).max()))
    # a checkpoint without that context: one clear line, nothing written
    bad = _params(work, tmp_path, cls__cam_iteration=3)
    res = _invoke("cams", "--which", "cls", "--params", bad, "--index", work / "index",
                  "--features", work / "features", "--prompts", tmp_path / "cls.pt",
                  "--out", tmp_path / "bad.zarr")
    assert res.exit_code == 1 and "no context of iteration 3" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "bad.zarr").exists()


def test_cam_iteration_and_loss_classes_are_validated(work, tmp_path):
    res = _invoke("train-prompts", "--which", "cls", "--params",
                  _params(work, tmp_path, cls__cam_iteration=5), "--index", work / "index",
                  "--features", work / "features", "--out", tmp_path / "x.pt")
    assert res.exit_code == 1 and "cam_iteration" in res.output
    res = _invoke("train-prompts", "--which", "cls", "--params",
                  _params(work, tmp_path, cls__loss_classes="image"), "--index", work / "index",
                  "--features", work / "features", "--out", tmp_path / "x.pt")
    assert res.exit_code == 1 and "prompts.cls.loss_classes" in res.output


def test_seg_prompts_train_on_image_labels(work, tmp_path):
    """Against all-background seed maps, crop classes give nothing to learn (every step is
    skipped, the context stays at its initialisation) while the image labels still train: each
    labelled class gets a CAM pushed down by L_bg."""
    blank = tmp_path / "blank"
    blank.mkdir()
    from pipeline.data.imageio import read_label, write_palette_png

    for png in (work / "seeds").glob("*.png"):
        write_palette_png(blank / png.name, np.zeros_like(read_label(png)))
    runs = {}
    for mode in ("crop", "image"):
        out = tmp_path / f"{mode}.pt"
        res = _invoke("train-prompts", "--which", "seg", "--params",
                      _params(work, tmp_path, seg__loss_classes=mode), "--index", work / "index",
                      "--features", work / "features", "--seeds", blank, "--out", out,
                      "--metrics", out.with_suffix(".csv"))
        assert res.exit_code == 0, res.output
        runs[mode] = torch.load(out, weights_only=True)
    init = PromptLearner(create_clip("tiny", seed=0).model, runs["crop"]["spec"]["names"], 4, 16, False,
                         "front", init_std=0.0125, seed=0).ctx.detach()
    torch.testing.assert_close(runs["crop"]["ctx"], init, rtol=0, atol=0)
    assert not torch.allclose(runs["image"]["ctx"], init)


def test_seg_prompts_can_start_from_the_cls_context(work, tmp_path):
    """prompts.seg.init: cls copies the trained cls context (shared, or into every prompt of a
    class-specific context). Against all-background seeds every step is skipped, so the final
    context is exactly the start. A layout the cls prompts do not share, a missing cls file and
    init on cls itself are one clear line each."""
    from pipeline.data.imageio import read_label, write_palette_png

    cls = _train(work, _params(work, tmp_path), "cls", tmp_path / "cls.pt")
    blank = tmp_path / "blank"
    blank.mkdir()
    for png in (work / "seeds").glob("*.png"):
        write_palette_png(blank / png.name, np.zeros_like(read_label(png)))
    cls_layout = dict(seg__class_position="end", seg__background="names", seg__init="cls")

    def seg(params, out, init_prompts=tmp_path / "cls.pt"):
        return _invoke("train-prompts", "--which", "seg", "--params", params, "--index", work / "index",
                       "--features", work / "features", "--seeds", blank, "--init-prompts", init_prompts,
                       "--out", out, "--metrics", out.with_suffix(".csv"))

    for shared in (True, False):
        out = tmp_path / f"seg_{shared}.pt"
        res = seg(_params(work, tmp_path, seg__shared_context=shared, **cls_layout), out)
        assert res.exit_code == 0, res.output
        ctx = torch.load(out, weights_only=True)["ctx"]
        expected = cls["ctx"] if shared else cls["ctx"].expand(len(cls["spec"]["names"]), -1, -1)
        torch.testing.assert_close(ctx, expected, rtol=0, atol=0)
    bad = {
        "class_position": (_params(work, tmp_path, **{**cls_layout, "seg__class_position": "front"}), tmp_path / "cls.pt"),
        "no classification prompts": (_params(work, tmp_path, **cls_layout), tmp_path / "none.pt"),
    }
    for expected, (params, init_prompts) in bad.items():
        res = seg(params, tmp_path / "bad.pt", init_prompts)
        assert res.exit_code == 1 and expected in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "bad.pt").exists()
    res = _invoke("train-prompts", "--which", "cls", "--params", _params(work, tmp_path, cls__init="cls"),
                  "--index", work / "index", "--features", work / "features", "--out", tmp_path / "x.pt")
    assert res.exit_code == 1 and "prompts.cls.init must be random or a phrase" in res.output


def test_classification_prompts_start_from_a_phrase(work, tmp_path):
    """``prompts.cls.init: "a photo of a"``: the context positions next to the class name start as
    the phrase's word embeddings (the prompts read "... a photo of a cat."), the rest as random."""
    from pipeline.clip.factory import build_clip, clip_kwargs
    from pipeline.params import ClipConfig, section
    from pipeline.prompts.learner import _tokenizer, phrase_context

    def train(out, **overrides):
        return _invoke("train-prompts", "--which", "cls", "--params",
                       _params(work, tmp_path, cls__iterations=1, cls__warmup_iterations=1,
                               cls__checkpoint_every=1, **overrides),
                       "--index", work / "index", "--features", work / "features", "--out", out,
                       "--metrics", out.with_suffix(".csv"))

    params = yaml.safe_load(_params(work, tmp_path).read_text())
    clip = build_clip(**clip_kwargs(section(params, "clip", ClipConfig), "cpu"))
    learner = PromptLearner(clip.model, ["cat", "dog", "sky"], 2, n_ctx=6, seed=3)
    ids = _tokenizer().encode("a photo of a")
    words = clip.model.token_embedding.weight[ids].float()
    ctx = phrase_context(learner, clip.model, "a photo of a")
    torch.testing.assert_close(ctx[2:], words, rtol=0, atol=0)  # next to the class name
    torch.testing.assert_close(ctx[:2], learner.ctx[:2].detach(), rtol=0, atol=0)
    # the prompt embeddings of "cat" then hold exactly the tokens of "a photo of a cat."
    with torch.no_grad():
        learner.ctx.copy_(ctx)
    hand = clip.model.token_embedding.weight[_tokenizer().encode("a photo of a cat.")].float()
    torch.testing.assert_close(learner.prompt_embeddings()[0, 3:3 + len(hand)], hand, rtol=0, atol=0)
    front = PromptLearner(clip.model, ["cat"], 1, n_ctx=6, class_position="front", seed=3)
    torch.testing.assert_close(phrase_context(front, clip.model, "a photo of a")[:4], words, rtol=0, atol=0)
    with pytest.raises(ValueError, match="the context holds 1 to 6"):
        phrase_context(learner, clip.model, "a photo of a very very small cat")

    # The stage: a phrase start differs from the random start and is deterministic.
    a, b, r = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "r.pt"
    for out, init in ((a, "a photo of a"), (b, "a photo of a"), (r, "random")):
        res = train(out, cls__init=init)
        assert res.exit_code == 0, res.output
    ctx = {k: torch.load(v, weights_only=True)["ctx"] for k, v in (("a", a), ("b", b), ("r", r))}
    torch.testing.assert_close(ctx["a"], ctx["b"], rtol=0, atol=0)
    assert not torch.equal(ctx["a"], ctx["r"])
    long = train(tmp_path / "long.pt", cls__init=" ".join(["cat"] * 40))
    assert long.exit_code == 1 and "prompts.cls.init" in long.output and "the context holds" in long.output


def test_crop_320_trains_segmentation_prompts(work, tmp_path):
    """A crop other than 224 (a 20x20 token grid) goes through clip-features and the seg loss."""
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["clip_features"]["augment"]["crop"] = 320
    params["prompts"]["seg"].update(iterations=2, batch_size=3)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    res = _invoke("clip-features", "--params", path, "--index", work / "index", "--out", tmp_path / "f")
    assert res.exit_code == 0, res.output
    views = ImageStore(tmp_path / "f" / "train_views.zarr")
    image_id = views.ids()[0]
    assert views.read_array(image_id, "tokens").shape == (2, 1 + 20 * 20, 64)
    res = _invoke("train-prompts", "--which", "seg", "--params", path, "--index", work / "index",
                  "--features", tmp_path / "f", "--seeds", work / "seeds", "--out", tmp_path / "seg.pt",
                  "--metrics", tmp_path / "seg.csv")
    assert res.exit_code == 0, res.output
    losses = [float(r.split(",")[1]) for r in (tmp_path / "seg.csv").read_text().splitlines()[1:]]
    assert len(losses) == 2 and all(np.isfinite(losses)) and max(losses) > 0
    params["clip_features"]["augment"]["crop"] = 300
    path.write_text(yaml.safe_dump(params))
    res = _invoke("clip-features", "--params", path, "--index", work / "index", "--out", tmp_path / "g")
    assert res.exit_code == 1 and "clip_features.augment.crop" in res.output


# -- precision, and resuming on another device (issue 23, defects 6 and 7) -------------------------


def _as_on_cuda(monkeypatch):
    """Make train-prompts choose its precision as on a CUDA device (``amp`` -> fp16-amp); the
    fp16 autocast and the GradScaler then run on this CPU, so the AMP code path is exercised."""
    from pipeline.precision import training_precision

    monkeypatch.setattr(tp, "training_precision",
                        lambda precision, amp, device: training_precision(precision, amp, "cuda"))


def test_a_cpu_resume_state_resumes_under_an_enabled_grad_scaler(work, tmp_path, monkeypatch):
    """A CPU run saves its disabled GradScaler's state, {}; the run resumed where the scaler is
    enabled (CUDA; an enabled CPU GradScaler stands in for it here) used to die in
    ``scaler.load_state_dict({})``. It resumes, and equals the uninterrupted run."""
    params = _params(work, tmp_path)
    full = _train(work, params, "cls", tmp_path / "full.pt")
    revive = kill_prompt_training_at(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="killed"):
        _train(work, params, "cls", tmp_path / "cls.pt")
    revive()
    assert torch.load(tmp_path / "cls.pt.resume", weights_only=True)["scaler"] == {}

    real = torch.amp.GradScaler
    made = []

    def enabled_scaler(*args, **kwargs):
        made.append(real("cpu", enabled=True))
        return made[-1]

    monkeypatch.setattr(torch.amp, "GradScaler", enabled_scaler)
    resumed = _train(work, params, "cls", tmp_path / "cls.pt")
    assert made and made[0].is_enabled()
    # loss scaling by a power of two is exact in fp32: the same bits as the uninterrupted run
    torch.testing.assert_close(resumed["ctx"], full["ctx"], rtol=0, atol=0)


def test_a_resume_state_of_another_precision_is_restarted(work, tmp_path, monkeypatch, caplog):
    """The resume fingerprint holds the precision: a CPU run's fp32 state met by a bf16 run, or by
    a CUDA run with ``amp`` (fp16-amp), is not continued in another precision but restarted,
    with a log line; the result is the uninterrupted run's in the new precision."""
    fp32 = _params(work, tmp_path)
    revive = kill_prompt_training_at(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="killed"):
        _train(work, fp32, "cls", tmp_path / "cls.pt")
    revive()
    bf16 = _params(work, tmp_path, compute__precision="bf16")
    with caplog.at_level("INFO", logger="wsss.train_prompts"):
        state = _train(work, bf16, "cls", tmp_path / "cls.pt")
    assert "training from the start" in caplog.text and "(this run: bf16)" in caplog.text
    assert state["precision"] == "bf16"
    torch.testing.assert_close(state["ctx"], _train(work, bf16, "cls", tmp_path / "ref.pt")["ctx"],
                               rtol=0, atol=0)

    caplog.clear()
    revive = kill_prompt_training_at(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="killed"):
        _train(work, _params(work, tmp_path, cls__amp=True), "cls", tmp_path / "amp.pt")  # CPU: fp32
    revive()
    _as_on_cuda(monkeypatch)
    with caplog.at_level("INFO", logger="wsss.train_prompts"):
        state = _train(work, _params(work, tmp_path, cls__amp=True), "cls", tmp_path / "amp.pt")
    assert "(this run: fp16-amp)" in caplog.text and state["precision"] == "fp16-amp"


def test_fp16_amp_trains_scales_and_resumes(work, tmp_path, monkeypatch):
    """``amp: true`` on CUDA is the reference's fp16 autocast + GradScaler: it trains (close to
    fp32, not equal), its resume state carries the scaler's state, and a resumed run equals the
    uninterrupted one."""
    _as_on_cuda(monkeypatch)
    params = _params(work, tmp_path, cls__amp=True, seg__amp=True)
    fp32 = _train(work, _params(work, tmp_path), "cls", tmp_path / "fp32.pt")
    full = _train(work, params, "cls", tmp_path / "full.pt")
    assert full["precision"] == "fp16-amp" and not torch.equal(full["ctx"], fp32["ctx"])
    torch.testing.assert_close(full["ctx"], fp32["ctx"], rtol=0.05, atol=2e-3)
    revive = kill_prompt_training_at(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="killed"):
        _train(work, params, "cls", tmp_path / "cls.pt")
    revive()
    scaler = torch.load(tmp_path / "cls.pt.resume", weights_only=True)["scaler"]
    assert scaler["scale"] > 0 and math.log2(scaler["scale"]) % 1 == 0  # a live scaler's state
    torch.testing.assert_close(_train(work, params, "cls", tmp_path / "cls.pt")["ctx"], full["ctx"],
                               rtol=0, atol=0)
    seg = _train(work, params, "seg", tmp_path / "seg.pt")  # the double backward under fp16 AMP
    assert seg["precision"] == "fp16-amp" and torch.isfinite(seg["ctx"]).all()


def test_precision_settings_are_validated(work, tmp_path, caplog):
    res = CliRunner().invoke(main, [str(a) for a in (
        "train-prompts", "--which", "cls", "--params",
        _params(work, tmp_path, cls__amp=True, compute__precision="bf16"), "--index", work / "index",
        "--features", work / "features", "--out", tmp_path / "x.pt")])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert "prompts.cls.amp" in res.output and "compute.precision: bf16" in res.output
    with caplog.at_level("INFO", logger="wsss.train_prompts"):
        state = _train(work, _params(work, tmp_path, cls__amp=True), "cls", tmp_path / "cpu.pt")
    assert "prompts.cls.amp applies on CUDA only; training in fp32 on cpu" in caplog.text
    assert state["precision"] == "fp32"


def test_a_prompt_run_started_on_the_cpu_continues_on_cuda(work, tmp_path, monkeypatch, caplog):
    """On a simulated CUDA device (tests/simulated_cuda.py; the arithmetic stays the CPU's):
    a run killed on the CPU resumes on CUDA in the same precision (fp32) and equals the
    uninterrupted CPU run; with ``amp`` (fp32 on the CPU, fp16-amp on CUDA) the CPU state used to
    crash the CUDA run in ``GradScaler.load_state_dict({})``; it is restarted, with a log line."""
    from tests.simulated_cuda import simulated_cuda

    for amp in (True, False):
        cpu = _params(work, tmp_path, cls__amp=amp)
        cuda = _params(work, tmp_path, cls__amp=amp, compute__device="cuda")
        full = _train(work, cpu, "cls", tmp_path / f"full{amp}.pt")
        revive = kill_prompt_training_at(monkeypatch, 3)
        with pytest.raises(RuntimeError, match="killed"):
            _train(work, cpu, "cls", tmp_path / f"cls{amp}.pt")
        revive()
        caplog.clear()
        with simulated_cuda(), caplog.at_level("INFO", logger="wsss.train_prompts"):
            state = _train(work, cuda, "cls", tmp_path / f"cls{amp}.pt")
        if amp:
            assert "training from the start" in caplog.text and "(this run: fp16-amp)" in caplog.text
            assert state["precision"] == "fp16-amp"
        else:
            assert "resuming at iteration 2" in caplog.text and state["precision"] == "fp32"
            torch.testing.assert_close(state["ctx"], full["ctx"], rtol=0, atol=0)
