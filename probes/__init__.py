"""Composable probes over cached activations of a :class:`vlm_lens.HookedVLM`.

Metrics (:mod:`vlm_lens.probes.metrics`) are pure functions; lenses (:mod:`vlm_lens.probes.lenses`) map residuals to logits; the
streaming pass (:mod:`vlm_lens.probes.lens_stats`) reduces every distribution statistic in one projection; probe classes return
:class:`ProbeResult` objects. Importing this package does not import transformers, TransformerLens or sklearn.
"""

from vlm_lens import moved
from vlm_lens.probes.ablation import TokenAblation
from vlm_lens.probes.base import PROBES, Probe, Source, as_source, register_probe
from vlm_lens.probes.geometry import CosineTrajectory, FeatureProjection, cross_image_cosine
from vlm_lens.probes.image_patch_lens import ImagePatchLens
from vlm_lens.probes.interventions import ActivationPatching, LayerSkip, patch_all_layers, skip_layer_hooks
from vlm_lens.probes.knockout import AttentionKnockout
from vlm_lens.probes.lens_probes import DistributionShift, LogitLensProbe, TokenTrajectory, TunedLensProbe
from vlm_lens.probes.lens_stats import LensStats, lens_pass
from vlm_lens.probes.lenses import Lens, LogitLens, TunedLens
from vlm_lens.probes.result import ProbeResult

__all__ = [
    "PROBES", "ActivationPatching", "AttentionKnockout", "CosineTrajectory", "DistributionShift", "FeatureProjection", "ImagePatchLens", "LayerSkip",
    "Lens", "LensStats", "LogitLens", "LogitLensProbe", "Probe", "ProbeResult", "Source", "TokenTrajectory",
    "TokenAblation", "TunedLens", "TunedLensProbe", "as_source", "cross_image_cosine", "lens_pass", "patch_all_layers",
    "register_probe", "skip_layer_hooks",
]  # fmt: skip

# module paths of 0.1 -> where they live now (importable, deprecated, for one release)
moved.install(__name__, {"lens": ("lenses",), "stream": ("lens_stats",)})
