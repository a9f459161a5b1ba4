"""Learning rules: each fills ``.grad``; see :mod:`decorrelate.rules.base` for the protocol."""

from .align import AlignAda, AlignProp, AlignZero, LastLayer
from .backprop import Backprop
from .base import (
    LearningRule,
    StepOutput,
    available_rules,
    get_rule,
    register_options,
    register_rule,
    register_shorthand,
    rule_class,
    rule_options,
    shorthands,
)
from .feedback import DirectFeedbackAlignment, FeedbackAlignment
from .perturbation import ActivityNP, IterativeNP, NodePerturbation, RecordedNoise

__all__ = [
    "ActivityNP",
    "AlignAda",
    "AlignProp",
    "AlignZero",
    "Backprop",
    "DirectFeedbackAlignment",
    "FeedbackAlignment",
    "IterativeNP",
    "LastLayer",
    "LearningRule",
    "NodePerturbation",
    "RecordedNoise",
    "StepOutput",
    "available_rules",
    "get_rule",
    "register_options",
    "register_rule",
    "register_shorthand",
    "rule_class",
    "rule_options",
    "shorthands",
]
