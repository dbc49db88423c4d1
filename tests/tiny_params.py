"""params.yaml as tests of the CLIP stages use it: the tiny random CLIP and the paper's VOC prompt
settings (the embedded default runs the trained demo CLIP with demo-tuned prompt settings, which
these tests do not depend on)."""

TINY_CLIP = {"model": "tiny", "checkpoint": None, "checkpoint_sha256": None, "attention_blocks": 8}
VOC_PROMPTS = {
    "cls": {"lr": 1e-3},
    "seg": {"lr": 1e-3, "shared_context": False, "class_position": "front", "background": "empty",
            "init_std": 0.0125, "init": "random"},
}
VOC_CAA = {"cls": {"caa": {"enabled": True}}, "seg": {"caa": {"enabled": True}}}


def use_tiny_clip(params: dict) -> dict:
    """``params`` (a loaded params.yaml) with the tiny CLIP, VOC's prompts and CAA on, in place."""
    params["clip"].update(TINY_CLIP)
    for which, values in VOC_PROMPTS.items():
        params["prompts"][which].update(values)
    for which, values in VOC_CAA.items():
        params["cams"][which]["caa"].update(values["caa"])
    return params


def tiny_graph_params(device: str, precision: str = "fp32", n_train: int = 4, workers: int = 1,
                      scheduler: str = "local", loader_workers: int | None = None) -> dict:
    """The repository's params.yaml shrunk to a whole graph that runs in minutes on the tiny
    random models: segment-anything's own classes at thresholds 0 (so masks reach the clean-up),
    a few images, 3 training steps. Used by the device-discipline tests and
    ``benchmarks/gpu_check.py``; ``loader_workers`` None keeps params.yaml's."""
    from pathlib import Path

    import yaml

    params = use_tiny_clip(yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text()))
    params["dataset"]["demo"] = {"n_train": n_train, "n_val": 2, "seed": 0}
    params["compute"] = {"scheduler": scheduler, "workers": workers, "device": device,
                         "precision": precision}
    params["sam"].update(model="tiny", checkpoint=None, points_per_side=4, points_per_batch=16,
                         crop_n_layers=1, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                         min_mask_region_area=20)
    params["clip_features"]["n_views"] = 2
    for which in ("cls", "seg"):
        params["prompts"][which].update(iterations=3, warmup_iterations=1, batch_size=2,
                                        checkpoint_every=2)
    params["prompts"]["seg"].update(init="cls", shared_context=True, class_position="end",
                                    background="names")
    params["segmenter"].update(model="tiny", encoder_weights=None, iterations=3, batch_size=2,
                               crop_size=64, val_every=2, checkpoint_every=2)
    if loader_workers is not None:
        params["segmenter"]["loader_workers"] = loader_workers
    params["predict"].update(scales=[1.0], flip=True, postprocess=True, alpha=1.0, alpha_sweep=[1.0])
    return params
