"""The fast mask-decoder path (pipeline/sam/point_decoder.py) against segment-anything's own."""
import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from segment_anything.utils.amg import build_point_grid

from pipeline.sam import point_decoder
from pipeline.sam.models import build_sam, build_sam_predictor
from pipeline.sam.specs import sam_spec
from pipeline.sam import quasi_superpixels as qsp
from pipeline.sam.point_decoder import (
    PointDecoder,
    StockNetworkPredictor,
    batch_memory_bytes,
    prompt_bytes,
    prompts_per_batch,
)
from pipeline.sam.quasi_superpixels import QuasiSuperpixelGenerator


def random_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def grid_coords(predictor, n):
    """An n x n point grid in the model's input frame, float64 as the generator passes it."""
    points = build_point_grid(n) * np.array(predictor.original_size)[None, ::-1]
    return torch.as_tensor(predictor.transform.apply_coords(points, predictor.original_size))


def stock_predict(predictor, coords, batch):
    logits, ious = [], []
    for i in range(0, len(coords), batch):
        part = coords[i:i + batch]
        lg, iou, _ = predictor.predict_torch(
            part[:, None, :], torch.ones(len(part), 1, dtype=torch.int), multimask_output=True,
            return_logits=True)
        logits.append(lg)
        ious.append(iou)
    return torch.cat(logits), torch.cat(ious)


def everything(iou):
    return torch.ones_like(iou, dtype=torch.bool)


@pytest.fixture(scope="module")
def tiny():
    predictor = build_sam_predictor("tiny", None, None)
    predictor.set_image(random_image(90, 130))
    coords = grid_coords(predictor, 8)
    return predictor, coords, stock_predict(predictor, coords, 64)


@pytest.mark.parametrize("batch", [64, 20, 12, 4])
def test_iou_and_logits_are_stock_bits_for_any_batch(tiny, batch):
    predictor, coords, (logits, iou) = tiny
    decoder = PointDecoder(predictor)
    parts = [decoder.predict(coords[i:i + batch], everything)
             for i in range(0, len(coords), batch)]
    assert torch.equal(torch.cat([p[0] for p in parts]), iou)
    assert all(torch.equal(p[1], torch.arange(3 * len(p[0]))) for p in parts)
    assert torch.equal(torch.cat([p[2] for p in parts]), logits.flatten(0, 1))


def test_only_prompts_and_slots_that_can_survive_are_upscaled(tiny):
    predictor, coords, (logits, iou) = tiny
    decoder = PointDecoder(predictor)
    upscaled, upsampled = [], []
    hook = decoder.decoder.output_upscaling.register_forward_hook(
        lambda m, i, o: upscaled.append(i[0].shape[0]))
    postprocess = predictor.model.postprocess_masks

    def spy(masks, *args):
        upsampled.append(masks.shape[0] * masks.shape[1])
        return postprocess(masks, *args)

    predictor.model.postprocess_masks = spy
    try:
        threshold = iou.flatten().sort().values[-10]  # about 10 of the 192 slots survive
        chosen = iou >= threshold
        got_iou, index, got_logits = decoder.predict(coords, lambda x: x >= threshold)
        # The chosen slots only, three to a row like stock's (B, 3) (zero-padded; see _to_image).
        padded = 3 * -(-int(chosen.sum()) // 3)
        assert upscaled == [int(chosen.any(1).sum())] and upsampled == [padded]
        assert torch.equal(index, torch.nonzero(chosen.flatten()).flatten())
        assert torch.equal(got_logits, logits.flatten(0, 1)[index])
        assert torch.equal(got_iou, iou)

        upscaled.clear(), upsampled.clear()
        _, index, got_logits = decoder.predict(coords, lambda x: torch.zeros_like(x, dtype=bool))
        assert upscaled == [] and upsampled == [] and len(index) == 0
        assert got_logits.shape == (0, 90, 130)
    finally:
        hook.remove()
        predictor.model.postprocess_masks = postprocess


def test_stock_bits_with_one_torch_thread(tiny):
    """One intra-op thread (dask's local-cluster workers run so): bilinear upsampling then rounds
    by channel count, and the chosen slots must still give stock's (B, 3) bits."""
    predictor, coords, _ = tiny
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        logits, iou = stock_predict(predictor, coords, 64)
        decoder = PointDecoder(predictor)
        threshold = iou.flatten().sort().values[-10]
        for batch in (64, 20):
            parts = [decoder.predict(coords[i:i + batch], lambda x: x >= threshold)
                     for i in range(0, len(coords), batch)]
            index = torch.nonzero((iou >= threshold).flatten()).flatten()
            assert torch.equal(torch.cat([p[2] for p in parts]), logits.flatten(0, 1)[index])
            _, _, got_logits = decoder.predict(coords[:batch], everything)
            assert torch.equal(got_logits, logits[:batch].flatten(0, 1))
    finally:
        torch.set_num_threads(threads)


def test_first_block_projects_the_image_tokens_once_per_image(tiny):
    predictor, coords, _ = tiny
    first = predictor.model.mask_decoder.transformer.layers[0]
    projections = (first.cross_attn_token_to_image.k_proj, first.cross_attn_token_to_image.v_proj,
                   first.cross_attn_image_to_token.q_proj)
    rows = []
    hooks = [m.register_forward_pre_hook(lambda m, a: rows.append(a[0].numel() // a[0].shape[-1]))
             for m in projections]
    try:
        stock_predict(predictor, coords[:8], 8)
        assert rows == [8 * 16 * 16] * 3  # stock: every prompt's copy of the 16x16 tokens
        rows.clear()
        decoder = PointDecoder(predictor)
        decoder.predict(coords, everything)
        assert rows == []  # computed once in PointDecoder(), from the weights
        assert [t.shape[0] for t in (decoder.first_t2i_k, decoder.first_t2i_v,
                                     decoder.first_i2t_q)] == [1, 1, 1]
    finally:
        for h in hooks:
            h.remove()


def test_prompt_batch_follows_the_memory_budget():
    sam = build_sam(sam_spec("vit_b"))
    per_prompt = prompt_bytes(sam, (375, 500))
    # 5 image-token tensors (4096 x 256 float32) in the transformer, or the upscaling and three
    # 1024^2 + 375x500 upsampled slots, whichever is larger.
    assert per_prompt == 4 * (4096 * 256 + 2 * 32 * 256 * 256 + 3 * (1024 ** 2 + 375 * 500))
    assert prompts_per_batch(1024 * 2 ** 20, sam, (375, 500), 256) == 28  # rounded to 4
    assert prompts_per_batch(1024 * 2 ** 20, sam, (375, 500), 16) == 16
    assert prompts_per_batch(2 ** 20, sam, (375, 500), 256) == point_decoder.PROMPT_ALIGN
    assert prompts_per_batch(40 * per_prompt, sam, (2000, 3000), 256) < 40


def test_auto_prompt_batch_is_sized_from_free_cuda_memory(monkeypatch):
    """``auto``/None: half of (free device memory + the allocator's unused cache) on CUDA, the
    CPU default elsewhere; a number is MiB."""
    calls = []

    def mem_get_info(device):
        calls.append(torch.device(device))
        return 80 * 2 ** 30, 141 * 2 ** 30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 6 * 2 ** 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 4 * 2 ** 30)
    cuda = torch.device("cuda", 1)
    for auto in (None, "auto"):
        assert batch_memory_bytes(auto, cuda) == \
            int(82 * 2 ** 30 * point_decoder.AUTO_MEMORY_FRACTION)
    assert calls == [cuda, cuda]
    assert batch_memory_bytes(None, "cpu") == point_decoder.DEFAULT_BATCH_MEMORY_MB * 2 ** 20
    assert batch_memory_bytes(512, cuda) == 512 * 2 ** 20
    assert batch_memory_bytes(0.5, "cpu") == 2 ** 19
    assert len(calls) == 2  # an explicit budget never asks the device
    for bad in (0, -1, "lots"):
        with pytest.raises(ValueError, match="max_batch_memory_mb"):
            batch_memory_bytes(bad, "cpu")
    # At VOC's size: 28 prompts under the old fixed 1 GiB, the full 256 with 80 GB free (every
    # SAM has the same prompt encoder and mask decoder, so ViT-B's per-prompt memory is ViT-H's).
    sam = build_sam(sam_spec("vit_b"))
    assert prompts_per_batch(batch_memory_bytes(1024, cuda), sam, (375, 500), 256) == 28
    assert prompts_per_batch(batch_memory_bytes("auto", cuda), sam, (375, 500), 256) == 256
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2 * 2 ** 30, 141 * 2 ** 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 0)
    assert prompts_per_batch(batch_memory_bytes("auto", cuda), sam, (375, 500), 256) == 28


def test_generator_asks_for_the_budget_of_the_predictor_device(monkeypatch):
    """The generator sizes its encoder passes and each crop's prompt batches with
    batch_memory_bytes on the predictor's device (auto by default), and its masks do not
    change."""
    predictor = build_sam_predictor("tiny", None, None)
    image = random_image(70, 110, seed=2)
    asked = []
    original = point_decoder.batch_memory_bytes

    def spy(budget, device):
        asked.append((budget, torch.device(device)))
        return original(budget, device)

    monkeypatch.setattr(qsp, "batch_memory_bytes", spy)
    auto = QuasiSuperpixelGenerator(predictor, **ONE_CROP).generate(image)
    assert asked == [(None, torch.device("cpu"))] * 2  # the encoder pass, the one crop's prompts
    fixed = QuasiSuperpixelGenerator(predictor, max_batch_memory_mb=1, **ONE_CROP).generate(image)
    assert asked[-1] == (1, torch.device("cpu"))
    assert len(auto) > 5
    assert_same_output(auto, fixed)


def assert_same_output(a, b):
    a, b = a.to_arrays(), b.to_arrays()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert a[key].tobytes() == b[key].tobytes(), key


# An IoU threshold at which part of the tiny random model's masks survive (its IoUs are near 0);
# its masks are near-duplicates, so NMS and the occupation filter are opened to keep many.
SURVIVING = dict(points_per_side=8, points_per_batch=64, pred_iou_thresh=0.05,
                 stability_score_thresh=0.0, crop_n_layers=1, min_mask_region_area=20,
                 box_nms_thresh=1.0, crop_nms_thresh=1.0, occupation_thresh=float("inf"))


ONE_CROP = dict(SURVIVING, crop_n_layers=0)


def test_generator_fast_path_gives_the_stock_network_output(monkeypatch):
    predictor = build_sam_predictor("tiny", None, None)
    image = random_image(70, 110, seed=1)
    reference = QuasiSuperpixelGenerator(StockNetworkPredictor(predictor), **SURVIVING).generate(image)
    assert len(reference) > 5
    # The fast path must not fall back to predict_torch for a real Sam.
    monkeypatch.setattr(SamPredictor, "predict_torch", lambda *a, **k: pytest.fail("stock path"))
    fast = QuasiSuperpixelGenerator(predictor, **SURVIVING).generate(image)
    assert_same_output(fast, reference)


def test_generator_output_does_not_depend_on_the_memory_budget():
    predictor = build_sam_predictor("tiny", None, None)
    image = random_image(70, 110, seed=2)
    batches = []
    original = PointDecoder.predict_images

    def spy(self, groups, select):
        batches.append(sum(len(coords) for _, coords in groups))
        return original(self, groups, select)

    outputs = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PointDecoder, "predict_images", spy)
        for budget in (1, 1024):
            batches.clear()
            outputs.append(QuasiSuperpixelGenerator(
                predictor, max_batch_memory_mb=budget, **SURVIVING).generate(image))
            # 1 MiB: crop by crop, 4 prompts a batch; 1024 MiB: the whole image and its four
            # crops (64 + 4 x 16 prompts) in batches of 64, crops packed together
            assert batches == ([4] * 32 if budget == 1 else [64, 64])
    assert len(outputs[0]) > 5
    assert_same_output(*outputs)


def test_bf16_autocasts_encoder_and_decoder_but_not_the_filters():
    predictor = build_sam_predictor("tiny", None, None)
    image = random_image(70, 110, seed=1)
    sam = predictor.model
    dtypes = {}

    def record(name):
        def hook(module, inputs, output):
            dtypes.setdefault(name, output.dtype)
        return hook

    watched = (("encoder", sam.image_encoder.blocks[0].mlp.lin1),
               ("decoder", sam.mask_decoder.transformer.layers[1].mlp.lin1),
               ("iou_head", sam.mask_decoder.iou_prediction_head.layers[0]))
    hooks = [module.register_forward_hook(record(name)) for name, module in watched]
    try:
        bf16 = QuasiSuperpixelGenerator(predictor, precision="bf16", **ONE_CROP).generate(image)
    finally:
        for h in hooks:
            h.remove()
    assert dtypes == {"encoder": torch.bfloat16, "decoder": torch.bfloat16,
                      "iou_head": torch.bfloat16}
    fp32 = QuasiSuperpixelGenerator(predictor, **ONE_CROP).generate(image)
    assert bf16.predicted_iou.dtype == np.float32 and bf16.stability_score.dtype == np.float32
    assert len(bf16) > 0 and len(fp32) > 0
    # bf16 really changes the numbers (the IoUs of common prompts differ in low bits).
    common = {tuple(p) for p in fp32.point_coords} & {tuple(p) for p in bf16.point_coords}
    assert common
    assert not np.array_equal(np.sort(fp32.predicted_iou), np.sort(bf16.predicted_iou))
    with pytest.raises(ValueError, match="precision"):
        QuasiSuperpixelGenerator(predictor, precision="fp16")


class CachedEncoder(SamPredictor):
    """A SamPredictor that runs the image encoder once per distinct image (slow-test economy)."""

    def __init__(self, sam):
        super().__init__(sam)
        self.cache = {}

    def set_image(self, image, image_format="RGB"):
        key = (image.shape, image.tobytes())
        if key not in self.cache:
            super().set_image(image, image_format)
            self.cache[key] = (self.features, self.original_size, self.input_size)
            return
        self.reset_image()
        self.features, self.original_size, self.input_size = self.cache[key]
        self.is_image_set = True


@pytest.mark.slow
def test_vit_b_random_weights_match_stock_bit_for_bit():
    """Real ViT-B architecture (random weights): IoUs of every slot, logits of the kept slots and
    the generator's final masks equal stock's predict_torch path bit for bit."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        predictor = CachedEncoder(build_sam(sam_spec("vit_b")))
    image = random_image(120, 160, seed=3)
    predictor.set_image(image)
    coords = grid_coords(predictor, 8)
    logits, iou = stock_predict(predictor, coords, 64)
    decoder = PointDecoder(predictor)
    keep = lambda x: x + torch.tensor([0.0, 0.0, 0.1]) > 0.15  # noqa: E731 - ~1/3 survive
    parts = [decoder.predict(coords[i:i + 28], keep) for i in range(0, 64, 28)]
    assert torch.equal(torch.cat([p[0] for p in parts]), iou)
    index = torch.cat([p[1] + 3 * 28 * k for k, p in enumerate(parts)])
    assert torch.equal(index, torch.nonzero(keep(iou).flatten()).flatten()) and len(index) > 10
    assert torch.equal(torch.cat([p[2] for p in parts]), logits.flatten(0, 1)[index])

    settings = dict(points_per_side=8, points_per_batch=64, pred_iou_thresh=0.15,
                    stability_score_thresh=0.0, crop_n_layers=0, min_mask_region_area=20)
    fast = QuasiSuperpixelGenerator(predictor, max_batch_memory_mb=256, **settings)
    reference = QuasiSuperpixelGenerator(StockNetworkPredictor(predictor), **settings)
    out = fast.generate(image)
    assert len(out) > 0
    assert_same_output(out, reference.generate(image))
