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
