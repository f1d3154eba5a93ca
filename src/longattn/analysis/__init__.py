"""Attention analysis and calibration: entropy, sinks, head classes, retrieval scores,
attention pictures (:mod:`.stats`, :mod:`.retrieval`, :mod:`.pictures`, :mod:`.analyze`),
and calibration files for DuoAttention, LightTransfer and retrieval-head scores
(:mod:`.calibrate`). Nothing runs at import; matplotlib and transformers load on use."""

from .calibrate import (Calibration, CalibrationError, apply_calibration, calibrate_duo, calibrate_headkv,
                        calibrate_lighttransfer, load_calibration, save_calibration)
from .analyze import AnalysisResult, Prompt, analyze_model, needle_prompt, text_prompt, write_outputs
from .retrieval import NeedleSpan, argmax_keys, copy_paste_scores, locate_needle
from .stats import AnalysisConfig, LayerStats, Sink, classify_head, entropy, layer_attention_stats

__all__ = [
    "Calibration", "CalibrationError", "apply_calibration", "calibrate_duo", "calibrate_headkv",
    "calibrate_lighttransfer", "load_calibration", "save_calibration",
    "AnalysisConfig", "AnalysisResult", "LayerStats", "NeedleSpan", "Prompt", "Sink", "analyze_model",
    "argmax_keys", "classify_head", "copy_paste_scores", "entropy", "layer_attention_stats",
    "locate_needle", "needle_prompt", "text_prompt", "write_outputs",
]
