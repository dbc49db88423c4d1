"""SAM's mask decoder for single-point prompts, with the automatic generator's exact shortcuts.

The automatic generator (algorithms.md §1) prompts SAM with one positive point per prompt, no box
and no mask input, and keeps a mask only if its predicted IoU passes the threshold. Stock
``SamPredictor.predict_torch`` does the whole decoder for every prompt and every mask slot. This
module computes the same numbers with less work, all of it exact:

1. **Shared first block.** Without a mask input, every prompt sees the same image tokens
   (image embedding + the "no mask" embedding) and the same positional encoding, so the first
   block's projections of the image tokens (token-to-image keys and values, image-to-token
   queries) are computed once per image instead of once per prompt, and the image embedding and
   its positional encoding are broadcast rather than copied per prompt. ``keys + key_pe`` is
   formed once per block (stock adds it twice, for both cross attentions).
2. **IoU before masks.** The IoU head reads the IoU token only, so the IoU test runs before the
   output upscaling, the hypernetworks and the upsampling to image size; those run only for
   prompts with a mask slot that can survive, and the upsampling only for those slots. Slot 0
   (the single-mask output) is never upsampled: the generator uses the three multimask slots.

Numerics are SAM's own, operation by operation, in the same memory layouts, so the results are
the bits stock produces (tests/test_point_decoder.py checks IoU predictions and logits against
``predict_torch``). Three details make that hold however the prompts are batched, which lets the
caller choose the batch from a memory budget (:func:`prompts_per_batch`; on CUDA the budget
defaults to a share of the free device memory, :func:`batch_memory_bytes`):

* a GEMM with few rows can take another kernel, hence other rounding, than the same GEMM with
  many rows (MKL: fewer than 12 rows), so token-side projections with few rows are zero-padded
  to :data:`MIN_GEMM_ROWS` rows;
* MKL's small batched GEMMs (the 7x7 self-attention scores) round differently when an output
  matrix is not 16-byte aligned, so a prompt's place in its batch must keep its alignment:
  batches are multiples of :data:`PROMPT_ALIGN` prompts (4 float32 = 16 bytes);
* with one torch thread, bilinear upsampling rounds by channel count, so the chosen mask slots
  are upsampled three to a row, as stock's (B, 3) slots are.

Checked on CPU at 1, 2 and 4 torch threads. With 3, stock's own logits differ between prompt
batch sizes (upsampling rounds by the number of slots upsampled): ours then equal stock's at the
same batch when every slot is kept, and may differ in the last bit when only some are.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.modeling.transformer import Attention
from torch import Tensor, nn

#: Token-side GEMMs with fewer rows are zero-padded to this many rows, so that every prompt batch
#: size uses the kernels of a large batch (see the module docstring).
MIN_GEMM_ROWS = 16
#: Prompt batches are multiples of this (see the module docstring).
PROMPT_ALIGN = 4

#: Working memory of one prompt in the transformer, in image-token tensors (h*w x C floats):
#: ViT-B at 375x500 peaked at about 4.1 per prompt (RSS slope over batch sizes).
TRANSFORMER_TOKEN_TENSORS = 5
#: The same for the output upscaling, in upscaled embeddings (C/8 x 4h x 4w floats).
UPSCALING_TENSORS = 2
#: Share of a CUDA device's free memory that an automatic prompt batch may plan for: the
#: estimate of :func:`prompt_bytes` is not a bound, and the batch's masks, their post-processing
#: and the allocator's fragmentation need the rest.
AUTO_MEMORY_FRACTION = 0.5
#: Prompt-batch budget (MiB) where free memory is not measured (CPU and other devices).
DEFAULT_BATCH_MEMORY_MB = 1024


def has_sam(predictor) -> bool:
    """Whether ``predictor`` holds a segment-anything :class:`Sam` (the fast path applies)."""
    return isinstance(getattr(predictor, "model", None), Sam)


class StockNetworkPredictor:
    """A predictor seen through ``SamPredictor``'s interface only (no :class:`Sam` to reach):
    a generator given it takes the stock network path (``predict_torch``) instead of the fast
    decoder. For verifying the fast path against stock (tests, ``benchmarks/sam_masks.py``)."""

    def __init__(self, predictor):
        self.inner, self.transform, self.device = predictor, predictor.transform, predictor.device
        self.model = type("Model", (), {"mask_threshold": predictor.model.mask_threshold})()

    def set_image(self, image):
        self.inner.set_image(image)

    def reset_image(self):
        self.inner.reset_image()

    def predict_torch(self, *args, **kwargs):
        return self.inner.predict_torch(*args, **kwargs)


def prompt_bytes(sam: Sam, original_size: tuple[int, int]) -> int:
    """Estimated peak working memory of one prompt through :class:`PointDecoder`, in bytes.

    The larger of its two phases, in float32: the transformer, then (for a prompt whose slots all
    survive the IoU test) its image tokens, the output upscaling and the upsampling of its mask
    slots to ``original_size`` through SAM's square input size. ViT-B at 375x500: 34.1 MiB
    (measured about 20.4 MiB per prompt with every slot kept).
    """
    c = sam.prompt_encoder.embed_dim
    h, w = sam.prompt_encoder.image_embedding_size
    side = sam.image_encoder.img_size
    slots = sam.mask_decoder.num_multimask_outputs
    transformer = TRANSFORMER_TOKEN_TENSORS * h * w * c
    masks = (h * w * c + UPSCALING_TENSORS * (c // 8) * (4 * h) * (4 * w)
             + slots * (side * side + original_size[0] * original_size[1]))
    return 4 * max(transformer, masks)


def batch_memory_bytes(max_batch_memory_mb: float | str | None, device) -> int:
    """The working-memory budget of one prompt batch, in bytes.

    A number is a budget in MiB. ``None`` or ``"auto"``: on a CUDA device,
    :data:`AUTO_MEMORY_FRACTION` of the memory free for new tensors (the device's free memory
    plus what PyTorch's caching allocator holds unused), measured now, after the image encoder
    ran; elsewhere :data:`DEFAULT_BATCH_MEMORY_MB` (a CPU's free memory is shared with other
    processes and says little about what a batch may take).
    """
    if max_batch_memory_mb is not None and max_batch_memory_mb != "auto":
        if isinstance(max_batch_memory_mb, str) or max_batch_memory_mb <= 0:
            raise ValueError(f"max_batch_memory_mb must be a positive number of MiB, None or "
                             f"'auto', got {max_batch_memory_mb!r}")
        return int(max_batch_memory_mb * 2**20)
    device = torch.device(device)
    if device.type != "cuda":
        return DEFAULT_BATCH_MEMORY_MB * 2**20
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int((free + cached) * AUTO_MEMORY_FRACTION)


def prompts_per_batch(budget_bytes: int, sam: Sam, original_size: tuple[int, int],
                      limit: int) -> int:
    """The largest prompt batch whose working memory fits ``budget_bytes``, at most ``limit``,
    rounded down to a multiple of PROMPT_ALIGN (and at least that: the decoder's floor)."""
    n = min(int(limit), int(budget_bytes) // prompt_bytes(sam, original_size))
    return max(PROMPT_ALIGN, n - n % PROMPT_ALIGN)


def _linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)``, with few rows zero-padded to MIN_GEMM_ROWS (same kernel as a large batch)."""
    rows = x.numel() // x.shape[-1]
    if rows >= MIN_GEMM_ROWS:
        return layer(x)
    flat = x.reshape(rows, x.shape[-1])
    padded = torch.cat([flat, flat.new_zeros(MIN_GEMM_ROWS - rows, flat.shape[1])])
    return layer(padded)[:rows].reshape(*x.shape[:-1], -1)


def _mlp(mlp: nn.Module, x: Tensor) -> Tensor:
    """segment-anything's decoder MLP (ReLU between layers), row-padded like :func:`_linear`."""
    rows = x.shape[0]
    if rows < MIN_GEMM_ROWS:
        x = torch.cat([x, x.new_zeros(MIN_GEMM_ROWS - rows, x.shape[1])])
    for i, layer in enumerate(mlp.layers):
        x = F.relu(layer(x)) if i < mlp.num_layers - 1 else layer(x)
    if mlp.sigmoid_output:
        x = torch.sigmoid(x)
    return x[:rows]


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, N, C) -> (B, heads, N, C/heads), contiguous: the operand layout that stock's matmul
    copies to (so a batch of one takes the same bmm path as any other batch)."""
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2).contiguous()


def _heads_t(x: Tensor, num_heads: int) -> Tensor:
    """(B, N, C) -> (B, heads, C/heads, N) contiguous: stock's ``k.permute(0, 1, 3, 2)`` operand,
    in one copy."""
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).permute(0, 2, 3, 1).contiguous()


def _attend(attn: Attention, q: Tensor, k_t: Tensor, v: Tensor) -> Tensor:
    """Attention.forward after the input projections: q and v per head (B, h, N, c), k_t per
    head transposed (B, h, c, N); a batch of 1 is broadcast (a shared operand)."""
    b = max(q.shape[0], k_t.shape[0], v.shape[0])
    heads, n_q, c_per_head = q.shape[1], q.shape[2], q.shape[3]
    n_k = k_t.shape[3]
    q, k_t, v = (t.expand(b, *t.shape[1:]) for t in (q, k_t, v))
    scores = torch.bmm(q.reshape(b * heads, n_q, c_per_head),
                       k_t.reshape(b * heads, c_per_head, n_k))
    scores = scores.view(b, heads, n_q, n_k) / math.sqrt(c_per_head)
    scores = torch.softmax(scores, dim=-1)
    out = torch.bmm(scores.view(b * heads, n_q, n_k), v.reshape(b * heads, n_k, c_per_head))
    out = out.view(b, heads, n_q, c_per_head).transpose(1, 2).reshape(b, n_q, heads * c_per_head)
    return _linear(attn.out_proj, out)


def _attention(attn: Attention, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Attention.forward with row-padded projections."""
    h = attn.num_heads
    return _attend(attn, _heads(_linear(attn.q_proj, q), h), _heads_t(_linear(attn.k_proj, k), h),
                   _heads(_linear(attn.v_proj, v), h))


def _stock_strided_linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)`` for the first block's image tokens, which stock passes as a permuted view:
    nn.Linear then runs matmul and a separate bias add (not addmm) over a contiguous copy."""
    return torch.matmul(x.contiguous(), layer.weight.t()).add_(layer.bias)


class PointDecoder:
    """The mask decoder of a :class:`SamPredictor` whose image is set, for single-point prompts.

    Build one per set image (``PointDecoder(predictor)``), or one for several images encoded
    together (:meth:`of_images`: an image's crops); it holds the per-image shared tensors.
    :meth:`predict` gives what ``predict_torch(points, labels=1, multimask_output=True,
    return_logits=True)`` gives, restricted to the mask slots chosen by a callback that sees the
    predicted IoUs first; :meth:`predict_images` does it for prompts of several images in one
    batch, each image's the bits it gets alone.
    """

    def __init__(self, predictor) -> None:
        self._setup(predictor.model, [(predictor.features, predictor.input_size,
                                       predictor.original_size)])

    @classmethod
    def of_images(cls, sam: Sam, images) -> "PointDecoder":
        """A decoder for several images: ``images`` is a sequence of (image embedding (1, C, h,
        w), input size, original size), what ``set_image`` leaves in a predictor's ``features``,
        ``input_size`` and ``original_size`` (:func:`pipeline.sam.image_encoder.encode_crops`)."""
        decoder = cls.__new__(cls)
        decoder._setup(sam, list(images))
        return decoder

    def _setup(self, sam: Sam, images: list) -> None:
        self.sam = sam
        self.input_sizes = [tuple(size) for _, size, _ in images]
        self.original_sizes = [tuple(size) for _, _, size in images]
        self.input_size, self.original_size = self.input_sizes[0], self.original_sizes[0]
        features = images[0][0]
        self.device = features.device
        decoder = sam.mask_decoder
        self.decoder = decoder
        self.transformer = decoder.transformer
        _, c, h, w = features.shape
        self.embedding_shape = (c, h, w)

        # Stock: src = repeat(features) + dense "no mask" embedding, pos = repeat(dense PE); both
        # are the same for every prompt, so they are built once per image and broadcast.
        dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        pos = sam.prompt_encoder.get_dense_pe()
        self.key_pe = pos.flatten(2).permute(0, 2, 1)
        first = self.transformer.layers[0]
        heads = self.transformer.num_heads
        shared = []
        for features, _, _ in images:  # image by image: each the bits of a decoder of its own
            # (1, HW, C) permuted views, as in TwoWayTransformer.forward.
            keys0 = (features + dense).flatten(2).permute(0, 2, 1)
            k0 = keys0 + self.key_pe
            shared.append((
                keys0,
                _heads_t(_stock_strided_linear(first.cross_attn_token_to_image.k_proj, k0), heads),
                _heads(_stock_strided_linear(first.cross_attn_token_to_image.v_proj, keys0), heads),
                _heads(_stock_strided_linear(first.cross_attn_image_to_token.q_proj, k0), heads)))
        #: Per image: (1, ...) or, for several, (N, ...) stacks picked per prompt.
        self.keys0, self.first_t2i_k, self.first_t2i_v, self.first_i2t_q = (
            parts[0] if len(parts) == 1 else torch.cat(parts) for parts in zip(*shared))
        self.output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], 0)

    # -- network ----------------------------------------------------------------------------------
    def _sparse_embeddings(self, coords: Tensor) -> Tensor:
        """Prompt-encoder output for (B, 2) input-frame points, label 1, padded like stock."""
        b = coords.shape[0]
        # Its PE matmul has 2 rows per prompt: pad the batch (repeat the last point) to
        # MIN_GEMM_ROWS rows so that small batches round like large ones.
        n = max(b, -(-MIN_GEMM_ROWS // 2))
        padded = torch.cat([coords, coords[-1:].expand(n - b, 2)]) if n > b else coords
        labels = torch.ones(n, 1, dtype=torch.int, device=coords.device)
        sparse, _ = self.sam.prompt_encoder(points=(padded[:, None, :], labels), boxes=None,
                                            masks=None)
        return sparse[:b]

    def _transformer(self, tokens: Tensor, image: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """TwoWayTransformer.forward over B prompts: (queries (B, T, C), keys (B, HW, C)).
        ``image`` (B,): each prompt's image, for a decoder of several; None: the one image."""
        tr = self.transformer
        heads = tr.num_heads
        shared = (self.keys0, self.first_t2i_k, self.first_t2i_v, self.first_i2t_q)
        keys0, t2i_k, t2i_v, i2t_q = shared if image is None else (t[image] for t in shared)
        point_embedding = tokens
        queries = tokens
        keys = None
        for i, layer in enumerate(tr.layers):
            if layer.skip_first_layer_pe:
                queries = _attention(layer.self_attn, queries, queries, queries)
            else:
                q = queries + point_embedding
                queries = queries + _attention(layer.self_attn, q, q, queries)
            queries = layer.norm1(queries)

            q = queries + point_embedding
            if i == 0:
                # Image tokens are still the same for every prompt: reuse their projections.
                t2i = layer.cross_attn_token_to_image
                attn_out = _attend(t2i, _heads(_linear(t2i.q_proj, q), heads), t2i_k, t2i_v)
            else:
                k = keys + self.key_pe  # once per block: both cross attentions use it
                attn_out = _attention(layer.cross_attn_token_to_image, q, k, keys)
            queries = layer.norm2(queries + attn_out)

            mlp = layer.mlp
            queries = layer.norm3(queries + _linear(mlp.lin2, mlp.act(_linear(mlp.lin1, queries))))

            q = queries + point_embedding
            i2t = layer.cross_attn_image_to_token
            if i == 0:
                attn_out = _attend(i2t, i2t_q, _heads_t(_linear(i2t.k_proj, q), heads),
                                   _heads(_linear(i2t.v_proj, queries), heads))
                keys = keys0 + attn_out
            else:
                attn_out = _attention(i2t, k, q, queries)
                keys = keys + attn_out
            del attn_out
            keys = layer.norm4(keys)

        q = queries + point_embedding
        k = keys + self.key_pe
        queries = queries + _attention(tr.final_attn_token_to_image, q, k, keys)
        del k
        return tr.norm_final_attn(queries), keys

    def _upscaled_masks(self, keys: Tensor, mask_tokens: Tensor) -> Tensor:
        """Low-res logits (B, num_mask_tokens, 4h, 4w) of the chosen prompts (MaskDecoder)."""
        decoder = self.decoder
        c, h, w = self.embedding_shape
        b = keys.shape[0]
        # Stock's keys.transpose(1, 2).view(b, c, h, w), with the batch stride spelled out: for
        # one prompt, view() gives dim 0 another stride, the convolution then picks a
        # channels-first output and LayerNorm2d sums channels in another order.
        src = keys.contiguous().as_strided((b, c, h, w), (h * w * c, 1, w * c, c))
        upscaled = decoder.output_upscaling(src)
        hyper_in = torch.stack([_mlp(mlp, mask_tokens[:, i, :])
                                for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], 1)
        _, cu, hu, wu = upscaled.shape
        return (hyper_in @ upscaled.view(b, cu, hu * wu)).view(b, -1, hu, wu)

    def _to_image(self, low_res: Tensor, image: int = 0) -> Tensor:
        """Sam.postprocess_masks of (N, 4h, 4w) low-res logits -> (N, H, W).

        Stock upsamples (B, 3, 4h, 4w) (three multimask slots per prompt). With one torch
        thread, bilinear interpolation rounds differently for another channel count (measured:
        1, 2, 5 or 24 channels give other bits than 3), so the slots are upsampled three to a row,
        zero-padded to a multiple of three, whatever their prompts."""
        n, hl, wl = low_res.shape
        slots = self.decoder.num_multimask_outputs
        pad = -n % slots
        if pad:
            low_res = torch.cat([low_res, low_res.new_zeros(pad, hl, wl)])
        masks = self.sam.postprocess_masks(low_res.view(-1, slots, hl, wl),
                                           self.input_sizes[image], self.original_sizes[image])
        return masks.view(-1, *masks.shape[2:])[:n]

    @torch.no_grad()
    def predict(self, coords: Tensor, select: Callable[[Tensor], Tensor],
                ) -> tuple[Tensor, Tensor, Tensor]:
        """Predicted IoUs of every multimask slot, and image-size logits of the selected ones.

        ``coords`` (B, 2): one positive point per prompt, already in the model's input frame
        (``predictor.transform.apply_coords``). ``select`` maps the IoU predictions (B, S)
        (S = 3 multimask slots, float32) to a bool (B, S) of the slots whose masks are wanted.

        Returns ``iou`` (B, S) float32, ``index`` (K,) the selected slots as flat indices into
        ``iou.flatten()`` (point-major, level-minor, ascending), and ``logits`` (K, H, W) float32
        at the original image size, in the order of ``index``.
        """
        return self.predict_images([(0, coords)], select)[0]

    @torch.no_grad()
    def predict_images(self, groups, select: Callable[[Tensor], Tensor],
                       ) -> list[tuple[Tensor, Tensor, Tensor]]:
        """:meth:`predict` of several images' prompts in one batch.

        ``groups``: (image index, coords (n, 2) in that image's input frame) in batch order, each
        image at most once. Every group but the last is padded to a multiple of
        :data:`PROMPT_ALIGN` prompts (its last point repeated; the padding is never selected), so
        that each group starts where a batch of its own would put it and gets its bits (module
        docstring). Returns :meth:`predict`'s (iou, index, logits) per group, in order, the
        logits at that image's original size.
        """
        # No cast: like stock, the prompt encoder shifts and scales the (float64) coordinates
        # before it casts them to float32.
        parts, starts, sizes, valid = [], [], [], []
        for k, (_, coords) in enumerate(groups):
            coords = torch.as_tensor(coords).to(self.device)
            n = coords.shape[0]
            pad = 0 if k == len(groups) - 1 else -n % PROMPT_ALIGN
            starts.append(sum(len(p) for p in parts))
            sizes.append(n)
            parts.append(torch.cat([coords, coords[-1:].expand(pad, 2)]) if pad else coords)
            valid += [True] * n + [False] * pad
        coords = parts[0] if len(parts) == 1 else torch.cat(parts)
        images = [image for image, _ in groups]
        if len(groups) == 1:  # one image: its (1, ...) tensors, broadcast over the prompts
            image = None if self.keys0.shape[0] == 1 else slice(images[0], images[0] + 1)
        else:
            image = torch.tensor(np.repeat(images, [len(p) for p in parts]), device=self.device)
        b = coords.shape[0]
        sparse = self._sparse_embeddings(coords)
        tokens = torch.cat([self.output_tokens.unsqueeze(0).expand(b, -1, -1), sparse], dim=1)
        queries, keys = self._transformer(tokens, image)
        decoder = self.decoder
        multimask = slice(1, decoder.num_mask_tokens)
        iou = _mlp(decoder.iou_prediction_head, queries[:, 0, :])[:, multimask].float()
        chosen = select(iou).to(iou.device)
        if not all(valid):
            chosen &= torch.tensor(valid, device=iou.device)[:, None]
        index = torch.nonzero(chosen.flatten()).flatten()
        prompts = torch.nonzero(chosen.any(1)).flatten()
        n_slots = iou.shape[1]
        logits = None
        if len(index):
            mask_tokens = queries[:, 1:1 + decoder.num_mask_tokens, :]
            if len(prompts) < b:
                keys, mask_tokens = keys[prompts], mask_tokens[prompts]
            low_res = self._upscaled_masks(keys, mask_tokens)[:, multimask].float()
            del keys
            # Rows of low_res are the chosen prompts; pick their chosen slots in flat order.
            row = torch.searchsorted(prompts, torch.div(index, n_slots, rounding_mode="floor"))
            logits = low_res[row, index % n_slots]
        if len(groups) == 1:
            cuts = [0, len(index)]
        else:  # each group's selected slots: one sync for all groups
            bounds = torch.tensor([s * n_slots for s in starts[1:]], device=index.device)
            cuts = [0, *torch.searchsorted(index, bounds).tolist(), len(index)]
        out = []
        for k, image_k in enumerate(images):
            a, z = cuts[k], cuts[k + 1]
            iou_k = iou[starts[k]:starts[k] + sizes[k]]
            index_k = index[a:z] - starts[k] * n_slots if starts[k] else index[a:z]
            if a == z:
                out.append((iou_k, index_k, iou.new_zeros(0, *self.original_sizes[image_k])))
            else:
                out.append((iou_k, index_k, self._to_image(logits[a:z], image_k)))
        return out
