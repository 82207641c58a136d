"""Stage 9, training: job configs (``config``), the attention model's loss and step
(``loop``), scale-labelled tiles (``samplers``, ``scale_tiles``), the teacher's
pseudo-labels (``pseudo_labels``) and the student's self-training (``self_training``).

May use: every stage below it (the extraction stage for the statistics inference fits).
"""
