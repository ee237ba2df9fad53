"""The trials on Ray Tune: the only package that imports Ray (cluster, Tuner, trainable, evaluation,
and ``ray_internals``, the one module with private Ray names)."""
