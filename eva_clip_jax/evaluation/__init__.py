"""Zero-shot classification and retrieval on the training mesh; the paper's benchmark suite (Tables 1-4)."""

from eva_clip_jax.evaluation.evaluators import ContrastiveValEvaluator, DatasetEvaluator, build_evaluators
from eva_clip_jax.evaluation.features import BoundExtractor, FeatureExtractor, data_mesh
from eva_clip_jax.evaluation.retrieval import retrieval_recall, score_retrieval
from eva_clip_jax.evaluation.zero_shot import (classification_counts, imagenet_metadata, metrics_from_counts,
                                               score_zero_shot, topk_accuracy, zero_shot_classifier)

__all__ = ['BoundExtractor', 'ContrastiveValEvaluator', 'DatasetEvaluator', 'FeatureExtractor', 'build_evaluators',
           'classification_counts', 'data_mesh', 'imagenet_metadata', 'metrics_from_counts', 'retrieval_recall',
           'score_retrieval', 'score_zero_shot', 'topk_accuracy', 'zero_shot_classifier']
