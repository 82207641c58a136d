"""Stage 8, evaluation: AJI, Dice, panoptic quality, object F1 and size ratios against
ground-truth instance labels (``metrics``); labels are read here only to score.

May use: ``common``.
"""
