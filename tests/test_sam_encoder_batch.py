"""An image's crops through SAM's image encoder together, and their prompts through the decoder
packed into shared batches (issue 32, item 2): the embeddings are the bits ``set_image`` gives one
crop at a time and each crop's decoder outputs the bits of a decoder of its own, so the
quasi-superpixels are identical however many crops a pass takes; the memory budget decides how
many."""
import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from segment_anything.utils.amg import generate_crop_boxes

import pipeline.demo.registry  # noqa: F401  (registers the demo SAM's CLIP-shaped encoder)
from pipeline.sam import image_encoder
from pipeline.sam.models import build_sam
from pipeline.sam.point_decoder import PointDecoder
from pipeline.sam.quasi_superpixels import QuasiSuperpixelGenerator, _pack_prompts
from pipeline.sam.specs import SamSpec, sam_spec
from tests.simulated_cuda import logical_device, simulated_cuda
from tests.test_sam_batched import same

#: ViT-B's blocks (width 768, 12 heads, rel-pos windowed and global attention) at a 256 px input.
VIT_B_256 = SamSpec(768, 12, 12, (2, 5, 8, 11), image_size=256)
SETTINGS = dict(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                crop_n_layers=1, min_mask_region_area=10, box_nms_thresh=1.0,
                crop_nms_thresh=1.0, occupation_thresh=float("inf"))


def predictor(spec: SamSpec) -> SamPredictor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sam = build_sam(spec)
    sam.mask_threshold = 0.0
    return SamPredictor(sam)


def image(height: int = 120, width: int = 160) -> np.ndarray:
    out = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    out[20:80, 30:100] = (200, 30, 30)
    return out


def crops(img: np.ndarray) -> list[np.ndarray]:
    boxes, _ = generate_crop_boxes(img.shape[:2], 1, 512 / 1500)
    return [img[y0:y1, x0:x1] for x0, y0, x1, y1 in boxes]


@pytest.mark.parametrize("spec", ["tiny", "demo", "vit_b blocks"])
def test_crops_encoded_together_are_the_bits_of_set_image(spec):
    pred = predictor(VIT_B_256 if spec == "vit_b blocks" else sam_spec(spec))
    parts = crops(image(375, 500))
    assert len({p.shape for p in parts}) > 1  # crops of different sizes share the pass
    together = image_encoder.encode_crops(pred, parts)
    for part, (features, input_size) in zip(parts, together):
        pred.set_image(part)
        assert input_size == pred.input_size
        assert features.shape == pred.features.shape
        assert torch.equal(features, pred.features)


def test_the_neck_runs_image_by_image():
    """The tiny SAM's 3x3 neck convolution rounds otherwise over a batch: the whole encoder on the
    stacked crops would not give set_image's bits (why the neck runs per crop)."""
    pred = predictor(sam_spec("tiny"))
    parts = crops(image(375, 500))
    inputs = torch.cat([image_encoder._input(pred, p)[0] for p in parts])
    with torch.no_grad():
        stacked = pred.model.image_encoder(inputs)
    own = torch.cat([f for f, _ in image_encoder.encode_crops(pred, parts)])
    assert not torch.equal(stacked, own)
    assert torch.allclose(stacked, own, atol=1e-5)


def count_passes(pred) -> list[int]:
    """Batch sizes seen by the encoder's patch embedding, one per pass."""
    seen = []
    encoder = pred.model.image_encoder
    embed = encoder.patch_embed if hasattr(encoder, "patch_embed") else encoder.conv1
    embed.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    return seen


def test_the_generator_encodes_an_images_crops_in_one_pass_with_identical_masks():
    img = image()
    pred = predictor(sam_spec("tiny"))
    passes = count_passes(pred)
    one_by_one = QuasiSuperpixelGenerator(pred, max_batch_memory_mb=0.01, **SETTINGS).generate(img)
    assert passes == [1] * 5
    passes.clear()
    together = QuasiSuperpixelGenerator(pred, **SETTINGS).generate(img)
    assert passes == [5]  # the whole image and the crop layer's four
    assert len(together) > 50
    assert same(together, one_by_one)


def test_crops_per_pass_follows_the_memory_budget():
    tiny = build_sam(sam_spec("tiny"))
    per_image = image_encoder.encoder_image_bytes(tiny)
    assert image_encoder.crops_per_pass(per_image * 3, tiny, 5) == 3
    assert image_encoder.crops_per_pass(per_image * 30, tiny, 5) == 5
    assert image_encoder.crops_per_pass(1, tiny, 5) == 1
    # ViT-H at 1024 px: its global attention's scores alone are 16 heads x 4096² floats (1 GiB).
    vit_h = torch.device("meta")
    with vit_h:
        big = build_sam(sam_spec("vit_h"))
    assert 3 * 2**30 < image_encoder.encoder_image_bytes(big) < 4 * 2**30
    assert image_encoder.crops_per_pass(1024 * 2**20, big, 5) == 1  # the CPU's default budget
    assert image_encoder.crops_per_pass(39 * 2**30, big, 5) == 5  # half an H100's free memory


@pytest.mark.parametrize("spec", ["tiny", "vit_b blocks"])
def test_prompts_of_several_crops_in_one_batch_are_the_bits_of_each_alone(spec):
    """PointDecoder.predict_images: groups of odd sizes (padded to keep each group's alignment),
    in any order, give each crop what a decoder of that crop alone gives."""
    pred = predictor(VIT_B_256 if spec == "vit_b blocks" else sam_spec(spec))
    parts = crops(image(375, 500))[1:4]
    encoded = image_encoder.encode_crops(pred, parts)
    decoder = PointDecoder.of_images(pred.model, [(f, size, part.shape[:2])
                                                  for part, (f, size) in zip(parts, encoded)])
    rng = np.random.default_rng(0)
    coords = [pred.transform.apply_coords(rng.uniform(0, 250, (n, 2)), part.shape[:2])
              for n, part in zip((7, 6, 5), parts)]
    alone = []
    for i in range(3):
        image_encoder.set_features(pred, encoded[i][0], parts[i].shape[:2], encoded[i][1])
        alone.append(PointDecoder(pred))
    ious = torch.cat([d.predict(torch.as_tensor(c), torch.ones_like)[0]
                      for d, c in zip(alone, coords)])
    threshold = ious.median()
    select = lambda iou: iou > threshold  # noqa: E731 - about half the slots
    order = [2, 0, 1]
    together = decoder.predict_images([(i, coords[i]) for i in order], select)
    for i, (iou, index, logits) in zip(order, together):
        want = alone[i].predict(torch.as_tensor(coords[i]), select)
        assert 0 < len(want[1]) < 3 * len(coords[i])
        for got, expected in zip((iou, index, logits), want):
            assert got.shape == expected.shape and torch.equal(got, expected)


def test_prompts_are_packed_in_aligned_batches():
    assert _pack_prompts([64, 16, 16, 16, 16], 64) == [
        [(0, 0, 64)], [(1, 0, 16), (2, 0, 16), (3, 0, 16), (4, 0, 16)]]
    # a part that does not fill its batch is padded to PROMPT_ALIGN (4) prompts
    assert _pack_prompts([5, 7], 8) == [[(0, 0, 5)], [(1, 0, 7)]]
    assert _pack_prompts([6, 6], 12) == [[(0, 0, 6), (1, 0, 4)], [(1, 4, 6)]]
    assert _pack_prompts([256] * 4, 28)[0] == [(0, 0, 28)]
    batches = _pack_prompts([1024, 256, 256, 256, 256], 256)
    assert len(batches) == 8 and all(sum(z - a for _, a, z in b) == 256 for b in batches)


def test_on_the_simulated_cuda_device_crops_go_together_and_give_the_cpu_masks(monkeypatch):
    """With half of 40 GB free as the budget, the whole image and its four crops go through the
    encoder in one pass and the decoder in shared batches, every tensor on the device, and the
    quasi-superpixels are the CPU's, crop by crop."""
    img = image()
    cpu = QuasiSuperpixelGenerator(predictor(sam_spec("tiny")), max_batch_memory_mb=0.01,
                                   **SETTINGS).generate(img)
    packed = []
    original = QuasiSuperpixelGenerator._decode_together

    def spy(self, group, orig_size):
        packed.append((len(group), logical_device(group[0][2][0])))
        return original(self, group, orig_size)

    monkeypatch.setattr(QuasiSuperpixelGenerator, "_decode_together", spy)
    with simulated_cuda():
        pred = predictor(sam_spec("tiny"))
        pred.model.to("cuda")
        pred = SamPredictor(pred.model)
        out = QuasiSuperpixelGenerator(pred, **SETTINGS).generate(img)
    assert packed == [(5, torch.device("cuda", 0))]
    assert same(out, cpu)
