"""Zero-shot classification and retrieval, feature extraction sharded over devices and hosts."""

from eva_clip_jax.evaluation.evaluators import RetrievalEvaluator, ZeroShotEvaluator, build_evaluators
from eva_clip_jax.evaluation.features import FeatureExtractor, data_mesh
from eva_clip_jax.evaluation.retrieval import retrieval_recall
from eva_clip_jax.evaluation.zero_shot import (evaluate_zero_shot, imagenet_metadata, topk_accuracy,
                                               zero_shot_classifier)

__all__ = ['FeatureExtractor', 'RetrievalEvaluator', 'ZeroShotEvaluator', 'build_evaluators', 'data_mesh',
           'evaluate_zero_shot', 'imagenet_metadata', 'retrieval_recall', 'topk_accuracy', 'zero_shot_classifier']
