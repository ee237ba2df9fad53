"""covid_tune: reproducible, distributed sweeps of chest X-ray classifiers on Ray Tune."""

__version__ = "0.1.0"
