"""The demo's model trainers: the tiny CLIP (:mod:`.clip`) and SAM (:mod:`.sam`) trained on the
procedural world, their held-out evaluation (:mod:`.evaluate`) and what a ``wsss demo-models`` run
needs around them (:mod:`.run`). Not run by any pipeline stage: they make the weights that
``clip.checkpoint`` and ``sam.checkpoint`` load like real checkpoints."""
